"""Tokenizer: a Hugging Face ``tokenizer.json`` directory, chat templates, and control tokens.

Design choices, and why:
- Data, not a live object. ``Tokenizer`` is a frozen dataclass holding the ``tokenizer.json``
  text and the few facts RLHF needs (BOS, the EOS ids, PAD, the chat template); the Rust
  tokenizers are rebuilt from them. Equality compares that data, and ``Tokenizer.load(d)``
  after ``t.save(d)`` equals ``t``.
- Several EOS ids. Chat models end a turn with one token and a document with another (Llama-3:
  ``<|eot_id|>`` and ``<|end_of_text|>``); the sampler must stop on either, so ``eos_ids`` is a
  tuple: the ``eos_token`` of tokenizer_config.json first, then generation_config.json's.
- PAD may equal EOS. Many tokenizers have no pad token; ``pad_id`` then falls back to
  ``eos_ids[0]``. The ops never infer "end of completion" from pad ids, so this is legal.
- Dataset text never becomes control tokens. ``encode`` and the message contents in
  ``encode_chat`` are tokenised with matching of added tokens switched off, so a literal
  ``<|im_end|>`` typed by a user stays text; only the chat template's own structure may produce
  control ids (see ``_chat_template``). Content is tokenised separately from the surrounding
  structure, so merges never cross a message boundary (byte-level BPE splits there anyway).
- Nothing is added that was not asked for: ``encode`` adds BOS/EOS only with
  ``add_special_tokens=True``; chat templates write their own BOS (HF does the same).
- Paths are checked: ``..`` in a directory path and files that are symlinks leaving the
  directory are refused before anything is read (so a Hugging Face *hub cache* snapshot, whose
  files link into ``../../blobs``, must be copied with its links resolved first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers

from rlhf_jax.data import _chat_template as chat
from rlhf_jax.fileio import atomic_write

_TOKENIZER_FILE = "tokenizer.json"
_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_MAP_FILE = "special_tokens_map.json"
_GENERATION_FILE = "generation_config.json"
_TEMPLATE_FILE = "chat_template.jinja"


def _checked_dir(directory: str | os.PathLike[str]) -> pathlib.Path:
    path = pathlib.Path(directory)
    if ".." in path.parts:
        raise ValueError(f"refusing tokenizer directory {str(path)!r}: it contains a '..' "
                         "component; pass the resolved path instead")
    return path


def _checked_file(directory: pathlib.Path, name: str) -> pathlib.Path:
    """``directory/name``, refused if it is a symlink that resolves outside ``directory``."""
    path = directory / name
    root = directory.resolve()
    if (path.is_symlink() or path.exists()) and not path.resolve().is_relative_to(root):
        raise ValueError(f"refusing {str(path)!r}: it is a symlink to {str(path.resolve())!r}, "
                         f"outside the tokenizer directory {str(root)!r}")
    return path


def _read_json(directory: pathlib.Path, name: str) -> dict[str, Any]:
    path = _checked_file(directory, name)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _write_text(path: pathlib.Path, text: str) -> None:
    # Write-then-rename through a fresh temporary file: a crash never leaves a half-written
    # file, and a symlink at ``path`` is replaced rather than written through.
    atomic_write(path, text)


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json stores tokens as strings or as {"content": ..., "__type": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _text_backend(tokenizer_json: str) -> tokenizers.Tokenizer:
    """A copy that matches no added token in the input: every byte of text stays text."""
    data = json.loads(tokenizer_json)
    for added in data.get("added_tokens") or []:
        added["special"] = True  # encode_special_tokens only covers *special* added tokens
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    backend.encode_special_tokens = True
    return backend


def _special_ids(backend: tokenizers.Tokenizer, config: dict[str, Any],
                 generation: dict[str, Any], where: str) -> dict[str, Any]:
    """bos_id, eos_ids and pad_id from the configs: config tokens first, then generation ids."""

    def token_id(key: str) -> int | None:
        token = _token_str(config.get(key))
        if token is None:
            return None
        found = backend.token_to_id(token)
        if found is None:
            raise ValueError(f"{key} {token!r} of {where!r} is not in the vocabulary")
        return found

    def generation_ids(key: str) -> list[int]:
        value = generation.get(key)
        values = value if isinstance(value, list) else [] if value is None else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{_GENERATION_FILE} {key} must be an int or a list of ints, "
                             f"got {value!r}")
        return values

    eos_ids = [i for i in [token_id("eos_token")] if i is not None]
    eos_ids += [i for i in generation_ids("eos_token_id") if i not in eos_ids]
    if not eos_ids:
        raise ValueError(f"no EOS token in {where!r}: set eos_token in {_CONFIG_FILE}")
    bos_id = token_id("bos_token")
    if bos_id is None:
        bos_id = next(iter(generation_ids("bos_token_id")), None)
    pad_id = token_id("pad_token")
    if pad_id is None:
        pad_id = (generation_ids("pad_token_id") or eos_ids)[0]
    return {"bos_id": bos_id, "eos_ids": tuple(eos_ids), "pad_id": pad_id}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tokenizer:
    """A Hugging Face fast tokenizer plus the chat and control-token facts RLHF needs."""

    tokenizer_json: str
    """The text of ``tokenizer.json`` (model, pre-tokenizer, decoder, added tokens)."""
    eos_ids: tuple[int, ...]
    """Every id that ends a completion; ``eos_ids[0]`` is the config's ``eos_token``."""
    pad_id: int
    """Padding id; equal to ``eos_ids[0]`` when the tokenizer has no pad token."""
    bos_id: int | None = None
    """Beginning-of-sequence id, or None for tokenizers without one (Qwen2)."""
    chat_template: str | None = None
    """Jinja2 chat template (rendered sandboxed), or None for a base tokenizer."""
    add_bos_token: bool | None = None
    """With ``add_special_tokens=True``: prepend BOS; None defers to the post-processor."""
    add_eos_token: bool | None = None
    """With ``add_special_tokens=True``: append EOS; None defers to the post-processor."""

    _backend: tokenizers.Tokenizer = dataclasses.field(init=False, repr=False, compare=False)
    _text: tokenizers.Tokenizer = dataclasses.field(init=False, repr=False, compare=False)
    _control_ids: frozenset[int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        backend = tokenizers.Tokenizer.from_str(self.tokenizer_json)
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_text", _text_backend(self.tokenizer_json))
        object.__setattr__(self, "_control_ids",
                           frozenset(backend.get_added_tokens_decoder()))
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
        if not self.eos_ids:
            raise ValueError("a tokenizer needs at least one EOS id to end completions")
        n = backend.get_vocab_size(with_added_tokens=True)
        for name, ids in (("eos_ids", self.eos_ids), ("pad_id", (self.pad_id,)),
                          ("bos_id", () if self.bos_id is None else (self.bos_id,))):
            bad = [i for i in ids if type(i) is not int or not 0 <= i < n]
            if bad:
                raise ValueError(f"{name} {bad}: not Python ints in the vocabulary of size {n}")

    # ----------------------------------------------------------------- loading and saving
    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.json`` and its configs from a Hugging Face tokenizer directory.

        Reads ``tokenizer_config.json`` (chat template, bos/eos/pad tokens, add_bos_token),
        ``special_tokens_map.json`` (which overrides it, as in HF), ``chat_template.jinja``
        (which wins over the config's template, as in HF) and ``generation_config.json``
        (whose ``eos_token_id``, an int or a list, adds EOS ids).
        """
        root = _checked_dir(directory)
        tok_path = _checked_file(root, _TOKENIZER_FILE)
        if not tok_path.is_file():
            raise FileNotFoundError(
                f"no {_TOKENIZER_FILE} in {str(root)!r}. rlhf_jax reads the 'fast' tokenizer "
                "format only; if the directory has tokenizer.model (SentencePiece) or "
                "vocab.json + merges.txt, convert it once with transformers: "
                "AutoTokenizer.from_pretrained(d).save_pretrained(d)")
        try:
            backend_json = tok_path.read_text(encoding="utf-8")
            backend = tokenizers.Tokenizer.from_str(backend_json)
        except Exception as e:  # the Rust parser raises a bare Exception
            raise ValueError(f"{str(tok_path)!r} is not a valid tokenizer.json: {e}") from None
        config = _read_json(root, _CONFIG_FILE)
        config.update(_read_json(root, _SPECIAL_MAP_FILE))
        ids = _special_ids(backend, config, _read_json(root, _GENERATION_FILE), str(root))
        template = config.get("chat_template")
        if isinstance(template, list):  # HF's named templates: [{"name":..., "template":...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        template_path = _checked_file(root, _TEMPLATE_FILE)
        if template_path.is_file():
            template = template_path.read_text(encoding="utf-8")
        flags = {k: config.get(k) if isinstance(config.get(k), bool) else None
                 for k in ("add_bos_token", "add_eos_token")}
        return cls(tokenizer_json=backend_json,
                   chat_template=template if isinstance(template, str) else None,
                   **ids, **flags)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` so ``load`` gives back self.

        EOS ids beyond the config's ``eos_token`` go to ``generation_config.json``; that file
        (its bos/eos/pad ids set by ``generation_config``), ``special_tokens_map.json`` and
        ``chat_template.jinja`` are updated in place when present (so a model's other settings
        are kept and nothing stale overrides the config).
        """
        root = _checked_dir(directory)
        root.mkdir(parents=True, exist_ok=True)
        token = self._backend.id_to_token
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # lets transformers load it too
            "bos_token": None if self.bos_id is None else token(self.bos_id),
            "eos_token": token(self.eos_ids[0]),
            "pad_token": token(self.pad_id),
            "chat_template": self.chat_template,
        }
        for key in ("add_bos_token", "add_eos_token"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        paths = {name: _checked_file(root, name) for name in (
            _TOKENIZER_FILE, _CONFIG_FILE, _SPECIAL_MAP_FILE, _GENERATION_FILE, _TEMPLATE_FILE)}
        _write_text(paths[_TOKENIZER_FILE], self.tokenizer_json)
        _write_text(paths[_CONFIG_FILE], json.dumps(config, indent=2, ensure_ascii=False))
        # Files that override the config on load are updated when present, never left stale.
        special_map = _read_json(root, _SPECIAL_MAP_FILE)
        if special_map:
            special_map.update({k: config[k] for k in ("bos_token", "eos_token", "pad_token")})
            _write_text(paths[_SPECIAL_MAP_FILE], json.dumps(special_map, indent=2))
        if paths[_TEMPLATE_FILE].is_file():
            if self.chat_template is None:
                paths[_TEMPLATE_FILE].unlink()
            else:
                _write_text(paths[_TEMPLATE_FILE], self.chat_template)
        generation = _read_json(root, _GENERATION_FILE)
        if generation or len(self.eos_ids) > 1:
            _write_text(paths[_GENERATION_FILE],
                        json.dumps(generation_config(self, generation), indent=2))

    # ----------------------------------------------------------------- text <-> ids
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding table needs at least this)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (e.g. a control token), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id (byte-level form, not decoded text), or None."""
        return self._backend.id_to_token(token_id)

    def _finish(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens and self.add_bos_token and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_special_tokens and self.add_eos_token:
            ids = [*ids, self.eos_ids[0]]
        return ids

    def _encode_text(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        flags_set = self.add_bos_token is not None or self.add_eos_token is not None
        post = add_special_tokens and not flags_set  # the config flags replace the post-processor
        out = []
        for enc in self._text.encode_batch(texts, add_special_tokens=False):
            if not self._control_ids.isdisjoint(enc.ids):
                raise ValueError("tokenizer.json's model maps plain text to a control token id; "
                                 "this tokenizer cannot keep dataset text apart from control "
                                 "tokens")
            if post:
                enc = self._text.post_process(enc, add_special_tokens=True)
            out.append(self._finish(enc.ids, add_special_tokens and flags_set))
        return out

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``, control-token strings in it encoded as ordinary text.

        ``add_special_tokens=True`` adds BOS/EOS as ``add_bos_token``/``add_eos_token`` say, or
        else as tokenizer.json's post-processor does.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._encode_text([text], add_special_tokens)[0]

    def batch_encode(self, texts: Sequence[str], *,
                     add_special_tokens: bool = False) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in parallel in the Rust library."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"batch_encode expects strs; texts[{bad[0]}] is "
                            f"{type(texts[bad[0]]).__name__}")
        return self._encode_text(list(texts), add_special_tokens)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; control tokens are dropped unless ``skip_special_tokens=False``."""
        return self._backend.decode([int(i) for i in ids],
                                    skip_special_tokens=skip_special_tokens)

    def encode_structure(self, text: str) -> list[int]:
        """Encode trusted template text, where control-token strings *are* control tokens."""
        return self._backend.encode(text, add_special_tokens=False).ids

    # ----------------------------------------------------------------- chat
    def _special_tokens(self) -> dict[str, str]:
        names = {"bos_token": self.bos_id, "eos_token": self.eos_ids[0], "pad_token": self.pad_id}
        return {k: self._backend.id_to_token(v) for k, v in names.items() if v is not None}

    def _template(self) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template; set one with "
                             "dataclasses.replace(tokenizer, chat_template=...)")
        return self.chat_template

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *,
                            add_generation_prompt: bool, tokenize: bool = True,
                            **extra: Any) -> list[int] | str:
        """Render ``messages`` with the sandboxed chat template; ids unless ``tokenize=False``.

        ``extra`` becomes template variables (``tools``, ``date_string``, ...). Ids are those
        of ``encode_chat``: message text never turns into control tokens.
        """
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt=add_generation_prompt,
                                    **extra)[0]
        return chat.render(self._template(), chat.validate_messages(messages),
                           add_generation_prompt=add_generation_prompt,
                           special_tokens=self._special_tokens(), extra=extra)

    def encode_chat(self, messages: Sequence[dict[str, Any]], *,
                    add_generation_prompt: bool = False,
                    **extra: Any) -> tuple[list[int], list[int]]:
        """Ids of a conversation and its assistant mask, for SFT on ``messages`` data.

        The mask is 1 on the tokens of assistant message contents and on the end-of-turn
        control token right after each (the model must learn to stop), 0 elsewhere. Template
        structure is encoded with control tokens; message contents as plain text.

        Returns:
          ``(ids, mask)``, two lists of the same length.
        """
        messages = chat.validate_messages(messages)
        segments = chat.split_segments(
            self._template(), messages, add_generation_prompt=add_generation_prompt,
            special_tokens=self._special_tokens(), extra=extra)
        ids: list[int] = []
        mask: list[int] = []
        after_assistant = False
        for segment in segments:
            if segment.message is None:
                part = self.encode_structure(segment.text)
                flags = [0] * len(part)
                if after_assistant and part and part[0] in self._control_ids:
                    flags[0] = 1  # the end-of-turn token closing an assistant message
            else:
                part = self.encode(segment.text)
                flags = [int(messages[segment.message]["role"] == "assistant")] * len(part)
            after_assistant = segment.message is not None and (
                messages[segment.message]["role"] == "assistant")
            ids += part
            mask += flags
        return ids, mask


