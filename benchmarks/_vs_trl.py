"""Shared plumbing of the ``*_vs_trl`` benchmarks: a small shared checkpoint and tokenizer, the
optional TRL stack, step timing on both sides, and compilation counting.

Design choices and why:

* One small Llama (``SMALL_LLAMA``: d_model 256, 4 layers, vocab 8192, 6.8M parameters) so the
  TRL side of every benchmark finishes in about a minute on a 2-core CPU. transformers builds
  it with ``torch.manual_seed(seed)`` and saves safetensors; we import that directory with
  ``rlhf_jax.models.load_hf_checkpoint``, so both systems start from the same weights. Reward
  and value models are one ``LlamaForSequenceClassification`` (one label, seed + 1), imported
  with ``heads=("reward",)`` / ``("value",)``.
* A word-level tokenizer (``<pad>`` = 0, ``</s>`` = 1, ``t2`` ... ``t8191``) written as a
  ``tokenizer.json`` with the ``tokenizers`` library (a core dependency): text ``"t5 t9"`` is
  exactly ids ``[5, 9]`` for both ``rlhf_jax.data.Tokenizer`` and transformers'
  ``PreTrainedTokenizerFast``, so reward functions see the same strings on both sides.
* Timing: ours is ``timed``-style (one warm-up call that includes compilation, then the median
  of ``repeats`` calls, each blocking on its outputs). TRL's is its own ``trainer.train()`` loop
  over ``1 + repeats`` steps with ``StepClock``, a ``TrainerCallback`` stamping
  ``on_step_end``: the median interval between consecutive stamps after the first step (data
  loading, generation, loss, backward, optimizer and TRL's per-step bookkeeping included).
* Compilations are counted with a ``jax.monitoring`` listener on
  ``/jax/core/compile/backend_compile_duration`` (one event per XLA compilation, robust on
  jax 0.10.2; ``jax_log_compiles`` only logs). A run reports how many programs it compiled in
  all, how many of them happened during the timed steady state (must be 0: no recompilation),
  and the seconds spent tracing, lowering and compiling.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import numpy as np

from benchmarks._common import program_peak_bytes
from rlhf_jax.models import ModelConfig, init_model, model_for

SMALL_LLAMA = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=4,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=512)
PAD_ID, EOS_ID = 0, 1


# --- the optional stack -------------------------------------------------------------------

def trl_stack():
    """``(torch, transformers, trl)`` if all import, else ``(None, None, None)``."""
    try:
        import torch
        import transformers
        import trl
    except ImportError:
        return None, None, None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch, transformers, trl


def versions() -> dict:
    torch, transformers, trl = trl_stack()
    out = {"jax": jax.__version__}
    if torch is not None:
        out |= {"torch": torch.__version__, "transformers": transformers.__version__,
                "trl": trl.__version__, "torch_threads": torch.get_num_threads()}
    return out


# --- tokenizer ----------------------------------------------------------------------------

def word_text(ids) -> str:
    """Token ids as the tokenizer's text (``[5, 9] -> "t5 t9"``)."""
    return " ".join(f"t{int(i)}" for i in ids)


