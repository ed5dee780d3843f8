"""The analytic model: per-device memory and a step-time bound for a config on a mesh.

Memory per device, for the train step of `near_jax.train` on the config's mesh:
  params, optimizer (AdamW mu + nu), grads (+ the f32 accumulator with micro-batches) and
  the input batch are exact: every leaf's shard size under THE rules table of `sharding.py`.
  Activations are a model of what XLA keeps alive, per micro-batch of T tokens per device:
    residuals   what the remat policy saves for every layer (full: the block input;
                dots_saveable: block input, q/k/v, attention and MLP projections, gate, up;
                none: everything);
    + the larger of two phases of the backward pass:
    head        the float32 logits and their gradient (2 x T x vocab/tensor), plus under FSDP
                the gathered float32 gradients of the embedding and the output head; with the
                fused loss (`model.loss_chunk`) the logits of one chunk (~2.5 x loss_chunk
                tokens x vocab/tensor: logits, softmax, gradient) and the float32 head gradient it
                accumulates chunk by chunk (one gathered chunk's product + the fsdp-sharded sum);
    layer       one layer's recomputation and backward working set, plus under FSDP that
                layer's gathered weights and gradients. With XLA attention the float32
                [heads x length x length] scores count here; fused kernels (splash, pallas,
                cudnn: the `auto` choice on TPU and GPU) keep no scores.
  The per-layer coefficients (`_LAYER_*`) were measured on XLA's CPU buffer assignment for
  this model (tests/test_compiled.py keeps the planner within 15% of it).

Step time is a bound, assuming communication overlaps compute perfectly: the largest of
compute (model FLOPs plus remat recomputation, and the fused loss's second logits matmul, at
peak), HBM traffic, in-slice collectives (FSDP all-gathers and reduce-scatters, one more of
the output head's gradient per fused-loss chunk; data-parallel all-reduce and tensor-parallel
activation all-reduces, one after another, as ideal rings at the chip's full ICI bandwidth;
an axis spanning more devices than one ICI/NVLink domain gets the DCN bandwidth) and the
cross-slice gradient all-reduce over DCN. MFU bound = model-FLOPs time / step-time bound.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections
import numpy as np

from near_jax import config as config_lib
from near_jax import hardware as hardware_lib
from near_jax import model, sharding
from near_jax.config import ConfigError

FEATURE_COUNT = 5  # inputs, targets, positions, segment_ids, weights: 4 bytes per token each

# Per-token widths of one layer's backward working set (multiples of the widths below, in
# compute-dtype bytes) and of everything a layer keeps with remat "none"; measured on XLA.
_LAYER_WORK = {"attn": 4.6, "mlp": 8.3, "scores": 2.0}
_LAYER_ALL = {"attn": 2.4, "mlp": 6.5, "scores": 2.0}
_HEAD_HIDDEN = 4  # float32 [T, d_model] tensors live around the head (final norm, grads)
_FUSED_LOGITS = 2.5  # [rows, chunk, vocab] float32 buffers the fused loss keeps (logits, grad)
_FUSED_ATTENTION = ("splash", "pallas", "cudnn")


@dataclasses.dataclass(frozen=True)
class Widths:
    """Per-device widths of one token's activations at a layout (tensor-split dims divided)."""

    d_model: int
    q: float  # heads * head_dim / tensor
    kv: float  # 2 * kv_heads * head_dim / tensor
    mlp: float  # mlp_dim / tensor
    vocab: float  # vocab / tensor
    heads: float  # heads / tensor


def layout(cfg: ml_collections.ConfigDict, devices: int) -> dict[str, int]:
    """Mesh axis sizes for `devices`: data (all slices), fsdp, tensor, dcn_data, devices."""
    per_slice = sharding.mesh_shape(cfg.mesh, devices)
    dcn = cfg.mesh.dcn_data
    return {
        "data": per_slice["data"] * dcn,
        "fsdp": per_slice["fsdp"],
        "tensor": per_slice["tensor"],
        "dcn_data": dcn,
        "devices": devices,
    }


def _abstract_mesh(lay: dict[str, int]) -> jax.sharding.AbstractMesh:
    sizes = tuple(lay[a] for a in sharding.MESH_AXES)
    return jax.sharding.AbstractMesh(sizes, sharding.MESH_AXES)


