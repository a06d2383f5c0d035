"""Evaluation of an on-policy run: sample on fixed prompts with a fixed key and report every
reward function's mean (a reward model, a task's hidden gold scorer, a verifier), the
per-sequence KL to the reference and the response length, under the glossary's names
(``rlhf_jax.metrics``): the numbers behind "gold reward against KL" plots.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import Tokenizer, decode_completions
from rlhf_jax.models import Model, score_completions
from rlhf_jax.ops.kl import kl_k1
from rlhf_jax.parallel import fetch
from rlhf_jax.rewards import RewardFn, call_reward_fns, nan_means
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.types import PromptBatch


class RolloutEval:
    """Sample on fixed prompts with a fixed key; report reward means, KL to the reference and
    length. Compiles one sampler and one scorer shape."""

    def __init__(self, *, policy: Model, reference: Model, ref_params, tokenizer: Tokenizer,
                 prompts: PromptBatch, rows: list[dict], sampling: SamplingConfig,
                 reward_fns: Mapping[str, RewardFn], device_rewards: Callable | None = None,
                 seed: int = 0, time_limit: float | None = None):
        self.tokenizer, self.rows, self.prompts = tokenizer, rows, prompts
        self.time_limit = time_limit
        self.reward_fns, self.device_rewards = dict(reward_fns), device_rewards
        self.key = jax.random.PRNGKey(seed + 7919)
        self._sample = make_sampler(policy, sampling)
        temp = sampling.temperature or 1.0

        @jax.jit
        def kl(params, ref, prompt, pmask, comp, cmask):
            lp = score_completions(policy, params, prompt, pmask, comp, cmask,
                                   temperature=temp).logprobs
            lr = score_completions(reference, ref, prompt, pmask, comp, cmask,
                                   temperature=temp).logprobs
            return jnp.sum(jnp.where(cmask, kl_k1(lp, lr), 0.0), axis=-1)

        self._kl, self._ref = kl, ref_params

    def samples(self, params) -> tuple[list[str], list[str], object]:
        """``(prompts, completion texts, SampleOutput)`` of ``params`` on the eval prompts."""
        out = self._sample(params, self.prompts.tokens, self.prompts.mask, self.key)
        texts = decode_completions(self.tokenizer, *fetch((out.tokens, out.mask)))
        return [r["prompt"] for r in self.rows], texts, out

    def __call__(self, params) -> dict[str, float]:
        prompts, texts, out = self.samples(params)
        columns = {k: [r.get(k) for r in self.rows] for k in self.rows[0] if k != "prompt"}
        scores = nan_means(call_reward_fns(self.reward_fns, prompts, texts, columns,
                                           time_limit=self.time_limit))
        args = (out.prompt_tokens, out.prompt_mask, out.tokens, out.mask)
        if self.device_rewards is not None:
            scores["reward_model"] = float(np.mean(fetch(self.device_rewards(*args))))
        kl = fetch(self._kl(params, self._ref, *args))
        row = {f"rewards/{k}": v for k, v in scores.items()}
        row |= {"kl": float(kl.mean()),
                "response_length": float(fetch(out.mask).sum(-1).mean()),
                "truncated_frac": float(fetch(out.truncated).mean())}
        return row


__all__ = ["RolloutEval"]
