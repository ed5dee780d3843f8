"""Training: the train state, the sharded train step, the loop, and the absl `main`.

python -m near_jax.train --config=configs/tiny.py --workdir=/tmp/run --config.train.steps=300
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import flags, logging
from ml_collections import config_flags

from near_jax import checkpoint, cli, data, distributed, metrics, model, optim, preemption, sharding
from near_jax import config as config_lib
from near_jax import workdir as workdir_lib
from near_jax.cli import load_config_flag, quiet_library_logs, usage_error
from near_jax.config import ConfigError
from near_jax.loading import is_params_only
from near_jax.tokenizer import load_tokenizer

now = time.perf_counter

VOCAB_MULTIPLE = 128


class DivergedError(RuntimeError):
    """The loss or the state stopped being finite; nothing from that point was saved."""


class TrainState(NamedTuple):
    """Everything a run carries from step to step (a pytree)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


class Trainer(NamedTuple):
    """The compiled pieces of a run on one mesh."""

    cfg: ml_collections.ConfigDict
    model_cfg: model.ModelConfig
    mesh: jax.sharding.Mesh
    state_shardings: TrainState
    abstract_state: TrainState  # shapes, dtypes and shardings of the state, no arrays
    batch_sharding: jax.sharding.NamedSharding
    schedule: optax.Schedule
    init: Any  # rng -> TrainState
    step: Any  # (TrainState, batch) -> (TrainState, metrics)
    eval_step: Any  # (params, batch) -> (sum of weighted xent, sum of weights)


def resolve_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> ml_collections.ConfigDict:
    """Fills derived fields: model.vocab_size from the tokenizer when it is 0."""
    cfg = cfg.copy_and_resolve_references()
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif cfg.model.vocab_size < vocab_size:
        raise ConfigError(
            f"config.model.vocab_size={cfg.model.vocab_size} is not allowed: the tokenizer "
            f"has {vocab_size} tokens (use 0 to size it from the tokenizer)"
        )
    return cfg


