"""Multi-process (multi-host) start-up: JAX's multi-controller runtime, configured once.

Every process runs the same Python program. ``initialize_distributed`` connects them (one call,
before anything touches a device); afterwards ``jax.devices()`` lists every process's devices,
meshes span them all, and the pipelines' ``parallel.put`` / ``parallel.fetch`` move host values
in and out of the global arrays. Only process 0 writes logs, metrics and exported models; all
processes take part in (Orbax) checkpointing.

Where the settings come from, first match wins:

1. the keyword arguments;
2. ``RLHF_JAX_COORDINATOR`` (``host:port`` of process 0), ``RLHF_JAX_NUM_PROCESSES`` and
   ``RLHF_JAX_PROCESS_ID``: for launching processes by hand (or from any scheduler);
3. ``RLHF_JAX_DISTRIBUTED=auto``: call ``jax.distributed.initialize()`` without arguments and
   let JAX read the cluster (Cloud TPU pod slices, whose layout comes from the TPU VM metadata
   server and cannot be seen in the environment; Kubernetes JobSets; any launcher JAX knows);
4. detected here without being asked: a SLURM step launched by ``srun`` with more than one task
   (``SLURM_STEP_NUM_TASKS``; a batch script's own ``python`` is one process, not many) and an
   Open MPI ``mpirun`` with more than one rank (``OMPI_COMM_WORLD_SIZE`` plus the
   ``OMPI_MCA_orte_hnp_uri`` JAX needs). ``RLHF_JAX_DISTRIBUTED=off`` turns this off.

With none of these, nothing happens and the run is an ordinary one-process run.
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "RLHF_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "RLHF_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RLHF_JAX_PROCESS_ID"


def _int_env(name: str) -> int | None:
    text = os.environ.get(name)
    if text in (None, ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None


ENV_AUTO = "RLHF_JAX_DISTRIBUTED"


def _cluster_detected() -> bool:
    """A multi-process launch that ``jax.distributed.initialize()`` can configure itself."""
    auto = os.environ.get(ENV_AUTO, "").strip().lower()
    if auto not in ("", "auto", "off"):
        raise ValueError(f"{ENV_AUTO}={auto!r}: expected 'auto' or 'off'")
    if auto == "off":
        return False

    def many(name):
        return (_int_env(name) or 1) > 1

    return (auto == "auto" or many("SLURM_STEP_NUM_TASKS")
            or many("OMPI_COMM_WORLD_SIZE") and "OMPI_MCA_orte_hnp_uri" in os.environ)


def initialize_distributed(*, coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: list[int] | None = None) -> bool:
    """Join this process to a multi-process JAX run; returns True when there is one.

    Call it first, before any array is created. Idempotent. On the CPU backend the
    cross-process collectives use gloo (set before the runtime starts).

    Raises ``ValueError`` when only some of coordinator / num_processes / process_id are given.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(
                f"a manual multi-process launch needs coordinator, num_processes and process_id "
                f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing "
                f"{missing}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is outside 0..{num_processes - 1}")
        if num_processes == 1:
            return False
        _cpu_collectives()
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
        return True
    if _cluster_detected():
        _cpu_collectives()
        jax.distributed.initialize(local_device_ids=local_device_ids)
        return jax.process_count() > 1
    return False


def _cpu_collectives() -> None:
    """CPU-only processes need a collectives implementation to talk to each other (gloo ships
    with jaxlib); harmless on GPU/TPU, whose collectives are their own."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
