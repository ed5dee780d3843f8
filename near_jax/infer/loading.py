"""Loading a trained run for inference: its config, tokenizer and params on this machine's mesh.

    run = load_run("/tmp/near_jax_tiny")            # the latest committed step
    logits = model.apply(run.params, tokens, positions, segment_ids, run.model_cfg)

Only the params are read (not the optimizer state), straight into the shardings of a mesh
built here, so a checkpoint trained on a pod can be evaluated on a laptop if it fits. The
model comes from the config the checkpoint was saved with, so no config flag is needed.
A relative tokenizer path in that config is looked up in the run directory first (an
imported run keeps `tokenizer/tokenizer.json` there), so a run directory can be moved.

Without an explicit step the latest committed step is tried first; a step that cannot be read
(any error reading its config or params) is reported with a one-line warning and the next
older one is tried, as `train` does when it resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from near_jax import model, sharding
from near_jax._io import one_line
from near_jax.config import ConfigError, default_config
from near_jax.data.tokenizer import Tokenizer, load_tokenizer
from near_jax.train import checkpoint, checkpoint_integrity, checkpoint_reads


class RunError(ValueError):
    """A run directory or step that cannot be loaded; the message is one line."""


class CheckpointUnreadable(RunError):
    """Checkpoint data that cannot be read (damaged or incomplete); the message is one line.

    Not a usage mistake: programs report it as a failure (exit 1). `step` is the step that
    failed, or None when every step of the run failed (the message then lists why each did).
    """

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def _unreadable(step: int, reason: str) -> CheckpointUnreadable:
    return CheckpointUnreadable(f"checkpoint step {step}: unreadable ({reason})", step)


def _one_line(e: BaseException) -> str:
    """Our errors' messages uncut; others' typed and cut (Orbax's run long)."""
    if isinstance(e, (RunError, checkpoint.CheckpointError)):
        return one_line(e, None)
    return one_line(e, typed=True)


@dataclasses.dataclass
class LoadedRun:
    """A run's params at one step, ready for `model.apply`."""

    workdir: str
    step: int
    cfg: ml_collections.ConfigDict  # as saved, but data.tokenizer resolved (tokenizer_path)
    model_cfg: model.ModelConfig
    params: Any
    mesh: jax.sharding.Mesh
    tokenizer: Tokenizer


def committed_steps(workdir: str) -> list[int]:
    """The committed checkpoint steps of a run directory, oldest first (RunError if none)."""
    if not workdir or not os.path.isdir(workdir):
        raise RunError(f"--workdir={workdir!r}: no such directory")
    directory = checkpoint.checkpoint_dir(workdir)
    steps = []
    if directory.exists():
        steps = sorted(
            int(p.name)
            for p in directory.iterdir()
            if p.name.isdigit() and (p / checkpoint.COMMIT_MARKER).exists()
        )
    if not steps:
        raise RunError(
            f"--workdir={workdir!r}: no committed checkpoint in {directory} "
            "(train with checkpoint.every > 0, or wait for the first save)"
        )
    return steps


# Model fields that fix the param shapes: a saved config without them is not a usable config.
_MODEL_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")


def _config_problem(saved: Any) -> str | None:
    """What is wrong with the shape of a saved config, or None if it can be used."""
    problem = checkpoint_integrity.config_problem(saved)
    if problem:
        return problem
    for key in _MODEL_SHAPE_KEYS:
        value = saved["model"].get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"model.{key} is {value!r} in the saved config, not a positive integer"
    return None


def run_config(workdir: str, step: int) -> ml_collections.ConfigDict:
    """The config of a checkpoint step, completed with today's defaults for newer fields.

    Raises CheckpointUnreadable (one line naming the step and why) if the step's config
    cannot be read or is not a config (e.g. a JSON list, `{}`, no model section).
    """
    where = checkpoint.checkpoint_dir(workdir) / str(step) / checkpoint.CONFIG
    try:
        saved = checkpoint_reads.read_config(checkpoint.checkpoint_dir(workdir), step)
    except Exception as e:  # noqa: BLE001 - any failure to read it means "damaged"
        problem = _one_line(e.__cause__ or e)  # read_config's own line names the step again
        # Orbax's error for JSON that is not an object is cryptic: say what the file holds.
        with contextlib.suppress(Exception):
            problem = _config_problem(json.loads((where / "metadata").read_text())) or problem
        raise _unreadable(step, f"{where}: {problem}") from e
    problem = _config_problem(saved)
    if problem:
        raise _unreadable(step, f"{where}: {problem}")
    cfg = default_config()
    for section, values in saved.items():
        try:
            if isinstance(values, dict) and section in cfg:
                for key, value in values.items():
                    if key in cfg[section]:
                        cfg[section][key] = value
            elif section in cfg:
                cfg[section] = values
        except (TypeError, ValueError, KeyError) as e:  # a value of the wrong type
            raise _unreadable(step, f"{where}: {section}: {_one_line(e)}") from e
    return cfg


def tokenizer_path(workdir: str, spec: str) -> str:
    """Where `config.data.tokenizer` = `spec` of the run in `workdir` is, seen from here.

    A relative path that names a file in the run directory is that file (an imported run
    keeps its tokenizer there); anything else ('byte', an absolute path, a path relative
    to the current directory) is returned as it is.
    """
    if not isinstance(spec, str) or spec == "byte" or os.path.isabs(os.path.expanduser(spec)):
        return spec
    in_run = os.path.join(workdir, spec)
    return os.path.abspath(in_run) if os.path.isfile(in_run) else spec


def inference_mesh(fsdp: int = 1, tensor: int = 1) -> jax.sharding.Mesh:
    """A mesh of every device here: `fsdp` x `tensor`, data parallelism over the rest."""
    mesh_cfg = default_config().mesh
    mesh_cfg.fsdp, mesh_cfg.tensor = fsdp, tensor
    try:
        return sharding.make_mesh(mesh_cfg)
    except (ConfigError, ValueError) as e:
        raise RunError(str(e).splitlines()[0]) from e


def define_mesh_flags() -> None:
    """--fsdp and --tensor, the mesh flags of the inference programs (eval, generate)."""
    from absl import flags

    flags.DEFINE_integer("fsdp", 1, "Mesh: shard params over this many devices (-1 = all).")
    flags.DEFINE_integer("tensor", 1, "Mesh: tensor-parallel size.")


def param_shardings(model_cfg: model.ModelConfig, mesh: jax.sharding.Mesh) -> Any:
    """ShapeDtypeStructs of the params with their shardings on `mesh` (nothing allocated)."""
    shapes = jax.eval_shape(lambda: model.init(model_cfg, jax.random.key(0)))
    shardings = sharding.logical_to_sharding(model.logical_axes(model_cfg), shapes, mesh)
    return checkpoint.abstract_like(shapes, shardings)


def load_run(
    workdir: str,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    model_overrides: dict[str, Any] | None = None,
) -> LoadedRun:
    """Loads a run's params at `step` (default: the latest readable committed one) onto `mesh`.

    `model_overrides` change inference-only model fields (e.g. {"attention": "xla"}).
    Raises RunError (one line) for a missing or empty run, an unknown step, or an unreadable
    tokenizer; CheckpointUnreadable (one line) when `step` cannot be read or, without a
    `step`, when no committed step can be (it lists why each failed). Without a `step`, each
    unreadable newer step is skipped with a one-line warning.
    """
    steps = committed_steps(workdir)
    if step is not None and step not in steps:
        raise RunError(f"--step={step}: not found in {workdir}; committed steps: {steps}")
    mesh = mesh or inference_mesh()
    candidates = [step] if step is not None else steps[::-1]
    problems = []
    for i, candidate in enumerate(candidates):
        try:
            return _load_step(workdir, candidate, mesh, model_overrides or {})
        except CheckpointUnreadable as e:
            if step is not None:
                raise
            problems.append(str(e))
            if i + 1 < len(candidates):
                logging.warning("%s; trying an older step", e)
    raise CheckpointUnreadable(
        f"{workdir}: no checkpoint could be read: " + "; ".join(problems), None
    )


def _load_step(
    workdir: str, step: int, mesh: jax.sharding.Mesh, model_overrides: dict[str, Any]
) -> LoadedRun:
    """load_run of one step; CheckpointUnreadable if its config or params cannot be read."""
    path = os.path.abspath(workdir)  # Orbax reads arrays from absolute paths only
    cfg = run_config(path, step)
    for key, value in model_overrides.items():
        cfg.model[key] = value
    try:
        model_cfg = model.ModelConfig.from_config(cfg.model)
        abstract = param_shardings(model_cfg, mesh)
    except Exception as e:  # noqa: BLE001 - a config that passed the shape checks but is wrong
        where = checkpoint.checkpoint_dir(path) / str(step) / checkpoint.CONFIG
        raise _unreadable(step, f"{where}: {_one_line(e)}") from e
    cfg.data.tokenizer = tokenizer_path(path, cfg.data.tokenizer)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except ConfigError as e:  # the tokenizer is the run's, not the step's: no older step helps
        raise RunError(f"{workdir}: the run's tokenizer cannot be loaded: {e}") from e
    try:
        _, params = checkpoint_reads.restore_params(f"{path}:{step}", abstract, what="--workdir")
    except Exception as e:  # noqa: BLE001 - CheckpointError or whatever Orbax raises: damaged
        raise _unreadable(step, _one_line(e)) from e
    return LoadedRun(workdir, step, cfg, model_cfg, params, mesh, tokenizer)
