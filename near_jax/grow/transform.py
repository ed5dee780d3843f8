"""Growing params: a source model's params -> a wider and/or deeper model's params.

    new_params = grow_params(params, cfg, new_cfg, rng, width="clone", depth="stack")

Pure jnp over the params pytree (jit it with the target's shardings as `out_shardings`:
gathers and scales only, so the grown arrays are produced already sharded). Width first,
layer by layer, then depth. The maps are `near_jax.grow.maps`; what each option preserves
is `maps.PRESERVES_FUNCTION`.

Symmetry: with `clone`, copies of a unit would get identical gradients forever and the
grown model would never be more than the source. So each reader of duplicated inputs gets
noise that sums to zero over the copies (weighted by how the copies are scaled): the
function is unchanged, and the copies' outputs get different gradients from the first step
(their input rows from the second). `noise` is its standard deviation relative to the
matrix's RMS.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from near_jax import model, sharding
from near_jax.config import ModelConfig
from near_jax.grow import maps
from near_jax.grow.maps import NEW

Params = Any
_STACKED = "blocks"


def layers_of(params: Params, cfg: ModelConfig) -> Params:
    """The blocks' params stacked on a leading layer axis (as scanned params are)."""
    if cfg.scan_layers:
        return params[_STACKED]
    blocks = [params[f"block_{i}"] for i in range(cfg.n_layers)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)


def with_layers(params: Params, layers: Params, cfg: ModelConfig) -> Params:
    """`params` with its blocks replaced by `layers` (stacked), laid out as `cfg` wants."""
    top = {k: v for k, v in params.items() if k != _STACKED and not k.startswith("block_")}
    if cfg.scan_layers:
        return {**top, _STACKED: layers}
    return top | {
        f"block_{i}": jax.tree.map(lambda x, i=i: x[i], layers) for i in range(cfg.n_layers)
    }


def _take(x: jax.Array, src: np.ndarray, axis: int, mesh: Mesh | None = None) -> jax.Array:
    """x gathered along `axis` by `src` (NEW rows read row 0: callers mask them), on a
    layout where `axis` is whole on each device (`sharding.whole_along`)."""
    x = sharding.whole_along(x, axis, mesh)
    out = jnp.take(x, jnp.asarray(np.where(src == NEW, 0, src)), axis=axis)
    return sharding.whole_along(out, axis, mesh)


def _along(values: np.ndarray, ndim: int, axis: int) -> jax.Array:
    """A 1-D per-index array shaped to broadcast along `axis` of an ndim array."""
    shape = [1] * ndim
    shape[axis] = len(values)
    return jnp.asarray(values.reshape(shape), jnp.float32)


