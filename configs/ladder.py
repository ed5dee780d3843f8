"""The model ladder: seven dense Llama-style rungs from 0.5B to 1.4T parameters.

    python -m near_jax.train --config=configs/ladder.py:m7b --workdir=...
    python -m near_jax.train --config=configs/ladder.py:m7b,tokens_per_param=40 ...
    python -m near_jax.plan --ladder                      # what each rung costs and whether it fits

Every rung uses a Llama-3-sized vocabulary (128,256 tokens: set
--config.data.tokenizer=/path/to/tokenizer.json of a Llama-3-style tokenizer; the byte
tokenizer also runs, using 259 of the rows), untied embeddings, grouped-query attention with
128-wide heads (64 on the smallest), SwiGLU, RoPE theta 500k, bf16 compute with float32
parameters and AdamW state.

Each rung names the hardware it is sized for (`RUNGS[name].accelerator`, a Cloud TPU type,
and `.gpus`, a GPU alternative), the mesh over those devices,
the sequence length, the global batch, micro-batching and remat policy, and
`train.steps` = the token budget (default 20 tokens per parameter, Chinchilla) divided by
the tokens per step. `python -m near_jax.plan --config=configs/ladder.py:<rung>` checks it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from near_jax.config import default_config

VOCAB_SIZE = 128_256  # Llama 3's tokenizer
TOKENS_PER_PARAM = 20.0


class Rung(NamedTuple):
    """One model of the ladder and the job it is sized for."""

    nominal: float  # parameters the name promises
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    seq_len: int
    batch: int  # sequences per step
    microbatches: int
    remat: str
    hardware: str  # near_jax.hardware name
    accelerator: str  # Cloud TPU accelerator type of one slice
    slices: int
    mesh: tuple[int, int, int]  # (data, fsdp, tensor) inside one slice
    gpus: str  # a GPU alternative (same device count unless it says how to change the mesh)

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


RUNGS: dict[str, Rung] = {
    "m500m": Rung(
        0.5e9,
        1024,
        16,
        16,
        8,
        64,
        4096,
        4096,
        128,
        8,
        "full",
        "v5p",
        "v5p-8",
        1,
        (1, 4, 1),
        "8x H100 (1 HGX node) with --config.mesh.fsdp=8",
    ),
    "m2b": Rung(
        2e9,
        2048,
        24,
        16,
        8,
        128,
        8192,
        4096,
        256,
        2,
        "full",
        "v5p",
        "v5p-32",
        1,
        (1, 16, 1),
        "16x H100 (2 HGX nodes)",
    ),
    "m7b": Rung(
        7e9,
        4096,
        28,
        32,
        8,
        128,
        14336,
        8192,
        256,
        1,
        "full",
        "v5p",
        "v5p-128",
        1,
        (1, 64, 1),
        "64x H100 (8 HGX nodes)",
    ),
    "m27b": Rung(
        27e9,
        6144,
        48,
        48,
        8,
        128,
        24576,
        8192,
        512,
        1,
        "full",
        "v5p",
        "v5p-512",
        1,
        (1, 256, 1),
        "256x H100 (32 HGX nodes)",
    ),
    "m100b": Rung(
        100e9,
        10240,
        88,
        80,
        8,
        128,
        28672,
        8192,
        1024,
        2,
        "full",
        "v5p",
        "v5p-2048",
        1,
        (1, 256, 4),
        "1024x H200 (128 HGX nodes)",
    ),
    "m375b": Rung(
        375e9,
        16384,
        108,
        128,
        16,
        128,
        57344,
        8192,
        2048,
        4,
        "full",
        "v5p",
        "v5p-8192",
        1,
        (1, 512, 8),
        "4096x B200 (512 HGX nodes)",
    ),
    "m1400b": Rung(
        1.4e12,
        24576,
        160,
        192,
        16,
        128,
        98304,
        8192,
        4096,
        4,
        "full",
        "v5p",
        "v5p-4096",
        4,
        (1, 256, 8),
        "8192x GB200 (114 NVL72 racks)",
    ),
}


def param_count(rung: Rung, vocab_size: int = VOCAB_SIZE) -> int:
    """Parameters from the shapes (embedding + head + layers + final norm)."""
    d, k = rung.d_model, rung.head_dim
    attn = d * k * (2 * rung.n_heads + 2 * rung.n_kv_heads)
    layer = attn + 3 * d * rung.mlp_dim + 2 * d
    return 2 * vocab_size * d + rung.n_layers * layer + d


def devices(rung: Rung) -> int:
    """JAX devices the rung's mesh spans (all slices)."""
    return math.prod(rung.mesh) * rung.slices


def _parse(arg: str) -> tuple[str, float]:
    name, _, rest = (arg or "").partition(",")
    tokens_per_param = TOKENS_PER_PARAM
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key != "tokens_per_param":
            raise ValueError(f"unknown ladder option {key!r}; known: tokens_per_param")
        tokens_per_param = float(value)
    if name not in RUNGS:
        raise ValueError(f"unknown rung {name!r}; known: {', '.join(RUNGS)}")
    return name, tokens_per_param


def get_config(arg: str = "m500m"):
    """The config of rung `arg` ("m7b", or "m7b,tokens_per_param=40")."""
    name, tokens_per_param = _parse(arg)
    rung = RUNGS[name]
    cfg = default_config()
    cfg.name = name
    m = cfg.model
    m.vocab_size = VOCAB_SIZE
    m.d_model, m.n_layers, m.mlp_dim = rung.d_model, rung.n_layers, rung.mlp_dim
    m.n_heads, m.n_kv_heads, m.head_dim = rung.n_heads, rung.n_kv_heads, rung.head_dim
    m.rope_theta = 500_000.0
    m.dtype, m.param_dtype = "bfloat16", "float32"
    m.remat = rung.remat
    cfg.data.seq_len = rung.seq_len
    cfg.train.global_batch_size = rung.batch
    cfg.train.microbatches = rung.microbatches
    budget = tokens_per_param * param_count(rung)
    cfg.train.steps = max(1, math.ceil(budget / rung.tokens_per_step))
    cfg.train.log_every = 10
    cfg.train.eval_every = 1000
    cfg.optim.lr = 3e-4 if rung.nominal < 50e9 else 1.5e-4
    cfg.optim.warmup_steps = min(2000, max(1, cfg.train.steps // 50))
    cfg.checkpoint.every = 1000
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = rung.mesh
    cfg.mesh.dcn_data = rung.slices
    return cfg
