"""Checkpoints with Orbax: the whole run (state, data iterator, config) per step.

A run keeps its checkpoints in `workdir/checkpoints/<step>/` with three items:
  state   the TrainState pytree (params, optimizer state, step, rng), as sharded arrays;
  data    the data position: each process's shard states (JSON, one file per process;
          merged on restore, so a run can resume on another number of processes);
  config  the resolved config (JSON).

Saves are asynchronous by default (Orbax writes in the background and commits atomically by
renaming a temporary directory); a background failure is raised at the next save or at
`close()`. On restore the latest step is tried first; an incomplete or damaged step is
reported with a warning and the previous one is tried, and if none can be read the run stops
with a CheckpointError rather than silently starting afresh.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE, DATA, CONFIG = "state", "data", "config"
CHECKPOINT_DIR = "checkpoints"
# Orbax writes this file into a step directory once every item of the step is written.
COMMIT_MARKER = "commit_success.txt"
# Orbax writes a step into "<step>.orbax-checkpoint-tmp-<n>" and renames it when committed.
_TMP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


class CheckpointError(RuntimeError):
    """No checkpoint could be read where one was expected (the message says why)."""


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns."""

    step: int
    state: Any
    config: dict
    skipped: list[str]  # one line per newer step that could not be used, and why


def checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
    """Where a run directory keeps its checkpoints."""
    return epath.Path(workdir) / CHECKPOINT_DIR


class Checkpointer:
    """Saves and restores a run's checkpoints (an Orbax CheckpointManager underneath)."""

    def __init__(
        self,
        directory: str | epath.Path,
        *,
        keep: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = epath.Path(directory)
        self.stale = [] if read_only else self._remove_stale_tmp()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler(),
            },
        )

    def _remove_stale_tmp(self) -> list[str]:
        """Deletes temporary directories of saves that never committed; returns warnings."""
        if jax.process_index() != 0 or not self.directory.exists():
            return []
        found = []
        for path in sorted(self.directory.iterdir()):
            match = _TMP_RE.match(path.name)
            if match:
                found.append(
                    f"step {match.group(1)}: incomplete save {path.name} (never committed); removed"
                )
                path.rmtree()
        for line in found:
            logging.warning("checkpoint %s", line)
        return found

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_iter: Any,
        config: ml_collections.ConfigDict,
        *,
        wait: bool = False,
    ) -> None:
        """Saves the run at `step` (async unless `wait`); raises an earlier save's error."""
        self.manager.check_for_errors()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iter)),
                    CONFIG: ocp.args.JsonSave(config.to_dict()),
                }
            ),
            force=True,
        )
        if wait:
            self.wait()

    def wait(self) -> None:
        """Blocks until pending saves are committed; raises their errors."""
        self.manager.wait_until_finished()
        self.manager.check_for_errors()

    def restore(
        self, abstract_state: Any, data_iter: Any | None = None, step: int | None = None
    ) -> Restored:
        """Restores the latest readable step (or exactly `step`) into `abstract_state`'s shardings.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding`: arrays land
        directly in those shardings, whatever mesh they were saved from. `data_iter`, when
        given, is set to the saved position. Newer steps that fail are skipped with a warning.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        skipped = list(self.stale)
        for candidate in candidates:
            if candidate not in self.manager.all_steps():
                raise CheckpointError(
                    f"step {candidate} not found in {self.directory}; "
                    f"committed steps: {self.steps() or 'none'}"
                )
            if not (self.directory / str(candidate) / COMMIT_MARKER).exists():
                problem = f"step {candidate}: incomplete (no {COMMIT_MARKER})"
                logging.warning("checkpoint %s; trying an older step", problem)
                skipped.append(problem)
                if step is not None:
                    raise CheckpointError(f"checkpoint {problem}")
                continue
            try:
                items = {
                    STATE: ocp.args.StandardRestore(abstract_state),
                    CONFIG: ocp.args.JsonRestore(),
                }
                restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
                data_state = self.read_data_state(candidate) if data_iter is not None else None
            except Exception as e:  # noqa: BLE001 - any read failure means "damaged"
                problem = f"step {candidate}: unreadable ({_one_line(e)})"
                logging.warning("checkpoint %s; trying an older step", problem)
                skipped.append(problem)
                if step is not None:
                    raise CheckpointError(f"checkpoint {problem}") from e
                continue
            if data_state is not None:
                try:
                    data_iter.set_state(data_state)
                except ValueError as e:
                    raise CheckpointError(f"step {candidate}: {e}") from e
            return Restored(candidate, restored[STATE], dict(restored[CONFIG]), skipped)
        raise CheckpointError(
            f"none of the checkpoints in {self.directory} could be read: " + "; ".join(skipped)
        )

    def read_data_state(self, step: int) -> dict[str, Any]:
        """The data position at `step`: every process's shard states merged into one dict.

        Any host can resume any shard, so the number of processes may change between runs.
        """
        files = sorted((self.directory / str(step) / DATA).glob("process_*.json"))
        if not files:
            raise CheckpointError(f"step {step}: no data position ({DATA}/process_*.json)")
        merged: dict[str, Any] = {"shards": {}}
        for path in files:
            state = json.loads(path.read_text())
            if merged.setdefault("num_shards", state["num_shards"]) != state["num_shards"]:
                raise CheckpointError(f"step {step}: {path.name} disagrees on num_shards")
            merged["shards"].update(state["shards"])
        return merged

    def close(self) -> None:
        """Waits for pending saves, raises their errors, and releases the manager."""
        try:
            self.wait()
        finally:
            self.manager.close()


class _IteratorSnapshot:
    """The iterator's position now: an async save may serialize it later, after more batches.

    grain's handler writes `get_state()` bytes as they are (restore reads them as JSON).
    """

    def __init__(self, data_iter: Any):
        self._state = json.dumps(data_iter.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300]


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) carrying the given shardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


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
    directory = epath.Path(path)
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
        saved = manager.item_metadata(step)[STATE]
        saved = getattr(saved, "tree", saved)
        problem = _shape_mismatch(saved.get("params", {}), abstract_params)
        if problem:
            raise CheckpointError(f"{what}={spec!r}: a different architecture: {problem}")
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                           dtype=x.dtype),
            abstract_params,
        )  # fmt: skip
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
    """The resolved config a checkpoint step was saved with (its `config` item)."""
    manager = _read_only_manager(epath.Path(directory))
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
        )
        return dict(restored[CONFIG])
    finally:
        manager.close()