def param_shards(cfg: ml_collections.ConfigDict, lay: dict[str, int]) -> dict[str, float]:
    """Exact per-device parameter element counts at a layout, from the rules table.

    Returns `shard` (all params on one device), `layer_gathered` (one layer's params after
    the FSDP all-gather), `eh_gathered` (embedding + head after the all-gather) and the
    matching shards `layer_shard`, `eh_shard`.
    """
    mcfg = model.ModelConfig.from_config(cfg.model)
    shapes = jax.eval_shape(lambda r: model.init(mcfg, r), jax.random.key(0))
    logical = model.logical_axes(mcfg)
    mesh = _abstract_mesh(lay)
    out = dict(shard=0.0, layer_gathered=0.0, layer_shard=0.0, eh_gathered=0.0, eh_shard=0.0)
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for (path, leaf), spec in zip(leaves, specs, strict=True):
        mesh_spec = sharding.logical_to_spec(spec, leaf.shape, mesh)
        split = gathered_split = 1
        for axes in mesh_spec:
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                split *= mesh.shape[axis]
                gathered_split *= 1 if axis == "fsdp" else mesh.shape[axis]
        size = math.prod(leaf.shape)
        out["shard"] += size / split
        top = getattr(path[0], "key", "")
        if top == "blocks":
            out["layer_gathered"] += size / gathered_split / mcfg.n_layers
            out["layer_shard"] += size / split / mcfg.n_layers
        elif top in ("embed", "head"):
            out["eh_gathered"] += size / gathered_split
            out["eh_shard"] += size / split
    return out


def widths(cfg: ml_collections.ConfigDict, lay: dict[str, int]) -> Widths:
    """Activation widths per token on one device (a tensor axis that doesn't divide is off)."""
    m = cfg.model
    k = config_lib.head_dim(m)
    tp = lay["tensor"]

    def split(n: int) -> float:
        return n / tp if n % tp == 0 else float(n)

    return Widths(
        d_model=m.d_model,
        q=split(m.n_heads) * k,
        kv=2 * split(m.n_kv_heads) * k,
        mlp=split(m.mlp_dim),
        vocab=split(m.vocab_size),
        heads=split(m.n_heads),
    )


def attention_impl(cfg: ml_collections.ConfigDict, acc: hardware_lib.Accelerator) -> str:
    """The attention implementation `auto` resolves to on this hardware (xla on CPU)."""
    impl = cfg.model.attention
    if impl != "auto":
        return impl
    return {"tpu": "splash", "gpu": "cudnn"}.get(acc.platform, "xla")


def batch_rows(cfg: ml_collections.ConfigDict, lay: dict[str, int]) -> tuple[int, int]:
    """(rows per device per step, rows per device per micro-batch); ConfigError if uneven."""
    dp = lay["data"] * lay["fsdp"]
    batch, mb = cfg.train.global_batch_size, cfg.train.microbatches
    if batch % (dp * mb):
        raise ConfigError(
            f"config.train.global_batch_size={batch} is not allowed: it must be a multiple of "
            f"the data-parallel size {dp} x train.microbatches {mb} = {dp * mb}"
        )
    return batch // dp, batch // dp // mb