def generation_config(tokenizer: Tokenizer,
                      base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (a ``generation_config.json``: temperature, top_p, ...) with its token ids
    replaced by the tokenizer's, so ``transformers``' ``generate()`` stops where our sampler
    does: ``bos_token_id`` (dropped when there is no BOS), ``eos_token_id`` (every EOS id: an
    int when there is one, else a list) and ``pad_token_id``."""
    out = {k: v for k, v in (base or {}).items()
           if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if tokenizer.bos_id is not None:
        out["bos_token_id"] = tokenizer.bos_id
    eos = list(tokenizer.eos_ids)
    out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    out["pad_token_id"] = tokenizer.pad_id
    return out


def check_compatible(a: Tokenizer, b: Tokenizer, *,
                     names: tuple[str, str] = ("given", "checkpoint's")) -> None:
    """Refuse two tokenizers that would not feed a model the same ids: they must have the same
    vocabulary (``vocab_size`` and the token -> id map, added tokens included) and the same
    ``bos_id``, ``eos_ids`` and ``pad_id``. The chat template and the add_bos/eos flags may
    differ. The ValueError names each differing fact, e.g. ``eos_ids (2,) vs (0, 5)``."""
    diffs = [f"{k} {getattr(a, k)!r} vs {getattr(b, k)!r}" for k in
             ("vocab_size", "bos_id", "eos_ids", "pad_id") if getattr(a, k) != getattr(b, k)]
    va, vb = (t._backend.get_vocab(with_added_tokens=True) for t in (a, b))
    moved = sorted((t for t in va.keys() & vb.keys() if va[t] != vb[t]), key=va.get)
    if moved:
        t = moved[0]
        diffs.append(f"{len(moved)} tokens map to other ids (e.g. {t!r} {va[t]} vs {vb[t]})")
    for name, x, y in ((names[0], va, vb), (names[1], vb, va)):
        if x.keys() - y.keys():
            diffs.append(f"{len(x.keys() - y.keys())} tokens only in the {name} "
                         f"(e.g. {min(x.keys() - y.keys(), key=x.get)!r})")
    if diffs:
        raise ValueError(f"the {names[0]} tokenizer and the {names[1]} tokenizer differ "
                         f"({names[0]} vs {names[1]}): {'; '.join(diffs)}. A model reads the ids "
                         "of the tokenizer it was trained with; use that one, or one with the "
                         "same vocabulary and bos/eos/pad ids")
