"""The command line: ``rlhf-jax STAGE [--config FILE] [--section.field VALUE ...]``.

One command per stage, built by tyro from the stage's nested config dataclass: every field is a
typed flag whose ``--help`` line is the field's doc and default, and an unknown flag or a bad
value is an error naming it. ``--config`` reads a YAML or JSON file of the same nesting
(``data: {train: d.jsonl}``); flags given after it override the file's values. A field the file
gives with an unknown name or a value of the wrong type is an error naming the file and the
dotted field. Optional blocks that default to None (``reference``, ``rewards.model``,
``value_init``) are chosen with tyro's subcommand token, e.g. ``rewards.model:model-spec
--rewards.model.path DIR``, or set in the file.

``python -m rlhf_jax STAGE`` is the same command. ``rlhf-jax plot RUN_DIR`` redraws a run's
plots. The exit status is 0 for a complete run, 3 for one stopped early (SIGTERM; run the same
command again to resume) and 2 for a config or data error (one line on stderr).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import typing
from collections.abc import Mapping
from typing import Any

import tyro

STAGES: dict[str, tuple[str, str]] = {
    "sft": ("rlhf_jax.pipelines.sft", "SFTConfig"),
    "reward-model": ("rlhf_jax.pipelines.reward_model", "RewardModelConfig"),
    "dpo": ("rlhf_jax.pipelines.dpo", "DPOConfig"),
    "grpo": ("rlhf_jax.pipelines.grpo", "GRPOConfig"),
    "ppo": ("rlhf_jax.pipelines.ppo", "PPOConfig"),
    "distill": ("rlhf_jax.pipelines.distill", "DistillConfig"),
    "best-of-n": ("rlhf_jax.pipelines.best_of_n", "BestOfNConfig"),
}
"""Stage name -> (module with ``run(cfg)``, its config class)."""

EXIT_STOPPED, EXIT_ERROR = 3, 2


class ConfigFileError(ValueError):
    """A config file problem, located as ``file: field 'a.b': what is wrong``."""


def _unchecked(cls, values: Mapping[str, Any], base=None):
    """An instance of ``cls`` without running ``__post_init__`` (tyro's default: the final
    config is built, and checked, from it). Fields not in ``values`` come from ``base`` (an
    instance), else the class default; required fields still absent get ``tyro.MISSING``."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
        elif base is not None:
            value = getattr(base, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = tyro.MISSING
        object.__setattr__(obj, f.name, value)
    return obj


def _dataclass_of(hint) -> type | None:
    """The dataclass in ``hint`` (``X`` or ``X | None``), else None."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                   type(int | None)) else (hint,)
    found = [t for t in options if dataclasses.is_dataclass(t)]
    return found[0] if found else None


def _convert(value, hint, where: str, source: str, base):
    """A file value as the field's type: nested blocks recursively, lists as tuples."""
    import typeguard

    block = _dataclass_of(hint)
    if block is not None and isinstance(value, Mapping):
        return from_mapping(block, value, source=source, prefix=f"{where}.",
                            base=base if isinstance(base, block) else None)
    if isinstance(value, list) and "tuple" in str(hint):
        value = tuple(value)
    if isinstance(value, int) and not isinstance(value, bool) and "float" in str(hint) \
            and "int" not in str(hint):
        value = float(value)
    try:
        typeguard.check_type(value, hint)
    except typeguard.TypeCheckError:
        raise ConfigFileError(f"{source}: field {where!r}: expected {hint}, got "
                              f"{value!r}") from None
    return value


def from_mapping(cls, data: Mapping[str, Any], *, source: str = "<config>", prefix: str = "",
                 base=None):
    """``cls`` (a config dataclass) from nested plain data over ``base`` (an instance; default:
    the class defaults), unchecked (see ``_unchecked``).

    Raises:
      ConfigFileError: an unknown field (the known ones listed) or a value of the wrong type.
    """
    if not isinstance(data, Mapping):
        raise ConfigFileError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping "
                              f"of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigFileError(f"{source}: unknown field {prefix + str(key)!r}; "
                                  f"{prefix.rstrip('.') or cls.__name__} has {names}")
        values[key] = _convert(value, hints[key], prefix + key, source,
                               None if base is None else getattr(base, key))
    return _unchecked(cls, values, base)


def load_config_file(cls, path: str, base=None):
    """``cls`` from a YAML (``.yaml``/``.yml``) or JSON file over ``base``, unchecked until
    tyro builds it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    return from_mapping(cls, data or {}, source=path, base=base)


def _pop_config(args: list[str]) -> tuple[str | None, list[str]]:
    for i, a in enumerate(args):
        if a == "--config":
            if i + 1 >= len(args):
                raise ConfigFileError("--config needs a file")
            return args[i + 1], args[:i] + args[i + 2:]
        if a.startswith("--config="):
            return a.split("=", 1)[1], args[:i] + args[i + 1:]
    return None, args


def parse(cls, args: list[str], *, prog: str | None = None, default=None,
          description: str | None = None):
    """``cls`` from ``args``: ``default`` (an instance, or the class defaults), then the
    ``--config FILE`` values, then the flags."""
    path, rest = _pop_config(args)
    if path is not None:
        default = load_config_file(cls, path, base=default)
    return tyro.cli(cls, default=default, args=rest, prog=prog, description=description)


def _usage() -> str:
    return ("usage: rlhf-jax STAGE [--config FILE] [--section.field VALUE ...]\n"
            "       rlhf-jax plot RUN_DIR [RUN_DIR ...]\n\n"
            f"stages: {', '.join(STAGES)}\n"
            "`rlhf-jax STAGE --help` lists every field with its doc and default.")


def _report(result: Mapping[str, Any]) -> None:
    shown = {k: v for k, v in result.items()
             if isinstance(v, (str, int, float, bool, type(None), dict, list))}
    print(json.dumps(shown, default=str))


def run_stage(stage: str, args: list[str]) -> int:
    """Parse ``args`` for ``stage``, run it, and return the exit status."""
    from rlhf_jax.data import DataError
    from rlhf_jax.parallel import initialize_distributed
    from rlhf_jax.train import CheckpointError

    module_name, cls_name = STAGES[stage]
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    doc = (cls.__doc__ or "").strip().splitlines()
    try:
        cfg = parse(cls, args, prog=f"rlhf-jax {stage}", description=doc[0] if doc else None)
        initialize_distributed()
        result = module.run(cfg)
    except (ConfigFileError, DataError, CheckpointError, FileNotFoundError,
            PermissionError) as e:
        print(f"rlhf-jax {stage}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as e:  # config checks in __post_init__ and before anything compiles
        print(f"rlhf-jax {stage}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    _report(result)
    if result.get("complete", True) is False:
        print(f"rlhf-jax {stage}: stopped at step {result.get('steps')} before the last step; "
              "run the same command again to resume", file=sys.stderr)
        return EXIT_STOPPED
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rlhf-jax`` and ``python -m rlhf_jax``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else EXIT_ERROR
    stage, rest = args[0], args[1:]
    if os.getcwd() not in sys.path:  # reward functions named "module:function" in the cwd
        sys.path.insert(0, os.getcwd())
    if stage == "plot":
        from rlhf_jax.pipelines import plot

        return plot.main(rest)
    if stage not in STAGES:
        print(f"rlhf-jax: unknown stage {stage!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_ERROR
    return run_stage(stage, rest)


__all__ = ["STAGES", "ConfigFileError", "from_mapping", "load_config_file", "main", "parse"]
