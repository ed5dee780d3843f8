"""Hugging Face interop: a run as a Llama checkpoint, and a Llama checkpoint as a run.

    python -m near_jax.hf export --workdir=RUN [--step=N] --out=DIR [--dtype=bfloat16]
    python -m near_jax.hf import --hf_dir=DIR --workdir=OUT [--dtype=float32]

`export` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads:
config.json (LlamaForCausalLM), safetensors weights (sharded past --max_shard_size) and the
run's tokenizer.json. `import` turns such a directory into a run directory holding one
checkpoint at step 0 (`{"params": ...}` plus the config, its tokenizer path relative to the
run so the directory can be moved), which `loading.load_run(OUT)` loads and
`--config.checkpoint.init_from=OUT` starts a new run from. Neither needs torch.

This module holds the files and the command line; the in-memory conversion (config
mapping, `params_to_hf`, `params_from_hf`, refusals) is `near_jax.hf.convert`, whose public
names are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from near_jax import sharding
from near_jax._io import one_line
from near_jax.config import ConfigError, default_config, validate
from near_jax.data.tokenizer import load_tokenizer
from near_jax.hf.convert import (
    HFError,
    hf_shapes,
    iter_hf_tensors,
    llama_config,
    np_dtype,
    params_from_hf,
)
from near_jax.infer import loading
from near_jax.train import checkpoint

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tokenizer files worth carrying along in either direction, when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_DIR = "tokenizer"  # where an imported run keeps them


@dataclasses.dataclass
class Written:
    """What an export or import wrote."""

    path: str
    files: int
    params: int
    bytes: int


def _safetensors() -> Any:
    """The safetensors package (the `hf` extra), or HFError saying how to install it."""
    try:
        import safetensors.numpy
    except ImportError as e:
        raise HFError("safetensors is not installed: pip install 'near_jax[hf]'") from e
    return safetensors


class SafetensorsDir(Mapping):
    """The tensors of an HF directory (one file or an index of shards), read on access."""

    def __init__(self, hf_dir: str):
        self._open = _safetensors().safe_open
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFError(f"{index}: no 'weight_map' object")
            self._files = {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            path = os.path.join(hf_dir, SINGLE_FILE)
            with self._reading(path, "not a readable safetensors file") as f:
                self._files = dict.fromkeys(f.keys(), path)
        else:
            raise HFError(
                f"--hf_dir={hf_dir!r}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
                "weights are read; re-save others with save_pretrained(safe_serialization=True))"
            )
        for path in sorted(set(self._files.values())):
            if not os.path.isfile(path):
                raise HFError(f"{path}: missing (named in {INDEX_FILE})")

    @contextlib.contextmanager
    def _reading(self, path: str, problem: str) -> Iterator[Any]:
        """The open file; any safetensors error as HFError naming `path` and `problem`."""
        try:
            with self._open(path, framework="np") as f:
                yield f
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise HFError(f"{path}: {problem} ({one_line(e)})") from e

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._files[name]
        with self._reading(path, f"tensor {name!r} unreadable") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object from a file, or HFError naming the file and the problem."""
    if not os.path.isfile(path):
        raise HFError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: not valid JSON ({one_line(e)})") from e
    if not isinstance(value, dict):
        raise HFError(f"{path}: must hold a JSON object, not {type(value).__name__}")
    return value


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def check_out_dir(path: str, flag: str) -> None:
    """HFError unless `path` is free: absent or an empty directory."""
    if not path:
        raise HFError(f"{flag} is required: the directory to write")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise HFError(f"{flag}={path!r} already exists and is not empty; choose a new directory")


