"""Runnable experiments: ``python -m experiments.NAME``; each has ``get_config()`` and
``run(cfg)``."""
