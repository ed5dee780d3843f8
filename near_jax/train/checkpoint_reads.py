"""Reading a run's checkpoint without resuming it: its config, its params alone, its kind.

`restore_params` restores only the params of a step (`config.checkpoint.init_from`, inference
and export), verified against the step's integrity manifest and refused in one line when the
architecture differs; `read_config` reads the resolved config a step was saved with;
`is_params_only` says whether a step holds params only (an imported run, which cannot be
resumed). All open the checkpoints read-only.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from near_jax.train import checkpoint_integrity as integrity
from near_jax.train.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG,
    DATA,
    STATE,
    Checkpointer,
    CheckpointError,
    _one_line,
    checkpoint_dir,
)
from near_jax.train.checkpoint_integrity import checked_config


def parse_init_from(spec: str) -> tuple[str, int | None]:
    """'PATH[:STEP]' -> (path, step or None). PATH is a run directory or its checkpoints/."""
    path, step = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and head:
        path, step = head, int(tail)
    return path, step


def _read_only_manager(directory: epath.Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers={
            STATE: ocp.PyTreeCheckpointHandler(),
            DATA: grain.checkpoint.CheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler(),
        },
    )


def _shape_mismatch(saved: Any, abstract: Any) -> str | None:
    """The first param whose saved shape differs from `abstract` (or that is missing), if any."""
    saved_flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved)}
    for path, want in jax.tree_util.tree_leaves_with_path(abstract):
        key = jax.tree_util.keystr(path)
        have = saved_flat.get(key)
        if have is None:
            return f"params{key} is missing from the checkpoint"
        if tuple(have.shape) != tuple(want.shape):
            return (
                f"params{key} has shape {tuple(have.shape)} in the checkpoint but "
                f"{tuple(want.shape)} in the config"
            )
    return None


def restore_params(
    spec: str, abstract_params: Any, *, what: str = "config.checkpoint.init_from"
) -> tuple[int, Any]:
    """Restores only the params of another run (`checkpoint.init_from`): (step, params).

    `spec` is 'PATH[:STEP]' (the latest step without one). A checkpoint of another
    architecture (a param shape differs or is missing) is a one-line CheckpointError.
    """
    path, step = parse_init_from(spec)
    directory = epath.Path(os.path.abspath(path))  # Orbax reads arrays from absolute paths only
    if (directory / CHECKPOINT_DIR).exists():
        directory = directory / CHECKPOINT_DIR
    if not directory.exists():
        raise CheckpointError(f"{what}={spec!r}: {directory} does not exist")
    manager = _read_only_manager(directory)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"{what}={spec!r}: no committed checkpoint in {directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"{what}={spec!r}: step {step} not found; have {steps}")
        if integrity.uses_manifests(directory):
            try:
                integrity.verify(directory / str(step))
            except integrity.DamagedStep as e:
                raise CheckpointError(f"{what}={spec!r}: step {step} is damaged ({e})") from e
        saved = manager.item_metadata(step)[STATE]
        saved = getattr(saved, "tree", saved)
        problem = _shape_mismatch(saved.get("params", {}), abstract_params)
        if problem:
            raise CheckpointError(f"{what}={spec!r}: a different architecture: {problem}")
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(
                sharding=x.sharding, global_shape=x.shape, dtype=x.dtype
            ),
            abstract_params,
        )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.PyTreeRestore(
                        item={"params": abstract_params},
                        restore_args={"params": restore_args},
                        partial_restore=True,
                    )
                }
            ),
        )
        return step, restored[STATE]["params"]
    finally:
        manager.close()


def read_config(directory: str | epath.Path, step: int) -> dict:
    """The resolved config a checkpoint step was saved with (CheckpointError if unusable)."""
    manager = _read_only_manager(epath.Path(directory))
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
        )
        return checked_config(restored[CONFIG])
    except (ValueError, OSError) as e:
        raise CheckpointError(f"step {step}: unreadable config ({_one_line(e)})") from e
    finally:
        manager.close()


def is_params_only(workdir: str, step: int) -> bool:
    """Whether checkpoint `step` of a run holds params only (no optimizer state, no step).

    True for an imported or grown run (`python -m near_jax.hf import`, `near_jax.grow`):
    training starts from its params (fresh optimizer, step 0), in its directory or with
    `config.checkpoint.init_from`. False for a training checkpoint and for
    one whose metadata cannot be read (restoring it then reports the problem).
    """
    try:
        directory = checkpoint_dir(os.path.abspath(workdir))
        ckpt = Checkpointer(directory, read_only=True)
        try:
            state = ckpt.manager.item_metadata(step)[STATE]
        finally:
            ckpt.close()
        return set(getattr(state, "tree", state)) == {"params"}
    except Exception:  # noqa: BLE001 - unreadable metadata: restoring it will say why
        return False
