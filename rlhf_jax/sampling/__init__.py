"""Jitted, KV-cached sampling from a ``models.Model``."""

from rlhf_jax.sampling.sampler import (
    SampleOutput,
    SamplingConfig,
    PAD_BUCKETS,
    bucket_length,
    filter_logits,
    inverse_cdf_sample,
    make_sampler,
    pad_prompts,
)

__all__ = ["PAD_BUCKETS", "SampleOutput", "SamplingConfig", "bucket_length", "filter_logits",
           "inverse_cdf_sample", "make_sampler", "pad_prompts"]
