"""Hugging Face Llama <-> near_jax, in memory: config fields, params and the refusals.

    tensors = params_to_hf(params, model_cfg)                # {HF name: np.ndarray}
    overrides, params = params_from_hf(tensors, hf_config)    # model fields, params pytree

The two layouts hold the same numbers: near_jax keeps the input features of a projection
first (`q [D,H,K]`, `o [H,K,D]`, `gate [D,F]`) where torch's Linear keeps them last
(`q_proj.weight [H*K,D]`), so a conversion is a reshape and a transpose. RoPE already
rotates the two halves of each head as HF Llama does, so q/k need no permutation.

Files (safetensors, run directories) and the command line live in `near_jax.hf`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from near_jax import model

DTYPES = ("float32", "bfloat16")
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
    """The near_jax shape of one tensor (one layer of a scanned stack)."""
    shape = tuple(_leaf(params, t).shape)
    return shape[1:] if t.layer is not None else shape


def np_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a --dtype value (HFError unless one of DTYPES)."""
    if dtype not in DTYPES:
        raise HFError(f"--dtype={dtype!r} is not allowed: one of {' | '.join(DTYPES)}")
    return np.dtype(jax.numpy.dtype(dtype))  # bfloat16 comes from ml_dtypes, as JAX uses


def hf_shapes(params: Any, cfg: Any) -> dict[str, tuple[int, ...]]:
    """{HF name: HF shape} of every tensor, in file order; reads shapes only (no arrays)."""
    layout = _layout(model.ModelConfig.from_config(cfg))
    return {t.hf_name: _hf_shape(_near_shape(params, t), t.n_in) for t in layout}


def iter_hf_tensors(
    params: Any, cfg: Any, dtype: str = "float32", names: Collection[str] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every tensor (or those in `names`), in file order, one at a time.

    Only one converted copy is live at a time; each is contiguous, as safetensors needs.
    """
    cfg, dt = model.ModelConfig.from_config(cfg), np_dtype(dtype)
    for t in _layout(cfg):
        if names is not None and t.hf_name not in names:
            continue
        x = np.asarray(_leaf(params, t))  # zero-copy for arrays on a CPU device
        if t.layer is not None:
            x = x[t.layer]
        if t.n_in:  # inputs first -> a torch Linear weight [out, in]
            x = x.reshape(math.prod(x.shape[: t.n_in]), -1).T
        yield t.hf_name, np.ascontiguousarray(x.astype(dt, copy=False))


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


def _positive(value: Any, key: str, kind: type | tuple[type, ...] = int) -> Any:
    """`value` if a positive `kind` (bools refused), else HFError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if kind is int else "a positive number"
        raise HFError(f"config.json: {key}={value!r} is not allowed: {what}")
    return value


def _positive_int(hf: dict[str, Any], key: str, default: int | None = None) -> int:
    value = hf.get(key)
    value = default if value is None else value  # HF writes null for "derive it"
    if value is None:
        raise HFError(f"config.json: {key!r} is missing (a positive integer is required)")
    return _positive(value, key)


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
    return float(_positive(theta, "rope_theta", (int, float)))


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
    return {
        "vocab_size": _positive_int(hf, "vocab_size"),
        "d_model": d_model,
        "n_layers": _positive_int(hf, "num_hidden_layers"),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "mlp_dim": _positive_int(hf, "intermediate_size"),
        "rope_theta": _rope_theta(hf),
        "norm_eps": float(_positive(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", (int, float))),
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
    dt = np_dtype(dtype)
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
        arrays = [_from_hf(tensors, t, shape, dt) for t in group]
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
