"""The one supervised path: SFT, reward modelling, DPO and distillation differ only in their
``SupervisedTask`` (a loss, the data, optionally frozen arrays such as a teacher); building the
optimizer, the state, the jitted train and eval steps, placing them on the mesh and running the
loop is written once, here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from rlhf_jax.ops.stats import compute_metrics, merge_metrics
from rlhf_jax.parallel import put, replicated
from rlhf_jax.train.adapters import Adapted, lora_loss
from rlhf_jax.train.loop import train_loop
from rlhf_jax.train.optim import make_optimizer, make_schedule
from rlhf_jax.train.state import create_train_state, state_shardings
from rlhf_jax.train.step import make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True, kw_only=True)
class SupervisedTask:
    """What one supervised stage trains on and how it is scored."""

    loss_fn: Callable
    """``loss_fn(params, batch, key[, frozen]) -> (loss_sum, count, metric accumulators)``."""
    data: Any
    """The training batches: a resumable iterator (``data.BatchIterator``)."""
    eval_batches: list | None = None
    """Fixed evaluation batches (None: no evaluation)."""
    frozen: Any = None
    """Arrays the loss reads but never trains (a distillation teacher), passed to the step."""
    frozen_shardings: Any = None
    """Where ``frozen`` lives on the mesh (default: replicated)."""
    tokens_in: Callable[[Any], int] | None = None
    """Tokens of a batch, for the ``tokens_per_s`` metric."""
    eval_post: Callable[[dict], dict] | None = None
    """Turns the exact eval means into the logged figures (e.g. a std from two means)."""
    postfix: tuple[str, ...] = ("loss",)
    """Training metrics shown on the progress bar."""


def evaluate(eval_step: Callable, params, batches: list, key) -> dict[str, float]:
    """Exact means over ``batches``: loss sums and metric accumulators merged, divided once."""
    total, count, acc = 0.0, 0.0, None
    for i, batch in enumerate(batches):
        t, c, m = eval_step(params, batch, jax.random.fold_in(key, i))
        total, count = total + t, count + c
        acc = m if acc is None else merge_metrics(acc, m)
    out = {k: float(v) for k, v in jax.device_get(compute_metrics(acc)).items()}
    out["loss"] = float(total / max(float(count), 1e-12))
    return out


def _frozen(task: SupervisedTask, mesh, adapted: Adapted | None, base_shardings):
    """The step's frozen arrays and their shardings: the task's own, and with LoRA the base in
    front (``(base, task's)``, or the base alone), placed once."""
    frozen, fz_sh = task.frozen, task.frozen_shardings
    if mesh is not None and frozen is not None:
        fz_sh = fz_sh or replicated(mesh)
    if adapted is not None:
        base_sh = base_shardings if mesh is not None else None
        if mesh is not None and base_sh is None:
            base_sh = replicated(mesh)
        frozen, fz_sh = ((adapted.base, base_sh) if frozen is None
                         else ((adapted.base, frozen), (base_sh, fz_sh)))
    if mesh is not None and frozen is not None:  # once: both steps then find it in place
        frozen = put(frozen, fz_sh)
    return frozen, fz_sh


def fit(cfg, task: SupervisedTask, *, run_dir: str, params, param_shardings=None, mesh=None,
        hparams: dict | None = None, adapted: Adapted | None = None, base_shardings=None):
    """Train ``params`` on ``task`` for ``cfg.loop.total_steps`` steps (resumable); returns the
    final ``TrainState``. ``cfg`` supplies ``optimizer``, ``loop``, ``logging``,
    ``micro_batches`` and ``seed`` (``pipelines.SupervisedConfig``); ``param_shardings`` places
    the params on ``mesh`` (``parallel.param_shardings``). With ``adapted`` (LoRA,
    ``train.adapters``) ``params`` is the trainable tree, the task's loss is a loss of the full
    params of ``adapted.model``, and the frozen base (placed by ``base_shardings``) rides in the
    step's frozen arrays."""
    total = cfg.loop.total_steps
    optimizer = make_optimizer(cfg.optimizer, total)
    state = create_train_state(params, optimizer, seed=cfg.seed)
    st_sh = None if mesh is None else state_shardings(state, mesh, param_shardings)
    state = state if st_sh is None else put(state, st_sh)
    frozen, fz_sh = _frozen(task, mesh, adapted, base_shardings)
    train_loss = eval_loss = task.loss_fn
    if adapted is not None:
        has = task.frozen is not None
        train_loss = lora_loss(task.loss_fn, adapted, has_frozen=has, train=True)
        eval_loss = lora_loss(task.loss_fn, adapted, has_frozen=has, train=False)
    step = make_train_step(train_loss, optimizer, micro_batches=cfg.micro_batches, mesh=mesh,
                           state_shardings=st_sh, learning_rate=make_schedule(cfg.optimizer,
                                                                              total),
                           frozen=frozen, frozen_shardings=fz_sh)
    eval_fn = None
    if task.eval_batches is not None:
        eval_step = make_eval_step(eval_loss, mesh=mesh, frozen=frozen,
                                   param_shardings=param_shardings, frozen_shardings=fz_sh)

        def eval_fn(s):
            out = evaluate(eval_step, s.params, task.eval_batches, jax.random.PRNGKey(cfg.seed))
            return task.eval_post(out) if task.eval_post is not None else out

    state, _ = train_loop(cfg.loop, run_dir=run_dir, state=state, step_fn=step, data=task.data,
                          eval_fn=eval_fn, postfix=task.postfix, tokens_in=task.tokens_in,
                          logging=cfg.logging, hparams=hparams)
    return state


__all__ = ["SupervisedTask", "evaluate", "fit"]
