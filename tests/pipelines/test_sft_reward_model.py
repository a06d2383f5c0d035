"""SFT and reward-model runs: smoke, exact resume, gradient accumulation, the data-parallel mesh,
and the config checks that run before anything compiles."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax.models import load_hf_checkpoint
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.pipelines import DataConfig, sft
from rlhf_jax.pipelines.run_dir import prepare_run_dir
from rlhf_jax.pipelines.setup import load_model
from tests.pipelines.common import (assert_moved, assert_run_outputs, assert_states_equal, flat,
                                    read, train_rows)
from tests.pipelines.conftest import TINY, sft_config


@pytest.fixture(scope="module")
def resumed(world):
    """SFT in a fresh directory: 2 steps, then the same run extended to 4 (same optimizer)."""
    cfg = sft_config(world.root, world.tokenizer, world.pref["sft"], "sft_resumed", steps=2)
    first = sft.run(cfg)
    second = sft.run(dataclasses.replace(cfg, loop=world.sft_cfg.loop))
    return first, second


def test_sft_smoke(world):
    rows = assert_run_outputs(world.sft, steps=4, kind="SFTConfig")
    _, init = load_model(TINY, heads=("lm",), vocab_size=512, seed=0)
    assert_moved(world.sft["model_dir"], init, heads=("lm",))
    # the exported checkpoint is the final state, bit for bit
    _, exported = load_hf_checkpoint(world.sft["model_dir"], heads=("lm",))
    for k, v in flat(exported).items():
        np.testing.assert_array_equal(v, flat(world.sft["state"].params)[k], err_msg=k)
    # an untrained model's NLL is about log(V); the warmup's first step has learning rate 0
    assert abs(rows[0]["loss"] - np.log(512)) < 0.5
    assert rows[0]["learning_rate"] == 0.0 and rows[1]["learning_rate"] == pytest.approx(1e-2)
    assert rows[0]["nll"] == pytest.approx(rows[0]["loss"], rel=1e-6)
    assert all(r["count"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_reward_model_smoke(world):
    rows = assert_run_outputs(world.rm, steps=3, kind="RewardModelConfig")
    _, init = load_hf_checkpoint(world.sft["model_dir"], heads=("reward",))
    assert_moved(world.rm["model_dir"], init, heads=("reward",))
    # the reward head starts at zero: every reward is 0 and the Bradley-Terry loss is log 2
    assert rows[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert rows[0]["rewards/mean"] == 0.0 and rows[0]["count"] == 8.0
    assert 0.0 <= rows[-1]["rewards/accuracy"] <= 1.0
    config, _ = load_hf_checkpoint(world.rm["model_dir"])
    assert config.heads == ("reward",)


def test_sft_exact_resume(world, resumed):
    first, second = resumed
    assert first["steps"] == 2 and second["steps"] == 4
    assert_states_equal(second["state"], world.sft["state"])
    assert read(os.path.join(second["run_dir"], "ledger.tsv")) == read(
        os.path.join(world.sft["run_dir"], "ledger.tsv"))
    assert len(read(os.path.join(second["run_dir"], "ledger.tsv")).splitlines()) == 4
    # metrics of the resumed run: one row per step, same losses as the straight run
    a = [r["loss"] for r in assert_run_outputs(second, steps=4, kind="SFTConfig")]
    b = [r["loss"] for r in assert_run_outputs(world.sft, steps=4, kind="SFTConfig")]
    assert a == b


def test_sft_gradient_accumulation(world, resumed):
    """micro_batches=2 gives the whole batch's update (sums divided once)."""
    first, _ = resumed
    cfg = sft_config(world.root, world.tokenizer, world.pref["sft"], "sft_micro2", steps=2,
                     micro_batches=2)
    out = sft.run(cfg)
    chex_close(out["state"].params, first["state"].params, atol=1e-6)
    la = [r["loss"] for r in assert_run_outputs(out, steps=2, kind="SFTConfig")]
    lb = [r["loss"] for r in train_rows(first["run_dir"])[:2]]  # dir now holds 4 steps
    np.testing.assert_allclose(la, lb, rtol=1e-6)


