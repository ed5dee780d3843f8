"""Checkpoints with Orbax: the whole run (state, data iterator, config) per step.

A run keeps its checkpoints in `workdir/checkpoints/<step>/` with three items:
  state   the TrainState pytree (params, optimizer state, step, rng), as sharded arrays;
  data    the data position: each process's shard states (JSON, one file per process;
          merged on restore, so a run can resume on another number of processes);
  config  the resolved config (JSON).

Saves are asynchronous by default (Orbax writes in the background and commits atomically by
renaming a temporary directory); a background failure is raised at the next save or at
`close()`. After the commit every file of the step is hashed into an integrity manifest
(`checkpoint_manifest`), and only then does retention delete older steps. A state holding a
NaN or Inf is never saved (NonFiniteStateError).

On restore the latest step is tried first; an incomplete or damaged step (no commit marker,
a file that does not match the manifest, anything Orbax cannot read, a saved config that is
not a config) is reported with a warning, moved aside to `<checkpoints>.damaged/` (never
deleted), and the previous one is tried; if none can be read the run stops with a
CheckpointError rather than silently starting afresh.

A *params-only* step holds `{"params": ...}` as its state (no optimizer state, no step): the
origin of a run made by `near_jax.hf import` or `near_jax.grow`. It is never restored as a
TrainState (the caller passes it in `restore(skip=...)`), never set aside, and never deleted
by retention.

Reading a step without resuming it (its params alone, its config) is `checkpoint_reads`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import threading
from collections.abc import Collection
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from near_jax._io import one_line
from near_jax.train import checkpoint_integrity as integrity
from near_jax.train.checkpoint_integrity import checked_config, is_finite

STATE, DATA, CONFIG = "state", "data", "config"
CHECKPOINT_DIR = "checkpoints"
# Orbax writes this file into a step directory once every item of the step is written.
COMMIT_MARKER = "commit_success.txt"
# Orbax writes a step into "<step>.orbax-checkpoint-tmp-<n>" and renames it when committed.
_TMP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


class CheckpointError(RuntimeError):
    """No checkpoint could be read where one was expected (the message says why)."""


class NoReadableCheckpoint(CheckpointError):
    """`Checkpointer.restore` tried every step and none could be used (each was set aside)."""


class NoFinishedCheckpoint(NoReadableCheckpoint):
    """Every step found was an unfinished save (none damaged): a run may start afresh."""


class NonFiniteStateError(RuntimeError):
    """A state with NaN or Inf values was refused by `Checkpointer.save` (nothing written)."""


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
    """Saves and restores a run's checkpoints (an Orbax CheckpointManager underneath).

    A step counts once Orbax has committed it *and* its integrity manifest is written (in a
    background thread after the commit); retention (`keep`, `keep_every`) runs only then,
    so it never deletes the newest good step for one that is not finished. A state with a
    NaN or Inf is refused before anything is written.

    Params-only steps (a run's imported or grown origin) are neither counted in `keep` nor
    deleted: keep=3 keeps the 3 newest full steps and the origin. A step's kind is read from
    its state item's metadata (a few ms) once per process and cached; a step whose metadata
    cannot be read is kept and not counted.
    """

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
        self.keep, self.keep_every, self.read_only = keep, keep_every, read_only
        self.stale = [] if read_only else self._remove_stale_tmp()
        self._finisher: threading.Thread | None = None
        self._finisher_error: BaseException | None = None
        self._last_step = -1
        self._params_only: dict[int, bool] = {}  # step -> holds params only (see params_only)
        # Retention is ours (after the manifest), not Orbax's (after the commit).
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only
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
        if not read_only and jax.process_index() == 0 and not self.step_dirs():
            # A new run: from its first step on, a step without a manifest is unfinished.
            integrity.mark_uses_manifests(self.directory)

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
        """Committed steps, oldest first (read from the directory, not Orbax's cache)."""
        return [s for s in self.step_dirs() if (self.directory / str(s) / COMMIT_MARKER).exists()]

    def good_steps(self) -> list[int]:
        """Steps whose save finished (committed, manifest written), oldest first."""
        return [s for s in self.step_dirs() if integrity.has_manifest(self.directory / str(s))]

    def params_only(self, step: int) -> bool | None:
        """Whether committed `step` holds params only (a run's origin); None if unreadable."""
        if step not in self._params_only:
            try:
                state = self.manager.item_metadata(step)[STATE]
            except Exception:  # noqa: BLE001 - a damaged step: restore will say why
                return None  # not cached: a read that failed once may work later
            self._params_only[step] = set(getattr(state, "tree", state) or ()) == {"params"}
        return self._params_only[step]

    def params_only_steps(self) -> list[int]:
        """Committed steps that hold params only (imported or grown origins), oldest first."""
        return [s for s in self.steps() if self.params_only(s)]

    def step_dirs(self) -> list[int]:
        """Every step-numbered entry of the directory (committed or not), oldest first."""
        if not self.directory.exists():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def save(
        self,
        step: int,
        state: Any,
        data_iter: Any,
        config: ml_collections.ConfigDict,
        *,
        wait: bool = False,
    ) -> None:
        """Saves the run at `step` (async unless `wait`); raises an earlier save's error.

        Raises NonFiniteStateError, writing nothing, if any float in `state` is NaN or Inf.
        """
        if not is_finite(state):
            raise NonFiniteStateError(f"step {step}: the state has NaN or Inf values")
        self._join_finisher()
        self._last_step = step
        self._params_only.pop(step, None)  # a step set aside may be saved again
        with self._save_errors(step):
            self.manager.check_for_errors()
            self.manager.reload()  # retention deleted steps behind Orbax's back
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
        self._finisher = threading.Thread(
            target=self._finish, args=(step,), name=f"near_jax-checkpoint-{step}", daemon=True
        )
        self._finisher.start()
        if wait:
            self.wait()

    @contextlib.contextmanager
    def _save_errors(self, step: int):
        """Any failure to write `step` (a full disk...) as one CheckpointError line."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many kinds
            good = self.good_steps() if jax.process_index() == 0 else []
            newest = f"step {good[-1]}" if good else "none"
            raise CheckpointError(
                f"step {step} could not be written ({_one_line(e)}); the newest good "
                f"checkpoint is {newest}"
            ) from e

    def _finish(self, step: int) -> None:
        """After the commit: the manifest, then retention (in the background thread)."""
        try:
            with self._save_errors(step):
                self.manager.wait_until_finished()
                self.manager.check_for_errors()
                if jax.process_index() == 0:
                    integrity.write(self.directory / str(step))
                    self._apply_retention()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread at the join
            self._finisher_error = e

    def _join_finisher(self) -> None:
        if self._finisher is not None:
            self._finisher.join()
            self._finisher = None
        error, self._finisher_error = self._finisher_error, None
        if error is not None:
            raise error

    def _apply_retention(self) -> None:
        """Deletes old steps beyond the newest `keep` good full ones (and `keep_every`
        multiples); params-only steps and steps of unknown kind stay."""
        if self.keep <= 0:
            return
        full = [s for s in self.good_steps() if self.params_only(s) is False]
        if len(full) <= self.keep:
            return
        oldest_kept = full[-self.keep]
        for step in self.steps():  # committed ones only: junk waits for restore to set it aside
            if step >= oldest_kept or (self.keep_every and step % self.keep_every == 0):
                continue
            if self.params_only(step) is False:  # the run's origin is never deleted
                (self.directory / str(step)).rmtree()
                self._params_only.pop(step, None)

    def wait(self) -> None:
        """Blocks until pending saves are committed and verified; raises their errors."""
        self._join_finisher()
        with self._save_errors(self._last_step):
            self.manager.wait_until_finished()
            self.manager.check_for_errors()

    def restore(
        self,
        abstract_state: Any,
        data_iter: Any | None = None,
        step: int | None = None,
        *,
        skip: Collection[int] = (),
    ) -> Restored:
        """Restores the latest good step (or exactly `step`) into `abstract_state`'s shardings.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding`: arrays land
        directly in those shardings, whatever mesh they were saved from. `data_iter`, when
        given, is set to the saved position. Newer steps that are incomplete or damaged are
        skipped with a warning and (unless read-only) moved aside by `integrity.quarantine`.
        `skip`: steps the walk back never tries nor sets aside (params-only steps: they hold
        no TrainState); an explicit `step` ignores it. When every step tried fails the error
        is a NoReadableCheckpoint (NoFinishedCheckpoint if none was damaged).
        """
        skipped_steps = set(skip)
        present = [s for s in self.step_dirs() if s not in skipped_steps]
        candidates = [step] if step is not None else list(reversed(present))
        if not candidates:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        if step is not None and step not in self.steps():
            raise CheckpointError(
                f"step {step} not found in {self.directory}; "
                f"committed steps: {self.steps() or 'none'}"
            )
        # A run saved before integrity manifests existed is read unverified (with a warning).
        verified = integrity.uses_manifests(self.directory)
        skipped, set_aside, damaged = list(self.stale), [], False
        try:
            for candidate in candidates:
                try:
                    restored = self._restore_step(candidate, abstract_state, data_iter, verified)
                except integrity.StepProblem as e:
                    problem = f"step {candidate}: {e}"
                    logging.warning("checkpoint %s; trying an older step", problem)
                    if step is not None:
                        raise CheckpointError(f"checkpoint {problem}") from e.__cause__
                    damaged = damaged or not e.unfinished
                    if not self.read_only:
                        problem += self._set_aside(candidate, problem)
                        set_aside.append(candidate)
                        self._params_only.pop(candidate, None)
                    skipped.append(problem)
                    continue
                if not verified:
                    logging.warning(
                        "checkpoint step %d: no integrity manifest (saved by an older near_jax); "
                        "restored unverified",
                        candidate,
                    )
                return dataclasses.replace(restored, skipped=skipped)
        finally:
            if set_aside:
                integrity.barrier("near_jax_checkpoint_set_aside")
                self.manager.reload()  # forget the steps that moved, so they can be saved again
        error = NoReadableCheckpoint if damaged else NoFinishedCheckpoint
        raise error(
            f"none of the checkpoints in {self.directory} could be read: " + "; ".join(skipped)
        )

    def _restore_step(
        self, step: int, abstract_state: Any, data_iter: Any | None, verified: bool
    ) -> Restored:
        """One step, or integrity.StepProblem saying why it cannot be used."""
        step_dir = self.directory / str(step)
        if not (step_dir / COMMIT_MARKER).exists():
            raise integrity.StepProblem(f"incomplete (no {COMMIT_MARKER})", unfinished=True)
        if verified:
            integrity.verify_everywhere(step_dir)
        try:
            items = {
                STATE: ocp.args.StandardRestore(abstract_state),
                CONFIG: ocp.args.JsonRestore(),
            }
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            config = checked_config(restored[CONFIG])
            data_state = self.read_data_state(step) if data_iter is not None else None
        except Exception as e:  # noqa: BLE001 - any read failure means "damaged"
            raise integrity.StepProblem(f"unreadable ({_one_line(e)})") from e
        if data_state is not None:
            try:
                data_iter.set_state(data_state)
            except ValueError as e:
                raise CheckpointError(f"step {step}: {e}") from e
        return Restored(step, restored[STATE], config, [])

    def _set_aside(self, step: int, problem: str) -> str:
        """Moves a damaged step out of the way (process 0); the text to add to its warning."""
        if jax.process_index() != 0:
            return ""
        try:
            target = integrity.quarantine(self.directory / str(step), problem)
        except OSError as e:
            raise CheckpointError(
                f"step {step} is damaged and cannot be moved aside: {_one_line(e)} ({problem})"
            ) from e
        logging.warning("checkpoint step %d: set aside in %s", step, target)
        return f"; set aside in {target}"

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
        except BaseException:
            # Orbax re-raises the same failed save from close(): report it once, from wait().
            with contextlib.suppress(Exception):
                self.manager.close()
            raise
        self.manager.close()


class NothingRead:
    """The data position of a params-only step (imported or grown): no data has been read."""

    def get_state(self) -> dict[str, Any]:
        return {"num_shards": 0, "shards": {}}


class _IteratorSnapshot:
    """The iterator's position now: an async save may serialize it later, after more batches.

    grain's handler writes `get_state()` bytes as they are (restore reads them as JSON).
    """

    def __init__(self, data_iter: Any):
        self._state = json.dumps(data_iter.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


def _one_line(e: BaseException) -> str:
    """`Type: message` on one line; Orbax's long messages get 400 characters, not 300."""
    return one_line(e, 400, typed=True)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) carrying the given shardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
