"""Shared pieces of the on-policy pipelines (PPO, GRPO): prompt data, sampling, evaluation.

``RolloutEval`` samples completions for a fixed set of evaluation prompts with a fixed key and
reports the mean of every reward function it is given (a reward model, the hidden gold scorer
of an embedded task, a verifier) plus the sequence KL to the reference policy and the response
length: the numbers behind "gold reward against KL" plots.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import Tokenizer, encode_prompts, load_jsonl, prompt_batch
from rlhf_jax.models import Model, score_completions
from rlhf_jax.pipelines.common import report_skipped
from rlhf_jax.ops.kl import kl_k1
from rlhf_jax.parallel import fetch
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.types import PromptBatch

RewardFn = Callable[..., Sequence[float]]
"""TRL-style reward function: ``fn(prompts=[...], completions=[...], **columns) -> floats``."""


def load_prompts(path: str, tokenizer: Tokenizer, *, max_prompt_length: int,
                 skip_invalid: bool = False, on_overflow: str = "error"
                 ) -> tuple[PromptBatch, list[dict]]:
    """Prompt-only JSONL (``prompt`` plus any extra columns) as a left-padded ``PromptBatch``
    of width ``max_prompt_length``, and the rows (reward functions get their extra columns).
    A prompt longer than ``max_prompt_length`` is an error naming its line, or with
    ``on_overflow="skip"`` is left out (with its row); skipped rows are reported on stderr."""
    ds = load_jsonl(path, fmt="prompt", skip_invalid=skip_invalid)
    enc = encode_prompts(ds, tokenizer, max_prompt_length=max_prompt_length,
                         on_overflow=on_overflow)
    report_skipped(path, ds.skipped, enc.skipped)
    batch = prompt_batch(enc.items, length=max_prompt_length, pad_id=tokenizer.pad_id)
    return batch, [ds.rows[i] for i in enc.kept]


def call_reward_fns(fns: Mapping[str, RewardFn], prompts: list[str], completions: list[str],
                    columns: Mapping[str, list]) -> dict[str, np.ndarray]:
    """Run each reward function on decoded text; a function's failure names the function."""
    out = {}
    for name, fn in fns.items():
        try:
            vals = np.asarray(fn(prompts=prompts, completions=completions, **columns), np.float32)
        except Exception as e:  # noqa: BLE001 - re-raised with the function's name
            raise RuntimeError(f"reward function {name!r} failed: {e}") from e
        if vals.shape != (len(completions),):
            raise ValueError(f"reward function {name!r} returned shape {vals.shape}, expected "
                             f"({len(completions)},)")
        out[name] = vals
    return out


def decode_completions(tokenizer: Tokenizer, tokens, mask) -> list[str]:
    """Completion text up to (excluding) the EOS."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    eos = set(tokenizer.eos_ids)
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m and int(t) not in eos])
            for row, mrow in zip(tokens, mask)]


class RolloutEval:
    """Sample on fixed prompts with a fixed key; report reward means, KL to the reference and
    length. Compiles one sampler and one scorer shape."""

    def __init__(self, *, policy: Model, reference: Model, ref_params, tokenizer: Tokenizer,
                 prompts: PromptBatch, rows: list[dict], sampling: SamplingConfig,
                 reward_fns: Mapping[str, RewardFn], device_rewards: Callable | None = None,
                 seed: int = 0):
        self.tokenizer, self.rows, self.prompts = tokenizer, rows, prompts
        self.reward_fns, self.device_rewards = dict(reward_fns), device_rewards
        self.key = jax.random.PRNGKey(seed + 7919)
        self._sample = make_sampler(policy, sampling)
        temp = sampling.temperature or 1.0

        def kl(params, ref_params, prompt, pmask, comp, cmask):
            lp = score_completions(policy, params, prompt, pmask, comp, cmask,
                                   temperature=temp).logprobs
            ref = score_completions(reference, ref_params, prompt, pmask, comp, cmask,
                                    temperature=temp).logprobs
            return jnp.sum(jnp.where(cmask, kl_k1(lp, ref), 0.0), axis=-1)

        self._kl = functools.partial(jax.jit(kl), ref_params=ref_params)

    def samples(self, params) -> tuple[list[str], list[str], object]:
        out = self._sample(params, self.prompts.tokens, self.prompts.mask, self.key)
        texts = decode_completions(self.tokenizer, *fetch((out.tokens, out.mask)))
        return [r["prompt"] for r in self.rows], texts, out

    def __call__(self, params) -> dict[str, float]:
        prompts, texts, out = self.samples(params)
        columns = {k: [r.get(k) for r in self.rows] for k in self.rows[0] if k != "prompt"}
        scores = call_reward_fns(self.reward_fns, prompts, texts, columns)
        if self.device_rewards is not None:
            scores["reward_model"] = fetch(self.device_rewards(
                out.prompt_tokens, out.prompt_mask, out.tokens, out.mask))
        kl = fetch(self._kl(params, prompt=out.prompt_tokens, pmask=out.prompt_mask,
                            comp=out.tokens, cmask=out.mask))
        row = {f"reward/{k}": float(v.mean()) for k, v in scores.items()}
        row |= {"kl_to_ref": float(kl.mean()),
                "response_length": float(fetch(out.mask).sum(-1).mean()),
                "truncated_frac": float(fetch(out.truncated).mean())}
        return row
