"""The model ladder: seven dense Llama-style rungs from 0.5B to 1.4T parameters.

    python -m near_jax.train --config=configs/ladder.py:m7b --workdir=...
    python -m near_jax.train --config=configs/ladder.py:m7b,gpu --workdir=...
    python -m near_jax.train --config=configs/ladder.py:m7b,tokens_per_param=40 ...
    python -m near_jax.plan --ladder                      # what each rung costs and whether it fits

The argument is `RUNG[,TARGET][,tokens_per_param=N]`: TARGET is `tpu` (the default, a Cloud
TPU v5p job) or `gpu` (an NVIDIA job); it sets the mesh, the slices or nodes and the
micro-batches, never the model or the token budget. The config's `name` is the rung's name
for `tpu` and `RUNG,gpu` for `gpu`, so `lookup(cfg.name)` finds the job again.

Every rung uses a Llama-3-sized vocabulary (128,256 tokens: set
--config.data.tokenizer=/path/to/tokenizer.json of a Llama-3-style tokenizer; the byte
tokenizer also runs, using 259 of the rows), untied embeddings, grouped-query attention with
128-wide heads, SwiGLU, RoPE theta 500k, bf16 compute with float32 parameters and AdamW state,
and the fused head + loss (`model.loss_chunk`: 1024 tokens per device at a time, never
[B, L, V]).

The rungs are sized so each can be grown from the one below it (`python -m near_jax.grow`:
wider and deeper, function-preserving): the head width is 128 on every rung, and no width,
depth, head count or kv-head count ever shrinks from one rung to the next.

Each target names the hardware it is sized for, the mesh over those devices, the slices (TPU)
or nodes (GPU, one process per node: `launch.slurm --per=node`) that the data axis spans, and
the micro-batches; the rung holds the sequence length, global batch and remat policy, and
`train.steps` = the token budget (default 20 tokens per parameter, Chinchilla) divided by the
tokens per step. `python -m near_jax.plan --config=configs/ladder.py:<rung>[,gpu]` checks it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from near_jax.config import default_config

VOCAB_SIZE = 128_256  # Llama 3's tokenizer
TOKENS_PER_PARAM = 20.0
TARGETS = ("tpu", "gpu")
# Rungs that were renamed when the ladder was resized: a config naming one says which to use.
RENAMED = {"m27b": "m30b", "m100b": "m70b", "m375b": "m350b"}


class Target(NamedTuple):
    """The job one rung is sized for on one kind of hardware."""

    hardware: str  # near_jax.hardware name
    mesh: tuple[int, int, int]  # (data, fsdp, tensor) inside one slice (TPU) or node (GPU)
    dcn_data: int  # slices or nodes the data axis spans (config.mesh.dcn_data)
    microbatches: int
    describe: str  # what to ask for: "v5p-128", "64x H100 (8 HGX nodes)"


class Rung(NamedTuple):
    """One model of the ladder and the jobs it is sized for."""

    nominal: float  # parameters the name promises
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    seq_len: int
    batch: int  # sequences per step, on every target
    remat: str
    tpu: Target  # describe = the Cloud TPU accelerator type of one slice
    gpu: Target

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len

    def target(self, name: str = "tpu") -> Target:
        """The job on `name` ("tpu" or "gpu")."""
        return self.gpu if name == "gpu" else self.tpu


def _v5p(chips: int, mesh: tuple[int, int, int], slices: int = 1, microbatches: int = 1) -> Target:
    """A Cloud TPU v5p job (v5p-N counts TensorCores: 2 per chip)."""
    return Target("v5p", mesh, slices, microbatches, f"v5p-{2 * chips}")


RUNGS: dict[str, Rung] = {
    # d_model, layers, heads, kv heads, head_dim, mlp; seq, batch, remat; TPU and GPU jobs.
    "m500m": Rung(
        0.5e9,
        1024,
        16,
        8,
        4,
        128,
        3840,
        4096,
        128,
        "full",
        _v5p(4, (1, 4, 1), microbatches=8),
        Target("h100", (1, 8, 1), 1, 2, "8x H100 (1 HGX node)"),
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
        "full",
        _v5p(16, (1, 16, 1), microbatches=2),
        Target("h100", (1, 8, 1), 2, 2, "16x H100 (2 HGX nodes)"),
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
        "full",
        _v5p(64, (1, 64, 1)),
        Target("h100", (1, 8, 1), 8, 2, "64x H100 (8 HGX nodes)"),
    ),
    "m30b": Rung(
        30e9,
        6144,
        52,
        48,
        8,
        128,
        24576,
        8192,
        512,
        "full",
        _v5p(256, (1, 256, 1)),
        Target("h200", (1, 8, 1), 32, 1, "256x H200 (32 HGX nodes)"),
    ),
    "m70b": Rung(  # Llama 3 70B's shape
        70e9,
        8192,
        80,
        64,
        8,
        128,
        28672,
        8192,
        1024,
        "full",
        _v5p(1024, (1, 256, 4), microbatches=2),
        Target("gb200", (16, 64, 1), 1, 1, "1024x GB200 (16 NVL72 racks, 64 GPUs of each)"),
    ),
    "m350b": Rung(  # Llama 3.1 405B's widths, 108 of its 126 layers
        350e9,
        16384,
        108,
        128,
        8,
        128,
        53248,
        8192,
        2048,
        "full",
        _v5p(4096, (1, 512, 8), microbatches=4),
        Target("gb200", (64, 8, 8), 1, 4, "4096x GB200 (64 NVL72 racks, 64 GPUs of each)"),
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
        "full",
        _v5p(2048, (1, 256, 8), slices=4, microbatches=4),
        Target("gb200", (4, 256, 8), 1, 2, "8192x GB200 (128 NVL72 racks, 64 GPUs of each)"),
    ),
}


def param_count(rung: Rung, vocab_size: int = VOCAB_SIZE) -> int:
    """Parameters from the shapes (embedding + head + layers + final norm)."""
    d, k = rung.d_model, rung.head_dim
    attn = d * k * (2 * rung.n_heads + 2 * rung.n_kv_heads)
    layer = attn + 3 * d * rung.mlp_dim + 2 * d
    return 2 * vocab_size * d + rung.n_layers * layer + d


def devices(rung: Rung, target: str = "tpu") -> int:
    """JAX devices the rung's job on `target` spans (all slices or nodes)."""
    job = rung.target(target)
    return math.prod(job.mesh) * job.dcn_data


