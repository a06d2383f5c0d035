"""The supervised stages' shared run: the task trained by ``train.supervised.fit`` on the
stage's mesh, then the model exported and ``result.json`` written."""

from __future__ import annotations

import os
from typing import Any, Mapping

from rlhf_jax.data import Tokenizer
from rlhf_jax.pipelines.config import SupervisedConfig
from rlhf_jax.pipelines.run_dir import config_dict, export_adapter, exported_params, finish_run
from rlhf_jax.pipelines.setup import load_tokenizer, model_shardings
from rlhf_jax.train.adapters import Adapted
from rlhf_jax.train.supervised import SupervisedTask, fit


def supervised_inputs(cfg: SupervisedConfig, loader, field: str, spec, *,
                      others: Mapping[str, Any] | None = None):
    """``(tokenizer, train, eval or None, data report)``: the tokenizer (the ``field`` model's
    own unless given, checked against ``others``' checkpoints) and both data files loaded with
    ``loader`` (``datasets.load_sft_batch`` or ``load_pairs``), before anything is written."""
    tokenizer = load_tokenizer(cfg.tokenizer, field, spec, others=others,
                               chat_template=cfg.data.chat_template)
    report: dict = {}  # rows per file, and those skipped or truncated
    train = loader(cfg.data.train, cfg.data, tokenizer, report=report)
    evals = (loader(cfg.data.eval, cfg.data, tokenizer, report=report) if cfg.data.eval
             else None)
    return tokenizer, train, evals, report


def run_supervised(cfg: SupervisedConfig, task: SupervisedTask, *, run_dir: str, model,
                   params, tokenizer: Tokenizer, mesh,
                   generation: Mapping[str, Any] | None = None,
                   data_report: Mapping[str, dict] | None = None,
                   adapted: Adapted | None = None) -> dict:
    """Train ``model`` on ``task`` (resumable), export it (``generation``: the base checkpoint's
    generation config, see ``run_dir.export_model``), write ``result.json`` (with
    ``data_report``: rows per data file, and those skipped or truncated); returns the result
    plus the final ``state`` and the ``model``. With ``adapted`` (LoRA, ``setup.with_adapter``)
    ``params`` is the trainable tree; the export is the merged model in ``model/`` plus the
    adapter alone in PEFT's layout in ``adapter/``."""
    base_sh = None if adapted is None else model_shardings(mesh, model.config, adapted.base)
    state = fit(cfg, task, run_dir=run_dir, params=params, mesh=mesh,
                param_shardings=model_shardings(mesh, model.config, params),
                hparams=config_dict(cfg), adapted=adapted, base_shardings=base_sh)
    result = finish_run(run_dir, model.config, exported_params(adapted, state.params), tokenizer,
                        state, total_steps=cfg.loop.total_steps, generation=generation,
                        data=dict(data_report or {}))
    if adapted is not None:
        result["adapter_dir"] = export_adapter(os.path.join(run_dir, "adapter"), adapted,
                                               state.params)
    return result | {"state": state, "model": model}
