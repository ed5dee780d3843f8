"""Documents of a data source: listing, identities, the train/val split, reading.

Sources (`config.data.source`):
  * "stdlib": the `.py` files of the running Python's standard library (site-packages
    skipped), found at run time under `sysconfig.get_paths()["stdlib"]`.
  * a directory (searched recursively), a file, or a glob of `.txt` / `.jsonl` / `.bin`
    files. A `.txt` file is one document; a `.jsonl` line is one document (text in field
    `config.data.jsonl_field`; blank lines skipped); a `.bin` file is a flat stream of
    pre-tokenized ids (`config.data.bin_dtype`) cut into chunks of `seq_len + 1` tokens, each
    chunk one document (the last, shorter chunk too if it has >= 2 tokens).

A document's identity is its path relative to the source root, plus `:line` (jsonl) or
`#chunk` (bin). A stable 64-bit hash of the identity puts a fraction `val_fraction` of the
documents in "val" and the rest in "train": the splits never share a document, whatever the
seed or the number of hosts, and neither is empty (at least one document each). Because
`.bin` chunks are `seq_len + 1` long, their split depends on `seq_len`.
"""

import dataclasses
import functools
import glob as globlib
import hashlib
import json
import os
import sysconfig
from typing import Any

import numpy as np

from near_jax.config import ConfigError
from near_jax.data.tokenizer import Tokenizer

_EXTS = {".txt": "text", ".jsonl": "jsonl", ".bin": "bin"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def _source_error(source: Any, why: str) -> ConfigError:
    why = " ".join(str(why).split())  # one line
    return ConfigError(f"config.data.source={source!r} is not allowed: {why}")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, vectorized over a uint64 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


# ----------------------------------------------------------------------------- documents


@dataclasses.dataclass
class Documents:
    """The documents of a source, listed without reading their text.

    Document `i` (0 <= i < len(docs)) lives in file `files[f]` (relative to `root`) for the
    f with cum[f] <= i < cum[f+1]; `k = i - cum[f]` is its number within the file.
    """

    source: str
    root: str
    files: tuple[str, ...]
    kinds: tuple[str, ...]  # per file: text | jsonl | bin
    cum: np.ndarray  # int64 [n_files + 1]: first document id of each file
    lines: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]  # jsonl: start, end, line_no
    jsonl_field: str
    bin_dtype: str
    chunk_len: int  # tokens per .bin document
    _memmaps: dict[int, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.cum[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_memmaps"] = {}  # memmaps are reopened, never pickled as data
        return state

    def locate(self, i: int) -> tuple[int, int]:
        """(file index, document number within the file) of document `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        f = int(np.searchsorted(self.cum, i, side="right")) - 1
        return f, int(i - self.cum[f])

    def identity(self, i: int) -> str:
        """A stable name of document `i`: relative path [+ ':line' | '#chunk']."""
        f, k = self.locate(i)
        if self.kinds[f] == "jsonl":
            return f"{self.files[f]}:{int(self.lines[f][2][k])}"
        if self.kinds[f] == "bin":
            return f"{self.files[f]}#{k}"
        return self.files[f]

    def hashes(self) -> np.ndarray:
        """uint64 [len(self)]: a stable hash of every document's identity."""
        keys = [
            int.from_bytes(hashlib.blake2b(rel.encode("utf-8"), digest_size=8).digest(), "little")
            for rel in self.files
        ]
        sub = np.zeros(len(self), np.uint64)  # line number (jsonl), chunk (bin), 0 (text)
        for f, kind in enumerate(self.kinds):
            lo, hi = int(self.cum[f]), int(self.cum[f + 1])
            if kind == "jsonl":
                sub[lo:hi] = self.lines[f][2]
            elif kind == "bin":
                sub[lo:hi] = np.arange(hi - lo, dtype=np.uint64)
        file_keys = np.repeat(np.asarray(keys, np.uint64), np.diff(self.cum))
        return _mix64(_mix64(sub) ^ file_keys)

    def _path(self, f: int) -> str:
        return os.path.join(self.root, self.files[f])

    def read_text(self, i: int) -> str:
        """The text of a .txt / .py / .jsonl document (ConfigError for a bad jsonl line)."""
        f, k = self.locate(i)
        kind = self.kinds[f]
        if kind == "text":
            with open(self._path(f), "rb") as fh:
                return fh.read().decode("utf-8", errors="replace")
        if kind != "jsonl":
            raise ValueError(f"document {self.identity(i)} is pre-tokenized, it has no text")
        start, end, line_no = (int(a[k]) for a in self.lines[f])
        with open(self._path(f), "rb") as fh:
            fh.seek(start)
            raw = fh.read(end - start).decode("utf-8", errors="replace").strip()
        if not raw:
            return ""
        where = f"{self.files[f]}:{line_no}"
        try:
            record = json.loads(raw)
        except ValueError as e:
            raise _source_error(self.source, f"{where}: bad JSON line ({e})") from None
        text = record.get(self.jsonl_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise _source_error(
                self.source,
                f"{where}: no string field {self.jsonl_field!r} (config.data.jsonl_field)",
            )
        return text

    def read_tokens(self, i: int, tokenizer: Tokenizer) -> np.ndarray:
        """int32 tokens of document `i`: [bos] + text tokens + [eos], or a .bin chunk."""
        f, k = self.locate(i)
        if self.kinds[f] != "bin":
            body = tokenizer.encode_array(self.read_text(i))
            out = np.empty(len(body) + 2, np.int32)
            out[0], out[1:-1], out[-1] = tokenizer.bos_id, body, tokenizer.eos_id
            return out
        mm = self._memmaps.get(f)
        if mm is None:
            mm = self._memmaps[f] = np.memmap(self._path(f), dtype=self.bin_dtype, mode="r")
        chunk = np.asarray(mm[k * self.chunk_len : (k + 1) * self.chunk_len], np.int32)
        if chunk.size and int(chunk.max()) >= tokenizer.vocab_size:
            raise _source_error(
                self.source,
                f"{self.identity(i)} holds token id {int(chunk.max())} >= vocab_size "
                f"{tokenizer.vocab_size} of config.data.tokenizer={tokenizer.name!r}",
            )
        return chunk


def _has_magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def _walk(root: str, exts: tuple[str, ...]) -> list[str]:
    """Sorted paths (relative to root) of non-empty files under root ending in exts."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS]
        for name in files:
            if name.endswith(exts):
                path = os.path.join(d, name)
                if os.path.isfile(path) and os.path.getsize(path) > 0:
                    out.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(out)


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[str, tuple[str, ...]]:
    root = sysconfig.get_paths()["stdlib"]
    return root, tuple(_walk(root, (".py",)))


def _match_files(source: str) -> tuple[str, list[str]]:
    """(root, sorted relative paths) of the .txt/.jsonl/.bin files a source names."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        root, files = path, _walk(path, tuple(_EXTS))
    elif os.path.isfile(path):
        root, files = os.path.dirname(os.path.abspath(path)), [os.path.basename(path)]
    else:
        parts = path.split(os.sep)
        fixed = []
        for part in parts:
            if _has_magic(part):
                break
            fixed.append(part)
        root = os.sep.join(fixed) or "."
        files = set()
        for match in globlib.glob(path, recursive=True):
            if os.path.isdir(match):
                files.update(os.path.join(match, f) for f in _walk(match, tuple(_EXTS)))
            elif os.path.isfile(match) and os.path.getsize(match) > 0:
                files.add(match)
        files = sorted(os.path.relpath(f, root).replace(os.sep, "/") for f in files)
    files = [f for f in files if os.path.splitext(f)[1] in _EXTS]
    if not files:
        raise _source_error(
            source,
            "matches no non-empty .txt/.jsonl/.bin file; want 'stdlib', a directory, a file "
            "or a glob",
        )
    return os.path.abspath(root), files


@functools.lru_cache(maxsize=4096)
def _scan_jsonl(path: str, size: int, mtime_ns: int) -> tuple[np.ndarray, ...]:
    """(start, end, line number) of the non-empty lines of a file; cached by (size, mtime)."""
    del mtime_ns  # part of the cache key only
    newlines, base, block = [], 0, 1 << 24
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + base)
            base += len(chunk)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [base]]).astype(np.int64)
    line_no = np.arange(1, len(starts) + 1, dtype=np.int64)
    keep = ends > starts
    return starts[keep], ends[keep], line_no[keep]


