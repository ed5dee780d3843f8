"""Meshes and the rules table: same numbers on every mesh, shardings as the table says."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config
from jax.sharding import PartitionSpec as P

from near_jax import model, sharding
from near_jax.config import ConfigError


def _mesh_cfg(data=-1, fsdp=1, tensor=1, dcn_data=1):
    cfg = small_config().mesh
    cfg.data, cfg.fsdp, cfg.tensor, cfg.dcn_data = data, fsdp, tensor, dcn_data
    return cfg


def _batch(seed=0, batch=8, length=32, vocab=384):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    segments = np.sort(rng.integers(1, 3, (batch, length)), axis=1).astype(np.int32)
    positions = np.zeros_like(segments)
    for b in range(batch):
        for t in range(1, length):
            positions[b, t] = 0 if segments[b, t] != segments[b, t - 1] else positions[b, t - 1] + 1
    weights = np.ones((batch, length), np.float32)
    weights[:, :-1] *= segments[:, 1:] == segments[:, :-1]
    return dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        positions=positions,
        segment_ids=segments,
        weights=weights,
    )


MESHES = {
    "1 device": (dict(data=1), 1),
    "data=8": (dict(data=8), 8),
    "fsdp=8": (dict(data=1, fsdp=8), 8),
    "tensor=2 x fsdp=4": (dict(data=1, fsdp=4, tensor=2), 8),
    "data=2 x fsdp=2 x tensor=2": (dict(data=2, fsdp=2, tensor=2), 8),
}


def _loss_and_grads(mesh_kwargs, n_devices, cfg):
    mesh = sharding.make_mesh(_mesh_cfg(**mesh_kwargs), jax.devices()[:n_devices])
    params = model.init(cfg, jax.random.key(0))
    shardings = sharding.logical_to_sharding(model.logical_axes(cfg), params, mesh)
    params = jax.device_put(params, shardings)
    batch = jax.device_put(_batch(), sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        fn = jax.jit(
            jax.value_and_grad(lambda p, b: model.loss_fn(p, b, cfg)[0]),
            in_shardings=(shardings, sharding.batch_sharding(mesh)),
            out_shardings=(sharding.replicated(mesh), shardings),
        )
        loss, grads = fn(params, batch)
    return loss, grads, params


@pytest.fixture(scope="module")
def reference():
    cfg = model.ModelConfig.from_config(small_config().model)
    return cfg, _loss_and_grads(dict(data=1), 1, cfg)


@pytest.mark.parametrize("name", list(MESHES)[1:])
def test_same_loss_and_gradients_on_every_mesh(name, reference):
    cfg, (ref_loss, ref_grads, _) = reference
    loss, grads, params = _loss_and_grads(*MESHES[name], cfg)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(
        lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7), grads, ref_grads
    )
    # Arrays really are laid out as the rules table says.
    specs = jax.tree.map(lambda x: x.sharding.spec, params)
    expected = jax.tree.map(
        lambda spec, x: sharding.logical_to_spec(spec, x.shape, x.sharding.mesh),
        model.logical_axes(cfg),
        params,
        is_leaf=lambda x: isinstance(x, P),
    )
    assert specs == expected


def test_rules_table_maps_parameters_to_mesh_axes():
    mesh = sharding.make_mesh(_mesh_cfg(data=1, fsdp=4, tensor=2))
    cfg = model.ModelConfig.from_config(small_config(n_heads=4, n_kv_heads=4).model)
    axes = model.logical_axes(cfg)
    shapes = jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0))
    spec = lambda *path: sharding.logical_to_spec(  # noqa: E731
        _get(axes, path), _get(shapes, path).shape, mesh
    )
    assert spec("blocks", "attn", "q") == P(None, "fsdp", "tensor", None)
    assert spec("blocks", "attn", "o") == P(None, "tensor", None, "fsdp")
    assert spec("blocks", "mlp", "down") == P(None, "tensor", "fsdp")
    assert spec("embed") == P("tensor", "fsdp")
    assert spec("head") == P("fsdp", "tensor")
    assert sharding.batch_sharding(mesh).spec == P(("replica", "data", "fsdp"), None)
    assert sharding.data_parallel_size(mesh) == 4


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_axes_that_do_not_divide_a_dimension_are_dropped():
    mesh = sharding.make_mesh(_mesh_cfg(data=2, tensor=4))
    # 2 kv heads cannot be split 4 ways: that dimension is replicated instead.
    assert sharding.logical_to_spec(P("embed", "kv_heads"), (64, 2), mesh) == P("fsdp", None)
    assert sharding.logical_to_spec(P("embed", "heads"), (64, 8), mesh) == P("fsdp", "tensor")


def test_activation_constraint_applies_inside_a_mesh():
    mesh = sharding.make_mesh(_mesh_cfg(data=8))
    x = jnp.ones((8, 4, 16))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "length", "embed")))(x)
    assert y.sharding.spec[0] == "data"
    assert {s.data.shape for s in y.addressable_shards} == {(1, 4, 16)}
    assert sharding.constrain(x, ("batch", "length", "embed")) is x  # no mesh: no-op


def test_mesh_fill_and_errors():
    assert sharding.mesh_shape(_mesh_cfg(data=-1, fsdp=2, tensor=2), 8) == dict(
        data=2, fsdp=2, tensor=2
    )
    assert sharding.mesh_shape(_mesh_cfg(data=2, fsdp=-1), 8)["fsdp"] == 4
    with pytest.raises(ConfigError, match=r"config.mesh=.*product"):
        sharding.mesh_shape(_mesh_cfg(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="must divide"):
        sharding.mesh_shape(_mesh_cfg(data=-1, fsdp=3), 8)
    with pytest.raises(ConfigError, match="dcn_data=2.*processes, which is 1"):
        sharding.make_mesh(_mesh_cfg(dcn_data=2))


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "fake"


def test_multi_slice_mesh_puts_only_data_parallelism_across_slices():
    # Two slices of four devices; dcn_data=2 x (data=2, fsdp=2) per slice.
    devices = [_FakeDevice(i, slice_index=i // 4) for i in range(8)]
    array = sharding.device_array(_mesh_cfg(data=2, fsdp=2, tensor=1, dcn_data=2), devices)
    assert array.shape == (4, 2, 1)
    slices = np.vectorize(lambda d: d.slice_index)(array)
    # fsdp and tensor groups stay inside one slice; the data axis crosses slices.
    assert (slices == slices[:, :1, :1]).all()
    assert set(slices[:, 0, 0]) == {0, 1}
    with pytest.raises(ConfigError, match="dcn_data=4.*slices, which is 2"):
        sharding.device_array(_mesh_cfg(data=1, fsdp=2, dcn_data=4), devices)


def test_whole_along_keeps_one_axis_whole_and_splits_the_others_over_the_mesh():
    cfg = small_config().mesh
    cfg.data, cfg.fsdp, cfg.tensor = 1, 4, 2
    mesh = sharding.make_mesh(cfg)
    x = jnp.arange(8 * 6 * 4, dtype=jnp.float32).reshape(8, 6, 4)
    out = jax.jit(lambda a: sharding.whole_along(a, 0, mesh))(x)
    # 6 is not a multiple of fsdp=4, so dim 1 takes tensor=2 and dim 2 takes fsdp=4.
    assert out.sharding.spec == P(None, "tensor", "fsdp")
    np.testing.assert_array_equal(out, x)
    assert sharding.whole_along(x, 0, None) is x