def write_tokenizer(directory: str, vocab_size: int) -> str:
    """A word-level ``tokenizer.json`` + ``tokenizer_config.json`` in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": PAD_ID, "</s>": EOS_ID} | {f"t{i}": i for i in range(2, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<pad>", "</s>"])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False,
                   "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}, f)
    return directory


def hf_tokenizer(directory: str):
    import transformers

    return transformers.PreTrainedTokenizerFast.from_pretrained(directory)


# --- checkpoints ----------------------------------------------------------------------------

def _hf_config(transformers, arch: dict, cls_name: str):
    return transformers.LlamaConfig(
        vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"], num_key_value_heads=arch["num_kv_heads"],
        max_position_embeddings=arch["max_position_embeddings"],
        tie_word_embeddings=arch.get("tie_embeddings", False),
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None, num_labels=1,
        architectures=[cls_name])


def make_checkpoint(directory: str, *, arch: dict = SMALL_LLAMA, seed: int = 0,
                    kind: str = "causal_lm") -> str | None:
    """Save a random ``LlamaForCausalLM`` (``kind="causal_lm"``) or one-label
    ``LlamaForSequenceClassification`` (``"reward"``) made with ``torch.manual_seed(seed)`` into
    ``directory``; None when transformers is absent."""
    torch, transformers, _ = trl_stack()
    if torch is None:
        return None
    cls = {"causal_lm": transformers.LlamaForCausalLM,
           "reward": transformers.LlamaForSequenceClassification}[kind]
    torch.manual_seed(seed)
    model = cls(_hf_config(transformers, arch, cls.__name__)).float()
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_ours(directory: str | None, *, heads: tuple[str, ...], arch: dict = SMALL_LLAMA,
              seed: int = 0):
    """``(Model, params)``: imported from ``directory``, or (no transformers) initialised by us
    on the same architecture."""
    if directory is None:
        cfg = ModelConfig(family="llama", heads=heads, **{"tie_embeddings": False} | arch)
        return init_model(cfg, jax.random.PRNGKey(seed))
    from rlhf_jax.models import load_hf_checkpoint

    cfg, params = load_hf_checkpoint(directory, heads=heads)
    return model_for(cfg), params


def value_from_reward(directory: str | None, *, arch: dict = SMALL_LLAMA, seed: int = 1):
    """Our critic (``heads=("value",)``) with the reward checkpoint's trunk and its ``score``
    row as the value head (bias 0): the same network TRL's PPO uses as its value model."""
    model, params = load_ours(directory, heads=("value",), arch=arch, seed=seed)
    if directory is not None:
        _, rm = load_ours(directory, heads=("reward",), arch=arch, seed=seed)
        head = dict(params["value_head"])
        head["kernel"] = rm["reward_head"]["kernel"].reshape(head["kernel"].shape)
        params = dict(params) | {"value_head": head}
    return model, params


# --- timing and compilation counting -------------------------------------------------------

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_COMPILE_PHASES = (_COMPILE_EVENT, "/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration")


class CompileCounter:
    """Counts XLA compilations and their seconds through ``jax.monitoring`` (process-wide)."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **_):
        if name == _COMPILE_EVENT:
            self.count += 1
        if name in _COMPILE_PHASES:
            self.seconds += duration

    def snapshot(self) -> tuple[int, float]:
        return self.count, self.seconds


def time_ours(fn, *, repeats: int, counter: CompileCounter) -> dict:
    """Warm up ``fn`` once (compiles), then the median of ``repeats`` calls; ``fn`` blocks.

    Returns seconds (``first``, ``median``, ``runs``), ``compile_s`` (first - median),
    ``compile_trace_lower_compile_s`` (from the listener), ``compiled_programs`` during the
    warm-up and ``recompiles_timed`` (compilations during the timed calls)."""
    c0, s0 = counter.snapshot()
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    c1, s1 = counter.snapshot()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    c2, _ = counter.snapshot()
    med = statistics.median(runs)
    return {"first": first, "median": med, "runs": runs, "compile_s": first - med,
            "compile_trace_lower_compile_s": s1 - s0, "compiled_programs": c1 - c0,
            "recompiles_timed": c2 - c1}


def make_step_clock():
    """A ``TrainerCallback`` stamping ``time.perf_counter()`` at train begin and every step end."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_train_begin(self, args, state, control, **kw):
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

        def step_seconds(self) -> dict:
            d = np.diff(self.stamps)
            if len(d) < 2:
                raise RuntimeError(f"TRL ran {len(d)} steps; need a warm-up and a timed one")
            return {"first": float(d[0]), "median": float(statistics.median(d[1:])),
                    "runs": [float(x) for x in d[1:]]}

    return StepClock()


def trl_common_args(output_dir: str, *, steps: int, lr: float, batch: int, seed: int = 0
                    ) -> dict:
    """TrainingArguments shared by every TRL config: our optimizer settings, no overheads."""
    return dict(output_dir=output_dir, max_steps=steps, learning_rate=lr,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0, seed=seed, data_seed=seed)