def list_documents(data_cfg) -> Documents:
    """Lists the documents of `data_cfg.source` (no text is read; jsonl files are scanned
    for line offsets). Raises ConfigError naming config.data.source if nothing matches."""
    source = data_cfg.source
    if source == "stdlib":
        root, files = _stdlib_files()
        kinds = ["text"] * len(files)
    else:
        root, files = _match_files(source)
        kinds = [_EXTS[os.path.splitext(f)[1]] for f in files]
    itemsize = np.dtype(data_cfg.bin_dtype).itemsize
    chunk_len = int(data_cfg.seq_len) + 1
    counts, lines = [], {}
    for f, (rel, kind) in enumerate(zip(files, kinds, strict=True)):
        path = os.path.join(root, rel)
        if kind == "text":
            counts.append(1)
        elif kind == "jsonl":
            st = os.stat(path)
            lines[f] = _scan_jsonl(path, st.st_size, st.st_mtime_ns)
            counts.append(len(lines[f][0]))
        else:
            size = os.path.getsize(path)
            if size % itemsize:
                raise _source_error(
                    source,
                    f"{rel} has {size} bytes, not a multiple of {itemsize} "
                    f"(config.data.bin_dtype={data_cfg.bin_dtype!r})",
                )
            n_tokens = size // itemsize
            counts.append(n_tokens // chunk_len + (n_tokens % chunk_len >= 2))
    cum = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    if cum[-1] == 0:
        raise _source_error(source, "holds no documents")
    return Documents(
        source=source,
        root=root,
        files=tuple(files),
        kinds=tuple(kinds),
        cum=cum,
        lines=lines,
        jsonl_field=data_cfg.jsonl_field,
        bin_dtype=data_cfg.bin_dtype,
        chunk_len=chunk_len,
    )


def split_documents(docs: Documents, split: str, val_fraction: float) -> np.ndarray:
    """Sorted int64 ids of the documents in `split` ("train" | "val").

    A document is in val iff the hash of its identity, as a number in [0, 1), is below
    val_fraction; if that leaves either split empty, the document with the lowest (highest)
    hash moves to val (train)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if len(docs) < 2:
        raise _source_error(
            docs.source, f"holds {len(docs)} document; need >= 2 to hold out validation"
        )
    h = docs.hashes()
    is_val = (h >> np.uint64(11)).astype(np.float64) / 2.0**53 < val_fraction
    if not is_val.any():
        is_val[np.argmin(h)] = True
    if is_val.all():
        is_val[np.argmax(h)] = False
    return np.flatnonzero(is_val if split == "val" else ~is_val).astype(np.int64)
