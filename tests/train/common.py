"""Shared pieces of the train/ tests: a tiny regression model, batches, a resumable data
source, and a reader of TFRecord/TensorBoard event files written from the format by hand."""

from __future__ import annotations

import struct

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


# --- TFRecord / Event reading, written from the format (independent of rlhf_jax.train.sinks) ---

def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = _crc32c_bitwise(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: str) -> list[bytes]:
    """Records of a TFRecord file; asserts both masked CRCs of every record."""
    out = []
    with open(path, "rb") as f:
        buf = f.read()
    i = 0
    while i < len(buf):
        header = buf[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", buf[i + 8:i + 12])
        assert hcrc == _masked(header), f"bad length crc at byte {i}"
        data = buf[i + 12:i + 12 + n]
        (dcrc,) = struct.unpack("<I", buf[i + 12 + n:i + 16 + n])
        assert dcrc == _masked(data), f"bad data crc at byte {i}"
        out.append(data)
        i += 16 + n
    assert i == len(buf), "trailing bytes"
    return out


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = b[i]
        value |= (byte & 0x7F) << shift
        i += 1
        shift += 7
        if not byte & 0x80:
            return value, i


def parse_fields(b: bytes) -> list[tuple[int, object]]:
    """``(field number, value)`` of a protobuf message: varint -> int, fixed64 -> 8 bytes,
    length-delimited -> bytes, fixed32 -> 4 bytes."""
    i, out = 0, []
    while i < len(b):
        key, i = _read_varint(b, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 2:
            n, i = _read_varint(b, i)
            v, i = b[i:i + n], i + n
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        out.append((num, v))
    return out


def decode_event(record: bytes) -> dict:
    """``{"wall_time", "step", "file_version", "scalars": {tag: float}}`` of an Event."""
    ev = {"step": 0, "scalars": {}, "file_version": None, "wall_time": None}
    for num, v in parse_fields(record):
        if num == 1:
            ev["wall_time"] = struct.unpack("<d", v)[0]
        elif num == 2:
            ev["step"] = v
        elif num == 3:
            ev["file_version"] = v.decode()
        elif num == 5:  # Summary
            for snum, value in parse_fields(v):
                assert snum == 1  # Summary.value
                fields = dict(parse_fields(value))
                ev["scalars"][fields[1].decode()] = struct.unpack("<f", fields[2])[0]
    return ev
