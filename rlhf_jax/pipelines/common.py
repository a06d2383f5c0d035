"""What every pipeline shares: model sources, run directories, meshes, exports, evaluation.

A pipeline is a frozen config dataclass plus ``run(cfg)``. Stages hand models to each other as
Hugging Face checkpoint directories (``<run>/model``: safetensors + ``tokenizer.json``), so any
stage's output also loads in transformers, and any Hugging Face Llama/Qwen2/Mistral checkpoint
can start any stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from rlhf_jax.data import (Tokenizer, detect_format, encode_preference, encode_sft, load_jsonl,
                           pack_token_batch, pad_token_batch, preference_batch)
from rlhf_jax.models import ModelConfig, get_preset, init_model, load_hf_checkpoint, \
    model_for, save_hf_checkpoint
from rlhf_jax.ops.stats import compute_metrics, merge_metrics
from rlhf_jax import parallel
from rlhf_jax.parallel import MeshConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Where a stage's model comes from: a Hugging Face directory, or a preset initialised fresh."""

    path: str | None = None
    """A checkpoint directory (``config.json`` + safetensors), e.g. an earlier stage's
    ``runs/<name>/model``. Takes precedence over ``preset``."""
    preset: str = "toy-1m"
    """A ``models.PRESETS`` name, used when ``path`` is None (``vocab_size`` follows the
    tokenizer)."""
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """``ModelConfig`` fields replacing the preset's (e.g. ``{"num_layers": 2}``)."""
    dtype: str | None = None
    """Parameter and compute dtype override (``float32``, ``bfloat16``)."""


def load_model(spec: ModelSpec, *, heads: tuple[str, ...], vocab_size: int, seed: int):
    """``(Model, params)`` with exactly ``heads``; heads the checkpoint lacks start at zero."""
    if spec.path is not None:
        config, params = load_hf_checkpoint(spec.path, dtype=spec.dtype, heads=heads)
        if config.vocab_size < vocab_size:
            raise ValueError(f"model at {spec.path} has vocab_size {config.vocab_size} < the "
                             f"tokenizer's {vocab_size}")
        return model_for(config), params
    extra = {"param_dtype": spec.dtype, "dtype": spec.dtype} if spec.dtype else {}
    config = get_preset(spec.preset, vocab_size=vocab_size, heads=heads,
                        **dict(spec.overrides), **extra)
    return init_model(config, jax.random.PRNGKey(seed))


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def config_dict(cfg) -> dict:
    """A config dataclass as plain JSON-able data."""
    return _jsonable(cfg)


def prepare_run_dir(cfg, output_dir: str, *,
                    ignore: Iterable[str] = ("loop", "mesh")) -> str:
    """Create ``output_dir`` and write ``config.json``; refuse to resume under another config.

    A restarted run (same directory) must use the same config except for the fields in
    ``ignore``: by default the loop settings (so a finished run can be extended) and the mesh
    (checkpoints are mesh-independent: a run saved on 8 devices resumes on 1 or on 16).
    Only process 0 writes the file.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "config.json")
    check_inside(output_dir, path, "config.json")
    new = {"kind": type(cfg).__name__} | config_dict(cfg)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(new)
                      if k not in ignore and old.get(k) != new.get(k))
        if diff:
            raise ValueError(f"{output_dir} holds a run with a different config (fields {diff}); "
                             f"choose another output_dir or delete the old run")
    if parallel.is_main_process():
        write_json(path, new)
    return output_dir


def check_inside(root: str, path: str, what: str) -> None:
    """Refuse ``path`` when it resolves (through a symlink, say) outside the directory ``root``:
    an output is never written through a link that leaves the output directory."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(f"refusing to write {what} at {path!r}: it resolves to {real!r}, "
                         f"outside the output directory {real_root!r} (a symlink leaving it); "
                         f"remove the link or choose another output_dir")


def check_sequence_fits(models: Mapping[str, ModelConfig], *, max_prompt_length: int,
                        max_new_tokens: int) -> None:
    """Prompt + completion must fit every model's positions (the sampler's KV cache has
    ``max_prompt_length + max_new_tokens`` slots); checked before anything is compiled."""
    need = max_prompt_length + max_new_tokens
    for name, config in models.items():
        if need > config.max_position_embeddings:
            raise ValueError(
                f"max_prompt_length {max_prompt_length} + max_new_tokens {max_new_tokens} = "
                f"{need} tokens exceeds the {name} model's max_position_embeddings "
                f"{config.max_position_embeddings} (the KV cache and position limit); lower "
                f"max_prompt_length or max_new_tokens")


