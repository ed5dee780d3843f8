"""Tokenizers: raw UTF-8 bytes, SentencePiece `.model` files, Hugging Face `tokenizer.json`.

`load_tokenizer(spec)` returns an object with `vocab_size`, `bos_id`, `eos_id`, `pad_id`,
`name`, `encode(text) -> list[int]` (no specials added), `encode_array(text) -> int32 array`
(the same ids, the fast path the data pipeline uses) and `decode(ids) -> str` (specials
skipped). Every tokenizer is picklable.

Special ids of SentencePiece / HF tokenizers are their own where defined. Where one is not:
  * bos or eos: if only one of the two is defined, it serves as both (the GPT-2 convention,
    one `<|endoftext|>` separator); if neither is, two fresh ids are appended after the
    vocabulary (`vocab_size` grows by two).
  * pad: the eos id. Padding only ever sits where `segment_ids == 0` and `weights == 0`, so
    it never has to be a distinct token.
HF special tokens are found in a `tokenizer_config.json` next to the file (its `bos_token`,
`eos_token`, `pad_token`), else among the tokenizer's special added tokens by common name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from near_jax.config import ConfigError

_ALLOWED = "'byte' or a readable SentencePiece .model file or Hugging Face tokenizer.json"

# Common names of special tokens in HF tokenizers, most specific first.
_HF_NAMES = {
    "bos": ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "[BOS]", "<|bos|>"),
    "eos": ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|eos|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
}


def _fail(spec: str, why: str) -> None:
    why = " ".join(str(why).split())  # one line
    raise ConfigError(f"config.data.tokenizer={spec!r} is not allowed: {_ALLOWED} ({why})")


class Tokenizer:
    """The interface every tokenizer implements (see the module docstring)."""

    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset((self.bos_id, self.eos_id, self.pad_id))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"
        )


class ByteTokenizer(Tokenizer):
    """ids 0..255 are UTF-8 bytes; bos=256, eos=257, pad=258; vocab_size=259."""

    name = "byte"
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel()
        data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


def _complete_specials(bos: int | None, eos: int | None, pad: int | None, vocab: int):
    """Fills undefined special ids (None) by the rules in the module docstring."""
    if bos is None and eos is None:
        bos, eos, vocab = vocab, vocab + 1, vocab + 2
    bos = eos if bos is None else bos
    eos = bos if eos is None else eos
    pad = eos if pad is None else pad
    return bos, eos, pad, vocab


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; its own bos/eos/pad where defined (>= 0)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromFile(path)
        self.name = f"sentencepiece:{os.path.basename(path)}"
        n = self._sp.get_piece_size()
        self._n_pieces = n

        def get(i: int) -> int | None:
            return i if 0 <= i < n else None

        self.bos_id, self.eos_id, self.pad_id, self.vocab_size = _complete_specials(
            get(self._sp.bos_id()), get(self._sp.eos_id()), get(self._sp.pad_id()), n
        )

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        skip = self.special_ids
        return self._sp.decode(
            [int(i) for i in ids if 0 <= i < self._n_pieces and int(i) not in skip]
        )


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (+ optional tokenizer_config.json)."""

    def __init__(self, path: str):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(path)
        self.name = f"hf:{os.path.basename(path)}"
        n = self._tok.get_vocab_size(with_added_tokens=True)
        self._n_tokens = n
        found: dict[str, int | None] = {}
        names = self._config_names(path)
        specials = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        for kind in ("bos", "eos", "pad"):
            found[kind] = None
            if names.get(kind) is not None:
                found[kind] = self._tok.token_to_id(names[kind])
            if found[kind] is None:
                found[kind] = next((specials[c] for c in _HF_NAMES[kind] if c in specials), None)
        self.bos_id, self.eos_id, self.pad_id, self.vocab_size = _complete_specials(
            found["bos"], found["eos"], found["pad"], n
        )

    @staticmethod
    def _config_names(path: str) -> dict[str, str | None]:
        cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if not os.path.isfile(cfg_path):
            return {}
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(cfg, dict):
            return {}
        return {k: _token_content(cfg.get(f"{k}_token")) for k in ("bos", "eos", "pad")}

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        skip = self.special_ids
        return self._tok.decode(
            [int(i) for i in ids if 0 <= i < self._n_tokens and int(i) not in skip],
            skip_special_tokens=True,
        )


def load_tokenizer(spec: str = "byte") -> Tokenizer:
    """Returns the tokenizer named by `config.data.tokenizer` (see the module docstring).

    Raises ConfigError (one line naming config.data.tokenizer) for a missing, unreadable or
    unrecognized file.
    """
    if spec == "byte":
        return ByteTokenizer()
    if not isinstance(spec, str) or not spec:
        _fail(spec, "empty or not a string")
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        _fail(spec, "no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError as e:
        _fail(spec, f"unreadable: {e}")
    # tokenizer.json is a JSON object; a SentencePiece model is a binary protobuf.
    is_json = path.endswith(".json") or head.startswith(b"{")
    try:
        return HFTokenizer(path) if is_json else SentencePieceTokenizer(path)
    except Exception as e:  # noqa: BLE001 - the libraries raise assorted types
        kind = "HF tokenizer.json" if is_json else "SentencePiece model"
        _fail(spec, f"not a valid {kind}: {type(e).__name__}: {e}")
    raise AssertionError("unreachable")
