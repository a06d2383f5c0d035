"""Test session setup: 8 virtual CPU devices (for sharding tests) and a deterministic hypothesis.

XLA_FLAGS must be set before JAX initialises its backend, so this runs at import time.
"""

import os

# The tests' programs are tiny, so XLA:CPU's LLVM optimisation is most of their cost, not their
# run time: backend optimisation level 0 compiles them about a third faster (measured on
# tests/models/test_transformer.py + tests/pipelines/test_grpo.py: 158 s -> 103 s on 2 cores).
# Every comparison a test makes is between programs compiled under the same flags, and the
# tolerances against NumPy / transformers hold at either level. For the same reason the CPU
# backend's older elemental emitters replace its MLIR fusion emitters, whose compile pipeline costs
# more than these programs ever run: a third less again (tests/models/test_transformer.py: 77 s
# -> 54 s; the multi-process test's reference run: 28 s -> 17 s). Set XLA_FLAGS yourself to
# override.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_cpu_use_fusion_emitters=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session: the controller makes the directory and
# the xdist workers and every subprocess a test starts inherit it, so a program that another
# pipeline run, worker or child process already compiled (the same tiny model's steps recur
# across hundreds of runs) is loaded instead of compiled again. Cached executables are the same
# programs, so bitwise comparisons keep their meaning.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhf_jax_test_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

# XLA on CPU flushes subnormal floats to zero (FTZ) while NumPy does not, so every float
# strategy in the tests passes allow_subnormal=False: a reference mismatch on 1e-39 is not a bug.

# Deterministic examples: CI must not flake, and a failure must reproduce on any machine.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def chat_world(tmp_path_factory):
    """A tiny ChatML checkpoint and one file per TRL data format (``tests/chat_world.py``)."""
    from tests.chat_world import make_chat_world

    return make_chat_world(tmp_path_factory.mktemp("chat_world"))
