"""Hugging Face interop: a run as a Llama checkpoint, and a Llama checkpoint as a run.

    python -m near_jax.hf export --workdir=RUN [--step=N] --out=DIR [--dtype=bfloat16]
    python -m near_jax.hf import --hf_dir=DIR --workdir=OUT [--dtype=float32]

`export` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads:
config.json (LlamaForCausalLM), safetensors weights (sharded past --max_shard_size) and the
run's tokenizer.json. `import` turns such a directory into a run directory holding one
checkpoint at step 0 (`{"params": ...}` plus the config), which `loading.load_run(OUT)`
loads and `--config.checkpoint.init_from=OUT` starts a new run from. Neither needs torch.

In memory (for tests and notebooks):

    tensors = params_to_hf(params, model_cfg)                # {HF name: np.ndarray}
    overrides, params = params_from_hf(tensors, hf_config)    # model fields, params pytree

The two layouts hold the same numbers: near_jax keeps the input features of a projection
first (`q [D,H,K]`, `o [H,K,D]`, `gate [D,F]`) where torch's Linear keeps them last
(`q_proj.weight [H*K,D]`), so a conversion is a reshape and a transpose. RoPE already
rotates the two halves of each head as HF Llama does, so q/k need no permutation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from near_jax import checkpoint, loading, model, sharding
from near_jax.config import ConfigError, default_config, validate
from near_jax.tokenizer import load_tokenizer

DTYPES = ("float32", "bfloat16")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tokenizer files worth carrying along in either direction, when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_DIR = "tokenizer"  # where an imported run keeps them
# Buffers some older checkpoints saved that are recomputed, never learned.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

# Per-layer params: (module, name) -> (HF name after "model.layers.{i}.", input axes).
# "Input axes" is how many leading near_jax axes are the projection's input features
# (0 for a norm's vector, which is the same in both layouts).
_LAYER_PARAMS = {
    ("attn_norm", "scale"): ("input_layernorm.weight", 0),
    ("attn", "q"): ("self_attn.q_proj.weight", 1),
    ("attn", "k"): ("self_attn.k_proj.weight", 1),
    ("attn", "v"): ("self_attn.v_proj.weight", 1),
    ("attn", "o"): ("self_attn.o_proj.weight", 2),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", 0),
    ("mlp", "gate"): ("mlp.gate_proj.weight", 1),
    ("mlp", "up"): ("mlp.up_proj.weight", 1),
    ("mlp", "down"): ("mlp.down_proj.weight", 1),
}


class HFError(ValueError):
    """A checkpoint or directory that cannot be converted; the message is one line."""


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and where it lives in the near_jax params."""

    hf_name: str
    path: tuple[str, ...]  # keys into the params tree
    layer: int | None  # index along the scanned "layers" axis, or None
    n_in: int  # leading near_jax axes that are input features (0: same layout)


@dataclasses.dataclass
class Written:
    """What an export or import wrote."""

    path: str
    files: int
    params: int
    bytes: int


def _layout(cfg: model.ModelConfig) -> list[_Tensor]:
    """Every HF tensor of a model, in file order, for scanned or unrolled layers."""
    tensors = [_Tensor("model.embed_tokens.weight", ("embed",), None, 0)]
    for i in range(cfg.n_layers):
        for (module, name), (hf_suffix, n_in) in _LAYER_PARAMS.items():
            if cfg.scan_layers:
                path, layer = ("blocks", module, name), i
            else:
                path, layer = (f"block_{i}", module, name), None
            tensors.append(_Tensor(f"model.layers.{i}.{hf_suffix}", path, layer, n_in))
    tensors.append(_Tensor("model.norm.weight", ("final_norm", "scale"), None, 0))
    if not cfg.tie_embeddings:  # tied, HF Llama derives lm_head from the embedding too
        tensors.append(_Tensor("lm_head.weight", ("head",), None, 1))
    return tensors


def _to_hf(x: np.ndarray, n_in: int) -> np.ndarray:
    """A near_jax weight (inputs first) as a torch Linear weight [out, in]."""
    if n_in == 0:
        return x
    return x.reshape(math.prod(x.shape[:n_in]), -1).T


