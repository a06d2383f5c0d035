"""Command-line overrides for experiment configs: ``python -m experiments.NAME key=value ...``.

Values are parsed by the field's type (int, float, bool, str, or None via ``none``);
``--help`` lists every field with its default.
"""

from __future__ import annotations

import dataclasses
import sys
import typing


def _convert(text: str, annotation, name: str):
    if text.lower() in ("none", "null") and "None" in str(annotation):
        return None
    kind = str(annotation)
    try:
        if "bool" in kind:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if "int" in kind and "float" not in kind:
            return int(text)
        if "float" in kind:
            return float(text)
    except ValueError:
        raise SystemExit(f"{name}={text!r}: expected {kind}") from None
    return text


def parse_overrides(cfg, argv: list[str]):
    """``cfg`` with ``key=value`` items of ``argv`` applied (unknown keys are an error)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    if "--help" in argv or "-h" in argv:
        print(f"{type(cfg).__name__} overrides (key=value):")
        for name in fields:
            print(f"  {name}={getattr(cfg, name)!r}  ({hints[name]})")
        raise SystemExit(0)
    changes = {}
    for item in argv:
        if "=" not in item:
            raise SystemExit(f"expected key=value, got {item!r} (see --help)")
        key, value = item.split("=", 1)
        key = key.lstrip("-").replace("-", "_")
        if key not in fields:
            raise SystemExit(f"unknown option {key!r}; choose from {sorted(fields)}")
        changes[key] = _convert(value, hints[key], key)
    return dataclasses.replace(cfg, **changes)


def main(get_config, run, argv: list[str] | None = None):
    """Entry point shared by the experiment modules. Joins a multi-process run first when one
    was launched (``parallel.initialize_distributed``: SLURM, TPU pod, or the ``RLHF_JAX_*``
    variables); a plain launch stays one process."""
    from rlhf_jax.parallel import initialize_distributed

    initialize_distributed()
    cfg = parse_overrides(get_config(), sys.argv[1:] if argv is None else argv)
    return run(cfg)
