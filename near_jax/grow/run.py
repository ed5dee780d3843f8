"""A new run grown from another run's checkpoint: `grow_run`.

    grown = grow_run("runs/m500m", cfg_m2b, "runs/m2b", width="clone", depth="stack")
    # then: python -m near_jax.train --config=configs/ladder.py:m2b --workdir=runs/m2b

The source params are restored straight into their shardings on the target config's mesh,
grown by one jitted function whose outputs are the target's shardings, and saved as a
params-only checkpoint at step 0 of the new run directory, with the resolved config
(`config.json`) and a record of where they came from (`grown.json`). Training in that
directory starts from them (fresh optimizer, step 0); eval, generate and hf export read
it like any run. A killed grow leaves no finished step: run it again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from near_jax import config as config_lib
from near_jax import model, sharding
from near_jax import workdir as workdir_lib
from near_jax._io import atomic_write
from near_jax.data.tokenizer import load_tokenizer
from near_jax.grow import maps
from near_jax.grow.transform import grow_params
from near_jax.infer import loading
from near_jax.train import checkpoint, checkpoint_integrity
from near_jax.train.checkpoint_reads import parse_init_from
from near_jax.train.step import resolve_config

RECORD = "grown.json"


@dataclasses.dataclass
class Grown:
    """What a grow wrote."""

    workdir: str
    source: str
    source_step: int
    params_source: int
    params_grown: int
    seconds: float
    record: dict[str, Any]


def _since(start: float) -> float:
    return time.perf_counter() - start


def _count(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def _tokenizer_identity(spec: str) -> str:
    """What makes two tokenizers the same: 'byte', or the content hash of the file."""
    if spec == "byte":
        return spec
    try:
        with open(os.path.expanduser(spec), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise maps.GrowError(f"tokenizer {spec!r} cannot be read ({e.strerror})") from e


def _source_config(path: str, step: int | None, source: str):
    """(step, config) of the source: only its config is read, so refusals come before
    minutes of reading params. RunError / CheckpointUnreadable name --from."""
    try:
        steps = loading.committed_steps(path)
    except loading.RunError as e:  # its message names eval's and generate's flag
        raise loading.RunError(str(e).replace("--workdir=", "--from=")) from e
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise loading.RunError(f"--from={source}: step {step} not found; committed steps: {steps}")
    return step, loading.run_config(path, step)


def _target_config(cfg: ml_collections.ConfigDict, source_cfg, source_dir: str):
    """The validated, resolved target config; GrowError unless its tokenizer is the source's."""
    config_lib.validate(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    theirs = loading.tokenizer_path(source_dir, source_cfg.data.tokenizer)
    if _tokenizer_identity(cfg.data.tokenizer) != _tokenizer_identity(theirs):
        raise maps.GrowError(
            f"config.data.tokenizer={cfg.data.tokenizer!r} is not the source run's tokenizer "
            f"({theirs!r}): growth keeps the tokenizer"
        )
    return resolve_config(cfg, tokenizer.vocab_size)


# What a grow that did not finish may have left in its workdir (it is done again).
_OURS = {
    workdir_lib.LOCK_FILE,
    checkpoint.CHECKPOINT_DIR,
    checkpoint.CHECKPOINT_DIR + checkpoint_integrity.DAMAGED_SUFFIX,
    "config.json",
    RECORD,
}


def _claim(workdir: str) -> workdir_lib.Lock | None:
    """Locks a new run directory for the grow (process 0) and agrees on it with every process.

    GrowError if it holds anything but what an unfinished grow leaves; such a grow's
    unfinished steps are moved aside (never deleted).
    """
    lock, problem = None, ""
    if jax.process_index() == 0:
        try:
            lock = workdir_lib.acquire(workdir, program="near_jax.grow")
            problem = _leftover_problem(workdir)
        except (workdir_lib.WorkdirError, OSError) as e:
            problem = str(e).splitlines()[0]
        if problem and lock:
            lock.release()
            lock = None
    if jax.process_count() > 1:  # every process learns whether process 0 could claim it
        failed = multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))
        if failed and not problem:
            problem = f"--workdir={workdir}: process 0 could not claim it (see its log)"
    if problem:
        raise maps.GrowError(problem)
    return lock


