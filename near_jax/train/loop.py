"""The training loop: start or resume a run in a workdir, train, evaluate, save; `train()`."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from near_jax import config as config_lib
from near_jax import data, model, sharding
from near_jax import workdir as workdir_lib
from near_jax._io import atomic_write
from near_jax.config import ConfigError
from near_jax.data.tokenizer import load_tokenizer
from near_jax.train import checkpoint, inmesh, metrics, preemption
from near_jax.train.checkpoint_reads import restore_params
from near_jax.train.step import (
    DivergedError,
    Trainer,
    TrainState,
    check_batch,
    evaluate,
    make_trainer,
    now,
    resolve_config,
)


def trainer_for(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Trainer:
    """The Trainer a config asks for: in-mesh DiLoCo's when `diloco.replicas` > 0, else plain."""
    if cfg.diloco.replicas:
        return inmesh.make_trainer(cfg, mesh)
    return make_trainer(cfg, mesh)


def save_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config to workdir/config.json (atomically)."""
    path = os.path.join(workdir, "config.json")
    atomic_write(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True))


# Model fields that choose only how the step computes, never the params or the loss: a run
# may change them on resume (and runs saved before the field existed lack it).
RESUMABLE_MODEL_FIELDS = ("loss_chunk",)


def check_resume_config(saved: dict, cfg: ml_collections.ConfigDict) -> None:
    """Fails with one line if a checkpoint's model or data layout differs from the config."""
    for section, keys in (("model", None), ("data", ("seq_len", "tokenizer", "source", "shards"))):
        want, have = cfg[section].to_dict(), saved.get(section, {})
        for key in keys or sorted((set(want) | set(have)) - set(RESUMABLE_MODEL_FIELDS)):
            if want.get(key) != have.get(key):
                raise ConfigError(
                    f"config.{section}.{key}={want.get(key)!r} is not allowed: the checkpoint "
                    f"in this workdir was trained with {have.get(key)!r} (use a new --workdir, "
                    "or checkpoint.init_from to start from its params)"
                )


