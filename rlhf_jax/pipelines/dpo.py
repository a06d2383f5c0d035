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

from rlhf_jax.data import BatchIterator
from rlhf_jax.losses import DPO_LOSSES, REFERENCE_FREE_LOSSES
from rlhf_jax.models import sequence_logprob_sums
from rlhf_jax.parallel import batch_sharding, fetch
from rlhf_jax.pipelines.config import (ModelSpec, OptimizerConfig, SupervisedConfig,
                                       refuse_packing)
from rlhf_jax.pipelines.datasets import fixed_batches, load_pairs, row_length
from rlhf_jax.pipelines.run_dir import prepare_run_dir
from rlhf_jax.pipelines.setup import (base_generation, check_length_fits, load_model,
                                      make_mesh, model_shardings, place, with_adapter)
from rlhf_jax.pipelines.supervised import run_supervised, supervised_inputs
from rlhf_jax.train.supervised import SupervisedTask

LOSSES = {**DPO_LOSSES, **REFERENCE_FREE_LOSSES}
"""Loss name -> pure loss function."""

HYPERPARAMETERS = {"sigmoid": {"beta": "beta"}, "ipo": {"beta": "beta"},
                   "cdpo": {"beta": "beta", "label_smoothing": "label_smoothing"},
                   "robust": {"beta": "beta", "label_smoothing": "label_smoothing"},
                   "simpo": {"beta": "beta", "gamma": "simpo_margin"},
                   "orpo": {"lam": "orpo_weight"}}
"""Loss name -> {the loss's keyword: the ``DPOAlgorithmConfig`` field that supplies it}."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOAlgorithmConfig:
    """Which preference loss, and its hyperparameters."""

    loss: str = "sigmoid"
    """A key of ``LOSSES``: sigmoid (DPO), cdpo, robust, ipo, simpo, orpo."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward (all but ORPO)."""
    label_smoothing: float = 0.1
    """Assumed label-noise rate (cDPO, robust DPO)."""
    simpo_margin: float = 0.5
    """SimPO's target reward margin (gamma in the paper)."""
    orpo_weight: float = 0.1
    """ORPO's odds-ratio weight (lambda in the paper)."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"algorithm.loss must be one of {sorted(LOSSES)}, got "
                             f"{self.loss!r}")
        if "beta" in HYPERPARAMETERS[self.loss].values() and not self.beta > 0:
            raise ValueError(f"algorithm.beta must be > 0, got {self.beta}")
        top = 0.5 if self.loss == "cdpo" else 0.4999999  # robust DPO divides by 1 - 2e
        if not 0 <= self.label_smoothing <= top:
            raise ValueError(f"algorithm.label_smoothing must be in [0, 0.5"
                             f"{']' if self.loss == 'cdpo' else ')'}, got "
                             f"{self.label_smoothing}")

    def hyperparameters(self) -> dict:
        """The chosen loss's keyword arguments."""
        return {kw: getattr(self, field) for kw, field in HYPERPARAMETERS[self.loss].items()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(SupervisedConfig):
    """Preference fine-tuning on JSONL ``prompt``/``chosen``/``rejected`` pairs."""

    policy: ModelSpec
    """Usually the SFT model; also the reference unless ``reference`` is given."""
    reference: ModelSpec | None = None
    """Frozen reference (default: the initial policy); unused by SimPO and ORPO."""
    algorithm: DPOAlgorithmConfig = DPOAlgorithmConfig()
    """The loss and its hyperparameters."""
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-6, warmup_steps=10)
    """AdamW and its learning-rate schedule (its length is ``loop.total_steps``)."""

    def __post_init__(self):
        super().__post_init__()
        refuse_packing(self.data)


