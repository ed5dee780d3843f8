"""DiLoCo inside one JAX program: replicas on a `replica` mesh axis (e.g. TPU slices over DCN).

    --config.diloco.replicas=2 --config.diloco.inner_steps=50   # on any train command

The mesh gets a leading `replica` axis of G device groups (`sharding.make_mesh(...,
replicas=G)`); `mesh.*` lays out the devices of one group. `diloco.replicas` = M replicas
(a multiple of G; the train command uses G = M) are spread over the groups, M / G each. The
global batch is cut into M equal parts, one per replica. Every step each replica runs the
ordinary train step (AdamW, micro-batches, the same update as `make_update`) on its own
part, inside a `shard_map` whose `replica` axis is manual: no collective can cross groups in
an inner step, and a group's M / G replicas are batched with `vmap` (with one replica per
group, `update` runs unbatched, as in plain training). Batching changes nothing but float32
reduction order, so M = 4 on 1, 2 or 4 groups train alike to ~1e-7; many replicas fit on
few devices (M = 8 on one CPU device). Every H steps the pseudo-gradients Δ_r = θ − θ_r are
compressed (`diloco.compression`, simulated bit-exactly as islands would send them),
averaged over replicas (the one collective over `replica`), and the outer optimizer
updates the global θ (`outer.py`); every replica restarts from it.

Outer optimizers (`diloco.outer_optimizer`, resolved by `outer.settings`):

    nesterov    SGD + Nesterov momentum; error feedback only with top-k (as islands do)
    sparseloco  plain SGD (momentum 0); error feedback whenever compression is lossy

With error feedback each replica r keeps e_r (float32, in `opt_state[FEEDBACK]`) and sends
codec(v) with v = Δ_r + β·e_r, then e_r ← v − codec(v) (β = `diloco.feedback_decay`;
nesterov's default is 1, and a β ≠ 1 given with nesterov's top-k feedback applies too).
`compress_pseudo_gradients` equals `compress.encode(Δ, spec, error_feedback=β·e)` bit for
bit. So sparseloco with β = 1 is nesterov with momentum 0, exactly.

Streaming DiLoCo (`diloco.fragments` = F): the blocks are cut into F contiguous fragments
(the embedding goes with the first, the head and final norm with the last); fragment f
syncs at steps where step % H == f·H // F, so only 1/F of the params moves at a time.
Only the due fragments' error feedback changes at a sync.

The state is an ordinary TrainState: `params` are the global params (what eval, generate
and export read), and `opt_state` holds the replicas' params and inner optimizer states
(leading axis M, whatever G) and the outer optimizer state. Checkpoints and exact resume
work as for plain training.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from near_jax import model, sharding
from near_jax.config import ConfigError
from near_jax.diloco import outer
from near_jax.diloco.codec import fake_quant
from near_jax.diloco.codec.spec import CompressionSpec
from near_jax.train import optim
from near_jax.train.step import Trainer, TrainState, compile_trainer, make_update

REPLICAS, INNER, OUTER, FEEDBACK = "replicas", "inner", "outer", "feedback"


def fragment_ids(params_shapes, n_layers: int, fragments: int):
    """A tree of int arrays (broadcastable to each param) naming each param's fragment."""

    def fragment(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if keys[0] == "blocks":  # scanned: leading layer axis
            ids = np.arange(n_layers) * fragments // n_layers
            return ids.reshape((n_layers,) + (1,) * (len(x.shape) - 1)).astype(np.int32)
        if keys[0].startswith("block_"):
            return np.int32(int(keys[0].removeprefix("block_")) * fragments // n_layers)
        return np.int32(0 if keys[0] == "embed" else fragments - 1)

    return jax.tree_util.tree_map_with_path(fragment, params_shapes)


def due_fragments(step: jax.Array, inner_steps: int, fragments: int) -> jax.Array:
    """bool [Z]: the fragments whose outer step falls after inner step `step` (1-based)."""
    offsets_Z = (jnp.arange(fragments) * inner_steps) // fragments
    return (step % inner_steps) == offsets_Z


def has_feedback(spec: CompressionSpec, optimizer: str) -> bool:
    """Whether replicas keep error feedback: with top-k (either outer optimizer, as islands
    do), and with sparseloco whenever the compression is lossy (anything but plain fp32)."""
    lossy = spec.format != "fp32" or bool(spec.topk)
    return bool(spec.topk) or (optimizer == "sparseloco" and lossy)


def compress_pseudo_gradients(
    delta_R: Any, spec: CompressionSpec, feedback_R: Any = None, decay: float = 1.0
) -> tuple[Any, Any]:
    """(decoded_R, new feedback_R): each replica's Δ (leading axis R) as islands would send it.

    With error feedback (`feedback_R` not None): v = Δ + decay·e, decoded = codec(v),
    e ← v − decoded, per replica (`compress.encode(Δ, spec, error_feedback=decay·e)`, bit for
    bit). Without: decoded = codec(Δ) (Δ itself for plain fp32), and the feedback is None.
    """
    if feedback_R is None:
        if spec.format == "fp32" and not spec.topk:
            return delta_R, None
        return jax.vmap(lambda d: fake_quant.roundtrip(d, spec))(delta_R), None
    if decay != 1.0:  # (with decay 1 nothing is multiplied: exactly the undecayed feedback)
        feedback_R = jax.tree.map(lambda e: _scaled(e, decay), feedback_R)
    return jax.vmap(lambda d, e: fake_quant.roundtrip_with_feedback(d, spec, e))(
        delta_R, feedback_R
    )


def _scaled(e: jax.Array, decay: float) -> jax.Array:
    """decay·e rounded once, in a form XLA cannot fuse into the next add.

    Δ + decay·e would be contracted into one fused multiply-add (rounding once, where the
    numpy codec rounds the product, then the sum). Subtracting e − e (+0 for finite e; not
    foldable without fast-math, see fake_quant's Exactness) leaves the value and its sign
    unchanged (−0 − +0 = −0), and the add that follows then sees a subtract, not a multiply.
    """
    return jnp.float32(decay) * e - (e - e)


def _replica_sharding(shardings, mesh):
    """Shardings of arrays with a leading replica axis, from those of one replica's arrays."""
    return jax.tree.map(
        lambda s: jax.sharding.NamedSharding(mesh, P(sharding.REPLICA_AXIS, *s.spec)), shardings
    )


def make_trainer(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Trainer:
    """The DiLoCo Trainer (same interface as `trainer_for`).

    `mesh` has G = mesh.shape["replica"] replica groups (`make_mesh(..., replicas=G)`);
    `diloco.replicas` = M must be a multiple of G, and each group trains M / G replicas.
    """
    dl = cfg.diloco
    n_rep, h, n_frag = dl.replicas, dl.inner_steps, dl.fragments
    n_groups = mesh.shape[sharding.REPLICA_AXIS]
    if n_rep % n_groups:
        raise ConfigError(
            f"config.diloco.replicas={n_rep} is not allowed: it must be a multiple of the "
            f"mesh's {n_groups} replica groups (make_mesh(..., replicas=G))"
        )
    per_group = n_rep // n_groups
    # Each replica's share of the batch must split over its group's data-parallel devices
    # and the micro-batches (check_batch only sees the G groups, not the M replicas).
    inner_dp = sharding.data_parallel_size(mesh) // n_groups
    rows = n_rep * inner_dp * cfg.train.microbatches
    if cfg.train.global_batch_size % rows:
        raise ConfigError(
            f"config.train.global_batch_size={cfg.train.global_batch_size} is not allowed: "
            f"it must be a multiple of diloco.replicas {n_rep} x the data-parallel size of "
            f"one replica group {inner_dp} x train.microbatches {cfg.train.microbatches} = {rows}"
        )
    spec = CompressionSpec.parse(dl.compression)
    model_cfg = model.ModelConfig.from_config(cfg.model)
    optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
    update = make_update(model_cfg, optimizer, schedule, cfg.train.microbatches)
    outer_settings = outer.settings(dl)
    # sparseloco's momentum is 0 (validated): its outer step is plain SGD.
    outer_opt = outer.outer_optimizer(outer_settings.lr, outer_settings.momentum)
    use_feedback = has_feedback(spec, outer_settings.optimizer)
    decay = outer_settings.feedback_decay
    stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n_rep, *x.shape)), tree)  # noqa: E731

    def init_state(rng: jax.Array) -> TrainState:
        init_rng, rng = jax.random.split(rng)
        params = model.init(model_cfg, init_rng)
        replicas = stack(params)
        opt_state = {
            REPLICAS: replicas,
            INNER: jax.vmap(optimizer.init)(replicas),
            OUTER: outer_opt.init(params),
        }
        if use_feedback:  # error feedback: what each replica has not sent yet
            opt_state[FEEDBACK] = jax.tree.map(lambda r: jnp.zeros(r.shape, jnp.float32), replicas)
        return TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.random.key_data(rng))

    abstract = jax.eval_shape(init_state, jax.random.key(0))
    repl = sharding.replicated(mesh)
    param_shardings = sharding.logical_to_sharding(
        model.logical_axes(model_cfg), abstract.params, mesh
    )
    replica_shardings = _replica_sharding(param_shardings, mesh)
    inner_shardings = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract.opt_state[INNER],
        replica_shardings,
        transform_non_params=lambda _: repl,
    )
    outer_shardings = optax.tree_map_params(
        outer_opt,
        lambda _, s: s,
        abstract.opt_state[OUTER],
        param_shardings,
        transform_non_params=lambda _: repl,
    )
    opt_shardings = {REPLICAS: replica_shardings, INNER: inner_shardings, OUTER: outer_shardings}
    if use_feedback:
        opt_shardings[FEEDBACK] = replica_shardings
    state_shardings = TrainState(repl, param_shardings, opt_shardings, repl)
    frag_ids = fragment_ids(abstract.params, model_cfg.n_layers, n_frag)

    def local_steps(params_K, inner_K, step, batch_K):
        """One inner step of this group's K = M / G replicas (leading axis K)."""
        if per_group > 1:  # several replicas per device group: batched over them
            return jax.vmap(update, in_axes=(0, 0, None, 0))(params_K, inner_K, step, batch_K)
        # One replica per group: run `update` as plain training does (no batching, so the
        # same XLA program and numerics as before groups held several replicas).
        squeeze = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
        params, inner, stats = update(squeeze(params_K), squeeze(inner_K), step, squeeze(batch_K))
        return jax.tree.map(lambda x: x[None], (params, inner, stats))

    inner_step = jax.shard_map(
        local_steps,
        mesh=mesh,
        in_specs=(
            P(sharding.REPLICA_AXIS),
            P(sharding.REPLICA_AXIS),
            P(),
            P(sharding.REPLICA_AXIS),
        ),
        out_specs=P(sharding.REPLICA_AXIS),
        axis_names={sharding.REPLICA_AXIS},
    )

    def sync(params, outer_state, replicas, feedback, due_Z, keep_R):
        """The outer step for the due fragments; replicas restart from the new params.

        `keep_R` marks the replicas whose pseudo-gradient arrives (all, unless drop_prob);
        with none, the global params stay as they are.
        """
        delta_R = jax.vmap(outer.pseudo_gradient, in_axes=(None, 0))(params, replicas)
        due = jax.tree.map(lambda ids: due_Z[ids], frag_ids)
        delta_R, new_feedback = compress_pseudo_gradients(delta_R, spec, feedback, decay)
        if use_feedback:  # only the due fragments were sent: the others keep their residual
            feedback = jax.tree.map(
                lambda m, n, o: jnp.where(m[None], n, o), due, new_feedback, feedback
            )
        kept = jnp.sum(keep_R)

        def average(d_R):  # the one collective across replicas
            w_R = keep_R.reshape((n_rep,) + (1,) * (d_R.ndim - 1)).astype(d_R.dtype)
            return jnp.sum(d_R * w_R, axis=0) / jnp.maximum(kept, 1).astype(d_R.dtype)

        delta = jax.tree.map(average, delta_R)
        apply = jax.tree.map(lambda m: m & (kept > 0), due)
        params, outer_state = outer.outer_step(outer_opt, params, outer_state, delta, apply)
        # Every replica of a due fragment restarts from the global params, even if its own
        # contribution was lost (an island pulls the new version either way).
        replicas = jax.tree.map(
            lambda m, g, r: jnp.where(m[None], g[None].astype(r.dtype), r), due, params, replicas
        )
        return params, outer_state, replicas, feedback

    def train_step(state: TrainState, batch):
        opt = state.opt_state
        batch_R = jax.tree.map(
            lambda x: sharding.constrain(
                x.reshape(n_rep, x.shape[0] // n_rep, *x.shape[1:]), ("replica", "batch", "length")
            ),
            batch,
        )
        replicas, inner, stats_R = inner_step(opt[REPLICAS], opt[INNER], state.step, batch_R)
        step = state.step + 1
        due_Z = due_fragments(step, h, n_frag)
        keep_R = jnp.ones((n_rep,), bool)
        if dl.drop_prob:
            rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
            keep_R = jax.random.uniform(rng, (n_rep,)) >= dl.drop_prob
        params, outer_state, replicas, feedback = jax.lax.cond(
            jnp.any(due_Z),
            sync,
            lambda p, o, r, f, *_: (p, o, r, f),
            state.params,
            opt[OUTER],
            replicas,
            opt.get(FEEDBACK),
            due_Z,
            keep_R,
        )
        stats = {k: jnp.mean(v) for k, v in stats_R.items()}
        stats["outer_fragments"] = jnp.sum(due_Z).astype(jnp.float32)
        stats["outer_kept"] = jnp.where(jnp.any(due_Z), jnp.sum(keep_R), 0).astype(jnp.float32)
        opt_state = {REPLICAS: replicas, INNER: inner, OUTER: outer_state}
        if use_feedback:
            opt_state[FEEDBACK] = feedback
        return TrainState(step, params, opt_state, state.rng), stats

    return compile_trainer(cfg, model_cfg, mesh, schedule, init_state, train_step, state_shardings)