@contextlib.contextmanager
def _atomic_dir(path: str, flag: str) -> Iterator[str]:
    """Yields a hidden sibling directory that is renamed to `path` only once complete.

    A crash leaves `.NAME.tmp-PID`, never a `path` that looks finished.
    """
    check_out_dir(path, flag)
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        check_out_dir(path, flag)  # someone else may have written it meanwhile
        os.replace(tmp, path)  # onto an absent or empty directory: atomic on POSIX
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (HFError otherwise)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in units or float(match.group(1)) <= 0:
        raise HFError(f"--max_shard_size={text!r} is not allowed: a size such as 5GB, 500MB")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def _plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Groups tensors in order into shards of at most `max_bytes` (a bigger tensor: alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_safetensors(
    directory: str, params: Any, cfg: Any, dtype: str = "float32", max_shard_bytes: int = 5 * 10**9
) -> list[str]:
    """Writes the HF tensors of `params` (sharded past `max_shard_bytes`); returns file names.

    Shards are planned from shapes, then each is materialized and written in turn, so host
    memory holds one shard beyond the params.
    """
    itemsize = np_dtype(dtype).itemsize
    sizes = {name: math.prod(shape) * itemsize for name, shape in hf_shapes(params, cfg).items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    save_file = _safetensors().numpy.save_file
    for file_name, shard in zip(names, shards, strict=True):
        tensors = dict(iter_hf_tensors(params, cfg, dtype, names=set(shard)))
        # transformers refuses safetensors files whose metadata names no known format.
        path = os.path.join(directory, file_name)
        save_file(tensors, path, metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())  # safetensors creates files private (0600)
    if len(shards) > 1:
        weight_map = {n: f for f, shard in zip(names, shards, strict=True) for n in shard}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        _write_json(os.path.join(directory, INDEX_FILE), index)
        names.append(INDEX_FILE)
    return names


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dir_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(directory)
        for f in files
    )


def _param_count(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def _copy_tokenizer(tokenizer_json: str, directory: str) -> list[str]:
    """Copies tokenizer.json and the HF files beside it into `directory`; returns names."""
    copied = []
    source_dir = os.path.dirname(os.path.abspath(tokenizer_json))
    for name in TOKENIZER_FILES:
        source = tokenizer_json if name == "tokenizer.json" else os.path.join(source_dir, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(directory, name))
            copied.append(name)
    return copied


def _tokenizer_config(tokenizer_json: str, tokenizer: Any, max_positions: int) -> dict:
    """A minimal tokenizer_config.json naming the run's special tokens, for AutoTokenizer."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(tokenizer_json)
    # The generic fast tokenizer adds no tokens of its own (near_jax encodes without any).
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_positions,
    }
    for kind in ("bos", "eos", "pad"):
        token = tok.id_to_token(getattr(tokenizer, f"{kind}_id"))
        if token is not None:
            config[f"{kind}_token"] = token
    return config


def _host_mesh() -> jax.sharding.Mesh:
    """One CPU device: an export reads every tensor to host memory anyway."""
    return sharding.make_mesh(default_config().mesh, jax.devices("cpu")[:1])


def export_run(
    workdir: str,
    out: str,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
) -> Written:
    """Writes a run's params at `step` (default: the latest readable) as an HF directory `out`."""
    dtype_name = np_dtype(dtype).name
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    check_out_dir(out, "--out")
    run = loading.load_run(workdir, step, mesh=_host_mesh())
    max_positions = int(run.cfg.data.seq_len)
    tok = run.tokenizer
    config = llama_config(
        run.model_cfg,
        dtype=dtype_name,
        max_positions=max_positions,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    with _atomic_dir(out, "--out") as tmp:
        files = write_safetensors(tmp, run.params, run.model_cfg, dtype, max_bytes)
        _write_json(os.path.join(tmp, "config.json"), config)
        files.append("config.json")
        spec = run.cfg.data.tokenizer  # resolved by load_run: usable from here
        if tok.name.startswith("hf:"):
            files += _copy_tokenizer(spec, tmp)
            if "tokenizer_config.json" not in files:
                tok_config = _tokenizer_config(spec, tok, max_positions)
                _write_json(os.path.join(tmp, "tokenizer_config.json"), tok_config)
                files.append("tokenizer_config.json")
        size = _dir_bytes(tmp)
    return Written(os.path.abspath(out), len(files), _param_count(run.params), size)


def _run_config(
    overrides: dict[str, Any], hf: dict[str, Any], dtype: str, tokenizer: str, name: str
) -> ml_collections.ConfigDict:
    """The near_jax config of an imported model (validated by the caller)."""
    cfg = default_config()
    cfg.name = f"hf:{name}"
    cfg.model.update(overrides)
    cfg.model.param_dtype = dtype
    # Compute in the precision the weights were published in.
    published = hf.get("dtype") or hf.get("torch_dtype")
    cfg.model.dtype = "float32" if published == "float32" else "bfloat16"
    cfg.data.tokenizer = tokenizer
    positions = hf.get("max_position_embeddings")
    if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
        cfg.data.seq_len = positions  # the context the model was trained for
    return cfg


def _import_tokenizer(hf_dir: str, run_dir: str) -> str:
    """Copies the HF tokenizer into the run; returns its path relative to `run_dir`.

    tokenizer.json is preferred; a SentencePiece tokenizer.model serves otherwise; with
    neither the run gets the byte tokenizer ('byte').
    """
    for name in ("tokenizer.json", "tokenizer.model"):
        source, target = os.path.join(hf_dir, name), os.path.join(run_dir, TOKENIZER_DIR)
        if os.path.isfile(source):
            os.makedirs(target)
            if name == "tokenizer.json":
                _copy_tokenizer(source, target)  # with tokenizer_config.json etc. beside it
            else:
                shutil.copyfile(source, os.path.join(target, name))
            return os.path.join(TOKENIZER_DIR, name)
    return "byte"


def import_hf(hf_dir: str, workdir: str, dtype: str = "float32") -> Written:
    """Writes an HF Llama directory as a near_jax run directory with a checkpoint at step 0.

    The run's tokenizer path is relative to the run directory (`tokenizer/tokenizer.json`),
    which `loading.load_run` resolves, so the directory can be moved or copied.
    """
    if not hf_dir:
        raise HFError("--hf_dir is required: the Hugging Face directory to import")
    if not os.path.isdir(hf_dir):
        raise HFError(f"--hf_dir={hf_dir!r}: no such directory")
    check_out_dir(workdir, "--workdir")
    hf = _read_json(os.path.join(hf_dir, "config.json"))
    overrides, params = params_from_hf(SafetensorsDir(hf_dir), hf, dtype)
    with _atomic_dir(workdir, "--workdir") as tmp:
        tokenizer = _import_tokenizer(hf_dir, tmp)
        name = os.path.basename(os.path.abspath(hf_dir))
        cfg = _run_config(overrides, hf, dtype, loading.tokenizer_path(tmp, tokenizer), name)
        try:
            validate(cfg)
            load_tokenizer(cfg.data.tokenizer)
        except ConfigError as e:
            raise HFError(str(e)) from e
        cfg.data.tokenizer = tokenizer  # relative to the run: it stays valid when moved
        ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(tmp), async_save=False)
        try:
            ckpt.save(0, {"params": params}, checkpoint.NothingRead(), cfg, wait=True)
        finally:
            ckpt.close()
        _write_json(os.path.join(tmp, "config.json"), cfg.to_dict())
        size = _dir_bytes(tmp)
    return Written(os.path.abspath(workdir), 1, _param_count(params), size)


# ---------------------------------------------------------------------------------------------
# Command line
