"""benchmarks.memory_mesh on toy-1m: the per-device state bytes it reports agree with a hand
count and with XLA's own argument size, FSDP holds ~1/8 of data parallelism's state, and per-block
remat shrinks the temporaries where activations dominate (FSDP, 256 tokens a row)."""

from __future__ import annotations

import functools
import math

import jax
import pytest

from benchmarks import memory_mesh as mm
from rlhf_jax.models import get_preset
from rlhf_jax.models.transformer import abstract_params

BATCH, SEQ = 8, 256
TOKEN_BYTES = 4 + 1 + 1 + 4 + 4  # tokens, loss_mask, attention_mask, segment_ids, positions
SCALARS = 4 + 8 + 4  # TrainState.step, rng (uint32[2]), skipped


@functools.lru_cache(maxsize=None)
def _record(shape, remat):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return mm.measure(get_preset("toy-1m", remat=remat), shape, batch=BATCH, seq=SEQ)


def _hand_param_bytes(n_split: int) -> tuple[int, int]:
    """``(per-device bytes, replicated bytes)`` of toy-1m's params when every matrix is split
    ``n_split`` ways and the norm vectors are replicated (the rules, for a mesh whose axes all
    divide toy-1m's dimensions)."""
    leaves = jax.tree.leaves(abstract_params(get_preset("toy-1m")))
    mats = sum(math.prod(x.shape) * 4 for x in leaves if x.ndim == 2)
    vecs = sum(math.prod(x.shape) * 4 for x in leaves if x.ndim == 1)
    return mats // n_split + vecs, vecs


FSDP = (1, 8, 1)


def test_fields_positive_and_peak_formula():
    r = _record(FSDP, False)
    for k in ("params_bytes", "opt_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "temp_size_in_bytes", "peak_bytes"):
        assert r[k] > 0, k
    assert r["generated_code_size_in_bytes"] >= 0
    assert r["peak_bytes"] == (r["argument_size_in_bytes"] + r["output_size_in_bytes"]
                               - r["alias_size_in_bytes"] + r["temp_size_in_bytes"])
    # The donated state comes back in place: every state byte is aliased.
    assert r["alias_size_in_bytes"] >= r["state_bytes"]


def test_fsdp_state_bytes_match_hand_count_and_xla():
    r = _record(FSDP, False)
    params, _ = _hand_param_bytes(8)
    assert r["params_bytes"] == params
    assert 2 * params <= r["opt_bytes"] <= 2 * params + 64  # AdamW mu, nu + int32 counts
    # XLA's argument size is the same state, the scalars and this device's row of the batch.
    batch_bytes = BATCH // 8 * SEQ * TOKEN_BYTES
    assert r["argument_size_in_bytes"] == r["state_bytes"] + SCALARS + batch_bytes


def test_fsdp_state_is_an_eighth_of_data_parallel():
    dp_params, dp_opt = mm.state_bytes(get_preset("toy-1m"), (8, 1, 1))
    assert dp_params == _hand_param_bytes(1)[0]
    fsdp = _record(FSDP, False)
    _, replicated = _hand_param_bytes(8)
    assert fsdp["state_bytes"] <= (dp_params + dp_opt) / 8 * 1.1 + 3 * replicated
    assert fsdp["state_bytes"] / (dp_params + dp_opt) < 0.13


def test_remat_shrinks_temporaries_where_activations_dominate():
    off, on = _record(FSDP, False), _record(FSDP, True)
    assert off["temp_size_in_bytes"] > 4 * off["state_bytes"]  # activations dominate
    assert on["temp_size_in_bytes"] < off["temp_size_in_bytes"]
    assert on["state_bytes"] == off["state_bytes"]


def test_markdown_has_a_row_per_record():
    recs = [dict(_record(FSDP, remat), preset="toy-1m") for remat in (False, True)]
    text = mm.markdown(recs, mm.summary(recs), "python -m benchmarks.memory_mesh")
    assert text.count("\n| 1x8x1 | off |") == 1 and text.count("\n| 1x8x1 | on |") == 1