def _hf_shape(shape: tuple[int, ...], n_in: int) -> tuple[int, ...]:
    """The HF shape of a near_jax weight of `shape`."""
    if n_in == 0:
        return tuple(shape)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _leaf(params: Any, t: _Tensor) -> Any:
    for key in t.path:
        params = params[key]
    return params


def _near_shape(params: Any, t: _Tensor) -> tuple[int, ...]:
    shape = tuple(_leaf(params, t).shape)
    return shape[1:] if t.layer is not None else shape


def _np_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise HFError(f"--dtype={dtype!r} is not allowed: one of {' | '.join(DTYPES)}")
    return np.dtype(jax.numpy.dtype(dtype))  # bfloat16 comes from ml_dtypes, as JAX uses


def _hf_tensor(params: Any, t: _Tensor, dtype: np.dtype) -> np.ndarray:
    """One tensor in HF layout, contiguous (safetensors writes raw buffers)."""
    x = np.asarray(_leaf(params, t))  # zero-copy for arrays on a CPU device
    if t.layer is not None:
        x = x[t.layer]
    return np.ascontiguousarray(_to_hf(x, t.n_in).astype(dtype, copy=False))


def iter_hf_tensors(
    params: Any, cfg: Any, dtype: str = "float32"
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every tensor, one at a time, so only one extra copy is live."""
    cfg, np_dtype = model.ModelConfig.from_config(cfg), _np_dtype(dtype)
    for t in _layout(cfg):
        yield t.hf_name, _hf_tensor(params, t, np_dtype)


def params_to_hf(params: Any, cfg: Any, dtype: str = "float32") -> dict[str, np.ndarray]:
    """A near_jax params tree as an HF Llama state dict of numpy arrays."""
    return dict(iter_hf_tensors(params, cfg, dtype))


# ---------------------------------------------------------------------------------------------
# HF config <-> near_jax model fields


def _hf_dict(hf_config: Any) -> dict[str, Any]:
    """config.json contents from a dict or a transformers PretrainedConfig."""
    if hasattr(hf_config, "to_dict"):
        hf_config = hf_config.to_dict()
    if not isinstance(hf_config, Mapping):
        raise HFError(f"config.json must hold a JSON object, not {type(hf_config).__name__}")
    return dict(hf_config)


def _unsupported(key: str, value: Any, allowed: str) -> None:
    raise HFError(f"config.json: {key}={value!r} is not supported: near_jax needs {allowed}")


def _positive_int(hf: dict[str, Any], key: str, default: int | None = None) -> int:
    value = hf.get(key)
    value = default if value is None else value  # HF writes null for "derive it"
    if value is None:
        raise HFError(f"config.json: {key!r} is missing (a positive integer is required)")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HFError(f"config.json: {key}={value!r} is not allowed: a positive integer")
    return value


def _rope_theta(hf: dict[str, Any]) -> float:
    """The RoPE base from 5.x `rope_parameters` or 4.x `rope_theta`; refuses any scaling."""
    theta = hf.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        rope = hf.get(key)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            _unsupported(key, rope, "a JSON object with rope_type 'default'")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            _unsupported(f"{key}.rope_type", kind, "plain RoPE ('default', no scaling)")
        theta = rope.get("rope_theta", theta)
    theta = 10_000.0 if theta is None else theta  # the transformers Llama default
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise HFError(f"config.json: rope_theta={theta!r} is not allowed: a positive number")
    return float(theta)


def model_overrides(hf_config: Any) -> dict[str, Any]:
    """The near_jax `model` fields of an HF Llama config; HFError for what near_jax lacks."""
    hf = _hf_dict(hf_config)
    if hf.get("model_type") != "llama":
        _unsupported("model_type", hf.get("model_type"), "'llama' (LlamaForCausalLM)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            _unsupported(key, hf[key], "false (no biases)")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        _unsupported("hidden_act", hf.get("hidden_act"), "'silu' (SwiGLU)")
    d_model, n_heads = _positive_int(hf, "hidden_size"), _positive_int(hf, "num_attention_heads")
    n_kv_heads = _positive_int(hf, "num_key_value_heads", n_heads)
    head_dim = _positive_int(hf, "head_dim", d_model // n_heads or None)
    if n_heads % n_kv_heads:
        _unsupported("num_key_value_heads", n_kv_heads, f"a divisor of {n_heads} heads")
    if head_dim % 2:
        _unsupported("head_dim", head_dim, "an even width (RoPE rotates pairs)")
    eps = hf.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or eps <= 0:
        raise HFError(f"config.json: rms_norm_eps={eps!r} is not allowed: a positive number")
    return {
        "vocab_size": _positive_int(hf, "vocab_size"),
        "d_model": d_model,
        "n_layers": _positive_int(hf, "num_hidden_layers"),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "mlp_dim": _positive_int(hf, "intermediate_size"),
        "rope_theta": _rope_theta(hf),
        "norm_eps": float(eps),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def llama_config(
    cfg: Any,
    *,
    dtype: str = "float32",
    max_positions: int = 2048,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """The config.json of a near_jax model, readable by transformers 4.x and 5.x."""
    c = model.ModelConfig.from_config(cfg)
    if c.attention_window:
        raise HFError(
            f"model.attention_window={c.attention_window} cannot be exported: Llama has no "
            "sliding-window attention (0 = full attention is required)"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        # 4.x reads rope_theta (+ rope_scaling); 5.x reads rope_parameters.
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "max_position_embeddings": max_positions,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,  # 4.x
        "dtype": dtype,  # 5.x
        "use_cache": True,
    }


def params_from_hf(
    tensors: Mapping[str, Any], hf_config: Any, dtype: str = "float32"
) -> tuple[dict[str, Any], Any]:
    """An HF Llama state dict (numpy arrays) -> (near_jax model fields, scanned params).

    Refuses (HFError, one line) a config near_jax cannot represent, a missing tensor, an
    unexpected one (e.g. a bias) and a tensor of the wrong shape. Tied, an `lm_head.weight`
    in the state dict is ignored, as transformers ignores it.
    """
    overrides = model_overrides(hf_config)
    cfg = model.ModelConfig(**overrides, param_dtype=dtype, scan_layers=True)
    np_dtype = _np_dtype(dtype)
    layout = _layout(cfg)
    expected = {t.hf_name for t in layout}
    ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unknown = sorted(n for n in tensors if n not in expected | ignored and not _IGNORED.match(n))
    if unknown:
        raise HFError(
            f"unexpected tensor {unknown[0]!r} ({len(unknown)} in all): near_jax holds only "
            "a Llama without biases"
        )
    shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    by_path: dict[tuple[str, ...], list[_Tensor]] = {}
    for t in layout:
        by_path.setdefault(t.path, []).append(t)
    params: dict[str, Any] = {}
    for path, group in by_path.items():
        shape = _near_shape(shapes, group[0])
        arrays = [_from_hf(tensors, t, shape, np_dtype) for t in group]
        value = np.stack(arrays) if group[0].layer is not None else arrays[0]
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return overrides, params


def _from_hf(
    tensors: Mapping[str, Any], t: _Tensor, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """One HF tensor in near_jax layout, checked against the shape the config implies."""
    if t.hf_name not in tensors:
        raise HFError(f"tensor {t.hf_name!r} is missing from the checkpoint")
    w = np.asarray(tensors[t.hf_name])
    want = _hf_shape(shape, t.n_in)
    if tuple(w.shape) != want:
        raise HFError(
            f"tensor {t.hf_name!r} has shape {tuple(w.shape)} but config.json implies {want}"
        )
    x = w.T.reshape(shape) if t.n_in else w
    return np.ascontiguousarray(x.astype(dtype, copy=False))


# ---------------------------------------------------------------------------------------------
# Files


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
            self._files = {k: path for k in self._keys(path)}
        else:
            raise HFError(
                f"--hf_dir={hf_dir!r}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
                "weights are read; re-save others with save_pretrained(safe_serialization=True))"
            )
        for path in sorted(set(self._files.values())):
            if not os.path.isfile(path):
                raise HFError(f"{path}: missing (named in {INDEX_FILE})")

    def _keys(self, path: str) -> list[str]:
        try:
            with self._open(path, framework="np") as f:
                return list(f.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise HFError(f"{path}: not a readable safetensors file ({_one_line(e)})") from e

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._files[name]
        try:
            with self._open(path, framework="np") as f:
                return f.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise HFError(f"{path}: tensor {name!r} unreadable ({_one_line(e)})") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object from a file, or HFError naming the file and the problem."""
    if not os.path.isfile(path):
        raise HFError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: not valid JSON ({_one_line(e)})") from e
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


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Groups tensors in order into shards of at most `max_bytes` (a bigger tensor: alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
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
    cfg, np_dtype = model.ModelConfig.from_config(cfg), _np_dtype(dtype)
    layout = {t.hf_name: t for t in _layout(cfg)}
    sizes = [
        (name, math.prod(_hf_shape(_near_shape(params, t), t.n_in)) * np_dtype.itemsize)
        for name, t in layout.items()
    ]
    shards = _plan_shards(sizes, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    save_file = _safetensors().numpy.save_file
    for file_name, shard in zip(names, shards, strict=True):
        tensors = {name: _hf_tensor(params, layout[name], np_dtype) for name in shard}
        # transformers refuses safetensors files whose metadata names no known format.
        path = os.path.join(directory, file_name)
        save_file(tensors, path, metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())  # safetensors creates files private (0600)
    if len(shards) > 1:
        weight_map = {n: f for f, shard in zip(names, shards, strict=True) for n in shard}
        index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
        _write_json(os.path.join(directory, INDEX_FILE), index)
        names.append(INDEX_FILE)
    return names


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dir_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory)
        for f in files
    )  # fmt: skip


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
    """Writes a run's params at `step` (default: the latest) as an HF Llama directory `out`."""
    np_dtype_name = _np_dtype(dtype).name
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    check_out_dir(out, "--out")
    run = loading.load_run(workdir, step, mesh=_host_mesh())
    max_positions = int(run.cfg.data.seq_len)
    tok = run.tokenizer
    config = llama_config(
        run.model_cfg, dtype=np_dtype_name, max_positions=max_positions,
        bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
    )  # fmt: skip
    with _atomic_dir(out, "--out") as tmp:
        files = write_safetensors(tmp, run.params, run.model_cfg, dtype, max_bytes)
        _write_json(os.path.join(tmp, "config.json"), config)
        files.append("config.json")
        spec = run.cfg.data.tokenizer
        if tok.name.startswith("hf:"):
            files += _copy_tokenizer(spec, tmp)
            if "tokenizer_config.json" not in files:
                tok_config = _tokenizer_config(spec, tok, max_positions)
                _write_json(os.path.join(tmp, "tokenizer_config.json"), tok_config)
                files.append("tokenizer_config.json")
        size = _dir_bytes(tmp)
    count = sum(x.size for x in jax.tree.leaves(run.params))
    return Written(os.path.abspath(out), len(files), count, size)


class _NoDataPosition:
    """The data item of an imported checkpoint: no data has been read."""

    def get_state(self) -> dict[str, Any]:
        return {"num_shards": 0, "shards": {}}


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


def _import_tokenizer(hf_dir: str, tmp: str, final: str) -> tuple[str, str]:
    """Copies the HF tokenizer into the run: (its path in tmp, its path once renamed).

    tokenizer.json is preferred; a SentencePiece tokenizer.model serves otherwise; with
    neither the run gets the byte tokenizer ('byte', 'byte').
    """
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
        _copy_tokenizer(os.path.join(hf_dir, "tokenizer.json"), os.path.join(tmp, TOKENIZER_DIR))
        name = os.path.join(TOKENIZER_DIR, "tokenizer.json")
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
        name = os.path.join(TOKENIZER_DIR, "tokenizer.model")
        shutil.copyfile(os.path.join(hf_dir, "tokenizer.model"), os.path.join(tmp, name))
    else:
        return "byte", "byte"
    return os.path.join(tmp, name), os.path.join(final, name)


def import_hf(hf_dir: str, workdir: str, dtype: str = "float32") -> Written:
    """Writes an HF Llama directory as a near_jax run directory with a checkpoint at step 0."""
    if not hf_dir:
        raise HFError("--hf_dir is required: the Hugging Face directory to import")
    if not os.path.isdir(hf_dir):
        raise HFError(f"--hf_dir={hf_dir!r}: no such directory")
    check_out_dir(workdir, "--workdir")
    hf = _read_json(os.path.join(hf_dir, "config.json"))
    overrides, params = params_from_hf(SafetensorsDir(hf_dir), hf, dtype)
    with _atomic_dir(workdir, "--workdir") as tmp:
        final = os.path.abspath(workdir)
        tok_here, tok_final = _import_tokenizer(hf_dir, tmp, final)
        name = os.path.basename(os.path.abspath(hf_dir))
        cfg = _run_config(overrides, hf, dtype, tok_here, name)
        try:
            validate(cfg)
            load_tokenizer(tok_here)
        except ConfigError as e:
            raise HFError(str(e)) from e
        cfg.data.tokenizer = tok_final  # where it will be once the directory is renamed
        ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(tmp), async_save=False)
        try:
            ckpt.save(0, {"params": params}, _NoDataPosition(), cfg, wait=True)
        finally:
            ckpt.close()
        _write_json(os.path.join(tmp, "config.json"), cfg.to_dict())
        size = _dir_bytes(tmp)
    count = sum(x.size for x in jax.tree.leaves(params))
    return Written(os.path.abspath(workdir), 1, count, size)


