"""Bad input gets a clear error at load time, before anything is built or compiled.

Every pipeline entry point (``run(cfg)``) is called on bad data with its model loader and its
``jax.jit`` replaced by sentinels that raise: the test passes only if the ``DataError`` (naming
file, line and field, or stating sizes and limits) comes first. The config checks (batch vs
devices and micro-batches, group size, minibatches, prompt + completion vs the model's
positions) are held to their messages the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types

import jax
import numpy as np
import pytest

import rlhf_jax.train.onpolicy as train_onpolicy
import rlhf_jax.train.rollout_eval as train_rollout_eval
import rlhf_jax.train.step as train_step
import rlhf_jax.train.supervised as train_supervised
from rlhf_jax.data import (DataError, encode_sft, load_jsonl, train_bpe_tokenizer)
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.pipelines import (DataConfig, GenerationConfig, LoggingConfig, LoopConfig,
                                ModelSpec, OptimizerConfig, RewardConfig, best_of_n, datasets,
                                distill, dpo, grpo, onpolicy, ppo, reward_model, run_dir, setup,
                                sft, supervised)
from rlhf_jax.rewards import exact_match_reward
from rlhf_jax.train import make_schedule, read_jsonl_metrics

MODULES = (sft, reward_model, dpo, distill, ppo, grpo, best_of_n, onpolicy, supervised, setup,
           datasets, run_dir, train_onpolicy, train_rollout_eval, train_step, train_supervised)
TINY = ModelSpec(preset="toy-1m", overrides={"hidden_size": 32, "intermediate_size": 64,
                                             "num_layers": 1, "num_heads": 2,
                                             "num_kv_heads": 1})
LOOP = LoopConfig(total_steps=1)
QUIET = LoggingConfig(progress=False, tensorboard=False)
OPT = OptimizerConfig(schedule="constant")  # no warmup: the stages' defaults exceed LOOP's 1


class Compiled(Exception):
    """Raised by the sentinels: something was built or compiled before validation."""


def _sentinel(what):
    def f(*args, **kwargs):
        raise Compiled(what)
    return f


class _NoJit(types.ModuleType):
    """``jax`` as a pipeline module sees it, except that ``jit`` raises."""

    def __init__(self):
        super().__init__("jax")

    def __getattr__(self, name):
        if name == "jit":
            return _sentinel("jax.jit")
        return getattr(jax, name)


@pytest.fixture
def no_jit(monkeypatch):
    """No ``jax.jit`` and no sampler in any pipeline module (models may still be built)."""
    for mod in MODULES:
        if hasattr(mod, "jax"):
            monkeypatch.setattr(mod, "jax", _NoJit())
        for name in ("make_sampler", "fit"):  # fit builds and jits the supervised stages' steps
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, _sentinel(name))


@pytest.fixture
def no_build(no_jit, monkeypatch):
    """Additionally no model loading: a stage must fail on its data before either."""
    for mod in MODULES:
        if hasattr(mod, "load_model"):
            monkeypatch.setattr(mod, "load_model", _sentinel("load_model"))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    texts = ["What is 2 plus 3? The answer is 5.", "Tell me a story about a cat.",
             "The cat sat on the mat and ate the rat."] * 20
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1).save(path)
    return path


GOOD = {
    "prompt_completion": {"prompt": "What is 2 plus 3?", "completion": "5"},
    "preference": {"prompt": "Tell me a story.", "chosen": "The cat sat.", "rejected": "No."},
    "prompt": {"prompt": "2 plus 3?", "answer": "5"},
}
FMT = {"sft": "prompt_completion", "distill": "prompt_completion", "reward_model": "preference",
       "dpo": "preference", "ppo": "prompt", "grpo": "prompt", "best_of_n": "prompt"}
STAGES = tuple(FMT)


def _write(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return str(path)


DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)}
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)}
ALGORITHMS = {"ppo": ppo.PPOAlgorithmConfig, "grpo": grpo.GRPOAlgorithmConfig}


def _cfg(stage: str, data: str, tok: str, out: str, **kw):
    """A small config of ``stage`` reading ``data``; ``kw`` overrides fields, by their name in
    their block (``batch_size``, ``eval`` ... of ``data``; ``max_new_tokens`` of ``sampling``;
    ``group_size``, ``num_minibatches`` ... of ``algorithm``) or at the top level."""
    data_kw = dict(train=data, batch_size=2, max_prompt_length=8, max_length=16)
    sampling_kw = dict(max_new_tokens=4)
    algorithm_kw = dict(ppo=dict(num_minibatches=1), grpo=dict(group_size=2)).get(stage, {})
    top = dict(tokenizer=tok, output_dir=out, seed=0)
    if stage != "best_of_n":
        top |= dict(loop=LOOP, logging=QUIET, optimizer=OPT, mesh=None)
    for key, value in kw.items():
        if key in DATA_FIELDS:
            data_kw[key] = value
        elif key in SAMPLING_FIELDS and stage in ("ppo", "grpo", "best_of_n"):
            sampling_kw[key] = value
        elif stage in ALGORITHMS and key in {f.name for f in
                                             dataclasses.fields(ALGORITHMS[stage])}:
            algorithm_kw[key] = value
        else:
            top[key] = value
    if stage in ("sft", "distill"):
        cfg_data = DataConfig(**data_kw)
        if stage == "sft":
            return sft.SFTConfig(**(dict(data=cfg_data, model=TINY) | top))
        return distill.DistillConfig(**(dict(data=cfg_data, teacher=TINY, student=TINY) | top))
    if stage in ("reward_model", "dpo"):
        cfg_data = DataConfig(**(dict(on_overflow="error") | data_kw))
        if stage == "reward_model":
            return reward_model.RewardModelConfig(**(dict(data=cfg_data, model=TINY) | top))
        return dpo.DPOConfig(**(dict(data=cfg_data, policy=TINY) | top))
    base = dict(data=DataConfig(**data_kw), policy=TINY,
                sampling=GenerationConfig(**sampling_kw))
    if stage == "ppo":
        return ppo.PPOConfig(**(base | dict(rewards=RewardConfig(model=TINY),
                                            algorithm=ppo.PPOAlgorithmConfig(**algorithm_kw))
                                | top))
    if stage == "grpo":
        return grpo.GRPOConfig(**(base | dict(algorithm=grpo.GRPOAlgorithmConfig(**algorithm_kw))
                                  | top))
    return best_of_n.BestOfNConfig(**(base | dict(rewards=RewardConfig(model=TINY),
                                                  group_size=2, progress=False) | top))


def _run(stage, cfg):
    mod = {"sft": sft, "distill": distill, "reward_model": reward_model, "dpo": dpo,
           "ppo": ppo, "grpo": grpo, "best_of_n": best_of_n}[stage]
    if stage == "grpo":
        return mod.run(cfg, reward_fns={"exact_match": exact_match_reward})
    return mod.run(cfg)


# (case, bad line 2 for a format, expected message after "<path>:2: ")
def _bad_rows(fmt):
    good = GOOD[fmt]
    no_prompt = {k: v for k, v in good.items() if k != "prompt"}
    # without its prompt a preference row is an implicit-prompt one (TRL's): it is then the
    # shared prefix of chosen and rejected, and these two share none
    missing = ("field 'chosen': chosen and rejected share no prompt prefix; give an explicit "
               "'prompt' field" if fmt == "preference" else
               f"field 'prompt': missing (the row has fields {sorted(no_prompt)})")
    return [
        ("malformed_json", b'{"prompt": "a",', "malformed JSON: "),
        ("not_an_object", [good], "expected a JSON object, got list"),
        ("missing_field", no_prompt, missing),
        ("wrong_type", good | {"prompt": 7}, "field 'prompt': expected a non-empty string or "
                                            "a list of messages, got int"),
        ("null", good | {"prompt": None}, "field 'prompt': expected a non-empty string or a "
                                          "list of messages, got null"),
        ("invalid_utf8", b'{"prompt": "caf\xe9"}', "invalid UTF-8 at byte 15 of the line: "
                                                   "invalid continuation byte"),
        ("empty_prompt", good | {"prompt": ""}, "field 'prompt': expected a non-empty string, "
                                                "got an empty string"),
    ]


CASES = [(stage, case, line, msg) for stage in STAGES
         for case, line, msg in _bad_rows(FMT[stage])]


@pytest.mark.parametrize("stage,case,line,msg", CASES,
                         ids=[f"{s}-{c}" for s, c, _, _ in CASES])
def test_bad_row_is_named_before_any_build(stage, case, line, msg, tmp_path, tok_dir, no_build):
    good = GOOD[FMT[stage]]
    data = _write(tmp_path / "train.jsonl", [good, line, good, good])
    with pytest.raises(DataError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run")))
    assert str(err.value).startswith(f"{data}:2: {msg}"), str(err.value)


@pytest.mark.parametrize("stage", ["sft", "distill", "reward_model", "dpo"])
def test_missing_other_field_is_named(stage, tmp_path, tok_dir, no_build):
    fmt = FMT[stage]
    field = "completion" if fmt == "prompt_completion" else "rejected"
    good = GOOD[fmt]
    bad = good | {field: 3}
    data = _write(tmp_path / "train.jsonl", [good, good, good, bad])
    with pytest.raises(DataError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run")))
    assert str(err.value) == (f"{data}:4: field {field!r}: expected a non-empty string or a "
                              f"list of messages, got int")


@pytest.mark.parametrize("stage", ["sft", "distill", "reward_model", "dpo"])
def test_a_row_mixing_strings_and_conversations_is_named(stage, tmp_path, tok_dir, no_build):
    fmt = FMT[stage]
    field = "completion" if fmt == "prompt_completion" else "rejected"
    good = GOOD[fmt]
    bad = good | {field: [{"role": "assistant", "content": "hi"}]}
    data = _write(tmp_path / "train.jsonl", [good, good, good, bad])
    with pytest.raises(DataError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run")))
    assert str(err.value).startswith(f"{data}:4: field {field!r}: mixes strings (")
    assert f"with conversations (['{field}'])" in str(err.value)


# ----------------------------------------------------------------------------- sizes, limits
LONG = "The cat sat on the mat and ate the rat. " * 6


@pytest.mark.parametrize("stage", ["reward_model", "dpo", "ppo", "grpo", "best_of_n"])
def test_prompt_too_long_states_size_and_limit(stage, tmp_path, tok_dir, no_build):
    good = GOOD[FMT[stage]]
    data = _write(tmp_path / "train.jsonl", [good, good, good | {"prompt": LONG}])
    with pytest.raises(DataError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run")))
    text = str(err.value)
    assert text.startswith(f"{data}:3: field 'prompt': the prompt is "), text
    n = int(text.split("the prompt is ")[1].split(" tokens")[0])
    assert n > 8
    assert text.endswith("tokens (BOS included), longer than "
                         "max_prompt_length=8; prompts are never truncated: raise "
                         "max_prompt_length or pass on_overflow='skip'")


@pytest.mark.parametrize("stage", ["sft", "distill"])
def test_sequence_too_long_states_size_and_limit(stage, tmp_path, tok_dir, no_build):
    good = GOOD[FMT[stage]]
    data = _write(tmp_path / "train.jsonl", [good, good | {"completion": LONG}, good])
    with pytest.raises(DataError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run"), on_overflow="error"))
    text = str(err.value)
    assert text.startswith(f"{data}:2: field 'completion': the sequence is "), text
    assert text.endswith(" tokens, longer than max_length=16; raise max_length or pass "
                         "on_overflow='truncate' or 'skip'")


@pytest.mark.parametrize("stage", ["sft", "distill"])
def test_all_supervised_tokens_truncated(stage, tmp_path, tok_dir, no_build):
    good = GOOD[FMT[stage]]
    data = _write(tmp_path / "train.jsonl", [good, good | {"prompt": LONG}, good])
    with pytest.raises(DataError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run"), on_overflow="truncate"))
    text = str(err.value)
    assert text.startswith(f"{data}:2: field 'completion': all supervised tokens truncated: "
                           "the sequence is "), text
    assert "beyond max_length=16; raise max_length or pass on_overflow='skip'" in text


@pytest.mark.parametrize("stage,limits", [
    ("sft", "max_length=16"), ("distill", "max_length=16"),
    ("reward_model", "max_prompt_length=8 or max_length=16"),
    ("dpo", "max_prompt_length=8 or max_length=16")])
def test_dataset_filtered_to_nothing_by_length(stage, limits, tmp_path, tok_dir, no_build):
    fmt = FMT[stage]
    long_row = GOOD[fmt] | ({"prompt": LONG} if fmt == "preference" else {"completion": LONG})
    data = _write(tmp_path / "train.jsonl", [long_row] * 3)
    with pytest.raises(DataError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run"), on_overflow="skip"))
    assert str(err.value) == (f"{data}: no rows left: all 3 rows are longer than {limits} "
                              f"(on_overflow='skip')")


@pytest.mark.parametrize("stage", ["sft", "distill", "reward_model", "dpo"])
def test_dataset_filtered_to_nothing_by_skip_invalid(stage, tmp_path, tok_dir, no_build):
    fmt = FMT[stage]
    data = _write(tmp_path / "train.jsonl", [GOOD[fmt] | {"prompt": 1}, b"nope", b"{}"])
    with pytest.raises(DataError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run"), skip_invalid=True))
    assert str(err.value) == (
        f"{data}: no valid {fmt!r} rows: all 3 rows were skipped as invalid; first: {data}:1: "
        f"field 'prompt': expected a non-empty string or a list of messages, got int")


@pytest.mark.parametrize("stage", STAGES)
def test_empty_file_is_an_error(stage, tmp_path, tok_dir, no_build):
    data = _write(tmp_path / "train.jsonl", [b"", b"   "])
    with pytest.raises(DataError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run")))
    assert str(err.value) == f"{data}: no rows: the dataset is empty (0 non-blank lines)"


@pytest.mark.parametrize("stage", ["sft", "reward_model", "distill", "dpo", "ppo", "grpo"])
def test_dataset_smaller_than_batch_is_refused_before_any_build(stage, tmp_path, tok_dir,
                                                                 no_build):
    data = _write(tmp_path / "train.jsonl", [GOOD[FMT[stage]]])
    with pytest.raises(ValueError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run"), batch_size=4))
    assert "the dataset has 1 examples, fewer than batch_size=4" in str(err.value)


@pytest.mark.parametrize("stage", ["sft", "distill"])
def test_packed_rows_are_not_called_examples(stage, tmp_path, tok_dir, no_build):
    # Issue 15: "dataset has 41 examples" counted packed rows. 6 short examples pack into
    # fewer rows of 64 tokens than the batch of 4; the message says both numbers.
    data = _write(tmp_path / "train.jsonl", [GOOD[FMT[stage]]] * 6)
    with pytest.raises(ValueError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run"), batch_size=4,
                         packing=True, max_length=64))
    assert re.search(r"the dataset has \d packed rows of 64 tokens \(from 6 examples\), fewer "
                     r"than batch_size=4", str(err.value)), str(err.value)


@pytest.mark.parametrize("stage", ["sft", "reward_model", "distill", "dpo", "ppo", "grpo"])
def test_bad_eval_data_is_named_before_any_build(stage, tmp_path, tok_dir, no_build):
    good = GOOD[FMT[stage]]
    data = _write(tmp_path / "train.jsonl", [good] * 4)
    bad = _write(tmp_path / "eval.jsonl", [good, good, good | {"prompt": 4}])
    with pytest.raises(DataError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run"), eval=bad))
    assert str(err.value) == (f"{bad}:3: field 'prompt': expected a non-empty string or a "
                              f"list of messages, got int")


@pytest.mark.parametrize("stage", ["sft", "reward_model", "distill", "dpo"])
def test_eval_set_smaller_than_batch_is_evaluated_not_refused(stage, tmp_path, tok_dir,
                                                              no_build):
    """One eval row with batches of 2 passes the data checks (its batch is filled with rows
    that add nothing: tests/pipelines/test_eval_batches.py) and the stage goes on to build."""
    good = GOOD[FMT[stage]]
    data = _write(tmp_path / "train.jsonl", [good] * 4)
    evals = _write(tmp_path / "eval.jsonl", [good])
    with pytest.raises(Compiled, match="load_model"):
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run"), eval=evals))


# ----------------------------------------------------------------------------- skip and count
def test_skip_invalid_counts_and_the_run_goes_on(tmp_path, tok_dir, no_build):
    good = GOOD["prompt_completion"]
    data = _write(tmp_path / "train.jsonl",
                  [good, b"{oops", good | {"completion": 3}, good, b'{"prompt": "\xff"}', good])
    ds = load_jsonl(data, fmt="prompt_completion", skip_invalid=True)
    assert (len(ds), ds.skipped, ds.lines) == (3, 3, (1, 4, 6))
    assert ds.skipped_reasons[0].startswith(f"{data}:2: malformed JSON: ")
    assert ds.skipped_reasons[1:] == (
        f"{data}:3: field 'completion': expected a non-empty string or a list of messages, "
        "got int",
        f"{data}:5: invalid UTF-8 at byte 12 of the line: invalid start byte")
    # The run gets past its data (and reaches the model loader, stubbed here).
    with pytest.raises(Compiled, match="load_model"):
        _run("sft", _cfg("sft", data, tok_dir, str(tmp_path / "run"), skip_invalid=True))
    with pytest.raises(DataError, match=f"^{data}:2: malformed JSON"):
        _run("sft", _cfg("sft", data, tok_dir, str(tmp_path / "run2")))


def test_on_overflow_skip_counts(tmp_path, tok_dir):
    from rlhf_jax.data import Tokenizer
    good = GOOD["prompt_completion"]
    data = _write(tmp_path / "d.jsonl", [good, good | {"completion": LONG}, good])
    enc = encode_sft(load_jsonl(data, fmt="prompt_completion"), Tokenizer.load(tok_dir),
                     max_length=16, on_overflow="skip")
    assert (len(enc.items), enc.skipped) == (2, 1)


# ----------------------------------------------------------------------------- config sanity
def test_batch_not_divisible_by_devices(tmp_path, tok_dir, no_build):
    assert jax.local_device_count() == 8
    data = _write(tmp_path / "train.jsonl", [GOOD["prompt_completion"]] * 12)
    with pytest.raises(ValueError) as err:
        _run("sft", _cfg("sft", data, tok_dir, str(tmp_path / "run"), batch_size=12,
                         mesh=MeshConfig()))
    assert str(err.value) == ("data.batch_size 12 is not divisible by data x fsdp = 8 (mesh "
                              "{'data': 8, 'fsdp': 1, 'tensor': 1} over 8 devices); change "
                              "data.batch_size or the mesh (mesh=None: one device)")
    data = _write(tmp_path / "prompts.jsonl", [GOOD["prompt"]] * 6)
    with pytest.raises(ValueError,
                       match="^data.batch_size 6 is not divisible by data x fsdp = 8"):
        _run("ppo", _cfg("ppo", data, tok_dir, str(tmp_path / "ppo"), batch_size=6,
                         num_minibatches=2, mesh=MeshConfig()))


@pytest.mark.parametrize("stage", ["sft", "reward_model", "dpo", "distill"])
def test_batch_not_divisible_by_micro_batches(stage, tmp_path):
    with pytest.raises(ValueError) as err:
        _cfg(stage, "d.jsonl", "tok", str(tmp_path), batch_size=8, micro_batches=3)
    assert str(err.value) == "data.batch_size 8 is not divisible by micro_batches 3"


def test_group_size_one_is_rejected():
    with pytest.raises(ValueError) as err:
        _cfg("grpo", "p.jsonl", "tok", "out", group_size=1)
    assert str(err.value) == "algorithm.group_size must be >= 2 for group baselines, got 1"


def test_rollout_batch_not_divisible_by_minibatches():
    with pytest.raises(ValueError) as err:
        _cfg("ppo", "p.jsonl", "tok", "out", batch_size=10, num_minibatches=4)
    assert str(err.value) == ("data.batch_size 10 is not divisible by "
                              "algorithm.num_minibatches 4")
    with pytest.raises(ValueError) as err:
        _cfg("grpo", "p.jsonl", "tok", "out", batch_size=3, group_size=3, num_minibatches=2)
    assert str(err.value) == ("data.batch_size * algorithm.group_size = 9 must be divisible by "
                              "algorithm.num_minibatches 2")


SMALL_CONTEXT = ModelSpec(preset="toy-1m", overrides=dict(TINY.overrides,
                                                          max_position_embeddings=10))


@pytest.mark.parametrize("stage,who,extra", [
    ("ppo", "policy", {}), ("ppo", "critic", {"value_init": SMALL_CONTEXT}),
    ("ppo", "reward", {"value_model": "shared"}), ("grpo", "policy", {}),
    ("grpo", "reference", {}), ("grpo", "reward", {}), ("best_of_n", "policy", {}),
    ("best_of_n", "reward", {})])
def test_prompt_plus_completion_must_fit_the_cache(stage, who, extra, tmp_path, tok_dir,
                                                   no_jit):
    data = _write(tmp_path / "prompts.jsonl", [GOOD["prompt"]] * 4)
    kw = {"policy": dict(policy=SMALL_CONTEXT), "reference": dict(reference=SMALL_CONTEXT),
          "reward": dict(rewards=RewardConfig(model=SMALL_CONTEXT)), "critic": {}}[who]
    with pytest.raises(ValueError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run"), max_prompt_length=8,
                         max_new_tokens=4, **kw, **extra))
    assert str(err.value) == (
        f"the prompts (padded to 8 tokens, at most data.max_prompt_length) + "
        f"sampling.max_new_tokens 4 = 12 tokens exceeds the {who} model's "
        f"max_position_embeddings 10 (the KV cache and position limit); lower max_new_tokens "
        f"or use shorter prompts")


@pytest.mark.parametrize("stage,who", [("sft", "model"), ("reward_model", "model"),
                                       ("dpo", "policy"), ("distill", "student")])
def test_training_rows_must_fit_the_positions(stage, who, tmp_path, tok_dir, no_jit):
    """Rows padded to 16 tokens on a model of 10 positions: refused before anything compiles
    (it would otherwise compile and run out of positions or memory)."""
    good = GOOD[FMT[stage]]
    data = _write(tmp_path / "train.jsonl", [good | {"prompt": "The cat sat on the mat"}] * 4)
    kw = {"sft": dict(model=SMALL_CONTEXT), "reward_model": dict(model=SMALL_CONTEXT),
          "dpo": dict(policy=SMALL_CONTEXT), "distill": dict(student=SMALL_CONTEXT)}[stage]
    with pytest.raises(ValueError) as err:
        _run(stage, _cfg(stage, data, tok_dir, str(tmp_path / "run"), **kw))
    assert str(err.value).startswith("the data's rows are padded to 16 tokens (their longest, "
                                     "at most data.max_length), beyond the ")
    assert f"{who} model's max_position_embeddings 10" in str(err.value)


def test_prompt_plus_completion_that_fits_reaches_the_sampler(tmp_path, tok_dir, no_jit):
    data = _write(tmp_path / "prompts.jsonl", [GOOD["prompt"]] * 4)
    fits = ModelSpec(preset="toy-1m", overrides=dict(TINY.overrides,
                                                     max_position_embeddings=12))
    with pytest.raises(Compiled, match="make_sampler"):
        _run("best_of_n", _cfg("best_of_n", data, tok_dir, str(tmp_path / "run"),
                               policy=fits, rewards=RewardConfig(model=fits)))


def test_a_data_error_writes_nothing_and_its_advice_can_be_followed(tmp_path, tok_dir):
    """The error says "raise max_length or pass on_overflow=..."; doing so in the same
    output_dir is not refused as "a different config" (nothing was written by the failed start,
    and a directory without a checkpoint has nothing to resume)."""
    good = GOOD["prompt_completion"]
    data = _write(tmp_path / "train.jsonl", [good] * 3 + [good | {"completion": LONG}])
    out = tmp_path / "run"
    with pytest.raises(DataError, match="on_overflow='truncate' or 'skip'"):
        _run("sft", _cfg("sft", data, tok_dir, str(out)))
    assert not out.exists()
    out.mkdir()
    (out / "config.json").write_text('{"kind": "SFTConfig", "data": {}}')  # an older start's
    result = _run("sft", _cfg("sft", data, tok_dir, str(out), on_overflow="skip"))
    assert result["complete"]
    with pytest.raises(ValueError, match="holds a run with a different config"):
        _run("sft", _cfg("sft", data, tok_dir, str(out), on_overflow="truncate"))


# ----------------------------------------------------------------------------- optimizer vs run
def test_nan_learning_rate_is_refused_at_config_time():
    with pytest.raises(ValueError, match="learning_rate") as err:
        OptimizerConfig(learning_rate=float("nan"))
    assert "nan" in str(err.value)


@pytest.mark.parametrize("stage", ["sft", "reward_model", "dpo", "distill", "ppo", "grpo"])
def test_warmup_longer_than_the_run_is_refused_before_anything_is_written(stage, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        _cfg(stage, "d.jsonl", "tok", str(out), optimizer=OptimizerConfig(warmup_steps=5),
             loop=LoopConfig(total_steps=4))
    assert str(err.value) == ("optimizer.warmup_steps 5 exceeds the run's loop.total_steps 4; "
                              "lower warmup_steps")
    assert not out.exists()


def test_finished_run_is_extended_by_raising_total_steps(tmp_path, tok_dir):
    """The fix a finished run needs to train longer, a larger ``loop.total_steps`` in the same
    ``output_dir``, is no "different config"; the schedule is then the longer run's."""
    data = _write(tmp_path / "train.jsonl", [GOOD["prompt_completion"]] * 4)
    opt = OptimizerConfig(learning_rate=1e-2, schedule="linear", min_lr_ratio=0.1)
    out = str(tmp_path / "run")

    def run(steps):
        return _run("sft", _cfg("sft", data, tok_dir, out, optimizer=opt,
                                loop=LoopConfig(total_steps=steps, log_every=1)))

    first = run(2)
    assert (first["steps"], first["complete"]) == (2, True)
    second = run(4)
    assert (second["steps"], second["complete"]) == (4, True)
    rows = [r for r in read_jsonl_metrics(os.path.join(out, "metrics.jsonl"))
            if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    short, long = make_schedule(opt, 2), make_schedule(opt, 4)
    want = [float(short(0)), float(short(1)), float(long(2)), float(long(3))]
    assert float(short(2)) != want[2]  # the extension decays over 4 steps, not 2
    np.testing.assert_allclose([r["learning_rate"] for r in rows], want, rtol=1e-6)
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["loop"]["total_steps"] == 4
