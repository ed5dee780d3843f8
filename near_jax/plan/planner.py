"""The scale planner: parameters, FLOPs, per-device memory and a step-time bound for a config.

    python -m near_jax.plan --config=configs/ladder.py:m7b [--config.mesh.fsdp=16]
        [--hardware=v5p|v6e|h100|...] [--devices=N] [--mfu=0.4] [--json]
    python -m near_jax.plan --config=configs/ladder.py:m7b,gpu       # the rung's GPU job
    python -m near_jax.plan --ladder [--hardware=...] [--json]       # every rung, TPU and GPU
    python -m near_jax.plan --config=... --compile                     # check against XLA

The memory and step-time model is `estimate`, the check against XLA `compiled`, the tables
`tables`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from near_jax import config as config_lib
from near_jax import hardware as hardware_lib
from near_jax import model
from near_jax.plan.estimate import attention_impl, layout, memory, step_time

LADDER_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs", "ladder.py"
)


def load_ladder() -> Any:
    """The `configs/ladder.py` module (RUNGS, TARGETS, get_config, lookup, devices)."""
    spec = importlib.util.spec_from_file_location("near_jax_ladder", LADDER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates `cfg` and fills model.vocab_size from the tokenizer when it is 0."""
    config_lib.validate(cfg)
    if cfg.model.vocab_size:
        return cfg.copy_and_resolve_references()
    # Lazy: the tokenizer and train.step pull in grain and orbax (~0.6 s of CPU at start-up),
    # which the ladder's configs (vocab_size set) never need.
    from near_jax.data.tokenizer import load_tokenizer
    from near_jax.train.step import resolve_config

    return resolve_config(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size)


@dataclasses.dataclass
class Plan:
    """Everything the planner says about one config on one mesh and accelerator."""

    name: str
    hardware: str
    devices: int
    mesh: dict[str, int]
    attention: str
    params: dict[str, int]
    flops_per_token: float
    tokens_per_step: int
    memory: dict[str, float]
    hbm_bytes: float
    fits: bool | None
    time: dict[str, float]
    token_budget: float = 0.0
    steps: int = 0
    train_flops: float = 0.0
    mfu: float = 0.0
    device_days: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_plan(
    cfg: ml_collections.ConfigDict,
    acc: hardware_lib.Accelerator,
    devices: int,
    mfu: float = 0.4,
    attention: str | None = None,
) -> Plan:
    """Plans `cfg` on `devices` devices of `acc` (ConfigError naming the key if it can't)."""
    cfg = resolve(cfg)
    lay = layout(cfg, devices)
    attention = attention or attention_impl(cfg, acc)
    mcfg = model.ModelConfig.from_config(cfg.model)
    seq = cfg.data.seq_len
    counts = model.param_counts(mcfg)
    mem = memory(cfg, lay, attention)
    tokens_step = cfg.train.global_batch_size * seq
    fpt = model.flops_per_token(mcfg, seq)
    steps = cfg.train.steps
    train_flops = fpt * tokens_step * steps
    peak = acc.peak_flops
    device_days = train_flops / (peak * mfu) / 86400 if peak > 0 and mfu > 0 else 0.0
    return Plan(
        name=cfg.name or "config",
        hardware=acc.name,
        devices=devices,
        mesh={k: lay[k] for k in ("data", "fsdp", "tensor", "dcn_data")},
        attention=attention,
        params=counts,
        flops_per_token=fpt,
        tokens_per_step=tokens_step,
        memory=mem,
        hbm_bytes=acc.hbm_bytes,
        fits=mem["total"] <= acc.hbm_bytes if acc.hbm_bytes > 0 else None,
        time=step_time(cfg, lay, acc, mem),
        token_budget=tokens_step * steps,
        steps=steps,
        train_flops=train_flops,
        mfu=mfu,
        device_days=device_days,
    )