def _leftover_problem(workdir: str) -> str:
    """Why `workdir` cannot take a grown run ('' if it can); sets aside unfinished steps."""
    extra = sorted(set(os.listdir(workdir)) - _OURS)
    trained = os.path.exists(os.path.join(workdir, "config.json")) and not os.path.exists(
        os.path.join(workdir, RECORD)
    )
    if extra or trained:
        return (
            f"--workdir={workdir} is not empty ({', '.join(extra) or 'a run config.json'}); "
            "grow into a new directory"
        )
    if not checkpoint.checkpoint_dir(workdir).exists():
        return ""
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), read_only=True)
    try:
        good, present = ckpt.good_steps(), ckpt.step_dirs()
    finally:
        ckpt.close()
    if good:
        return (
            f"--workdir={workdir} already holds a run (checkpoint steps {good}); grow into a "
            "new directory"
        )
    for step in present:
        where = checkpoint_integrity.quarantine(
            checkpoint.checkpoint_dir(workdir) / str(step),
            "unfinished: left by a grow that did not finish",
        )
        logging.warning("grow: unfinished step %d set aside in %s", step, where)
    return ""


def grow_on_mesh(
    params: Any,
    cfg: model.ModelConfig,
    new_cfg: model.ModelConfig,
    mesh: jax.sharding.Mesh,
    width: str = "clone",
    depth: str = "stack",
    noise: float = 0.01,
    seed: int = 0,
) -> Any:
    """`grow_params` compiled with the target's shardings on `mesh` as its outputs' shardings:
    each device computes only its own shards of the grown params."""
    target = loading.param_shardings(new_cfg, mesh)
    grow = jax.jit(
        functools.partial(
            grow_params,
            cfg=cfg,
            new_cfg=new_cfg,
            width=width,
            depth=depth,
            noise=noise,
            mesh=mesh,
        ),
        out_shardings=jax.tree.map(lambda x: x.sharding, target),
    )
    return grow(params, rng=jax.random.key(seed))


def grow_run(
    source: str,
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    width: str = "clone",
    depth: str = "stack",
    noise: float = 0.01,
    seed: int = 0,
) -> Grown:
    """Grows the run `source` ('PATH[:STEP]', default its latest step) into `cfg`'s model,
    written as a new run in `workdir` (see the module doc).

    Raises maps.GrowError (one line) for growth that cannot work or a taken `workdir`,
    loading.RunError / CheckpointUnreadable for a source that cannot be read.
    """
    start = time.perf_counter()
    maps.check_options(width, depth)
    path, step = parse_init_from(source)
    path, workdir = os.path.abspath(path), os.path.abspath(workdir)
    if os.path.basename(path) == checkpoint.CHECKPOINT_DIR:  # PATH may be the run's checkpoints/
        path = os.path.dirname(path)
    step, source_cfg = _source_config(path, step, source)
    cfg = _target_config(cfg, source_cfg, path)
    src_model = model.ModelConfig.from_config(source_cfg.model)
    new_model = model.ModelConfig.from_config(cfg.model)
    maps.check(src_model, new_model, width, depth)
    preserves = maps.preserved(src_model, new_model, width, depth)
    logging.info(
        "grow: %s step %d (%s) -> %s: %s; width=%s (function preserved: %s), depth=%s (%s)",
        path,
        step,
        source_cfg.name or "run",
        cfg.name or "run",
        maps.describe(src_model, new_model),
        width,
        preserves[width],
        depth,
        preserves[depth],
    )
    record = {
        "from": path,
        "step": step,
        "source_name": source_cfg.name,
        "name": cfg.name,
        "width": width,
        "depth": depth,
        "noise": noise if width == "clone" else None,  # zero adds no noise
        "seed": seed,
        "grows": maps.describe(src_model, new_model),
        "preserves_function": preserves,
    }
    mesh = sharding.make_mesh(cfg.mesh)
    lock = _claim(workdir)
    try:
        if jax.process_index() == 0:  # first: the step-0 commit is the grow's last act
            text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
            atomic_write(os.path.join(workdir, "config.json"), text)
            atomic_write(os.path.join(workdir, RECORD), json.dumps(record, indent=2) + "\n")
        src = loading.load_run(path, step, mesh=mesh)
        params_source = _count(src.params)
        logging.info(
            "grow: source read (%.1fs); growing on mesh %s", _since(start), dict(mesh.shape)
        )
        grown = grow_on_mesh(src.params, src_model, new_model, mesh, width, depth, noise, seed)
        src.params = None  # the source's arrays are not needed past here
        jax.block_until_ready(grown)
        logging.info("grow: grown (%.1fs); saving step 0 to %s", _since(start), workdir)
        ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), async_save=False)
        try:
            ckpt.save(0, {"params": grown}, checkpoint.NothingRead(), cfg, wait=True)
        finally:
            ckpt.close()
    finally:
        if lock:
            lock.release()
    return Grown(
        workdir,
        path,
        step,
        params_source,
        _count(grown),
        time.perf_counter() - start,
        record,
    )
