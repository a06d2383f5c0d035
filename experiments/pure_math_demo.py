"""Demo of the pure RLHF math on a toy batch: ``python -m experiments.pure_math_demo``.

The notebook view of ``rlhf_jax.losses`` (the main job is ``experiments.rlhf_pipeline``). It
draws a toy policy / old-policy / reference as random logits, samples completions, and runs
every stage's loss on them, printing one table row per function (value = ``loss_sum / count``
plus a headline metric). Everything here is a pure function call: the same calls work in a
notebook.

Override fields on the command line: ``python -m experiments.pure_math_demo --seed 3 --batch 16``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from rlhf_jax import losses as L
from rlhf_jax import ops as O


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    seed: int = 0
    """PRNG seed for the toy batch."""
    batch: int = 8
    """Completions in the batch (a multiple of ``group_size``)."""
    group_size: int = 4
    """Completions per prompt for the group baselines (>= 2)."""
    length: int = 16
    """Completion length in tokens."""
    vocab: int = 32
    """Toy vocabulary size; token 0 is EOS."""
    beta: float = 0.1
    """DPO beta and KL coefficient."""

    def __post_init__(self):
        if self.group_size < 2 or self.batch % self.group_size:
            raise ValueError("batch must be a multiple of group_size >= 2")
        if min(self.batch, self.length, self.vocab) < 2:
            raise ValueError("batch, length and vocab must be >= 2")


def get_config() -> DemoConfig:
    return DemoConfig()


def _toy_batch(cfg: DemoConfig):
    k = jax.random.split(jax.random.PRNGKey(cfg.seed), 5)
    shape = (cfg.batch, cfg.length, cfg.vocab)
    logits = jax.random.normal(k[0], shape) * 2.0
    old_logits = logits + 0.3 * jax.random.normal(k[1], shape)
    ref_logits = logits + 0.5 * jax.random.normal(k[2], shape)
    tokens = jax.random.categorical(k[3], old_logits)  # sampled by the old policy
    mask = O.completion_mask_from_eos(tokens, eos_ids=0)
    rewards = jax.random.bernoulli(k[4], 0.5, (cfg.batch,)).astype(jnp.float32)
    return logits, old_logits, ref_logits, tokens, mask, rewards


def run(cfg: DemoConfig) -> list[tuple[str, float, str]]:
    """Compute every loss on the toy batch; returns and prints ``(name, value, metric)`` rows."""
    logits, old_logits, ref_logits, tokens, mask, rewards = _toy_batch(cfg)
    logp = O.token_logprobs(logits, tokens)
    old_logp = O.token_logprobs(old_logits, tokens)
    ref_logp = O.token_logprobs(ref_logits, tokens)
    entropy = O.entropy_from_logits(logits)
    values = 0.1 * logp
    token_rewards = -cfg.beta * O.kl_k1(old_logp, ref_logp)
    last = O.last_token_index(mask)
    token_rewards = token_rewards.at[jnp.arange(cfg.batch), last].add(rewards)
    adv, returns = O.gae_advantages(token_rewards, values, mask, gamma=1.0, lam=0.95)
    g = cfg.group_size
    seq_logp = O.masked_sum(logp, mask, axis=-1)
    seq_ref = O.masked_sum(ref_logp, mask, axis=-1)
    lengths = O.masked_count(mask, axis=-1)
    half = cfg.batch // 2
    pref = (seq_logp[:half], seq_logp[half:], seq_ref[:half], seq_ref[half:])

    def row(name, out, metric):
        total, count, metrics = out
        return name, float(O.safe_divide(total, count)), metric, O.compute_metrics(metrics)

    rows = [
        row("sft_loss", L.sft_loss(logp, mask), "nll"),
        row("bradley_terry_loss", L.bradley_terry_loss(seq_logp[:half], seq_logp[half:]),
            "rewards/accuracy"),
        row("ppo_policy_loss", L.ppo_policy_loss(logp, old_logp, adv, mask), "clip_frac"),
        row("value_loss", L.value_loss(values, values, returns, mask), "explained_variance"),
        row("entropy_bonus", L.entropy_bonus(entropy, mask, coef=0.01), "entropy"),
        row("grpo_loss (GRPO)", L.grpo_loss(
            logp, old_logp, O.group_advantages(rewards, group_size=g), mask, ref_logp=ref_logp,
            kl_coef=cfg.beta), "kl"),
        row("grpo_loss (Dr.GRPO)", L.grpo_loss(
            logp, old_logp, O.group_advantages(rewards, group_size=g, scale_by_std=False), mask,
            aggregation="seq_mean_token_sum_norm"), "approx_kl"),
        row("grpo_loss (RLOO adv)", L.grpo_loss(
            logp, old_logp, O.rloo_advantages(rewards, group_size=g), mask), "ratio_mean"),
        row("gspo_loss", L.gspo_loss(logp, old_logp, O.group_advantages(rewards, group_size=g),
                                     mask), "clip_frac"),
        row("dpo_loss", L.dpo_loss(*pref, beta=cfg.beta), "rewards/accuracy"),
        row("ipo_loss", L.ipo_loss(*pref, beta=cfg.beta), "rewards/margin"),
        row("cdpo_loss", L.cdpo_loss(*pref, beta=cfg.beta), "rewards/accuracy"),
        row("robust_dpo_loss", L.robust_dpo_loss(*pref, beta=cfg.beta), "rewards/accuracy"),
        row("simpo_loss", L.simpo_loss(seq_logp[:half], seq_logp[half:], lengths[:half],
                                       lengths[half:]), "rewards/margin"),
        row("orpo_loss", L.orpo_loss(seq_logp[:half], seq_logp[half:], lengths[:half],
                                     lengths[half:]), "log_odds_ratio"),
        row("forward_kl_distill_loss", L.forward_kl_distill_loss(logits, ref_logits, mask),
            "forward_kl"),
        row("reverse_kl_distill_loss", L.reverse_kl_distill_loss(logits, ref_logits, mask),
            "reverse_kl"),
        row("jsd_distill_loss", L.jsd_distill_loss(logits, ref_logits, mask), "jsd"),
    ]
    print(f"toy batch: {cfg.batch} completions x {cfg.length} tokens, vocab {cfg.vocab}, "
          f"{int(mask.sum())} completion tokens, mean reward {float(rewards.mean()):.2f}")
    print(f"{'function':<26}{'loss':>12}  headline metric")
    print("-" * 64)
    out = []
    for name, value, metric, computed in rows:
        print(f"{name:<26}{value:>12.5f}  {metric} = {float(computed[metric]):.5f}")
        out.append((name, value, metric))
    kl = {k: float(O.masked_mean(O.KL_ESTIMATORS[k](logp, ref_logp), mask))
          for k in O.KL_ESTIMATORS}
    print("KL(pi || pi_ref) estimators: " + ", ".join(f"{k}={v:.4f}" for k, v in kl.items()))
    print(f"exact token-mean KL(pi || pi_ref): "
          f"{float(O.masked_mean(O.kl_from_logits(logits, ref_logits), mask)):.4f}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(DemoConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    cfg = DemoConfig(**vars(parser.parse_args(argv)))
    start = time.perf_counter()
    run(cfg)
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
