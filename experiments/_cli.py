"""The experiments' command line: ``python -m experiments.NAME [--config FILE] [--field value]``.

The stages' parser (``rlhf_jax.cli.parse``), on the experiment's config dataclass: every field
is a typed flag (``--help`` lists each with its one-line doc and default), values are parsed by
the field's type, a YAML/JSON ``--config`` file sets fields under the flags, and an unknown
flag or a bad value is an error naming it.
"""

from __future__ import annotations

import sys

from rlhf_jax.cli import parse as parse_config


def parse(cfg, argv: list[str]):
    """``cfg`` with the flags in ``argv`` applied (``--ppo-steps 300`` or ``--ppo_steps 300``)."""
    doc = (sys.modules[type(cfg).__module__].__doc__ or "").strip().splitlines()
    return parse_config(type(cfg), argv, default=cfg, description=doc[0] if doc else None)


def main(get_config, run, argv: list[str] | None = None):
    """Entry point shared by the experiment modules. Joins a multi-process run first when one
    was launched (``parallel.initialize_distributed``: SLURM, TPU pod, or the ``RLHF_JAX_*``
    variables); a plain launch stays one process."""
    from rlhf_jax.parallel import initialize_distributed

    initialize_distributed()
    cfg = parse(get_config(), sys.argv[1:] if argv is None else argv)
    return run(cfg)
