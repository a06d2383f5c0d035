"""Shared pieces of the train/ tests: a tiny regression model, batches, a resumable data
source, and TensorBoard event files read back with TensorBoard's own reader."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.ops.stats import Max, Mean

D_IN, D_HID, T = 3, 2, 5


def toy_params(seed: int = 0) -> dict:
    """Fresh arrays every call (train steps donate their state, so never share params)."""
    r = np.random.default_rng(seed)
    return {"w": jnp.asarray(r.normal(size=(D_IN, D_HID)), jnp.float32),
            "b": jnp.asarray(r.normal(size=(D_HID,)) * 0.1, jnp.float32),
            "v": jnp.asarray(r.normal(size=(D_HID,)), jnp.float32)}


def toy_predict(params, x):
    return jnp.tanh(x @ params["w"] + params["b"]) @ params["v"]  # [B, T]


def toy_loss(params, batch, key):
    """Masked squared error: ``(sum_t m (pred - y)^2, sum m, metrics)``."""
    del key
    m = batch["m"]
    err = (toy_predict(params, batch["x"]) - batch["y"]) ** 2 * m  # [B, T]
    total, count = jnp.sum(err), jnp.sum(m)
    return total, count, {"mse": Mean(total, count),
                          "max_err": Max(jnp.max(jnp.where(m > 0, err, -jnp.inf)))}


def toy_batch(seed: int, b: int = 8, counts=None) -> dict:
    """A batch whose rows hold ``counts[i]`` valid tokens (default: random, all different
    between the micro-batches of any split)."""
    r = np.random.default_rng(seed)
    if counts is None:
        counts = r.integers(0, T + 1, size=b)
    counts = np.asarray(counts)
    m = (np.arange(T)[None, :] < counts[:, None]).astype(np.float32)
    return {"ids": r.integers(0, 1000, size=(b, T)).astype(np.int32),
            "x": r.normal(size=(b, T, D_IN)).astype(np.float32),
            "y": r.normal(size=(b, T)).astype(np.float32),
            "m": m}


class ArraySource:
    """A resumable ``BatchSource`` over fixed rows: shuffled per epoch (seeded), ``b`` rows per
    batch; ``bad_from``: batches handed out from this index on have a NaN target."""

    def __init__(self, n_rows: int = 12, b: int = 4, seed: int = 0, bad_from: int | None = None):
        self.data = toy_batch(1000 + seed, b=n_rows, counts=np.arange(n_rows) % (T + 1))
        self.n, self.b, self.seed, self.bad_from = n_rows, b, seed, bad_from
        self.pos, self.epoch, self.handed = 0, 0, 0

    def next(self):
        if self.pos + self.b > self.n:
            self.pos, self.epoch = 0, self.epoch + 1
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        idx = order[self.pos:self.pos + self.b]
        self.pos += self.b
        batch = {k: v[idx].copy() for k, v in self.data.items()}
        if self.bad_from is not None and self.handed >= self.bad_from:
            batch["y"][0, 0] = np.nan
            batch["m"][0, 0] = 1.0
        self.handed += 1
        return batch

    def state(self) -> dict:
        return {"pos": self.pos, "epoch": self.epoch, "handed": self.handed}

    def restore(self, state: dict) -> None:
        self.pos, self.epoch, self.handed = state["pos"], state["epoch"], state["handed"]


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_bitwise(a, b) -> None:
    la, ta = jax.tree.flatten(host(a))
    lb, tb = jax.tree.flatten(host(b))
    assert ta == tb, f"tree structures differ:\n{ta}\n{tb}"
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def read_scalars(path: str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the TensorBoard event files at ``path`` (a file or a
    directory), read by TensorBoard's own reader, which also applies the purges a resumed
    run's writer asks for."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path, size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
