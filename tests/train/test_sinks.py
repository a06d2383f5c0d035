"""Tests of rlhf_jax/train/sinks.py: CRC-32C, TensorBoard event framing parsed back by an
independent reader (tests/train/common.py), JSONL round trip."""

from __future__ import annotations

import glob
import math
import os

import numpy as np
import pytest

from rlhf_jax.train import JsonlSink, TensorBoardSink, read_jsonl_metrics
from rlhf_jax.train.sinks import crc32c, encode_event
from tests.train.common import _crc32c_bitwise, decode_event, parse_fields, read_records


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(bytes([0xFF] * 32)) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of 0xFF
    data = bytes(range(256)) * 3
    assert crc32c(data) == _crc32c_bitwise(data)


def test_encode_event_hand():
    ev = encode_event(3, 1.5, {"a": 2.0})
    # wall_time (field 1, fixed64), step (field 2, varint), summary (field 5)
    assert ev[:9] == b"\x09" + np.float64(1.5).tobytes()
    assert ev[9:11] == b"\x10\x03"
    assert ev[11:] == b"\x2a\x0a" + b"\x0a\x08" + b"\x0a\x01a" + b"\x15" + np.float32(2).tobytes()
    big = parse_fields(encode_event(300, 0.0))
    assert big[1] == (2, 300)  # multi-byte varint


def test_tensorboard_records_parse_back(tmp_path):
    sink = TensorBoardSink(str(tmp_path / "tb"))
    sink.write(1, {"train/loss": 0.25, "train/lr": 1e-3})
    sink.write(2, {"train/loss": float("nan"), "train/acc": 0.5, "x": float("inf")})
    sink.write(300, {"eval/loss": np.float32(-1.75)})
    sink.close()
    files = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert files == [sink.path]
    events = [decode_event(r) for r in read_records(sink.path)]
    assert len(events) == 4
    assert events[0]["file_version"] == "brain.Event:2" and events[0]["scalars"] == {}
    assert [e["step"] for e in events[1:]] == [1, 2, 300]
    assert events[1]["scalars"] == {"train/loss": 0.25, "train/lr": np.float32(1e-3)}
    assert events[2]["scalars"] == {"train/acc": 0.5}  # non-finite values are dropped
    assert events[3]["scalars"] == {"eval/loss": -1.75}
    assert all(abs(e["wall_time"] - events[0]["wall_time"]) < 60 for e in events)


def test_tensorboard_corruption_is_detected(tmp_path):
    """Sensitivity of the reader: flipping a payload byte breaks the data CRC."""
    sink = TensorBoardSink(str(tmp_path))
    sink.write(1, {"loss": 1.0})
    sink.close()
    raw = bytearray(open(sink.path, "rb").read())
    raw[-6] ^= 0x01
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(raw))
    with pytest.raises(AssertionError, match="bad data crc"):
        read_records(str(bad))


def test_jsonl_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "metrics.jsonl")
    sink = JsonlSink(path)
    sink.write(1, {"split": "train", "loss": np.float32(0.5), "count": 17})
    sink.write(2, {"split": "eval", "loss": float("nan"), "acc": 1.0})
    sink.close()
    sink = JsonlSink(path)  # appends (a resumed run keeps the earlier rows)
    sink.write(3, {"split": "train", "loss": 0.125})
    sink.close()
    rows = read_jsonl_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["split"] for r in rows] == ["train", "eval", "train"]
    assert rows[0]["loss"] == 0.5 and rows[0]["count"] == 17.0
    assert math.isnan(rows[1]["loss"]) and rows[1]["acc"] == 1.0
    assert rows[2]["loss"] == 0.125
    assert all(isinstance(r["time"], float) for r in rows)
    assert os.path.getsize(path) > 0
