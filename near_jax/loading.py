"""Loading a trained run for inference: its config, tokenizer and params on this machine's mesh.

    run = load_run("/tmp/near_jax_tiny")            # the latest committed step
    logits = model.apply(run.params, tokens, positions, segment_ids, run.model_cfg)

Only the params are read (not the optimizer state), straight into the shardings of a mesh
built here, so a checkpoint trained on a pod can be evaluated on a laptop if it fits. The
model comes from the config the checkpoint was saved with, so no config flag is needed.
A relative tokenizer path in that config is looked up in the run directory first (an
imported run keeps `tokenizer/tokenizer.json` there), so a run directory can be moved.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from near_jax import checkpoint, model, sharding
from near_jax.config import ConfigError, default_config
from near_jax.tokenizer import Tokenizer, load_tokenizer


class RunError(ValueError):
    """A run directory or step that cannot be loaded; the message is one line."""


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


def run_config(workdir: str, step: int) -> ml_collections.ConfigDict:
    """The config of a checkpoint step, completed with today's defaults for newer fields."""
    saved = checkpoint.read_config(checkpoint.checkpoint_dir(workdir), step)
    cfg = default_config()
    for section, values in saved.items():
        if isinstance(values, dict) and section in cfg:
            for key, value in values.items():
                if key in cfg[section]:
                    cfg[section][key] = value
        elif section in cfg:
            cfg[section] = values
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


def is_params_only(workdir: str, step: int) -> bool:
    """Whether checkpoint `step` of a run holds params only (no optimizer state, no step).

    True for an imported run (`python -m near_jax.hf import`): it cannot be resumed, only
    started from with `config.checkpoint.init_from`. False for a training checkpoint and for
    one whose metadata cannot be read (restoring it then reports the problem).
    """
    try:
        directory = checkpoint.checkpoint_dir(os.path.abspath(workdir))
        ckpt = checkpoint.Checkpointer(directory, read_only=True)
        try:
            state = ckpt.manager.item_metadata(step)[checkpoint.STATE]
        finally:
            ckpt.close()
        return set(getattr(state, "tree", state)) == {"params"}
    except Exception:  # noqa: BLE001 - unreadable metadata: restoring it will say why
        return False


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
    """Loads a run's params at `step` (default: the latest committed) onto `mesh`.

    `model_overrides` change inference-only model fields (e.g. {"attention": "xla"}).
    Raises RunError (one line) for a missing or empty run, an unknown step, an unreadable
    tokenizer, or a checkpoint whose params do not match its architecture.
    """
    steps = committed_steps(workdir)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RunError(f"--step={step}: not found in {workdir}; committed steps: {steps}")
    path = os.path.abspath(workdir)  # Orbax reads arrays from absolute paths only
    cfg = run_config(path, step)
    for key, value in (model_overrides or {}).items():
        cfg.model[key] = value
    cfg.data.tokenizer = tokenizer_path(path, cfg.data.tokenizer)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except ConfigError as e:
        raise RunError(f"{workdir}: the run's tokenizer cannot be loaded: {e}") from e
    model_cfg = model.ModelConfig.from_config(cfg.model)
    mesh = mesh or inference_mesh()
    abstract = param_shardings(model_cfg, mesh)
    try:
        _, params = checkpoint.restore_params(f"{path}:{step}", abstract, what="--workdir")
    except checkpoint.CheckpointError as e:
        raise RunError(str(e)) from e
    return LoadedRun(workdir, step, cfg, model_cfg, params, mesh, tokenizer)
