"""The train state and the sharded, jitted train and eval steps (`Trainer`)."""

from __future__ import annotations

import functools
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from near_jax import data, model, sharding
from near_jax.config import ConfigError
from near_jax.train import checkpoint, optim

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
        x_AxBxL = x_BxL.reshape(x_BxL.shape[0] // n, n, *x_BxL.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x_AxBxL, (None, "batch", "length"))

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

    The plain data-parallel step; `loop.trainer_for` picks in-mesh DiLoCo's when a config asks.
    """
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
        cfg,
        model_cfg,
        mesh,
        state_shardings,
        abstract_state,
        batch_sharding,
        schedule,
        _in_mesh(mesh, init_jit),
        _in_mesh(mesh, step_jit),
        _in_mesh(mesh, eval_jit),
    )


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