def memory(
    cfg: ml_collections.ConfigDict, lay: dict[str, int], attention: str = "xla"
) -> dict[str, float]:
    """Per-device bytes of one train step: state, grads, batch, activations and the total."""
    m = cfg.model
    p_bytes = np.dtype(m.param_dtype).itemsize
    a_bytes = np.dtype(m.dtype).itemsize
    shards = param_shards(cfg, lay)
    rows, rows_micro = batch_rows(cfg, lay)
    seq = cfg.data.seq_len
    tokens = rows_micro * seq
    w = widths(cfg, lay)
    attn_w, mlp_w = w.d_model + w.q + w.kv, w.mlp
    scores = tokens * w.heads * seq * 4 if attention not in _FUSED_ATTENTION else 0.0

    def layer(coef: dict[str, float]) -> float:
        return (
            tokens * a_bytes * (coef["attn"] * attn_w + coef["mlp"] * mlp_w)
            + coef["scores"] * scores
        )

    saved = {
        "full": tokens * a_bytes * w.d_model,
        "dots_saveable": tokens * a_bytes * (2 * w.d_model + w.q + w.kv + 2 * w.mlp),
        "none": layer(_LAYER_ALL),
    }[m.remat]
    residuals = m.n_layers * saved
    fsdp = lay["fsdp"] > 1
    logits = 2 * tokens * w.vocab * 4  # the float32 logits and their gradient
    if m.get("loss_chunk", 0):  # fused head + loss (model/xent.py): one chunk's logits at a time
        positions = min(seq, max(1, m.loss_chunk // rows_micro))  # as xent.positions_per_chunk
        logits = _FUSED_LOGITS * rows_micro * positions * w.vocab * 4
        # the float32 head gradient: one chunk's (gathered) product + the fsdp-sharded sum
        logits += 4 * w.d_model * w.vocab * (1 + 1 / lay["fsdp"])
    head = logits + tokens * 4 * _HEAD_HIDDEN * w.d_model
    if fsdp:  # gathered float32 gradients of the embedding and the head
        head += 4 * (shards["eh_gathered"] - shards["eh_shard"])
    work = layer(_LAYER_WORK) - (saved if m.remat == "none" else 0.0)
    if fsdp:  # one layer's gathered weights and their gradient
        work += (p_bytes + 4) * shards["layer_gathered"]
    activations = residuals + max(head, work)
    out = {
        "params": shards["shard"] * p_bytes,
        "optimizer": 2 * shards["shard"] * p_bytes,
        "grads": shards["shard"] * (p_bytes + (4 if cfg.train.microbatches > 1 else 0)),
        "batch": rows * seq * 4 * FEATURE_COUNT,
        "residuals": residuals,
        "head_phase": head,
        "layer_phase": work,
        "activations": activations,
    }
    out["total"] = sum(out[k] for k in ("params", "optimizer", "grads", "batch", "activations"))
    return out


def step_time(
    cfg: ml_collections.ConfigDict,
    lay: dict[str, int],
    acc: hardware_lib.Accelerator,
    mem: dict[str, float],
) -> dict[str, float]:
    """A lower bound on the step time (seconds) from compute, HBM and network, and its MFU."""
    m = cfg.model
    mcfg = model.ModelConfig.from_config(m)
    seq, devices = cfg.data.seq_len, lay["devices"]
    tokens_step = cfg.train.global_batch_size * seq
    model_flops = model.flops_per_token(mcfg, seq) * tokens_step
    k = mcfg.head_dim
    layer_matmul = m.d_model * k * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.mlp_dim
    attn_fwd = 2 * 2 * m.n_heads * k * (seq + 1) / 2  # per token per layer
    recompute_per_token = {
        "full": m.n_layers * (2 * layer_matmul + attn_fwd),
        "dots_saveable": m.n_layers * attn_fwd,
        "none": 0.0,
    }[m.remat]
    if m.get("loss_chunk", 0):  # the fused loss computes the logits again in the backward
        recompute_per_token += 2 * m.d_model * m.vocab_size
    hw_flops = model_flops + recompute_per_token * tokens_step
    peak = acc.peak_flops
    out = {"model_flops": model_flops, "hardware_flops": hw_flops}
    if peak <= 0:
        return out
    p_bytes = np.dtype(m.param_dtype).itemsize
    a_bytes = np.dtype(m.dtype).itemsize
    mb = cfg.train.microbatches
    passes = 3 if m.remat == "full" else 2  # weight uses per micro-batch: fwd, bwd (+ remat)
    shards = param_shards(cfg, lay)
    layer_params = shards["layer_gathered"] * m.n_layers + shards["eh_gathered"]
    hbm = (
        passes * mb * layer_params * a_bytes  # weights read by the matmuls
        + 7 * mem["params"]  # optimizer: read params, grads, mu, nu; write params, mu, nu
        + 2 * mb * mem["activations"]  # activations written once and read once
    )
    t_compute = hw_flops / (devices * peak)
    t_hbm = hbm / acc.hbm_bw
    t_ici, t_dcn = _network_time(cfg, lay, acc, layer_params, shards["shard"], p_bytes, a_bytes)
    bound = max(t_compute, t_hbm, t_ici, t_dcn)
    out.update(
        compute_s=t_compute,
        hbm_s=t_hbm,
        ici_s=t_ici,
        dcn_s=t_dcn,
        step_s=bound,
        mfu_bound=model_flops / (devices * peak * bound),
        tokens_per_s=tokens_step / bound,
    )
    return out


def _network_time(cfg, lay, acc, gathered_params, shard, p_bytes, a_bytes) -> tuple[float, float]:
    """(in-slice, cross-slice) collective seconds per step under ideal ring collectives."""
    m, mb = cfg.model, cfg.train.microbatches
    fsdp, tp, data = lay["fsdp"], lay["tensor"], lay["data"] // lay["dcn_data"]
    passes = 3 if m.remat == "full" else 2
    rows_micro = batch_rows(cfg, lay)[1]
    tokens = rows_micro * cfg.data.seq_len
    ring = lambda n: (n - 1) / n  # noqa: E731 - fraction of a buffer each device moves

    def bw(span: int) -> float:  # an axis group larger than the fast domain crosses the DCN
        return acc.ici_bw if span <= acc.domain_devices else acc.dcn_bw

    per_micro_fsdp = gathered_params * ring(fsdp) * (passes * p_bytes + 4)
    if m.get("loss_chunk", 0):  # the fused loss reduce-scatters the head gradient per chunk
        positions = min(cfg.data.seq_len, max(1, m.loss_chunk // rows_micro))
        chunks = -(-cfg.data.seq_len // positions)
        head = m.d_model * widths(cfg, lay).vocab
        per_micro_fsdp += (chunks - 1) * head * ring(fsdp) * 4
    t_fsdp = mb * per_micro_fsdp / bw(fsdp * tp)
    t_data = 2 * shard * 4 * ring(data) / bw(data * fsdp * tp)
    acts = m.n_layers * tokens * m.d_model * a_bytes * 2 * passes  # 2 all-reduces per pass
    t_tensor = mb * acts * 2 * ring(tp) / bw(tp)
    t_dcn = 0.0
    if lay["dcn_data"] > 1 and acc.dcn_bw > 0:
        t_dcn = 2 * shard * 4 * ring(lay["dcn_data"]) / acc.dcn_bw
    return t_fsdp + t_data + t_tensor, t_dcn
