"""The training step (`near_jax.train.step`): it learns, micro-batching is exact, and the
state is sharded as the table says."""

import jax
import numpy as np
from helpers import small_config

from near_jax import sharding
from near_jax.train.loop import trainer_for


def _random_batch(seed: int, batch: int, length: int, vocab: int = 384) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    return dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        positions=np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
        segment_ids=np.ones((batch, length), np.int32),
        weights=rng.uniform(0.5, 1.0, (batch, length)).astype(np.float32),
    )


def _trainer(cfg, **mesh):
    for key, value in mesh.items():
        cfg.mesh[key] = value
    return trainer_for(cfg, sharding.make_mesh(cfg.mesh))


def test_overfitting_one_batch_drives_loss_below_0_1():
    cfg = small_config()
    cfg.train.steps = 120
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule = 1e-2, 10, "constant"
    cfg.optim.weight_decay = 0.0
    trainer = _trainer(cfg, data=8)
    state = trainer.init(jax.random.key(0))
    batch = jax.device_put(_random_batch(0, 8, 32), trainer.batch_sharding)
    losses = []
    for _ in range(cfg.train.steps):
        state, stats = trainer.step(state, batch)
        losses.append(float(stats["loss"]))
    assert losses[0] > 5.0  # ~log(384) at init
    assert losses[-1] < 0.1, losses[-10:]
    assert int(state.step) == cfg.train.steps


def test_microbatches_give_the_full_batch_update():
    cfg = small_config()
    cfg.optim.warmup_steps = 0
    one = _trainer(cfg, data=4, fsdp=2)
    cfg4 = small_config()
    cfg4.optim.warmup_steps = 0
    cfg4.train.microbatches = 2
    four = _trainer(cfg4, data=4, fsdp=2)
    batch = _random_batch(1, 16, 32)
    s1, m1 = one.step(one.init(jax.random.key(0)), jax.device_put(batch, one.batch_sharding))
    s4, m4 = four.step(four.init(jax.random.key(0)), jax.device_put(batch, four.batch_sharding))
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s4.params, s1.params
    )


def test_train_state_is_sharded_as_the_table_says():
    cfg = small_config()
    trainer = _trainer(cfg, data=2, fsdp=2, tensor=2)
    state = trainer.init(jax.random.key(0))
    q = state.params["blocks"]["attn"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    # AdamW moments follow their parameter's sharding.
    mu_q = state.opt_state[1][0].mu["blocks"]["attn"]["q"]
    assert mu_q.sharding.spec == q.sharding.spec