def make_mesh(mesh: MeshConfig | None, batch_size: int, *, what: str = "batch_size"):
    """The stage's ``data x fsdp x tensor`` mesh over all devices (every process's), or None
    when ``mesh`` is None or there is one device (plain single-device jit).

    Raises when ``batch_size`` does not split evenly over ``data x fsdp`` (checked before
    anything is compiled), and for ``mesh=None`` in a multi-process run (every process would
    train its own copy, and checkpoints cannot hold process-local arrays).
    """
    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"mesh=None runs on one device, but this is a run of "
                         f"{jax.process_count()} processes; give a mesh (MeshConfig(): data "
                         f"parallel over all {jax.device_count()} devices)")
    if mesh is None or jax.device_count() == 1:
        return None
    built = parallel.make_mesh(mesh)
    rows = parallel.batch_size_divisor(built)
    if batch_size % rows:
        shape = dict(built.shape)
        raise ValueError(f"{what} {batch_size} is not divisible by data x fsdp = {rows} (mesh "
                         f"{shape} over {jax.device_count()} devices); change {what} or the "
                         f"mesh (mesh=None: one device)")
    return built


def model_shardings(mesh, config: ModelConfig, params):
    """``params``' shardings by the family's rules (``parallel.param_shardings``); None
    without a mesh."""
    return None if mesh is None else parallel.param_shardings(config, params, mesh)


def place(tree, shardings):
    """``parallel.put`` when there are shardings, the tree unchanged otherwise."""
    return tree if shardings is None else parallel.put(tree, shardings)


def export_model(directory: str, config: ModelConfig, params, tokenizer: Tokenizer) -> str:
    """Write params as a Hugging Face checkpoint plus the tokenizer files into ``directory``.

    ``directory`` must not be a symlink leading out of its parent (the run directory)."""
    check_inside(os.path.dirname(os.path.abspath(directory)), directory, "the model directory")
    host = parallel.fetch(params)  # every process joins the gather; process 0 writes
    if parallel.is_main_process():
        save_hf_checkpoint(directory, config, host)
        tokenizer.save(directory)
    parallel.barrier(f"export {directory}")  # the next stage, on every process, reads it
    return directory


def evaluate(eval_step: Callable, params, batches: list, key) -> dict[str, float]:
    """Exact means over ``batches``: loss sums and metric accumulators merged, divided once."""
    total, count, acc = 0.0, 0.0, None
    for i, batch in enumerate(batches):
        t, c, m = eval_step(params, batch, jax.random.fold_in(key, i))
        total, count = total + t, count + c
        acc = m if acc is None else merge_metrics(acc, m)
    out = {k: float(v) for k, v in jax.device_get(compute_metrics(acc)).items()}
    out["loss"] = float(total / max(float(count), 1e-12))
    return out


def fixed_batches(data, batch_size: int) -> list:
    """Split a pytree of arrays into consecutive full batches (for evaluation); drops the tail."""
    n = len(jax.tree.leaves(data)[0])
    if n < batch_size:
        raise ValueError(f"evaluation set has {n} rows < batch size {batch_size}")
    return [jax.tree.map(lambda x, s=s: np.asarray(x[s:s + batch_size]), data)
            for s in range(0, n - batch_size + 1, batch_size)]


