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
import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging

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


class _NothingRead:
    """The data position of a grown run: nothing has been read."""

    def get_state(self) -> dict[str, Any]:
        return {"num_shards": 0, "shards": {}}


def _since(start: float) -> float:
    return time.perf_counter() - start


def _count(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def _target_config(cfg: ml_collections.ConfigDict, source: loading.LoadedRun):
    """The validated, resolved target config; GrowError if its tokenizer is not the source's."""
    config_lib.validate(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.name != source.tokenizer.name:
        raise maps.GrowError(
            f"config.data.tokenizer is {tokenizer.name!r} but the source run's is "
            f"{source.tokenizer.name!r}: growth keeps the tokenizer"
        )
    return resolve_config(cfg, tokenizer.vocab_size)


def _free_workdir(workdir: str) -> checkpoint.Checkpointer:
    """The Checkpointer of a new run directory; GrowError if it already holds a run.

    Steps a killed grow left unfinished are moved aside (never deleted), so a rerun works.
    """
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), async_save=False)
    if ckpt.good_steps():
        ckpt.close()
        raise maps.GrowError(
            f"--workdir={workdir} already holds a run (checkpoint steps {ckpt.good_steps()}); "
            "grow into a new directory"
        )
    for step in ckpt.step_dirs():
        if jax.process_index() == 0:
            where = checkpoint_integrity.quarantine(
                ckpt.directory / str(step), "unfinished: left by a grow that did not finish"
            )
            logging.warning("grow: unfinished step %d set aside in %s", step, where)
    ckpt.manager.reload()
    return ckpt


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
    maps.check_options(width, depth)  # before minutes of reading
    path, step = parse_init_from(source)
    path, workdir = os.path.abspath(path), os.path.abspath(workdir)
    config_lib.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    try:
        src = loading.load_run(path, step, mesh=mesh)
    except loading.RunError as e:  # its messages name the flag of eval and generate
        raise type(e)(str(e).replace("--workdir=", "--from=").replace("--step=", "--from=:")) from e
    cfg = _target_config(cfg, src)
    new_model = model.ModelConfig.from_config(cfg.model)
    maps.check(src.model_cfg, new_model, width, depth)
    logging.info(
        "grow: %s step %d (%s) -> %s: %s; width=%s (preserves the function: %s), depth=%s (%s)",
        path,
        src.step,
        src.cfg.name or "run",
        cfg.name or "run",
        maps.describe(src.model_cfg, new_model),
        width,
        maps.PRESERVES_FUNCTION[width],
        depth,
        maps.PRESERVES_FUNCTION[depth],
    )
    lock = (
        workdir_lib.acquire(workdir, program="near_jax.grow") if jax.process_index() == 0 else None
    )
    try:
        ckpt = _free_workdir(workdir)
        params_source = _count(src.params)
        logging.info(
            "grow: source read (%.1fs); growing on mesh %s", _since(start), dict(mesh.shape)
        )
        grown = grow_on_mesh(src.params, src.model_cfg, new_model, mesh, width, depth, noise, seed)
        src.params = None  # the source's arrays are not needed past here
        record = {
            "from": os.path.abspath(path),
            "step": src.step,
            "source_name": src.cfg.name,
            "name": cfg.name,
            "width": width,
            "depth": depth,
            "noise": noise,
            "seed": seed,
            "grows": maps.describe(src.model_cfg, new_model),
            "preserves_function": {
                width: maps.PRESERVES_FUNCTION[width],
                depth: maps.PRESERVES_FUNCTION[depth],
            },
        }
        jax.block_until_ready(grown)
        logging.info("grow: grown (%.1fs); saving step 0 to %s", _since(start), workdir)
        try:
            ckpt.save(0, {"params": grown}, _NothingRead(), cfg, wait=True)
        finally:
            ckpt.close()
        if jax.process_index() == 0:
            text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
            atomic_write(os.path.join(workdir, "config.json"), text)
            atomic_write(os.path.join(workdir, RECORD), json.dumps(record, indent=2) + "\n")
    finally:
        if lock:
            lock.release()
    return Grown(
        os.path.abspath(workdir),
        os.path.abspath(path),
        src.step,
        params_source,
        _count(grown),
        time.perf_counter() - start,
        record,
    )