def _unknown(name: str) -> ValueError:
    known = ", ".join(RUNGS)
    if name in RENAMED:
        return ValueError(
            f"unknown rung {name!r}: the ladder's rungs are now {known} "
            f"({name} became {RENAMED[name]})"
        )
    return ValueError(f"unknown rung {name!r}; known: {known}")


def _parse(arg: str) -> tuple[str, str, float]:
    """(rung, target, tokens_per_param) of "m7b[,gpu][,tokens_per_param=N]"."""
    name, _, rest = (arg or "").partition(",")
    target, tokens_per_param = "tpu", TOKENS_PER_PARAM
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in TARGETS and not value:
            target = key
        elif key == "tokens_per_param":
            tokens_per_param = float(value)
        else:
            raise ValueError(f"unknown ladder option {item!r}; known: tpu, gpu, tokens_per_param=N")
    if name not in RUNGS:
        raise _unknown(name)
    return name, target, tokens_per_param


def lookup(name: str) -> tuple[Rung, str] | None:
    """The rung and target ("tpu"/"gpu") a ladder config's `name` stands for; None if none."""
    rung, _, target = (name or "").partition(",")
    if rung not in RUNGS or target not in ("", *TARGETS):
        return None
    return RUNGS[rung], target or "tpu"


def get_config(arg: str = "m500m"):
    """The config of rung `arg` ("m7b", "m7b,gpu", "m7b,tokens_per_param=40")."""
    name, target, tokens_per_param = _parse(arg)
    rung = RUNGS[name]
    job = rung.target(target)
    cfg = default_config()
    cfg.name = name if target == "tpu" else f"{name},{target}"
    m = cfg.model
    m.vocab_size = VOCAB_SIZE
    m.d_model, m.n_layers, m.mlp_dim = rung.d_model, rung.n_layers, rung.mlp_dim
    m.n_heads, m.n_kv_heads, m.head_dim = rung.n_heads, rung.n_kv_heads, rung.head_dim
    m.rope_theta = 500_000.0
    m.dtype, m.param_dtype = "bfloat16", "float32"
    m.remat = rung.remat
    m.loss_chunk = 1024  # fused head + loss: 1024 tokens' logits per device at a time
    cfg.data.seq_len = rung.seq_len
    cfg.train.global_batch_size = rung.batch
    cfg.train.microbatches = job.microbatches
    budget = tokens_per_param * param_count(rung)
    cfg.train.steps = max(1, math.ceil(budget / rung.tokens_per_step))
    cfg.train.log_every = 10
    cfg.train.eval_every = 1000
    cfg.optim.lr = 3e-4 if rung.nominal < 50e9 else 1.5e-4
    cfg.optim.warmup_steps = min(2000, max(1, cfg.train.steps // 50))
    cfg.checkpoint.every = 1000
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = job.mesh
    cfg.mesh.dcn_data = job.dcn_data
    return cfg