def write_json(path: str, obj) -> None:
    """Write-then-rename through a fresh temporary file (``mkstemp``: never an existing link),
    so a crash leaves no half-written file and a symlink at ``path`` is replaced, not followed."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_pairs(path: str, cfg, tokenizer: Tokenizer):
    """Preference JSONL as a ``PreferenceBatch`` using ``cfg``'s ``max_prompt_length``,
    ``max_length``, ``on_overflow`` and ``skip_invalid``."""
    ds = load_jsonl(path, fmt="preference", skip_invalid=cfg.skip_invalid)
    enc = encode_preference(ds, tokenizer, max_prompt_length=cfg.max_prompt_length,
                            max_length=cfg.max_length, on_overflow=cfg.on_overflow)
    report_skipped(path, ds.skipped, enc.skipped)
    return preference_batch(enc.items, length=cfg.max_length, pad_id=tokenizer.pad_id)


def report_skipped(path: str, invalid: int, too_long: int) -> None:
    """Say on stderr how many rows ``skip_invalid`` / ``on_overflow="skip"`` left out."""
    if invalid or too_long:
        print(f"{path}: skipped {invalid} invalid and {too_long} over-long rows",
              file=sys.stderr)


def sniff_format(path: str) -> str:
    """The JSONL format of ``path`` from its first non-blank line (``load_jsonl`` then
    validates every line and reports a malformed one precisely)."""
    with open(path, "rb") as f:
        first = next((ln for ln in f if ln.strip()), b"{}")
    try:
        return detect_format(json.loads(first))
    except ValueError:
        return "prompt_completion"


def load_sft_batch(path: str, cfg, tokenizer: Tokenizer):
    """``prompt``/``completion`` or ``messages`` JSONL as a ``TokenBatch`` (packed when
    ``cfg.packing``) using ``cfg``'s ``max_length``, ``on_overflow`` and ``skip_invalid``."""
    ds = load_jsonl(path, fmt=sniff_format(path), skip_invalid=cfg.skip_invalid)
    enc = encode_sft(ds, tokenizer, max_length=cfg.max_length, on_overflow=cfg.on_overflow)
    report_skipped(path, ds.skipped, enc.skipped)
    batch_fn = pack_token_batch if cfg.packing else pad_token_batch
    return batch_fn(enc.items, length=cfg.max_length, pad_id=tokenizer.pad_id)


def finish_run(run_dir: str, config: ModelConfig, params, tokenizer: Tokenizer, state, *,
               total_steps: int, **extra) -> dict:
    """Export the trained model to ``run_dir/model`` and write ``result.json``: paths, the step,
    ``complete`` (False when a SIGTERM stopped the run before ``total_steps``: the exported model
    is the checkpointed partial one, and a chain of stages should stop, not go on from it), and
    the last train and eval rows of ``metrics.jsonl`` (read from disk, so a stage that was
    already complete and only resumed reports the same figures)."""
    model_dir = export_model(os.path.join(run_dir, "model"), config, params, tokenizer)
    rows = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    last = {split: next((r for r in reversed(rows) if r.get("split") == split), None)
            for split in ("train", "eval")}
    steps = int(state.step)
    result = {"run_dir": run_dir, "model_dir": model_dir, "steps": steps,
              "complete": steps >= total_steps} | last
    result |= extra
    if parallel.is_main_process():
        write_json(os.path.join(run_dir, "result.json"), result)
    parallel.barrier(f"finish {run_dir}")
    return result


def fit(cfg, *, run_dir: str, tokenizer: Tokenizer, model, params, loss_fn, data, eval_batches,
        mesh, postfix: tuple[str, ...], tokens_in=None, frozen=None, frozen_shardings=None,
        eval_post=None) -> dict:
    """The shared body of the supervised stages (SFT, reward model, DPO, distillation): build
    the optimizer, state and jitted steps from ``cfg`` (``optimizer``, ``loop``,
    ``micro_batches``, ``seed``), place the state on ``mesh`` by the model family's sharding
    rules, run the loop with periodic evaluation on ``eval_batches`` (post-processed by
    ``eval_post``), then export and write ``result.json``."""
    from rlhf_jax.train import (create_train_state, make_eval_step, make_optimizer,
                                make_schedule, make_train_step, state_shardings, train_loop)

    optimizer = make_optimizer(cfg.optimizer)
    state = create_train_state(params, optimizer, seed=cfg.seed)
    p_sh = model_shardings(mesh, model.config, params)
    st_sh = None if mesh is None else state_shardings(state, mesh, p_sh)
    state = place(state, st_sh)
    step = make_train_step(loss_fn, optimizer, micro_batches=cfg.micro_batches, mesh=mesh,
                           state_shardings=st_sh, learning_rate=make_schedule(cfg.optimizer),
                           frozen=frozen, frozen_shardings=frozen_shardings)
    eval_step = make_eval_step(loss_fn, mesh=mesh, frozen=frozen, param_shardings=p_sh,
                               frozen_shardings=frozen_shardings)

    def run_eval(s):
        out = evaluate(eval_step, s.params, eval_batches, jax.random.PRNGKey(cfg.seed))
        return eval_post(out) if eval_post is not None else out

    eval_fn = run_eval if eval_batches is not None else None

    state, _ = train_loop(cfg.loop, run_dir=run_dir, state=state, step_fn=step, data=data,
                          eval_fn=eval_fn, postfix=postfix, tokens_in=tokens_in)
    result = finish_run(run_dir, model.config, state.params, tokenizer, state,
                        total_steps=cfg.loop.total_steps)
    return result | {"state": state, "model": model}
