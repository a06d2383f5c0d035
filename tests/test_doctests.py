"""The examples in the pure layer's docstrings are executed, so they cannot drift from the code."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import rlhf_jax.losses
import rlhf_jax.ops

MODULES = sorted(
    f"{pkg.__name__}.{info.name}"
    for pkg in (rlhf_jax.ops, rlhf_jax.losses)
    for info in pkgutil.iter_modules(pkg.__path__)
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"
    if ">>>" in inspect.getsource(module):
        assert result.attempted > 0, f"{name} has examples but none ran"