def _run_shards(workdir: str) -> int:
    """The data shard count a run in `workdir` started with (0 if it has not started)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return int(json.load(f)["data"]["shards"])
    except (OSError, KeyError, ValueError, TypeError):
        return 0


def start_state(
    trainer: Trainer, ckpt: checkpoint.Checkpointer, train_iter: Any
) -> tuple[TrainState, str]:
    """The state to train from, and a message: resumed, started from the workdir's params-only
    step (an imported or grown model), warm-started (init_from), or fresh."""
    cfg = trainer.cfg
    abstract = trainer.abstract_state
    workdir = str(ckpt.directory.parent)
    origins = ckpt.params_only_steps()  # never resumed as a TrainState, never set aside
    if any(s not in origins for s in ckpt.step_dirs()):
        try:
            restored = ckpt.restore(abstract._asdict(), data_iter=train_iter, skip=origins)
        except checkpoint.NoReadableCheckpoint as e:
            # Killed before its first save finished, or every save since is damaged (and set
            # aside): a run with an origin goes back to it, as to any older good step.
            if not (origins or isinstance(e, checkpoint.NoFinishedCheckpoint)):
                raise
            if origins:
                logging.warning("%s; going back to params-only step %d", e, origins[-1])
            restored = None
        if restored is not None:
            check_resume_config(restored.config, cfg)  # (checkpoint logged what it skipped)
            how = f"resumed from step {restored.step} in {ckpt.directory}"
            return TrainState(**restored.state), how
    if origins and cfg.checkpoint.init_from:
        raise ConfigError(
            f"config.checkpoint.init_from={cfg.checkpoint.init_from!r} is not allowed: "
            f"--workdir={workdir} holds the params to start from (params-only step "
            f"{origins[-1]}); drop init_from, or use a new --workdir"
        )
    if origins:
        # Read first: another architecture fails before the (slow) init. The optimizer starts
        # fresh: a params-only step has none to resume.
        step, params = restore_params(f"{workdir}:{origins[-1]}", abstract.params, what="--workdir")
        state = trainer.init(jax.random.key(cfg.seed))._replace(params=params)
        return state, (
            f"starting from the params of step {step} in {workdir} (params only: fresh optimizer)"
        )
    state = trainer.init(jax.random.key(cfg.seed))
    if cfg.checkpoint.init_from:
        step, params = restore_params(cfg.checkpoint.init_from, abstract.params)
        return state._replace(params=params), (
            f"initialized params from {cfg.checkpoint.init_from} (step {step})"
        )
    return state, "starting from scratch"


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) training as configured; returns the final train and eval metrics."""
    config_lib.validate(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = resolve_config(cfg, tokenizer.vocab_size)
    groups = cfg.diloco.replica_groups or cfg.diloco.replicas
    mesh = sharding.make_mesh(cfg.mesh, replicas=max(groups, 1))
    check_batch(cfg, mesh)
    cfg.data.shards = cfg.data.shards or _run_shards(workdir) or jax.process_count()
    # The data iterator first: a bad source fails before any model work.
    train_iter = data.make_iterator(
        cfg.data, split="train", seed=cfg.seed, global_batch_size=cfg.train.global_batch_size
    )
    is_main = jax.process_index() == 0
    # Process 0 owns the workdir for the whole run: a second train on it is refused.
    lock = workdir_lib.acquire(workdir, program="near_jax.train") if is_main else None
    try:
        return _train_locked(cfg, workdir, mesh, train_iter, is_main)
    finally:
        if lock:
            lock.release()


def _train_locked(cfg, workdir, mesh, train_iter, is_main) -> dict[str, float]:
    trainer = trainer_for(cfg, mesh)
    counts = model.param_counts(trainer.model_cfg)
    logging.info(
        "near_jax: %s | %.2fM params (%.2fM non-embedding) | mesh %s | %d devices, %d processes",
        cfg.name or "run",
        counts["total"] / 1e6,
        counts["non_embedding"] / 1e6,
        dict(mesh.shape),
        jax.device_count(),
        jax.process_count(),
    )
    ck = cfg.checkpoint
    ckpt = checkpoint.Checkpointer(
        checkpoint.checkpoint_dir(workdir),
        keep=ck.keep,
        keep_every=ck.keep_every,
        async_save=ck.async_save,
    )
    try:
        state, how = start_state(trainer, ckpt, train_iter)
        logging.info("%s", how)
        if is_main:
            save_config(cfg, workdir)
        return _loop(trainer, state, train_iter, ckpt, workdir, is_main)
    except (DivergedError, checkpoint.NonFiniteStateError) as e:
        ckpt.wait()  # the good saves before it finish
        good = ckpt.good_steps()
        newest = f"step {good[-1]}" if good else "none"
        raise DivergedError(
            f"{e}; nothing from there on was saved: the newest good checkpoint is {newest} in "
            f"{ckpt.directory} (lower optim.lr or fix the data, then run again to resume)"
        ) from e
    finally:
        ckpt.close()


def _loop(trainer, state, train_iter, ckpt, workdir, is_main) -> dict[str, float]:
    """The training loop from `state` to train.steps, with logging, eval and checkpoints."""
    cfg = trainer.cfg
    seq_len, batch_size = cfg.data.seq_len, cfg.train.global_batch_size
    flops_per_token = model.flops_per_token(trainer.model_cfg, seq_len)
    peak = metrics.peak_flops_per_device(jax.devices()[0])
    writer = metrics.MetricsWriter(workdir, enabled=is_main)
    # Only process 0 reports; the others train silently.
    progress = (
        metrics.Progress(cfg.train.steps, mode=cfg.train.progress, initial_step=int(state.step))
        if is_main
        else None
    )
    stop = preemption.StopRequest()
    tokens_per_step = batch_size * seq_len
    first_step = int(state.step)
    last_time, last_step = now(), first_step
    result: dict[str, float] = {"start_step": first_step}
    try:
        for step in range(first_step, cfg.train.steps):
            batch = data.to_global_batch(next(train_iter), trainer.batch_sharding)
            state, stats = trainer.step(state, batch)
            done = step + 1
            if step == first_step:
                jax.block_until_ready(state)
                if progress:
                    progress.log(f"compiled and ran the first step in {now() - last_time:.1f}s")
                last_time, last_step = now(), done
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                stats = {k: float(v) for k, v in jax.device_get(stats).items()}
                if not math.isfinite(stats["loss"]):
                    raise DivergedError(f"step {done}: the training loss is {stats['loss']}")
                t_now = now()
                if done > last_step:
                    step_time = (t_now - last_time) / (done - last_step)
                    tps = tokens_per_step / step_time
                    stats.update(
                        step_time_s=step_time,
                        tokens_per_s=tps,
                        tokens_per_s_per_device=tps / jax.device_count(),
                        mfu=metrics.mfu(flops_per_token, tps, jax.device_count(), peak),
                    )
                stats["tokens"] = done * tokens_per_step
                writer.write(done, stats, split="train")
                if progress:
                    progress.update(done, stats)
                result.update({f"train_{k}": v for k, v in stats.items() if v is not None})
                last_time, last_step = now(), done
            every = cfg.train.eval_every
            if (every and done % every == 0) or done == cfg.train.steps:
                eval_stats = evaluate(trainer, state.params, cfg.seed)
                if not math.isfinite(eval_stats["loss"]):
                    raise DivergedError(f"step {done}: the eval loss is {eval_stats['loss']}")
                eval_stats["tokens"] = done * tokens_per_step
                writer.write(done, eval_stats, split="eval")
                if progress:
                    progress.log(
                        f"eval step {done} | loss {eval_stats['loss']:.4f} | "
                        f"perplexity {eval_stats['perplexity']:.2f}"
                    )
                result.update({f"eval_{k}": v for k, v in eval_stats.items()})
                last_time = now()  # eval time is not training throughput
            if stop.should_stop(done) and done < cfg.train.steps:
                ckpt.save(done, state._asdict(), train_iter, cfg, wait=True)
                result.update(preempted_at=done)
                break
            if done == cfg.train.stop_at and done < cfg.train.steps:
                ckpt.save(done, state._asdict(), train_iter, cfg, wait=True)
                result.update(stopped_at=done)
                break
            if cfg.checkpoint.every and (
                done % cfg.checkpoint.every == 0 or done == cfg.train.steps
            ):
                ckpt.save(done, state._asdict(), train_iter, cfg)
                last_time = now()  # the host copy of a save is not training throughput
    finally:
        stop.close()
        if progress:
            progress.close()
        writer.close()
    return result