def check_batch(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Fails with one line unless the batch splits over data parallelism and micro-batches."""
    dp, mb = sharding.data_parallel_size(mesh), cfg.train.microbatches
    batch = cfg.train.global_batch_size
    if batch % (dp * mb):
        raise ConfigError(
            f"config.train.global_batch_size={batch} is not allowed: it must be a multiple of "
            f"the data-parallel size {dp} x train.microbatches {mb} = {dp * mb}"
        )
    if batch % jax.process_count():
        raise ConfigError(
            f"config.train.global_batch_size={batch} is not allowed: it must be a multiple of "
            f"the process count {jax.process_count()}"
        )


def _split_microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    # Row r goes to micro-batch r % n, so each device keeps its own rows in every micro-batch.
    def split(x_BxL):
        x_NxBxL = x_BxL.reshape(x_BxL.shape[0] // n, n, *x_BxL.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x_NxBxL, (None, "batch", "length"))

    return jax.tree.map(split, batch)


def make_update(
    model_cfg: model.ModelConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    n_micro: int,
):
    """One optimizer step: (params, opt_state, step, batch) -> (params, opt_state, stats).

    With `n_micro` > 1 the batch is split into micro-batches whose gradients are accumulated,
    weighted by their token counts, before the one update.
    """
    grad_fn = jax.value_and_grad(functools.partial(model.loss_fn, cfg=model_cfg), has_aux=True)

    def update(params, opt_state, step, batch: dict[str, jax.Array]):
        if n_micro == 1:
            (loss, aux), grads = grad_fn(params, batch)
        else:

            def accumulate(carry, micro):
                (loss, aux), grads = grad_fn(params, micro)
                # Weight each micro-batch by its token count so the sum is the full-batch mean.
                w = aux["weight"]
                acc_grads, acc_loss, acc_w = carry
                acc_grads = jax.tree.map(lambda a, g: a + g * w, acc_grads, grads)
                return (acc_grads, acc_loss + loss * w, acc_w + w), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            micro = _split_microbatches(batch, n_micro)
            (grads, loss, weight), _ = jax.lax.scan(accumulate, init, micro)
            weight = jnp.maximum(weight, 1.0)
            grads = jax.tree.map(lambda g, p: (g / weight).astype(p.dtype), grads, params)
            loss = loss / weight
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        stats = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(step)}
        return params, opt_state, stats

    return update


def make_trainer(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Trainer:
    """Builds the jitted init, train and eval steps with explicit shardings for `mesh`.

    With `diloco.replicas` > 0 the step is DiLoCo's (`near_jax.diloco.inmesh`).
    """
    if cfg.diloco.replicas:
        from near_jax.diloco import inmesh  # imports this module

        return inmesh.make_trainer(cfg, mesh)
    model_cfg = model.ModelConfig.from_config(cfg.model)
    optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
    n_micro = cfg.train.microbatches

    def init_state(rng: jax.Array) -> TrainState:
        init_rng, rng = jax.random.split(rng)
        params = model.init(model_cfg, init_rng)
        # Raw key data (uint32), so the state checkpoints as plain arrays.
        rng = jax.random.key_data(rng)
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)

    abstract = jax.eval_shape(init_state, jax.random.key(0))
    param_shardings = sharding.logical_to_sharding(
        model.logical_axes(model_cfg), abstract.params, mesh
    )
    repl = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract.opt_state,
        param_shardings,
        transform_non_params=lambda _: repl,
    )
    state_shardings = TrainState(repl, param_shardings, opt_shardings, repl)
    update = make_update(model_cfg, optimizer, schedule, n_micro)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        params, opt_state, stats = update(state.params, state.opt_state, state.step, batch)
        return TrainState(state.step + 1, params, opt_state, state.rng), stats

    return compile_trainer(cfg, model_cfg, mesh, schedule, init_state, train_step, state_shardings)


def compile_trainer(
    cfg: ml_collections.ConfigDict,
    model_cfg: model.ModelConfig,
    mesh: jax.sharding.Mesh,
    schedule: optax.Schedule,
    init_state,
    train_step,
    state_shardings: TrainState,
) -> Trainer:
    """Jits a run's init and step functions (and the eval step) with explicit shardings."""
    repl = sharding.replicated(mesh)
    param_shardings = state_shardings.params
    batch_sharding = sharding.batch_sharding(mesh)
    abstract = jax.eval_shape(init_state, jax.random.key(0))

    def eval_step(params, batch):
        _, aux = model.loss_fn(params, batch, model_cfg)
        return aux["xent"] * aux["weight"], aux["weight"]

    batch_shardings = {k: batch_sharding for k in data.FEATURES}
    with jax.set_mesh(mesh):
        init_jit = jax.jit(init_state, in_shardings=repl, out_shardings=state_shardings)
        step_jit = jax.jit(
            train_step,
            in_shardings=(state_shardings, batch_shardings),
            out_shardings=(state_shardings, repl),
            donate_argnums=0,
        )
        eval_jit = jax.jit(
            eval_step,
            in_shardings=(param_shardings, batch_shardings),
            out_shardings=(repl, repl),
        )
    abstract_state = checkpoint.abstract_like(abstract, state_shardings)
    return Trainer(
        cfg, model_cfg, mesh, state_shardings, abstract_state, batch_sharding, schedule,
        _in_mesh(mesh, init_jit), _in_mesh(mesh, step_jit), _in_mesh(mesh, eval_jit),
    )  # fmt: skip


def _in_mesh(mesh, fn):
    # Tracing must see the mesh so the model's activation constraints apply.
    @functools.wraps(fn)
    def wrapped(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    wrapped.lower = lambda *args: _lower_in_mesh(mesh, fn, *args)
    return wrapped


def _lower_in_mesh(mesh, fn, *args):
    with jax.set_mesh(mesh):
        return fn.lower(*args)


def evaluate(trainer: Trainer, params: Any, seed: int) -> dict[str, float]:
    """Mean loss and perplexity over `train.eval_batches` batches of the validation split."""
    cfg = trainer.cfg
    it = data.make_iterator(
        cfg.data, split="val", seed=seed, global_batch_size=cfg.train.global_batch_size
    )
    total, weight = 0.0, 0.0
    for _ in range(cfg.train.eval_batches):
        batch = data.to_global_batch(next(it), trainer.batch_sharding)
        s, w = jax.device_get(trainer.eval_step(params, batch))
        total, weight = total + float(s), weight + float(w)
    loss = total / max(weight, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def save_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config to workdir/config.json (atomically)."""
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def check_resume_config(saved: dict, cfg: ml_collections.ConfigDict) -> None:
    """Fails with one line if a checkpoint's model or data layout differs from the config."""
    for section, keys in (("model", None), ("data", ("seq_len", "tokenizer", "source", "shards"))):
        want, have = cfg[section].to_dict(), saved.get(section, {})
        for key in keys or sorted(set(want) | set(have)):
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
    """The state to train from: resumed, warm-started (init_from), or fresh; and a message."""
    cfg = trainer.cfg
    abstract = trainer.abstract_state
    if ckpt.step_dirs():
        workdir = str(ckpt.directory.parent)
        if is_params_only(workdir, ckpt.step_dirs()[-1]):
            raise ConfigError(f"--workdir={workdir} holds params only (an imported model): it "
                              "cannot be resumed; train from it in a new --workdir with "
                              f"--config.checkpoint.init_from={workdir}")  # fmt: skip
        try:
            restored = ckpt.restore(abstract._asdict(), data_iter=train_iter)
        except checkpoint.NoFinishedCheckpoint:  # killed before its first save finished
            restored = None
        if restored is not None:
            check_resume_config(restored.config, cfg)  # (checkpoint logged what it skipped)
            how = f"resumed from step {restored.step} in {ckpt.directory}"
            return TrainState(**restored.state), how
    state = trainer.init(jax.random.key(cfg.seed))
    if cfg.checkpoint.init_from:
        step, params = checkpoint.restore_params(cfg.checkpoint.init_from, abstract.params)
        return state._replace(params=params), (
            f"initialized params from {cfg.checkpoint.init_from} (step {step})"
        )
    return state, "starting from scratch"


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) training as configured; returns the final train and eval metrics."""
    config_lib.validate(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = resolve_config(cfg, tokenizer.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh, replicas=max(cfg.diloco.replicas, 1))
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
    trainer = make_trainer(cfg, mesh)
    counts = model.param_counts(trainer.model_cfg)
    logging.info(
        "near_jax: %s | %.2fM params (%.2fM non-embedding) | mesh %s | %d devices, %d processes",
        cfg.name or "run", counts["total"] / 1e6, counts["non_embedding"] / 1e6,
        dict(mesh.shape), jax.device_count(), jax.process_count(),
    )  # fmt: skip
    ck = cfg.checkpoint
    ckpt = checkpoint.Checkpointer(
        checkpoint.checkpoint_dir(workdir),
        keep=ck.keep, keep_every=ck.keep_every, async_save=ck.async_save,
    )  # fmt: skip
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


def define_flags() -> None:
    """Defines --config and --workdir (at launch, so importing this module defines none)."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py[:arg]); override fields with --config.KEY=V."
    )
    flags.DEFINE_string(
        "workdir", None, "Run directory: checkpoints, metrics, TensorBoard events, config."
    )
    distributed.define_flags()  # --coordinator_address, --num_processes, --process_id


def _main(argv: list[str]) -> None:
    quiet_library_logs()
    try:
        distributed.initialize_from_flags()  # before anything touches a device
    except distributed.DistributedError as e:
        usage_error(str(e))
    if len(argv) > 1:
        usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = load_config_flag(flags.FLAGS.config)
    if not flags.FLAGS.workdir:
        usage_error("--workdir is required: the run directory for metrics and config")
    try:
        result = train(cfg, flags.FLAGS.workdir)
    except (ConfigError, workdir_lib.WorkdirError) as e:
        usage_error(str(e))
    except checkpoint.CheckpointError as e:
        _fail(f"checkpoint error: {e}")
    except DivergedError as e:
        _fail(f"diverged: {e}")
    except OSError as e:  # a full disk, a filesystem gone read-only mid-run
        _fail(
            f"cannot write the run: {str(e).splitlines()[0]} (committed checkpoints stay readable)"
        )
    if "stopped_at" in result:
        print(f"stopped at step {result['stopped_at']} (train.stop_at): checkpoint saved in "
              f"{flags.FLAGS.workdir}; run again without it to continue")  # fmt: skip
        return
    if "preempted_at" in result:
        print(f"stopped by signal: checkpoint saved at step {result['preempted_at']} "
              f"in {flags.FLAGS.workdir}; run the same command to resume")  # fmt: skip
        return
    if result.get("start_step", 0) >= cfg.train.steps:
        print(f"nothing to do: {flags.FLAGS.workdir} is already trained to step "
              f"{result['start_step']} (raise --config.train.steps to continue)")  # fmt: skip
        return
    summary = {k: round(v, 4) for k, v in result.items() if k in ("train_loss", "eval_loss")}
    print(f"done: {json.dumps(summary)} | workdir {flags.FLAGS.workdir}")


def _fail(message: str) -> None:
    print(f"near_jax.train: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Exit now: after a failed save, Orbax's abandoned I/O threads may still print their own
    # tracebacks at interpreter shutdown, burying this line. Every file near_jax wrote is
    # closed by now, and the kernel drops the workdir lock.
    os._exit(1)


def main() -> None:
    """Console entry point."""
    cli.run(_main, define_flags)


if __name__ == "__main__":
    main()
