"""Per-device memory of one SFT train step on five meshes: ``python -m benchmarks.memory_mesh``.

Nothing is allocated: the params, the AdamW state and the batch are ``jax.ShapeDtypeStruct``s,
the trainer's step is lowered with explicit shardings (state by ``parallel.param_shardings`` /
``opt_state_shardings``, batch by ``batch_spec``, state donated) and compiled for 8 devices, and
we read XLA's buffer assignment (``compiled.memory_analysis()``, per device; LLVM's optimisations
are skipped, ``COMPILER_OPTIONS``, which changes no figure). On JAX 0.10.2 CPU it
has ``argument_size_in_bytes``, ``output_size_in_bytes``, ``alias_size_in_bytes`` (outputs that
reuse a donated input), ``temp_size_in_bytes`` (the one temporary arena, already packed by buffer
liveness), ``generated_code_size_in_bytes`` (0 on CPU), the ``host_*`` twins (0) and
``peak_memory_in_bytes``, which on CPU is not the live peak (it reads about the argument size), so
we use

    peak = argument + output - alias + temp

an upper bound: every input and output live at once, plus the whole temporary arena. Beside it,
the state's bytes per device come analytically from the shardings (the sum over leaves of
``sharding.shard_shape(shape)`` elements times the item size), which is where FSDP's ~1/N
parameter + optimizer memory against data parallelism's full copy shows.

The meshes are ``data x fsdp x tensor``: 8x1x1 (data parallel), 1x8x1 (FSDP), 2x4x1, 2x2x2 and
1x1x8 (tensor parallel), each with per-block rematerialisation off and on. Prints one JSON line
per configuration and a summary line; ``main`` also writes ``benchmarks/results/memory_mesh.md``.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before JAX initialises its backend (it does so lazily, at the first device query).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from benchmarks._common import program_peak_bytes  # noqa: E402
from rlhf_jax.losses import sft_loss  # noqa: E402
from rlhf_jax.models import get_preset, token_batch_logprobs  # noqa: E402
from rlhf_jax.models.transformer import abstract_params, model_for  # noqa: E402
from rlhf_jax.parallel import (MeshConfig, batch_spec, make_mesh, param_shardings,  # noqa: E402
                               replicated)
from rlhf_jax.train import (OptimizerConfig, create_train_state, make_optimizer,  # noqa: E402
                            make_train_step, state_shardings)
from rlhf_jax.types import TokenBatch  # noqa: E402

MESHES = ((8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))  # (data, fsdp, tensor)
RESULTS = pathlib.Path(__file__).parent / "results" / "memory_mesh.md"
MIB = 2**20
# Buffer assignment is decided on the HLO, before LLVM runs: skipping LLVM's optimisations leaves
# every figure identical and compiles ~40% faster (checked on toy-1m and the 1B preset).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def mesh_name(shape) -> str:
    return "x".join(map(str, shape))


def shard_bytes(abstract, shardings) -> int:
    """Bytes one device holds of ``abstract`` (``ShapeDtypeStruct`` leaves) under ``shardings``:
    ``sum(prod(sharding.shard_shape(shape)) * itemsize)`` (the rules only split evenly)."""
    sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize,
                         abstract, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def abstract_batch(batch: int, seq: int) -> TokenBatch:
    """A ``TokenBatch`` of ``[batch, seq]`` shapes with the dtypes ``data.batching`` produces."""
    i32, b = jax.ShapeDtypeStruct((batch, seq), "int32"), jax.ShapeDtypeStruct((batch, seq), bool)
    return TokenBatch(tokens=i32, loss_mask=b, attention_mask=b, segment_ids=i32, positions=i32)


def _sft_step(config):
    """The trainer's own (unjitted) SFT step: ``pipelines.sft``'s loss in ``make_train_step``.

    ``make_train_step(mesh=...)`` returns a wrapper that places host batches, which cannot be
    lowered on abstract values; without a mesh it returns the ``jax.jit`` of the step, whose
    ``__wrapped__`` we re-jit below with the same shardings the trainer gives it.
    """
    model = model_for(config)

    def loss_fn(p, batch, key):  # as in rlhf_jax/pipelines/sft.py
        return sft_loss(token_batch_logprobs(model, p, batch), batch.loss_mask,
                        aggregation="token_mean")

    optimizer = make_optimizer(OptimizerConfig(), 1000)
    return make_train_step(loss_fn, optimizer).__wrapped__, optimizer


def plan(config, mesh_shape, optimizer):
    """``(mesh, abstract TrainState, its shardings)`` for ``config`` on ``mesh_shape``: params
    and moments by ``parallel.param_shardings`` / ``opt_state_shardings``, the rest replicated."""
    d, f, t = mesh_shape
    mesh = make_mesh(MeshConfig(data=d, fsdp=f, tensor=t), jax.devices()[:d * f * t])
    params = abstract_params(config)
    state = jax.eval_shape(lambda p: create_train_state(p, optimizer, seed=0), params)
    return mesh, state, state_shardings(state, mesh, param_shardings(config, params, mesh))


def state_bytes(config, mesh_shape, optimizer=None) -> tuple[int, int]:
    """``(params, optimizer state)`` bytes per device, from the shardings alone (no compile)."""
    optimizer = optimizer or make_optimizer(OptimizerConfig(), 1000)
    _, state, sh = plan(config, mesh_shape, optimizer)
    return shard_bytes(state.params, sh.params), shard_bytes(state.opt_state, sh.opt_state)


def measure(config, mesh_shape, *, batch: int, seq: int, step=None) -> dict:
    """Compile one train step of ``config`` on ``mesh_shape`` and report its memory per device."""
    fn, optimizer = step or _sft_step(config)
    mesh, state, st_sh = plan(config, mesh_shape, optimizer)
    rows = NamedSharding(mesh, batch_spec(mesh))
    jitted = jax.jit(fn, in_shardings=(st_sh, rows), out_shardings=(st_sh, replicated(mesh)),
                     donate_argnums=(0,))
    start = time.perf_counter()
    lowered = jitted.lower(state, abstract_batch(batch, seq))
    compiled = lowered.compile(compiler_options=COMPILER_OPTIONS)
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    if m is None:
        raise SystemExit("this backend reports no memory analysis")
    mem = {k: int(getattr(m, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
        "temp_size_in_bytes", "generated_code_size_in_bytes")}
    params_b = shard_bytes(state.params, st_sh.params)
    opt_b = shard_bytes(state.opt_state, st_sh.opt_state)
    peak = program_peak_bytes(compiled)
    return {"benchmark": "memory_mesh", "mesh": mesh_name(mesh_shape), "remat": config.remat,
            "batch": batch, "seq": seq, "params_bytes": params_b, "opt_bytes": opt_b,
            "state_bytes": params_b + opt_b, **mem, "peak_bytes": peak,
            "compile_s": round(compile_s, 2)}


def run(preset: str, *, batch: int, seq: int, meshes=MESHES, remats=(False, True),
        emit=print) -> list[dict]:
    """``measure`` for every mesh x remat; each record is passed to ``emit`` as it is made."""
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, have {jax.device_count()}: set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=8 before JAX starts")
    records = []
    for remat in remats:
        config = get_preset(preset, remat=remat)
        step = _sft_step(config)
        for shape in meshes:
            rec = measure(config, shape, batch=batch, seq=seq, step=step)
            rec["preset"] = preset
            emit(json.dumps(rec))
            records.append(rec)
    return records


def summary(records: list[dict]) -> dict:
    """FSDP (1x8x1) over data parallel (8x1x1): state bytes and peak, per remat setting."""
    by = {(r["mesh"], r["remat"]): r for r in records}
    out = {"benchmark": "memory_mesh", "summary": True}
    for remat in (False, True):
        dp, fs = by.get(("8x1x1", remat)), by.get(("1x8x1", remat))
        if dp is None or fs is None:
            continue
        tag = "remat_on" if remat else "remat_off"
        out[f"fsdp_over_dp_state_{tag}"] = round(fs["state_bytes"] / dp["state_bytes"], 4)
        out[f"fsdp_over_dp_peak_{tag}"] = round(fs["peak_bytes"] / dp["peak_bytes"], 4)
    return out


def markdown(records: list[dict], summ: dict, command: str) -> str:
    r0 = records[0]
    head = (f"# memory_mesh: {r0['preset']}, batch {r0['batch']} x {r0['seq']} tokens, "
            "float32 params + AdamW\n\n"
            f"Command: `{command}`; JAX {jax.__version__} {jax.default_backend()}, "
            f"{jax.device_count()} devices, {platform.machine()} with {os.cpu_count()} cores. "
            "MiB per device; peak = argument + output - alias + temp (XLA buffer assignment); "
            "params/opt from the shardings.\n\n"
            "| mesh (d x f x t) | remat | params | opt state | argument | output | alias | temp "
            "| peak | compile s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {r['mesh']} | {'on' if r['remat'] else 'off'} | {r['params_bytes'] / MIB:.1f} | "
        f"{r['opt_bytes'] / MIB:.1f} | {r['argument_size_in_bytes'] / MIB:.1f} | "
        f"{r['output_size_in_bytes'] / MIB:.1f} | {r['alias_size_in_bytes'] / MIB:.1f} | "
        f"{r['temp_size_in_bytes'] / MIB:.1f} | **{r['peak_bytes'] / MIB:.1f}** | "
        f"{r['compile_s']} |\n" for r in records)
    ratios = "".join(f"- `{k}`: {v}\n" for k, v in summ.items() if k.startswith("fsdp_"))
    return head + rows + "\nFSDP (1x8x1) / data parallel (8x1x1):\n\n" + ratios


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=8, help="global rows per step")
    p.add_argument("--seq", type=int, default=512, help="tokens per row")
    p.add_argument("--meshes", default=",".join(map(mesh_name, MESHES)),
                   help="comma-separated data x fsdp x tensor shapes, e.g. 8x1x1,1x8x1")
    p.add_argument("--remat", choices=("both", "off", "on"), default="both")
    p.add_argument("--out", default=str(RESULTS), help="Markdown table ('' to skip)")
    a = p.parse_args(argv)
    meshes = [tuple(int(n) for n in m.split("x")) for m in a.meshes.split(",")]
    remats = {"both": (False, True), "off": (False,), "on": (True,)}[a.remat]
    records = run(a.preset, batch=a.batch, seq=a.seq, meshes=meshes, remats=remats)
    summ = summary(records)
    print(json.dumps(summ))
    if a.out:
        out = pathlib.Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.memory_mesh " + " ".join(argv or [])
        out.write_text(markdown(records, summ, command.strip()))
    return records + [summ]


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
