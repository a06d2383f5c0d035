"""Multi-host on one machine: two local processes (2 CPU devices each) joined over loopback with
gloo collectives run SFT and GRPO on a ``data=2 x fsdp=2`` mesh, and give the numbers of one
process driving the same 4-device mesh. Only process 0 writes logs.

Each rank is a fresh interpreter (``multiprocess_worker.py``): ``jax.distributed.initialize``
must run before any device is touched, which this pytest process has long done.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments.tasks import arithmetic, preference_world
from rlhf_jax.data import train_bpe_tokenizer
from rlhf_jax.parallel.distributed import (ENV_AUTO, ENV_COORDINATOR, ENV_NUM_PROCESSES,
                                           ENV_PROCESS_ID, _cluster_detected,
                                           initialize_distributed)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RLHF_JAX_") and k != "PYTEST_XDIST_WORKER"}
    return env | {"PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"} | extra


def _launch(data: str, out: str, local_devices: int, env: dict, log: str) -> subprocess.Popen:
    """One rank; its output goes to a file (a full pipe nobody reads would stall the rank and
    with it the other ranks' collectives)."""
    cmd = [sys.executable, "-u", "-m", "tests.parallel.multiprocess_worker", data, out,
           str(local_devices)]
    with open(log, "w", encoding="utf-8") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen], logs: list[str]) -> list[str]:
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = []
    for p, log in zip(procs, logs):
        with open(log, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
        assert p.returncode == 0, f"{log} exited {p.returncode}:\n{texts[-1][-4000:]}"
    return texts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    data = str(root / "data")
    texts = preference_world.corpus(0, n_responses=100) + arithmetic.corpus(0, n=200)
    train_bpe_tokenizer(texts, vocab_size=384).save(os.path.join(data, "tokenizer"))
    paths = arithmetic.write_datasets(data, n_sft=48, n_train=16, n_eval=4)["paths"]
    assert os.path.dirname(paths["sft"]) == data

    two, port = str(root / "two"), _free_port()
    rank_logs = [str(root / f"rank{i}.log") for i in range(2)]
    ranks = [_launch(data, two, 2, _env(**{ENV_COORDINATOR: f"127.0.0.1:{port}",
                                            ENV_NUM_PROCESSES: "2", ENV_PROCESS_ID: str(i)}),
                     rank_logs[i]) for i in range(2)]
    logs = _wait(ranks, rank_logs)
    one = str(root / "one")  # after the ranks: the machine may have only two cores
    logs = _wait([_launch(data, one, 4, _env(), str(root / "one.log"))],
                 [str(root / "one.log")]) + logs
    load = lambda d, r: dict(np.load(os.path.join(d, f"rank{r}.npz")))  # noqa: E731
    return {"one": load(one, 0), "rank0": load(two, 0), "rank1": load(two, 1),
            "two_dir": two, "logs": logs}


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_two_processes_match_one(runs, stage):
    one, rank0 = runs["one"], runs["rank0"]
    keys = sorted(k for k in one if k.startswith(stage + "/"))
    assert keys == sorted(k for k in rank0 if k.startswith(stage + "/"))
    np.testing.assert_array_equal(rank0[f"{stage}/train_steps"], [1, 2, 3])
    if stage == "grpo":  # the greedy evaluation ran on the mesh too
        np.testing.assert_array_equal(rank0["grpo/eval_steps"], [0, 3])
    metrics = [k for k in keys if "/metric/" in k]
    params = [k for k in keys if "/param" in k]
    assert metrics and params
    for k in metrics:
        np.testing.assert_allclose(rank0[k], one[k], rtol=2e-5, atol=1e-6, err_msg=k)
    for k in params:
        np.testing.assert_allclose(rank0[k], one[k], rtol=2e-5, atol=1e-6, err_msg=k)
        np.testing.assert_array_equal(runs["rank1"][k], rank0[k], err_msg=k)  # same gather
    if stage == "grpo":  # it starts from the SFT result: some parameters must have moved
        assert all(k.startswith("grpo/param['policy']") for k in params)  # no critic
        assert any(not np.allclose(one[k], one[k.replace("grpo/param['policy']", "sft/param")])
                   for k in params)
    else:
        loss = one["sft/metric/train/loss"]
        assert loss[-1] < loss[0], loss


def test_only_process_zero_writes(runs):
    for stage in ("sft", "grpo"):
        with open(os.path.join(runs["two_dir"], stage, "metrics.jsonl"), encoding="utf-8") as f:
            steps = [line for line in f if '"split": "train"' in line]
        assert len(steps) == 3, steps  # one writer: no duplicated rows
    rank0_log, rank1_log = runs["logs"][1], runs["logs"][2]
    assert "3/3" in rank0_log  # the progress bar
    assert "3/3" not in rank1_log and "eval:" not in rank1_log


def test_initialize_distributed_arguments(monkeypatch):
    for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, ENV_AUTO,
              "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(k, raising=False)
    assert initialize_distributed() is False  # nothing configured: one process
    assert initialize_distributed(coordinator="h:1", num_processes=1, process_id=0) is False
    with pytest.raises(ValueError, match="missing"):
        initialize_distributed(coordinator="127.0.0.1:1")
    monkeypatch.setenv(ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="not an integer"):
        initialize_distributed()
    monkeypatch.setenv(ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(ENV_COORDINATOR, "127.0.0.1:1")
    monkeypatch.setenv(ENV_PROCESS_ID, "2")
    with pytest.raises(ValueError, match="outside"):
        initialize_distributed()


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"SLURM_NTASKS": "8"}, False),  # an sbatch script's own python: one process
    ({"SLURM_STEP_NUM_TASKS": "8"}, True),  # srun
    ({"SLURM_STEP_NUM_TASKS": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, False),  # Open MPI without what JAX needs to connect
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_hnp_uri": "x"}, True),
    ({ENV_AUTO: "auto"}, True),  # TPU pod slices, JobSets: JAX reads the cluster itself
    ({ENV_AUTO: "off", "SLURM_STEP_NUM_TASKS": "8"}, False),
])
def test_which_launches_join_a_cluster(monkeypatch, env, expected):
    for k in (ENV_AUTO, "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
              "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _cluster_detected() is expected


def test_bad_auto_value(monkeypatch):
    monkeypatch.setenv(ENV_AUTO, "yes")
    with pytest.raises(ValueError, match="expected 'auto' or 'off'"):
        _cluster_detected()


def test_importing_touches_no_device():
    """``initialize_distributed`` must run before the backend starts, so importing the library
    and the experiment modules may not create a single array."""
    code = (
        "import jax._src.xla_bridge as xb\n"
        "def started(*a, **k):\n"
        "    raise SystemExit('the XLA backend was started at import time')\n"
        "xb.backends = started\n"
        "import rlhf_jax.pipelines, rlhf_jax.train, rlhf_jax.losses, rlhf_jax.sampling\n"
        "import experiments.rlhf_pipeline, experiments.grpo_arithmetic, experiments.distill\n"
        "import experiments.best_of_n, experiments.dpo_preference, experiments.kl_frontier\n"
        "import experiments.overoptimization\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_mesh_none_is_refused_with_several_processes(monkeypatch):
    import jax

    from rlhf_jax.pipelines import setup

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="mesh=None runs on one device, but this is a run of 2"):
        setup.make_mesh(None, 8)
