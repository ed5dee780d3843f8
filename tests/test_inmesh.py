"""In-mesh DiLoCo: reduces to plain training, matches an independent outer-step recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from near_jax import model, sharding
from near_jax.config import ConfigError
from near_jax.diloco.codec import compress
from near_jax.diloco.codec.spec import CompressionSpec
from near_jax.train import inmesh, optim
from near_jax.train.loop import trainer_for
from near_jax.train.step import TrainState, make_update


def _batches(n, cfg, seed=0):
    b, length = cfg.train.global_batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, 300, (b, length + 1)).astype(np.int32)
        segs = np.ones((b, length), np.int32)
        segs[:, length // 2 :] = 2  # two documents per row
        positions = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(b, 0)
        out.append(
            dict(
                inputs=tokens[:, :-1],
                targets=tokens[:, 1:],
                segment_ids=segs,
                positions=positions.astype(np.int32),
                weights=np.ones((b, length), np.float32),
            )
        )
    return out


def _run(cfg, batches, replicas, groups=None):
    # One device per replica group (by default one group per replica): the smallest mesh
    # that has the replica axis (compiles fastest).
    groups = groups or replicas
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:groups], replicas=groups)
    trainer = trainer_for(cfg, mesh)
    state = trainer.init(jax.random.key(cfg.seed))
    losses = []
    for b in batches:
        state, stats = trainer.step(
            state, {k: jax.device_put(v, trainer.batch_sharding) for k, v in b.items()}
        )
        losses.append(float(stats["loss"]))
    return state, losses


def _cfg(**diloco):
    cfg = small_config()
    for k, v in diloco.items():
        cfg.diloco[k] = v
    return cfg


def test_one_replica_h1_lr1_momentum0_is_plain_training():
    batches = _batches(4, small_config())
    plain_state, plain = _run(small_config(), batches, replicas=1)
    cfg = _cfg(replicas=1, inner_steps=1, outer_lr=1.0, outer_momentum=0.0)
    state, losses = _run(cfg, batches, replicas=1)
    # θ − (θ − θ') = θ' up to one float32 rounding of the subtraction per step.
    np.testing.assert_allclose(losses, plain, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        state.params,
        plain_state.params,
    )


@pytest.mark.parametrize("spec", ["int8", "int4+topk=0.25"])
def test_two_replicas_one_round_matches_an_independent_recomputation(spec):
    h = 3
    cfg = _cfg(replicas=2, inner_steps=h, outer_lr=0.7, outer_momentum=0.9, compression=spec)
    batches = _batches(h, cfg, seed=1)
    state, _ = _run(cfg, batches, replicas=2)

    # Reference: two plain AdamW runs on their halves of every batch, one device, then the
    # outer Nesterov step written out in numpy.
    mcfg = model.ModelConfig.from_config(cfg.model)
    init = model.init(mcfg, jax.random.split(jax.random.key(cfg.seed))[0])
    optimizer, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
    update = jax.jit(make_update(mcfg, optimizer, schedule, 1))
    half = cfg.train.global_batch_size // 2
    finals = []
    for r in range(2):
        params, opt_state = init, optimizer.init(init)
        for i, b in enumerate(batches):
            part = {k: v[r * half : (r + 1) * half] for k, v in b.items()}
            params, opt_state, _ = update(params, opt_state, jnp.int32(i), part)
        finals.append(params)
    theta = jax.tree.map(lambda x: np.asarray(x, np.float64), init)
    # Each replica's Δ goes through the codec islands use, then the two are averaged.
    deltas, feedback = [], []
    for final in finals:
        raw = jax.tree.map(
            lambda t, f: np.asarray(t, np.float32) - np.asarray(f, np.float32), init, final
        )
        payload, ef = compress.encode(raw, spec)
        deltas.append(compress.decode(payload))
        feedback.append(ef)
    delta = jax.tree.map(lambda a, b: (np.float64(a) + np.float64(b)) / 2, *deltas)
    # optax sgd(nesterov): m = Δ (from 0); update = -lr (Δ + μ m)
    want = jax.tree.map(lambda t, d: t - 0.7 * (d + 0.9 * d), theta, delta)
    jax.tree.map(
        lambda got, w: np.testing.assert_allclose(got, w, rtol=2e-4, atol=2e-6),
        state.params,
        want,
    )
    if "topk" in spec:  # what was not sent waits in each replica's error feedback
        for r in range(2):
            jax.tree.map(
                lambda got, want, r=r: np.testing.assert_allclose(got[r], want, atol=1e-7),
                state.opt_state[inmesh.FEEDBACK],
                feedback[r],
            )
    # Every replica restarted from the new global params.
    for r in range(2):
        jax.tree.map(
            lambda rep, g, r=r: np.testing.assert_array_equal(rep[r], g),
            state.opt_state[inmesh.REPLICAS],
            state.params,
        )


def test_replicas_do_not_communicate_between_outer_steps():
    cfg = _cfg(replicas=2, inner_steps=100)
    batches = _batches(2, cfg, seed=2)
    state, _ = _run(cfg, batches, replicas=2)
    reps = state.opt_state[inmesh.REPLICAS]
    # Different data, no sync yet: the replicas differ, and the global params have not moved.
    assert not np.allclose(reps["embed"][0], reps["embed"][1])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:2], replicas=2)
    init = trainer_for(cfg, mesh).init(jax.random.key(cfg.seed))
    jax.tree.map(np.testing.assert_array_equal, state.params, init.params)


def test_streaming_fragments_sync_at_staggered_steps():
    h, f = 4, 2
    cfg = _cfg(replicas=2, inner_steps=h, fragments=f)
    due = [np.asarray(inmesh.due_fragments(jnp.int32(s), h, f)).tolist() for s in range(1, 9)]
    assert due == [[False, False], [False, True], [False, False], [True, False]] * 2
    shapes = jax.eval_shape(lambda: model.init(cfg.model, jax.random.key(0)))
    ids = inmesh.fragment_ids(shapes, cfg.model.n_layers, f)
    assert ids["embed"] == 0 and ids["head"] == 1
    assert ids["blocks"]["attn"]["q"].ravel().tolist() == [0, 1]

    batches = _batches(2, cfg, seed=3)
    state, _ = _run(cfg, batches, replicas=2)  # step 2: only fragment 1 synced
    reps = state.opt_state[inmesh.REPLICAS]
    np.testing.assert_array_equal(reps["head"][0], reps["head"][1])  # fragment 1: synced
    np.testing.assert_array_equal(
        reps["blocks"]["attn"]["q"][0, 1], reps["blocks"]["attn"]["q"][1, 1]
    )
    assert not np.allclose(reps["embed"][0], reps["embed"][1])  # fragment 0: not yet
    assert not np.allclose(reps["blocks"]["attn"]["q"][0, 0], reps["blocks"]["attn"]["q"][1, 0])


def test_replica_count_must_divide_the_devices():
    with pytest.raises(Exception, match="diloco.replicas=3"):
        sharding.make_mesh(small_config().mesh, replicas=3)


def test_several_replicas_per_device_group_train_as_one_per_group():
    # M = 4 replicas on 4, 2 and 1 device groups: the same trajectory over two outer steps.
    # Batching `update` over a group's replicas (vmap) may reorder float32 reductions:
    # measured max |Δparams| 1.2e-7 (G = 1 vs 4), 1.9e-9 (G = 2 vs 4). fp32 compression:
    # a lossy codec would turn such an ulp into a whole quantization step now and then.
    cfg = _cfg(replicas=4, inner_steps=2)
    batches = _batches(4, cfg, seed=7)
    runs = {g: _run(cfg, batches, replicas=4, groups=g) for g in (4, 2, 1)}
    want_state, want_losses = runs[4]
    for g in (2, 1):
        state, losses = runs[g]
        np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
        for tree in ("params", "opt_state"):  # replicas, feedback: leading axis M = 4 always
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                getattr(state, tree),
                getattr(want_state, tree),
            )


def test_replicas_must_be_a_multiple_of_the_device_groups():
    cfg = _cfg(replicas=4)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:3], replicas=3)
    with pytest.raises(ConfigError, match="diloco.replicas=4 is not allowed.*3 replica groups"):
        trainer_for(cfg, mesh)


def test_dropped_contributions_leave_the_global_params_unchanged():
    cfg = _cfg(replicas=2, inner_steps=1, drop_prob=0.99)  # seeded: both dropped here
    state, _ = _run(cfg, _batches(2, cfg, seed=4), replicas=2)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:2], replicas=2)
    init = trainer_for(cfg, mesh).init(jax.random.key(cfg.seed))
    jax.tree.map(np.testing.assert_array_equal, state.params, init.params)
    # The replicas' work was lost: they restarted from the (unchanged) global params.
    jax.tree.map(
        lambda rep, g: np.testing.assert_array_equal(rep[1], g),
        state.opt_state[inmesh.REPLICAS],
        state.params,
    )


@pytest.mark.parametrize("groups", [2, 1])  # one replica per device, or both on one
def test_checkpoint_resume_is_exact(tmp_path, groups):
    from helpers import DataPosition

    from near_jax.train import checkpoint

    cfg = _cfg(replicas=2, inner_steps=2, compression="int4")
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:groups], replicas=groups)
    trainer = trainer_for(cfg, mesh)
    batches = [
        {k: jax.device_put(v, trainer.batch_sharding) for k, v in b.items()}
        for b in _batches(4, cfg, seed=5)
    ]
    state = trainer.init(jax.random.key(cfg.seed))
    straight = []
    for i, b in enumerate(batches):
        state, stats = trainer.step(state, b)
        straight.append(float(stats["loss"]))
        if i == 0:  # after one inner step, mid-round: replicas and global params differ
            ckpt = checkpoint.Checkpointer(tmp_path, keep=0)
            ckpt.save(1, state._asdict(), DataPosition(), cfg, wait=True)
            ckpt.close()
    restored = checkpoint.Checkpointer(tmp_path).restore(trainer.abstract_state._asdict())
    resumed = TrainState(**restored.state)
    losses = straight[:1]
    for b in batches[1:]:
        resumed, stats = trainer.step(resumed, b)
        losses.append(float(stats["loss"]))
    assert losses == straight
    jax.tree.map(np.testing.assert_array_equal, resumed, state)


@pytest.mark.parametrize("spec", ["fp32", "int4+topk=0.25"])
def test_sparseloco_without_decay_is_nesterov_without_momentum(spec):
    # β = 1: the same error feedback as nesterov's (none for fp32, top-k's otherwise), and
    # SGD with momentum 0 either way: bit for bit the same run.
    batches = _batches(2, small_config(), seed=8)
    common = dict(replicas=2, inner_steps=1, outer_lr=0.7, compression=spec)
    sparse = _cfg(outer_optimizer="sparseloco", feedback_decay=1.0, **common)
    nesterov = _cfg(outer_optimizer="nesterov", outer_momentum=0.0, **common)
    got, _ = _run(sparse, batches, replicas=2, groups=1)
    want, _ = _run(nesterov, batches, replicas=2, groups=1)
    assert (inmesh.FEEDBACK in got.opt_state) == ("topk" in spec)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("spec", ["int8", "int4+topk=0.25", "fp4:block=16+topk=0.1", "bf16"])
def test_decayed_error_feedback_matches_the_numpy_codec(spec):
    # Three rounds of v = Δ + β·e, decoded = codec(v), e ← v − decoded per replica, against
    # compress.encode(Δ, spec, error_feedback=β·e) in numpy: bit for bit (sign of zero too).
    beta, n_rep = 0.95, 2
    parsed = CompressionSpec.parse(spec)
    assert inmesh.has_feedback(parsed, "sparseloco")
    assert inmesh.has_feedback(parsed, "nesterov") == bool(parsed.topk)
    rng = np.random.default_rng(9)
    shapes = {"a": (3, 40), "b": (7,), "c": ()}
    step = jax.jit(lambda d, e: inmesh.compress_pseudo_gradients(d, parsed, e, beta))
    feedback_R = {k: np.zeros((n_rep, *s), np.float32) for k, s in shapes.items()}
    want_feedback = [{k: np.zeros(s, np.float32) for k, s in shapes.items()}] * n_rep
    for _ in range(3):
        delta_R = {
            k: (rng.standard_normal((n_rep, *s)) * 10.0 ** rng.integers(-4, 0)).astype(np.float32)
            for k, s in shapes.items()
        }
        decoded_R, feedback_R = jax.device_get(step(delta_R, feedback_R))
        for r in range(n_rep):
            scaled = {k: np.float32(beta) * e for k, e in want_feedback[r].items()}
            payload, want_feedback[r] = compress.encode(
                {k: d[r] for k, d in delta_R.items()}, spec, error_feedback=scaled
            )
            want_decoded = compress.decode(payload)
            for k in shapes:
                for got, want in ((decoded_R, want_decoded), (feedback_R, want_feedback[r])):
                    np.testing.assert_array_equal(
                        np.asarray(got[k][r]).view(np.uint32), np.asarray(want[k]).view(np.uint32)
                    )
        assert any(np.any(e) for e in feedback_R.values())  # lossy: something was held back


def test_sparseloco_keeps_decayed_feedback_per_fragment():
    # int4 without top-k: nesterov keeps no error feedback, sparseloco does; with two
    # fragments, after step 2 only fragment 1 (the head) was sent and has a residual (step 1's
    # learning rate is 0, warm-up: a sync there would send Δ = 0).
    cfg = _cfg(
        replicas=2, inner_steps=4, fragments=2, compression="int4", outer_optimizer="sparseloco"
    )
    state, _ = _run(cfg, _batches(2, cfg, seed=10), replicas=2, groups=1)
    feedback = state.opt_state[inmesh.FEEDBACK]
    assert not np.any(feedback["embed"]) and np.any(feedback["head"])
    q = feedback["blocks"]["attn"]["q"]  # scanned layers: layer 0 is fragment 0
    assert not np.any(q[:, 0]) and np.any(q[:, 1])
    reps = state.opt_state[inmesh.REPLICAS]
    for r in range(2):
        np.testing.assert_array_equal(reps["head"][r], state.params["head"])
    nesterov = _cfg(replicas=2, inner_steps=4, fragments=2, compression="int4")
    mesh = sharding.make_mesh(nesterov.mesh, jax.devices()[:1], replicas=1)
    assert inmesh.FEEDBACK not in trainer_for(nesterov, mesh).abstract_state.opt_state


def test_replicas_train_the_same_with_the_fused_loss():
    # The fused loss's scans run inside the replicas' shard_map (carries vary by replica).
    batches = _batches(2, small_config())
    runs = []
    for chunk in (0, 64):
        cfg = _cfg(replicas=2, inner_steps=2, outer_lr=0.7, outer_momentum=0.9)
        cfg.model.loss_chunk, cfg.model.z_loss = chunk, 1e-3
        runs.append(_run(cfg, batches, replicas=2))
    (state0, losses0), (state1, losses1) = runs
    np.testing.assert_allclose(losses1, losses0, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        state1.params,
        state0.params,
    )
