"""The CPU quick start: a ~2.5M-parameter model that learns Python's standard library.

python -m near_jax.train --config=configs/tiny.py --workdir=/tmp/near_jax_tiny
"""

from near_jax.config import default_config


def get_config():
    cfg = default_config()
    cfg.name = "tiny"
    cfg.model.d_model = 256
    cfg.model.n_layers = 4
    cfg.model.n_heads = 4
    cfg.model.n_kv_heads = 2
    cfg.model.mlp_dim = 512
    cfg.model.rope_theta = 10_000.0
    # bfloat16 matmuls are emulated (slow) on CPU; float32 is the fast path there.
    cfg.model.dtype = "float32"
    cfg.data.seq_len = 256
    cfg.train.steps = 150
    cfg.train.global_batch_size = 16
    cfg.train.log_every = 10
    cfg.train.eval_every = 50
    cfg.train.eval_batches = 4
    cfg.optim.lr = 2e-3
    cfg.optim.warmup_steps = 20
    cfg.optim.weight_decay = 0.1
    return cfg
