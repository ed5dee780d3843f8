"""Small shared builders for tests."""

import hashlib
import math

import jax
import ml_collections
import numpy as np

from near_jax import config as config_lib

# A ~0.1M-parameter tiny.py run on the command line, saving every 5 steps (add steps,
# log_every and checkpoint.keep per test).
SMALL_TRAIN_FLAGS = [
    "--config=configs/tiny.py",
    "--config.model.d_model=64",
    "--config.model.n_layers=2",
    "--config.model.mlp_dim=128",
    "--config.data.seq_len=64",
    "--config.train.global_batch_size=8",
    "--config.train.eval_every=0",
    "--config.train.eval_batches=1",
    "--config.train.progress=lines",
    "--config.checkpoint.every=5",
]


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

    from near_jax import sharding
    from near_jax.train import checkpoint
    from near_jax.train.loop import save_config, trainer_for

    trainer = trainer_for(cfg, sharding.make_mesh(cfg.mesh))
    state = trainer.init(jax.random.key(cfg.seed))
    if params is not None:
        state = state._replace(params=params)
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=0)
    for step in steps:
        ckpt.save(step, state._replace(step=state.step + step)._asdict(), _DataPosition(), cfg)
    ckpt.close()
    save_config(cfg, str(workdir))
    return state


DAMAGE_KINDS = (
    "no_commit_marker",
    "arrays_deleted",
    "arrays_truncated",
    "config_garbage",
    "config_list",
    "config_empty",
    "empty_newer_step",
)


def damage_step(workdir, step, kind):
    """Damages checkpoint `step` of a run in place the way a crash or a bad disk would."""
    import pathlib

    directory = pathlib.Path(workdir) / "checkpoints" / str(step)
    arrays = [p for p in (directory / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    config = directory / "config" / "metadata"  # the JSON of the step's config item
    if kind == "no_commit_marker":
        (directory / "commit_success.txt").unlink()
    elif kind == "arrays_deleted":
        for path in arrays:
            path.unlink()
    elif kind == "arrays_truncated":
        for path in arrays:
            path.write_bytes(path.read_bytes()[:10])
    elif kind == "config_garbage":
        config.write_text("{not json")
    elif kind == "config_list":
        config.write_text("[1, 2]")
    elif kind == "config_empty":
        config.write_text("{}")
    elif kind == "empty_newer_step":  # a folder named like a newer step, with nothing in it
        (directory.parent / str(step + 100)).mkdir()
    else:
        raise ValueError(f"unknown damage kind {kind!r}")


def delta(shape, seed=0, outliers=3, scale=1e-3, spike=1000):
    """A pseudo-gradient-like tensor: small normal values, a few ×spike outliers, no zeros."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    flat = x.reshape(-1)
    flat[flat == 0] = scale
    flat[rng.choice(flat.size, size=min(outliers, flat.size), replace=False)] *= spike
    return x


def hashed_delta(shape, seed=0, scale=1e-3, spike=1000):
    """A pseudo-gradient-like float32 tensor that depends on no random number generator (so
    that golden hashes of what the codec or outer step make of it pin those, not numpy's
    RNG): uniform in ±scale from sha256 counter blocks, every 97th value ×spike, and a −0
    and a +0 where there is room. Exact float64 arithmetic, then one rounding to float32."""
    n = math.prod(shape)
    stream = b"".join(
        hashlib.sha256(f"near_jax {seed} {i}".encode()).digest() for i in range(-(-n // 8))
    )
    u = np.frombuffer(stream, "<u4")[:n].astype(np.float64)
    x = (u / 2.0**31 - 1.0) * scale  # exact in float64: u < 2³², a power-of-two divisor
    x[::97] *= spike
    x[5:6], x[6:7] = -0.0, 0.0
    return x.astype(np.float32).reshape(shape)


def hashed_tree(seed, scale=1e-3):
    """A small pytree of hashed_delta leaves (one a block multiple plus one, one a scalar)."""
    return {
        "w": hashed_delta((3, 100), seed, scale),
        "b": hashed_delta((129,), seed + 1, scale),
        "s": hashed_delta((), seed + 2, scale),
    }


def leaves_sha256(tree) -> str:
    """sha256 of a tree's float32 leaves' bytes, in tree order: a golden's fingerprint."""
    leaves = (np.asarray(x, np.float32).tobytes() for x in jax.tree.leaves(tree))
    return hashlib.sha256(b"".join(leaves)).hexdigest()