def r(x: float | None, n: int = 3):
    return None if x is None else round(float(x), n)


def summarize(ours: dict, theirs: dict | None, *, unit: str, work: float) -> dict:
    """Figures of both sides. ``work`` units per step (pairs, tokens) for throughput units;
    for ``unit == "s/step"`` the figure is seconds per step. The ratio is always "how many
    times faster we are" (TRL seconds / our seconds)."""
    def figure(sec):
        return r(sec, 3) if unit == "s/step" else r(work / sec, 1)

    rec = {"unit": unit, "ours": figure(ours["median"]),
           "ours_runs_s": [r(x) for x in ours["runs"]],
           "ours_compile_s": r(ours["compile_s"], 2),
           "ours_compile_trace_lower_compile_s": r(ours["compile_trace_lower_compile_s"], 2),
           "ours_compiled_programs": ours["compiled_programs"],
           "ours_recompiles_timed": ours["recompiles_timed"],
           "trl": None, "ratio": None}
    if theirs is not None:
        rec |= {"trl": figure(theirs["median"]), "trl_runs_s": [r(x) for x in theirs["runs"]],
                "trl_first_step_s": r(theirs["first"]),
                "ratio": r(theirs["median"] / ours["median"], 2)}
    return rec


def parse_args(description: str, argv, *, flags: tuple = (), **ints: int):
    """The workload flags ``--name N`` (one per keyword, its default; ``prompt_len`` is spelled
    ``--prompt-len``), ``--repeats`` among them, plus ``--no-trl`` and ``flags`` (``(name,
    argparse keywords)`` pairs). Returns ``(args, a fresh CompileCounter, whether TRL runs)``:
    torch/trl installed and not ``--no-trl``."""
    import argparse

    p = argparse.ArgumentParser(description=description.splitlines()[0])
    for name, default in ints.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    for name, kw in flags:
        p.add_argument(name, **kw)
    p.add_argument("--no-trl", action="store_true", help="run our side only")
    a = p.parse_args(argv)
    return a, CompileCounter(), trl_stack()[0] is not None and not a.no_trl


# --- memory ------------------------------------------------------------------------------------

def current_rss_mib() -> float:
    """This process's resident set now (``/proc/self/statm``), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident set so far (``ru_maxrss``, KiB on Linux), MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(queue, fn, args, kw):
    try:
        queue.put(("ok", fn(*args, **kw), peak_rss_mib()))
    except BaseException:  # the parent re-raises it: a failed child never passes for a result
        import traceback

        queue.put(("error", traceback.format_exc(), None))
        raise


def in_child(fn, *args, **kw):
    """``(fn(*args, **kw), the child's peak RSS in MiB)`` from a fresh (spawned) process, so
    that what ``fn`` allocates (torch, TRL) neither counts in our peak RSS nor stays resident
    here. ``fn`` must be a module-level function; the child imports its module (jax included,
    no arrays)."""
    import multiprocessing
    import queue as queue_mod

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args, kw))
    proc.start()
    while True:  # a child killed outright (out of memory) puts nothing: stop waiting then
        try:
            status, out, rss = queue.get(timeout=10)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                status, out, rss = "error", "no result", None
                break
    proc.join()
    if status != "ok" or proc.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed in its process (exit {proc.exitcode}):\n{out}")
    return out, rss


def compiled_memory_mib(compiled) -> dict:
    """A compiled program's ``memory_analysis()`` in MiB: arguments, outputs, aliased (donated
    arguments reused as outputs), temporaries, and ``peak = argument + output - alias +
    temp`` (what the program needs at once, its inputs included)."""
    m = compiled.memory_analysis()
    b = {k: getattr(m, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp")}
    b["peak"] = program_peak_bytes(compiled)
    return {k: round(v / 2**20, 1) for k, v in b.items()}


def random_prompts(rows: int, length: int, vocab: int = SMALL_LLAMA["vocab_size"]) -> np.ndarray:
    """``[rows, length]`` prompt ids drawn with seed 0, never the pad (0) or EOS (1) id."""
    return np.random.default_rng(0).integers(2, vocab, (rows, length)).astype(np.int32)
