"""Device meshes and THE logical-axis rules table.

Every parameter and large activation is annotated with logical axis names; this module alone
maps them to mesh axes. Changing parallelism is a config change (`mesh.*`), never a code change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from near_jax.config import ConfigError

# Mesh axes of one model replica, outermost first (sized by `config.mesh`). Nothing outside
# this module names a mesh axis.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
# DiLoCo replicas inside one program (`config.diloco.replicas`) go in front: replicas train
# independently and only meet at the outer step. The axis is always there (size 1 without
# DiLoCo), so every mesh has the same axis names.
REPLICA_AXIS = "replica"
ALL_AXES: tuple[str, ...] = (REPLICA_AXIS, *MESH_AXES)

# THE rules table: logical axis -> mesh axes. flax resolves each logical axis to the first
# rule whose mesh axes are still free in that array, so an activation's `embed` stays
# unsharded once `batch` has taken `fsdp`, while a parameter's `embed` is sharded by `fsdp`.
#
# `batch` has two rules: the whole batch splits over replicas too, while inside one replica
# (where `replica` is a manual shard_map axis, or already taken by a leading `replica` dim)
# flax falls through to the second.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("replica", REPLICA_AXIS),
    ("batch", (REPLICA_AXIS, "data", "fsdp")),
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves `mesh.{data,fsdp,tensor,dcn_data}` (one may be -1) to sizes for num_devices."""
    dcn = mesh_cfg.dcn_data
    if num_devices % dcn:
        raise ConfigError(
            f"config.mesh.dcn_data={dcn} is not allowed: must divide the device count {num_devices}"
        )
    per_slice = num_devices // dcn
    sizes = {axis: mesh_cfg[axis] for axis in MESH_AXES}
    fill = [axis for axis, size in sizes.items() if size == -1]
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if per_slice % known:
            raise ConfigError(
                f"config.mesh={_fmt(sizes)} is not allowed: the fixed axes' product {known} "
                f"must divide the {per_slice} devices per slice"
            )
        sizes[fill[0]] = per_slice // known
    if math.prod(sizes.values()) != per_slice:
        raise ConfigError(
            f"config.mesh={_fmt(sizes)} is not allowed: the product of data*fsdp*tensor must "
            f"equal the {per_slice} devices per slice (set one axis to -1 to fill)"
        )
    return sizes


def _fmt(sizes: dict[str, int]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sizes.items()) + "}"


def make_mesh(
    mesh_cfg: ml_collections.ConfigDict,
    devices: Sequence[jax.Device] | None = None,
    replicas: int = 1,
) -> Mesh:
    """Builds the (replica, data, fsdp, tensor) mesh, over all devices by default.

    `mesh.*` lays out the devices of one replica. With `replicas` > 1 (DiLoCo) the devices
    are cut into that many contiguous groups (devices are ordered by process and slice, so a
    replica is a host or slice where they divide evenly). With `mesh.dcn_data > 1` the data
    axis spans slices (or processes, where devices carry no slice index) and is laid out
    with `create_hybrid_device_mesh`, so only data parallelism crosses the slow network.
    """
    devices = list(jax.devices() if devices is None else devices)
    if replicas < 1 or len(devices) % replicas:
        raise ConfigError(
            f"config.diloco.replicas={replicas} is not allowed: it must divide the "
            f"{len(devices)} devices"
        )
    per = len(devices) // replicas
    groups = [device_array(mesh_cfg, devices[r * per : (r + 1) * per]) for r in range(replicas)]
    axis_types = (jax.sharding.AxisType.Auto,) * len(ALL_AXES)
    return Mesh(np.stack(groups), ALL_AXES, axis_types=axis_types)


def device_array(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any]) -> np.ndarray:
    """The [data, fsdp, tensor] array of devices; with dcn_data > 1, data spans slices."""
    sizes = mesh_shape(mesh_cfg, len(devices))
    ici_shape = [sizes[axis] for axis in MESH_AXES]
    dcn = mesh_cfg.dcn_data
    if dcn == 1:
        return mesh_utils.create_device_mesh(ici_shape, devices=devices)
    has_slices = hasattr(devices[0], "slice_index")
    granules = len({d.slice_index if has_slices else d.process_index for d in devices})
    if granules != dcn:
        kind = "slices" if has_slices else "processes"
        raise ConfigError(
            f"config.mesh.dcn_data={dcn} is not allowed: it must equal the number of "
            f"{kind}, which is {granules}"
        )
    return mesh_utils.create_hybrid_device_mesh(
        ici_shape, [dcn, 1, 1], devices=devices, process_is_granule=not has_slices
    )


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the `batch` logical axis is split on this mesh (replicas included)."""
    return math.prod(mesh.shape[a] for a in _rule("batch") if a in mesh.shape)


def _rule(logical: str) -> tuple[str, ...]:
    for name, axes in LOGICAL_AXIS_RULES:
        if name == logical:
            return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    raise KeyError(logical)


def logical_to_spec(
    logical: PartitionSpec, shape: Sequence[int], mesh: Mesh | jax.sharding.AbstractMesh
) -> PartitionSpec:
    """Maps a logical PartitionSpec to mesh axes, dropping mesh axes that don't divide a dim.

    Dropping (replicating) instead of failing keeps every mesh legal for every model, e.g.
    2 kv heads on tensor=4.
    """
    spec = nn.logical_to_mesh_axes(logical, LOGICAL_AXIS_RULES)
    # Axes this mesh lacks, or that are manual here (inside shard_map), cannot shard.
    usable = set(mesh.shape) - set(getattr(mesh, "manual_axes", ()))
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept, size = [], 1
        for axis in axes:
            if axis in usable and dim % (size * mesh.shape[axis]) == 0:
                kept.append(axis)
                size *= mesh.shape[axis]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def logical_to_sharding(logical_tree: Any, shape_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs and a matching tree of shapes."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_spec(spec, np.shape(x), mesh)),
        logical_tree,
        shape_tree,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [batch, length] data arrays: batch over the data-parallel axes."""
    axes = tuple(a for a in _rule("batch") if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes, None))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """Constrains an activation's sharding by logical names.

    A no-op outside `jax.set_mesh(mesh)`, so model code runs unchanged on one device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(PartitionSpec(*logical), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def whole_along(x: jax.Array, axis: int, mesh: Mesh | None) -> jax.Array:
    """`x` constrained so that `axis` is whole on every device and the other axes are split
    over the mesh (largest first, each mesh axis on the first dim it divides).

    For a gather or segment sum along `axis` inside jit (growing params): done on a layout
    sharded along that axis, XLA would gather the whole array onto every device. None: x.
    """
    if mesh is None:
        return x
    free = [a for a in mesh.axis_names if mesh.shape[a] > 1]
    spec: list[Any] = [None] * x.ndim
    for dim in sorted((d for d in range(x.ndim) if d != axis), key=lambda d: -x.shape[d]):
        kept, size = [], 1
        for a in list(free):
            if x.shape[dim] % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
                free.remove(a)
        spec[dim] = None if not kept else kept[0] if len(kept) == 1 else tuple(kept)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))
