"""Meta-test: every public function of ops, losses and models.scoring has four kinds of test.

Kinds are recognised by test-function names, ``test_<name>_<kind>...`` with kind one of
``hand`` (tiny case computed by hand), ``numpy`` (NumPy loop reference), ``property``
(hypothesis properties) and ``grad`` (gradient checks). A function may skip a kind only with a
reason written in ``EXEMPT`` below, so a new public function without tests fails this test.
"""

from __future__ import annotations

import ast
import functools
import inspect
import pathlib

import pytest

import rlhf_jax.losses as losses
import rlhf_jax.models.scoring as scoring
import rlhf_jax.ops as ops

KINDS = ("hand", "numpy", "property", "grad")
TESTS = pathlib.Path(__file__).parent

_NO_GRAD = "integer/boolean output or pure bookkeeping: there is no gradient to check"
EXEMPT: dict[tuple[str, str], str] = {
    ("masked_count", "grad"): _NO_GRAD,
    ("completion_mask_from_eos", "grad"): _NO_GRAD,
    ("is_truncated", "grad"): _NO_GRAD,
    ("last_token_index", "grad"): _NO_GRAD,
    ("kl_controller_init", "grad"): "host-side constructor from a Python float",
    ("fixed_kl_update", "grad"): "identity on the state",
    ("merge_metrics", "grad"): _NO_GRAD,
    ("compute_metrics", "grad"): _NO_GRAD,
}


def public_functions() -> list[str]:
    names = []
    for mod in (ops, losses, scoring):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj):
                names.append(name)
    return sorted(set(names))


@functools.lru_cache(maxsize=1)
def _collected_test_names() -> frozenset[str]:
    found = set()
    for path in TESTS.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith(
                "test_"
            ):
                found.add(node.name)
    return frozenset(found)


@pytest.mark.parametrize("name", public_functions())
def test_public_function_has_four_kinds(name):
    names = _collected_test_names()
    missing = []
    for kind in KINDS:
        prefix = f"test_{name}_{kind}"
        if (name, kind) in EXEMPT:
            continue
        if not any(n == prefix or n.startswith(prefix + "_") for n in names):
            missing.append(kind)
    assert not missing, f"{name}: no {missing} test (name them {f'test_{name}_<kind>...'})"


def test_exemptions_are_for_real_functions():
    funcs = set(public_functions())
    stale = [k for k in EXEMPT if k[0] not in funcs or k[1] not in KINDS]
    assert not stale, f"stale exemptions: {stale}"
