"""Metric sinks: JSONL (always), TensorBoard event files, console.

The TensorBoard writer is self-contained: an event file is a TFRecord stream of ``Event``
protobufs, and the three messages we need (Event, Summary, Summary.Value with simple_value)
are a few bytes of wire format, so no TensorFlow or tensorboard install is needed to *write*
files that TensorBoard reads.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Mapping

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing uses."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """Serialise an ``Event`` with scalar summaries (or the file-version header)."""
    msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
            for tag, v in scalars.items())
        msg += _field_bytes(5, values)
    return msg


class TensorBoardSink:
    """Writes ``events.out.tfevents.*`` in ``directory`` (scalars only)."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(directory, name)
        self._f = open(self.path, "ab")
        self._write(encode_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + record
                      + struct.pack("<I", _masked_crc(record)))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        self._write(encode_event(step, time.time(), finite))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class JsonlSink:
    """One JSON object per line: ``{"step": s, "time": t, "split": "train", ...metrics}``."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row |= {k: (float(v) if not isinstance(v, str) else v) for k, v in metrics.items()}
        self._f.write(json.dumps(row, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl_metrics(path: str) -> list[dict]:
    """The rows a ``JsonlSink`` wrote (for plots and tests)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
