"""File handling for ``models.hf``: path checks, safetensors shards in and out, nothing else.

Every file name that comes from a checkpoint (shard names in ``model.safetensors.index.json``)
is checked before anything is opened: relative, no ``..``, no drive or backslash, ending in
``.safetensors``, and its real path (symlinks resolved) inside the checkpoint directory. Output
files are written to a fresh temporary name in the target directory and renamed into place
(``rlhf_jax.fileio``), so a crash leaves no half-written file and a pre-existing symlink is
replaced, never written through.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.fileio import atomic_path, atomic_write_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
VALUE_HEAD = "value_head.safetensors"
GENERATION = "generation_config.json"
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CONVERT_HINT = (
    "rlhf_jax loads safetensors only (pickle-based files can run code when loaded). Convert it "
    "once in a trusted environment: `m = transformers.AutoModelForCausalLM.from_pretrained(dir); "
    "m.save_pretrained(out_dir, safe_serialization=True)`, then load out_dir.")


def real_dir(directory: str | os.PathLike, *, create: bool = False) -> pathlib.Path:
    """The directory's real path; created when ``create``; an error if it is not a directory."""
    path = pathlib.Path(directory)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.name.endswith(_UNSAFE_SUFFIXES):
        raise ValueError(f"{str(path)!r} is a pickle-based weights file. {_CONVERT_HINT}")
    if path.is_file():
        raise ValueError(f"{str(path)!r} is a file; pass the checkpoint directory")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    return pathlib.Path(os.path.realpath(path))


def child(root: pathlib.Path, name: object, what: str) -> pathlib.Path:
    """``root / name`` after checking that ``name`` cannot leave ``root`` (see module doc)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{what} {name!r} is not a file name")
    pure = pathlib.PurePosixPath(name)
    win = pathlib.PureWindowsPath(name)
    if pure.is_absolute() or win.is_absolute() or win.drive or "\\" in name:
        raise ValueError(f"{what} {name!r} is an absolute path; only names inside {str(root)!r} "
                         "are allowed")
    if ".." in pure.parts:
        raise ValueError(f"{what} {name!r} contains '..'; only names inside {str(root)!r} are "
                         "allowed")
    path = root / pure
    real = pathlib.Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise ValueError(f"{what} {name!r} resolves to {str(real)!r}, outside {str(root)!r} "
                         "(a symlink escaping the directory)")
    return path


def read_json(root: pathlib.Path, name: str) -> dict:
    path = child(root, name, "file")
    if not path.is_file():
        raise FileNotFoundError(f"{str(root)!r} has no {name}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{name} in {str(root)!r} must hold a JSON object")
    return data


def weight_files(root: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of the checkpoint, every name checked before any is opened."""
    if (root / INDEX).exists():
        index = read_json(root, INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{INDEX} must have a non-empty 'weight_map' object")
        names = sorted(set(weight_map.values()), key=str)
        for name in names:  # validate them all first: nothing is opened on a bad index
            if not isinstance(name, str) or not name.endswith(".safetensors"):
                raise ValueError(f"{INDEX} weight_map entry {name!r} is not a .safetensors file")
            child(root, name, f"{INDEX} weight_map entry")
        paths = [child(root, n, f"{INDEX} weight_map entry") for n in names]
        missing = [str(p.name) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {INDEX} are missing: {missing}")
        return paths
    if (root / SINGLE).exists():
        return [child(root, SINGLE, "weights file")]
    unsafe = sorted(p.name for p in root.iterdir() if p.name.endswith(_UNSAFE_SUFFIXES))
    if unsafe:
        raise ValueError(f"{str(root)!r} holds only pickle-based weights {unsafe}. {_CONVERT_HINT}")
    raise FileNotFoundError(f"{str(root)!r} has neither {SINGLE} nor {INDEX}")


def read_tensors(paths: list[pathlib.Path]) -> dict[str, np.ndarray]:
    """All tensors of the given safetensors files; a name stored twice is an error."""
    out: dict[str, np.ndarray] = {}
    for path in paths:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                if key in out:
                    raise ValueError(f"tensor {key!r} is stored in more than one file")
                out[key] = f.get_tensor(key)
    return out


def _target(root: pathlib.Path, name: str) -> pathlib.Path:
    path = child(root, name, "output file")  # raises for a symlink escaping ``root``
    if path.exists() and not path.is_file():
        raise ValueError(f"output path {str(path)!r} exists and is not a file")
    return path


def write_json(root: pathlib.Path, name: str, data: dict) -> None:
    atomic_write_json(_target(root, name), data, sort_keys=True)


def write_tensors(root: pathlib.Path, name: str, tensors: dict[str, np.ndarray]) -> None:
    with atomic_path(_target(root, name)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def write_weights(root: pathlib.Path, tensors: dict[str, np.ndarray],
                  max_shard_bytes: int | None) -> list[str]:
    """``model.safetensors``, or shards plus an index when ``max_shard_bytes`` is given.

    Shards are filled in order; a tensor larger than the limit gets a shard of its own. Weight
    files of a previous export in the other layout are removed so one layout remains.
    """
    for name in [INDEX, SINGLE] + [p.name for p in root.iterdir() if _SHARD.match(p.name)]:
        _target(root, name).unlink(missing_ok=True)  # checked: never follows an escaping link
    if max_shard_bytes is None:
        write_tensors(root, SINGLE, tensors)
        return [SINGLE]
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    groups: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        if groups[-1] and size + value.nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = value
        size += value.nbytes
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(names, groups):
        write_tensors(root, name, group)
        weight_map.update({k: name for k in group})
    total = sum(v.nbytes for v in tensors.values())
    write_json(root, INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names
