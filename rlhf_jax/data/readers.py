"""Dataset files of every kind a TRL user brings: JSONL, Parquet, and ``datasets`` directories.

``load_dataset(path)`` picks the reader from the path:

* a directory written by ``datasets.Dataset.save_to_disk`` (``dataset_info.json`` and
  ``state.json`` inside): read with ``datasets.load_from_disk`` (the optional ``datasets`` extra);
  a ``DatasetDict`` root is refused with its split names (point at ``DIR/train``);
* ``*.parquet``: read with ``pyarrow.parquet`` (columns of lists of structs become lists of
  message dicts);
* anything else: JSONL (``jsonl.load_jsonl``).

Every reader validates the same way (``jsonl.build_dataset``): errors name ``path:N: field``,
``N`` the 1-based line of a JSONL file or row of a table. In a table every row has every column,
so a null cell means "absent" (an explicit-prompt column that is null in one row leaves that row
an implicit-prompt preference) and is dropped from the row.
"""

from __future__ import annotations

import os

from rlhf_jax.data.jsonl import DataError, Dataset, build_dataset, load_jsonl

_HF_DATASET_FILES = ("dataset_info.json", "state.json")


def _table_rows(path: str, records: list[dict], fmt: str, skip_invalid: bool) -> Dataset:
    parsed = [(i + 1, {k: v for k, v in r.items() if v is not None}, None)
              for i, r in enumerate(records)]
    return build_dataset(path, fmt, parsed, skip_invalid)


def load_parquet(path: str | os.PathLike[str], *, fmt: str = "auto",
                 skip_invalid: bool = False) -> Dataset:
    """Read and validate a Parquet file (rows numbered from 1 in errors)."""
    import pyarrow.parquet as pq

    name = os.fspath(path)
    try:
        table = pq.read_table(name)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{name}: not a readable Parquet file: {e}") from None
    return _table_rows(name, table.to_pylist(), fmt, skip_invalid)


def is_hf_dataset_dir(path: str) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk`` (a dataset or a dict)."""
    return os.path.isdir(path) and (
        all(os.path.isfile(os.path.join(path, f)) for f in _HF_DATASET_FILES)
        or os.path.isfile(os.path.join(path, "dataset_dict.json")))


def load_hf_dataset(path: str | os.PathLike[str], *, fmt: str = "auto",
                    skip_invalid: bool = False) -> Dataset:
    """Read and validate a ``datasets`` directory saved with ``save_to_disk`` (one split)."""
    name = os.fspath(path)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name} is a Hugging Face datasets directory; reading it needs the "
                        "optional extra: pip install 'rlhf_jax[datasets]' (or export it to "
                        "JSONL / Parquet)") from None
    loaded = datasets.load_from_disk(name)
    if isinstance(loaded, datasets.DatasetDict):
        splits = sorted(loaded)
        raise DataError(f"{name} holds the splits {splits}, not one dataset; point at one of "
                        f"them, e.g. {os.path.join(name, splits[0])}")
    return _table_rows(name, loaded.to_list(), fmt, skip_invalid)


def load_dataset(path: str | os.PathLike[str], *, fmt: str = "auto",
                 skip_invalid: bool = False) -> Dataset:
    """A validated ``Dataset`` from a JSONL file, a Parquet file or a ``datasets`` directory.

    ``fmt``: a key of ``formats.FORMATS``, or ``"auto"`` (the first row's format).

    Raises:
      DataError: a missing path, a directory that is no saved dataset, or any row problem
        (``path:N: field 'name': ...``).
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise DataError(f"{name}: no such file or directory")
    if os.path.isdir(name):
        if not is_hf_dataset_dir(name):
            raise DataError(f"{name} is a directory but not a dataset saved with "
                            "datasets.save_to_disk (no dataset_info.json / state.json); give a "
                            ".jsonl or .parquet file or a saved dataset")
        return load_hf_dataset(name, fmt=fmt, skip_invalid=skip_invalid)
    if name.endswith(".parquet"):
        return load_parquet(name, fmt=fmt, skip_invalid=skip_invalid)
    return load_jsonl(name, fmt=fmt, skip_invalid=skip_invalid)