def test_sft_data_parallel_mesh(world, resumed):
    """mesh=MeshConfig() on 8 devices equals one device after 2 steps."""
    assert jax.local_device_count() == 8  # tests/conftest.py
    first, _ = resumed
    cfg = sft_config(world.root, world.tokenizer, world.pref["sft"], "sft_mesh", steps=2,
                     mesh=MeshConfig())
    out = sft.run(cfg)
    chex_close(out["state"].params, first["state"].params, atol=1e-5)
    la = [r["loss"] for r in assert_run_outputs(out, steps=2, kind="SFTConfig")]
    lb = [r["loss"] for r in train_rows(first["run_dir"])[:2]]  # dir now holds 4 steps
    np.testing.assert_allclose(la, lb, rtol=1e-6)


def test_sft_resumes_on_another_mesh(world):
    """2 steps on a data=2 x fsdp=4 mesh, then the same run extended to 4 steps on one device:
    the straight one-device run's parameters and losses (the mesh is not part of the run's
    identity; the checkpoint restores onto whatever the new run places it on)."""
    cfg = sft_config(world.root, world.tokenizer, world.pref["sft"], "sft_remesh", steps=2,
                     mesh=MeshConfig(data=2, fsdp=4))
    sft.run(cfg)
    out = sft.run(dataclasses.replace(cfg, loop=world.sft_cfg.loop, mesh=None))
    assert out["steps"] == 4
    chex_close(out["state"].params, world.sft["state"].params, atol=1e-5)
    la = [r["loss"] for r in assert_run_outputs(out, steps=4, kind="SFTConfig")]
    lb = [r["loss"] for r in train_rows(world.sft["run_dir"])]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def chex_close(a, b, *, atol):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], atol=atol, rtol=0, err_msg=k)


def test_run_dir_reused_with_another_config(world):
    cfg = dataclasses.replace(world.sft_cfg, seed=3,
                              data=dataclasses.replace(world.sft_cfg.data, batch_size=16))
    with pytest.raises(ValueError, match=r"different config \(fields \['data', 'seed'\]\)"):
        sft.run(cfg)
    # a loop change alone is allowed (extending a finished run)
    longer = dataclasses.replace(world.sft_cfg.loop, total_steps=9)
    prepare_run_dir(dataclasses.replace(world.sft_cfg, loop=longer), world.sft_cfg.output_dir)


def test_run_saved_before_a_field_existed_resumes(world, tmp_path):
    """A config.json written before a field was added (here ``model.remat``) lacks it: the run
    resumes while the new config keeps the field's default, and is refused once it sets it."""
    cfg = dataclasses.replace(world.sft_cfg, output_dir=str(tmp_path / "old"))
    prepare_run_dir(cfg, cfg.output_dir)
    (tmp_path / "old" / "checkpoints" / "3").mkdir(parents=True)  # a saved step
    path = tmp_path / "old" / "config.json"
    saved = json.loads(path.read_text())
    del saved["model"]["remat"]
    path.write_text(json.dumps(saved))
    prepare_run_dir(cfg, cfg.output_dir)  # the default: the same run
    path.write_text(json.dumps(saved))
    remat = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=True))
    with pytest.raises(ValueError, match=r"different config \(fields \['model'\]\)"):
        prepare_run_dir(remat, cfg.output_dir)


def test_batch_not_divisible_by_devices(world, tmp_path):
    cfg = dataclasses.replace(world.sft_cfg, output_dir=str(tmp_path / "x"), mesh=MeshConfig(),
                              data=dataclasses.replace(world.sft_cfg.data, batch_size=12))
    with pytest.raises(ValueError,
                       match="^data.batch_size 12 is not divisible by data x fsdp = 8"):
        sft.run(cfg)


def test_micro_batches_must_divide_batch():
    with pytest.raises(ValueError,
                       match="data.batch_size 8 is not divisible by micro_batches 3"):
        sft.SFTConfig(data=DataConfig(train="x", batch_size=8), tokenizer="y", output_dir="z",
                      micro_batches=3)