def _zero_sum_noise(
    rng: jax.Array,
    x: jax.Array,
    axis: int,
    src: np.ndarray,
    weight: np.ndarray,
    noise: float,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Noise on `x` whose `weight`-weighted sum over each source unit's copies is zero."""
    if noise <= 0 or np.bincount(src[src != NEW]).max() <= 1:  # no copies: nothing to break
        return jnp.zeros_like(x)
    std = noise * jnp.sqrt(jnp.mean(jnp.square(x)))
    eta = sharding.whole_along(std * jax.random.normal(rng, x.shape, x.dtype), axis, mesh)
    w = _along(weight, x.ndim, axis)
    group = np.where(src == NEW, 0, src)
    n_src = int(group.max()) + 1
    moved = jnp.moveaxis(w * eta, axis, 0)
    sums = jax.ops.segment_sum(moved, jnp.asarray(group), num_segments=n_src)
    sums = jnp.moveaxis(sums, 0, axis)
    norms = np.bincount(group, weights=weight * weight, minlength=n_src)
    norms = np.where(norms > 0, norms, 1.0)[group]
    return eta - w * _take(sums, src, axis, mesh) / _along(norms, x.ndim, axis)


class _Width:
    """Applies the width maps to one leaf at a time."""

    def __init__(self, cfg: ModelConfig, new: ModelConfig, width: str, noise: float, rng, mesh):
        self.zero, self.noise, self.rng, self.mesh = width == "zero", noise, rng, mesh
        self.res = maps.residual_map(cfg.d_model, new.d_model, width)
        self.mlp = maps.unit_map(cfg.mlp_dim, new.mlp_dim)
        self.q, self.kv = maps.head_maps(cfg, new)
        self._calls = 0

    def _key(self) -> jax.Array:
        self._calls += 1
        return jax.random.fold_in(self.rng, self._calls)

    def reader(
        self, x: jax.Array, fresh: jax.Array, row_axis: int, units=None, unit_axis: int = 0
    ) -> jax.Array:
        """A matrix reading the residual stream (after a norm) on `row_axis`, and feeding
        the `units` (heads, MLP units: copies) on `unit_axis`.

        clone: rows copied and rescaled, plus zero-sum noise over each channel's copies.
        zero: new rows, and the whole column of a unit that is not its source's first copy
        (in `zero` it is a new unit), come from the fresh matrix.
        """
        out = x if units is None else _take(x, units.src, unit_axis, self.mesh)
        out = _take(out, self.res.src, row_axis, self.mesh) * _along(
            self.res.read, x.ndim, row_axis
        )
        if not self.zero:
            return out + _zero_sum_noise(
                self._key(), out, row_axis, self.res.src, self.res.scale, self.noise, self.mesh
            )
        fresh_here = _along(self.res.src == NEW, x.ndim, row_axis) > 0
        if units is not None and units is not self.kv:  # kv heads are always copies
            fresh_here = fresh_here | (_along(~units.first, x.ndim, unit_axis) > 0)
        return jnp.where(fresh_here, fresh, out)

    def writer(self, x: jax.Array, axis: int) -> jax.Array:
        """A matrix writing into the residual stream on `axis` (new channels: zero)."""
        return _take(x, self.res.src, axis, self.mesh) * _along(self.res.scale, x.ndim, axis)

    def unit_outputs(self, x: jax.Array, units: maps.UnitMap, axis: int) -> jax.Array:
        """Output weights of units (o: heads, down: MLP units) on `axis`.

        clone: each copy gets the source's weights over the copy count, plus noise that
        sums to zero over the copies (they compute the same value). zero: the first copy
        gets the source's weights, new units zero.
        """
        out = _take(x, units.src, axis, self.mesh)
        if self.zero:
            return out * _along(units.first.astype(np.float64), x.ndim, axis)
        out = out / _along(units.copies[units.src].astype(np.float64), x.ndim, axis)
        ones = np.ones(len(units.src))
        return out + _zero_sum_noise(self._key(), out, axis, units.src, ones, self.noise, self.mesh)

    def norm(self, scale: jax.Array) -> jax.Array:
        """An RMSNorm's scale (last axis: channels); new channels start at 1."""
        src, axis = self.res.src, scale.ndim - 1
        out = jnp.where(
            _along(src == NEW, scale.ndim, axis) > 0, 1.0, _take(scale, src, axis, self.mesh)
        )
        return out * self.res.norm

    def layers(self, layers: Params, fresh: Params) -> Params:
        """One stacked tree of blocks [L, ...] grown in width ([L, d, H, K] q etc.)."""
        attn, mlp, fa, fm = layers["attn"], layers["mlp"], fresh["attn"], fresh["mlp"]
        return {
            "attn": {
                "q": self.reader(attn["q"], fa["q"], 1, self.q, 2),
                "k": self.reader(attn["k"], fa["k"], 1, self.kv, 2),
                "v": self.reader(attn["v"], fa["v"], 1, self.kv, 2),
                "o": self.writer(self.unit_outputs(attn["o"], self.q, 1), 3),
            },
            "mlp": {
                "gate": self.reader(mlp["gate"], fm["gate"], 1, self.mlp, 2),
                "up": self.reader(mlp["up"], fm["up"], 1, self.mlp, 2),
                "down": self.writer(self.unit_outputs(mlp["down"], self.mlp, 1), 2),
            },
            "attn_norm": {"scale": self.norm(layers["attn_norm"]["scale"])},
            "mlp_norm": {"scale": self.norm(layers["mlp_norm"]["scale"])},
        }


def _identity_block(block: Params) -> Params:
    """A fresh block whose output projections are zero: it adds nothing to the stream."""
    block = jax.tree.map(lambda x: x, block)
    block["attn"]["o"] = jnp.zeros_like(block["attn"]["o"])
    block["mlp"]["down"] = jnp.zeros_like(block["mlp"]["down"])
    return block


def grow_params(
    params: Params,
    cfg: Any,
    new_cfg: Any,
    rng: jax.Array,
    *,
    width: str = "clone",
    depth: str = "stack",
    noise: float = 0.01,
    mesh: Mesh | None = None,
) -> Params:
    """The params of `new_cfg`'s model grown from `params` of `cfg`'s (see the module doc).

    `mesh` (under jit): each gather runs on a layout where its axis is whole on every
    device and the rest is split, so no device ever holds a whole matrix.

    Raises maps.GrowError (one line) for growth that cannot work. Parameters come out in
    `new_cfg.param_dtype`; the maths runs in float32.
    """
    cfg, new = ModelConfig.from_config(cfg), ModelConfig.from_config(new_cfg)
    maps.check(cfg, new, width, depth)
    noise_rng, width_rng, depth_rng = jax.random.split(rng, 3)
    params = _float32(params)
    narrow = _replace(new, n_layers=cfg.n_layers)  # the source's depth at the new width
    # Fresh weights only where an option asks for new units (model.init costs a compile).
    fresh = _float32(model.init(narrow, width_rng)) if width == "zero" else None

    grow = _Width(cfg, new, width, noise, noise_rng, mesh)
    fresh_layers = layers_of(fresh, narrow) if fresh is not None else _NO_FRESH
    layers = grow.layers(layers_of(params, cfg), fresh_layers)
    final_scale = grow.norm(params["final_norm"]["scale"])
    if new.tie_embeddings and width == "clone":
        # The head is the embedding (a writer, scaled as such) transposed, where a reader
        # would be divided by d'/d: the final norm, which feeds only the head, divides.
        final_scale = final_scale * (cfg.d_model / new.d_model)
    top = {"embed": grow.writer(params["embed"], 1), "final_norm": {"scale": final_scale}}
    if not new.tie_embeddings:
        top["head"] = grow.reader(params["head"], None if fresh is None else fresh["head"], 0)

    order = maps.layer_order(cfg.n_layers, new.n_layers, depth)
    stacked = jax.tree.map(lambda x: _take(x, order, 0, mesh), layers)
    if (order == NEW).any():
        identity = _identity_block(layers_of(_float32(model.init(new, depth_rng)), new))
        is_new = jnp.asarray(order == NEW)
        stacked = jax.tree.map(
            lambda g, f: jnp.where(is_new.reshape((-1,) + (1,) * (g.ndim - 1)), f, g),
            stacked,
            identity,
        )
    grown = with_layers(top, stacked, new)
    dtype = jnp.dtype(new.param_dtype)
    return jax.tree.map(lambda x: x.astype(dtype), grown)


def _replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    return dataclasses.replace(cfg, **changes)


def _float32(tree: Params) -> Params:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


# The fresh matrices of `clone`, which never reads them.
_NO_FRESH = {"attn": dict.fromkeys("qkv"), "mlp": {"gate": None, "up": None}}
