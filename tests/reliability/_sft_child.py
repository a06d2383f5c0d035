"""A real SFT training process for the crash-safety tests (run as ``python -m``).

``python -m tests.reliability._sft_child SPEC.json``: SPEC holds the dataset, tokenizer and
output paths and the loop sizes. Before training it prints ``RESUME <step>`` (the latest
*complete* checkpoint the run will continue from, -1 for a fresh run); at the end ``DONE``.
The parent kills it (SIGKILL, SIGTERM) at chosen moments and restarts it.
"""

from __future__ import annotations

import json
import os
import sys


def main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    from rlhf_jax.pipelines import sft
    from rlhf_jax.train import Checkpointer
    from tests.reliability.conftest import crash_sft_config

    cfg = crash_sft_config(**spec)
    ckpt = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"))
    latest = ckpt.latest_step()
    ckpt.close()
    print(f"RESUME {-1 if latest is None else latest}", flush=True)
    result = sft.run(cfg)
    print(f"DONE {result['steps']} complete={result['complete']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