def reference_logps(model, params, pairs, batch_size: int,
                    mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """``log pi_ref(y_w | x)`` and ``log pi_ref(y_l | x)`` for every pair, in fixed batches
    (the last partial batch padded by repetition and cut off), chosen and rejected in one
    forward pass exactly as the train step scores the policy: at step 1, where the policy is the
    reference, the implicit reward margin is then exactly 0 on any mesh. With ``mesh`` the
    reference is placed by its family's sharding rules and each batch split over
    ``data x fsdp``."""
    @jax.jit
    def fn(p, pair):  # chosen and rejected in one batch, as the train step scores the policy
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), pair.chosen, pair.rejected)
        logps = sequence_logprob_sums(model, p, both)[0]
        return logps[:batch_size], logps[batch_size:]

    params = place(params, model_shardings(mesh, model.config, params))
    rows = None if mesh is None else batch_sharding(mesh)
    n = pairs.chosen.tokens.shape[0]
    out_c, out_r = [], []
    for s in range(0, n, batch_size):
        idx = np.arange(s, s + batch_size) % n
        c, r = fetch(fn(params, place(jax.tree.map(lambda x: np.asarray(x)[idx], pairs), rows)))
        out_c.append(c)
        out_r.append(r)
    return np.concatenate(out_c)[:n], np.concatenate(out_r)[:n]


def make_dpo_loss(model, algorithm: DPOAlgorithmConfig):
    """``loss_fn(params, (pairs, ref_chosen, ref_rejected), key)`` for the trainer."""
    fn, hyper = LOSSES[algorithm.loss], algorithm.hyperparameters()
    reference_free = algorithm.loss in REFERENCE_FREE_LOSSES

    def loss_fn(params, batch, key):
        pairs, ref_c, ref_r = batch
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), pairs.chosen, pairs.rejected)
        logps, lengths = sequence_logprob_sums(model, params, both)
        n = ref_c.shape[0]
        live = jnp.any(pairs.chosen.loss_mask, -1)  # evaluation's filler pairs have none
        if reference_free:
            return fn(logps[:n], logps[n:], lengths[:n], lengths[n:], pair_mask=live, **hyper)
        return fn(logps[:n], logps[n:], ref_c, ref_r, pair_mask=live, **hyper)

    return loss_fn


def run(cfg: DPOConfig) -> dict:
    """Train the policy on preferences; returns final metrics and paths."""
    tokenizer, train, evals, report = supervised_inputs(
        cfg, load_pairs, "policy", cfg.policy, others={"reference": cfg.reference})
    generation = base_generation(cfg.policy)
    b = cfg.data.batch_size
    # Size checks before the models are built or anything compiled (the reference log-probs
    # travel with the data, so the iterator itself is built after them).
    BatchIterator(train, batch_size=b, seed=cfg.seed)
    mesh = make_mesh(cfg.mesh, b)
    v = tokenizer.vocab_size
    model, params = load_model(cfg.policy, heads=("lm",), vocab_size=v, seed=cfg.seed)
    check_length_fits({"policy": model.config}, row_length(train, evals))
    base = (model, params)  # the reference by default; with LoRA, the base with the adapter off
    model, params, adapted = with_adapter(cfg.policy, model, params, seed=cfg.seed)
    if adapted is not None:
        ref_model, params_of = adapted.reference
        base = (ref_model, params_of(adapted.base))
    # after every check above: a start refused for its config or data writes nothing
    run_dir = prepare_run_dir(cfg, cfg.output_dir)

    def with_ref(pairs):
        n = pairs.chosen.tokens.shape[0]
        if cfg.algorithm.loss in REFERENCE_FREE_LOSSES:
            return pairs, np.zeros(n, np.float32), np.zeros(n, np.float32)
        ref_model, ref_params = base if cfg.reference is None else load_model(
            cfg.reference, heads=("lm",), vocab_size=v, seed=cfg.seed, frozen="reference")
        return (pairs, *reference_logps(ref_model, ref_params, pairs, b, mesh))

    task = SupervisedTask(
        loss_fn=make_dpo_loss(model, cfg.algorithm),
        data=BatchIterator(with_ref(train), batch_size=b, seed=cfg.seed),
        eval_batches=fixed_batches(with_ref(evals), b) if evals is not None else None,
        postfix=("loss", "rewards/accuracy"))
    return run_supervised(cfg, task, run_dir=run_dir, model=model, params=params,
                          tokenizer=tokenizer, mesh=mesh, generation=generation, data_report=report,
                          adapted=adapted)


if __name__ == "__main__":  # python -m rlhf_jax.pipelines.dpo is `rlhf-jax dpo`
    import sys

    from rlhf_jax.cli import main

    sys.exit(main(["dpo", *sys.argv[1:]]))
