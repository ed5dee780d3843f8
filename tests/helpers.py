"""Small shared builders for tests."""

import ml_collections
import numpy as np

from near_jax import config as config_lib


def small_config(**model_overrides) -> ml_collections.ConfigDict:
    """A validated config of a tiny float32 model (vocab 384) for fast tests."""
    cfg = config_lib.default_config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 384, 64, 2, 4, 2
    m.mlp_dim, m.dtype, m.rope_theta = 128, "float32", 10_000.0
    for key, value in model_overrides.items():
        m[key] = value
    cfg.data.seq_len = 32
    cfg.train.global_batch_size = 8
    cfg.train.steps = 10
    cfg.optim.warmup_steps = 2
    return config_lib.validate(cfg)


class _DataPosition:
    """A stand-in data iterator for checkpoints written outside a training run."""

    def get_state(self):
        return {"num_shards": 1, "shards": {"0": 0}}


def save_run(workdir, cfg: ml_collections.ConfigDict, steps=(5,), params=None):
    """Writes checkpoints of a freshly initialized run (params optionally replaced) to workdir."""
    import jax

    from near_jax import checkpoint, sharding, train

    trainer = train.make_trainer(cfg, sharding.make_mesh(cfg.mesh))
    state = trainer.init(jax.random.key(cfg.seed))
    if params is not None:
        state = state._replace(params=params)
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=0)
    for step in steps:
        ckpt.save(step, state._replace(step=state.step + step)._asdict(), _DataPosition(), cfg)
    ckpt.close()
    train.save_config(cfg, str(workdir))
    return state


def delta(shape, seed=0, outliers=3, scale=1e-3, spike=1000):
    """A pseudo-gradient-like tensor: small normal values, a few ×spike outliers, no zeros."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    flat = x.reshape(-1)
    flat[flat == 0] = scale
    flat[rng.choice(flat.size, size=min(outliers, flat.size), replace=False)] *= spike
    return x
