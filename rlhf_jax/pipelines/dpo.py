"""Direct preference optimisation and its family, no reward model and no sampling (Rafailov et
al. 2023; Azar et al. 2023; Chowdhury et al. 2024; Meng et al. 2024; Hong et al. 2024).

The reference policy's sequence log-probs ``log pi_ref(y | x)`` of every chosen and rejected
response are computed **once, up front**, in fixed batches, and travel with the data; each
training step then needs only the policy's forward pass (chosen and rejected in one batch).
The loss is a row of ``LOSSES``: the reference-based ones from ``losses.DPO_LOSSES`` and the
reference-free SimPO and ORPO from ``losses.REFERENCE_FREE_LOSSES`` (which skip the reference
pass entirely).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import BatchIterator, Tokenizer
from rlhf_jax.losses import DPO_LOSSES, REFERENCE_FREE_LOSSES
from rlhf_jax.models import sequence_logprob_sums
from rlhf_jax.parallel import MeshConfig, batch_sharding, fetch
from rlhf_jax.pipelines.common import (ModelSpec, fit, fixed_batches, load_model, load_pairs,
                                       make_mesh, model_shardings, place,
                                       prepare_run_dir)
from rlhf_jax.train import LoopConfig, OptimizerConfig

LOSSES = {**DPO_LOSSES, **REFERENCE_FREE_LOSSES}
"""Loss name -> pure loss function."""

_HYPER = {"sigmoid": ("beta",), "ipo": ("beta",), "cdpo": ("beta", "label_smoothing"),
          "robust": ("beta", "label_smoothing"), "simpo": ("beta", "gamma"), "orpo": ("lam",)}
"""Which config fields each loss takes as its keyword hyperparameters."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """Preference fine-tuning on JSONL ``prompt``/``chosen``/``rejected`` pairs."""

    train_data: str
    tokenizer: str
    policy: ModelSpec
    """Usually the SFT model; also the reference unless ``reference`` is given."""
    reference: ModelSpec | None = None
    output_dir: str = "runs/dpo"
    eval_data: str | None = None
    loss: str = "sigmoid"
    """A key of ``LOSSES``: sigmoid (DPO), cdpo, robust, ipo, simpo, orpo."""
    beta: float = 0.1
    label_smoothing: float = 0.1
    gamma: float = 0.5
    """SimPO's target margin."""
    lam: float = 0.1
    """ORPO's odds-ratio weight."""
    max_prompt_length: int = 24
    max_length: int = 48
    batch_size: int = 32
    micro_batches: int = 1
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4, warmup_steps=10,
                                                 total_steps=200)
    loop: LoopConfig = LoopConfig(total_steps=200, log_every=10, eval_every=100,
                                  save_every=100)
    on_overflow: str = "truncate"
    skip_invalid: bool = False
    mesh: MeshConfig | None = MeshConfig()
    """Devices per ``data``/``fsdp``/``tensor`` axis (``parallel.MeshConfig``; default: every
    device data-parallel); None runs on one device. Not part of the run's identity: a run
    resumes on another mesh."""
    seed: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by micro_batches "
                             f"{self.micro_batches}")


def reference_logps(model, params, pairs, batch_size: int,
                    mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """``log pi_ref(y_w | x)`` and ``log pi_ref(y_l | x)`` for every pair, in fixed batches
    (the last partial batch padded by repetition and cut off). With ``mesh`` the reference is
    placed by its family's sharding rules and each batch split over ``data x fsdp``."""
    fn = jax.jit(lambda p, b: sequence_logprob_sums(model, p, b)[0])
    params = place(params, model_shardings(mesh, model.config, params))
    rows = None if mesh is None else batch_sharding(mesh)
    n = pairs.chosen.tokens.shape[0]
    out_c, out_r = [], []
    for s in range(0, n, batch_size):
        idx = np.arange(s, s + batch_size) % n
        sub = place(jax.tree.map(lambda x: np.asarray(x)[idx], pairs), rows)
        out_c.append(fetch(fn(params, sub.chosen)))
        out_r.append(fetch(fn(params, sub.rejected)))
    return np.concatenate(out_c)[:n], np.concatenate(out_r)[:n]


def make_dpo_loss(model, cfg: DPOConfig):
    """``loss_fn(params, (pairs, ref_chosen, ref_rejected), key)`` for the trainer."""
    fn = LOSSES[cfg.loss]
    hyper = {k: getattr(cfg, k) for k in _HYPER[cfg.loss]}

    def loss_fn(params, batch, key):
        pairs, ref_c, ref_r = batch
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), pairs.chosen, pairs.rejected)
        logps, lengths = sequence_logprob_sums(model, params, both)
        n = ref_c.shape[0]
        if cfg.loss in REFERENCE_FREE_LOSSES:
            return fn(logps[:n], logps[n:], lengths[:n], lengths[n:], **hyper)
        return fn(logps[:n], logps[n:], ref_c, ref_r, **hyper)

    return loss_fn


def run(cfg: DPOConfig) -> dict:
    """Train the policy on preferences; returns final metrics and paths."""
    run_dir = prepare_run_dir(cfg, cfg.output_dir)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    train = load_pairs(cfg.train_data, cfg, tokenizer)
    evals = load_pairs(cfg.eval_data, cfg, tokenizer) if cfg.eval_data else None
    # Size checks before the models are built or anything compiled (the reference log-probs
    # travel with the data, so the iterator itself is built after them).
    BatchIterator(train, batch_size=cfg.batch_size, seed=cfg.seed)
    if evals is not None:
        fixed_batches(evals, cfg.batch_size)
    mesh = make_mesh(cfg.mesh, cfg.batch_size)
    v = tokenizer.vocab_size
    model, params = load_model(cfg.policy, heads=("lm",), vocab_size=v, seed=cfg.seed)

    def with_ref(pairs):
        n = pairs.chosen.tokens.shape[0]
        if cfg.loss in REFERENCE_FREE_LOSSES:
            return pairs, np.zeros(n, np.float32), np.zeros(n, np.float32)
        ref_model, ref_params = (model, params) if cfg.reference is None else load_model(
            cfg.reference, heads=("lm",), vocab_size=v, seed=cfg.seed)
        return (pairs, *reference_logps(ref_model, ref_params, pairs, cfg.batch_size, mesh))

    return fit(cfg, run_dir=run_dir, tokenizer=tokenizer, model=model, params=params,
               loss_fn=make_dpo_loss(model, cfg),
               data=BatchIterator(with_ref(train), batch_size=cfg.batch_size, seed=cfg.seed),
               eval_batches=(fixed_batches(with_ref(evals), cfg.batch_size)
                             if evals is not None else None),
               mesh=mesh, postfix=("loss", "rewards/accuracy"))