# ---------------------------------------------------------------------------------------------
# Command line

_FLAGS_OF = {
    "export": ("workdir", "step", "out", "dtype", "max_shard_size"),
    "import": ("hf_dir", "workdir", "dtype"),
}


def define_flags() -> None:
    """Defines the flags (at launch, so importing this module defines none)."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "export: the run to read; import: the run to write.")
    flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest).")
    flags.DEFINE_string("out", None, "export: the HF directory to write (absent or empty).")
    flags.DEFINE_string("hf_dir", None, "import: the HF Llama directory to read.")
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Dtype of the written weights.")
    flags.DEFINE_string("max_shard_size", "5GB", "export: largest safetensors file.")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _main(argv: list[str]) -> None:
    from absl import flags

    from near_jax.train import quiet_library_logs, usage_error

    quiet_library_logs()
    commands = " | ".join(_FLAGS_OF)
    if len(argv) != 2 or argv[1] not in _FLAGS_OF:
        got = " ".join(argv[1:]) or "nothing"
        usage_error(f"expected one command, {commands}; got {got}")
    command, f = argv[1], flags.FLAGS
    for name in set().union(*_FLAGS_OF.values()) - set(_FLAGS_OF[command]):
        if f[name].present:
            allowed = ", ".join(f"--{n}" for n in _FLAGS_OF[command])
            usage_error(f"--{name} is not a flag of {command}; its flags: {allowed}")
    try:
        if command == "export":
            if not f.workdir:
                usage_error("--workdir is required: the run directory to export")
            written = export_run(f.workdir, f.out, f.step, f.dtype, f.max_shard_size)
            print(f"wrote {written.path}: {written.files} files, {written.params:,} params, "
                  f"{_mb(written.bytes)} ({f.dtype})")  # fmt: skip
        else:
            if not f.workdir:
                usage_error("--workdir is required: the run directory to write")
            written = import_hf(f.hf_dir, f.workdir, f.dtype)
            print(f"wrote {written.path}: checkpoint at step 0, {written.params:,} params, "
                  f"{_mb(written.bytes)} ({f.dtype}); start a run from it with "
                  f"--config.checkpoint.init_from={written.path}")  # fmt: skip
    except (HFError, loading.RunError) as e:
        usage_error(str(e))
    except (OSError, checkpoint.CheckpointError) as e:
        print(f"near_jax.hf: {command} failed: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """Console entry point."""
    from absl import app

    from near_jax.train import parse_flags

    define_flags()
    app.run(_main, flags_parser=parse_flags)


if __name__ == "__main__":
    main()
