"""Config validation: `validate(cfg)`, one validator per section, one-line `ConfigError`s."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import ml_collections

from near_jax.config.schema import CHOICES, FLOAT_RANGES, SCHEMA, TOP_LEVEL, ConfigError
from near_jax.diloco.codec.spec import CompressionSpec


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{key}={value!r} is not allowed: {allowed}")


def _check_keys(cfg: ml_collections.ConfigDict) -> None:
    known_top = set(TOP_LEVEL) | set(SCHEMA)
    for key in cfg.keys():
        if key not in known_top:
            _fail(key, cfg[key], f"unknown key; known: {', '.join(sorted(known_top))}")
    for section, fields in SCHEMA.items():
        if section not in cfg:
            raise ConfigError(f"config.{section} is missing")
        for key in cfg[section].keys():
            if key not in fields:
                _fail(
                    f"{section}.{key}",
                    cfg[section][key],
                    f"unknown key; known: {', '.join(sorted(fields))}",
                )
        for key, (default, _) in fields.items():
            if key not in cfg[section]:
                raise ConfigError(f"config.{section}.{key} is missing")
            value = cfg[section][key]
            want = type(default)
            ok = isinstance(value, want) or (want is float and isinstance(value, int))
            if isinstance(value, bool) and want is not bool:
                ok = False
            if not ok:
                _fail(f"{section}.{key}", value, f"expected {want.__name__}")


def _check_floats(cfg: ml_collections.ConfigDict) -> None:
    """Every float field of the schema is finite and in its FLOAT_RANGES range."""
    for section, fields in SCHEMA.items():
        for key, (default, _) in fields.items():
            if not isinstance(default, float):
                continue
            check, allowed = FLOAT_RANGES[f"{section}.{key}"]
            value = cfg[section][key]
            # An int (allowed for a float field) is finite; isfinite would overflow on a huge one.
            if (isinstance(value, float) and not math.isfinite(value)) or not check(value):
                _fail(f"{section}.{key}", value, allowed)


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field of `cfg`; raises ConfigError (one line) on the first bad one.

    The checks run in a fixed order (which error a config with several gets): keys and types,
    choices, float ranges, then one validator per section in SCHEMA order, and last
    diloco.compression (at the end of _validate_contrib).
    """
    _check_keys(cfg)
    _check_choices(cfg)
    _check_floats(cfg)
    for check in (
        _validate_model,
        _validate_data,
        _validate_train,
        _validate_optim,
        _validate_checkpoint,
        _validate_mesh,
        _validate_diloco,
        _validate_contrib,
    ):
        check(cfg)
    return cfg


def _check_choices(cfg: ml_collections.ConfigDict) -> None:
    """Every CHOICES field holds one of its allowed values."""
    for key, allowed in CHOICES.items():
        section, field = key.split(".")
        if cfg[section][field] not in allowed:
            _fail(key, cfg[section][field], f"one of {' | '.join(allowed)}")


def _validate_model(cfg: ml_collections.ConfigDict) -> None:
    """model: positive sizes, a resolvable vocab, heads that divide, an even head width."""
    m = cfg.model
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim"):
        if m[key] <= 0:
            _fail(f"model.{key}", m[key], "a positive integer")
    if m.vocab_size < 0:
        _fail("model.vocab_size", m.vocab_size, "0 (from the tokenizer) or a positive integer")
    if m.n_heads % m.n_kv_heads:
        _fail("model.n_kv_heads", m.n_kv_heads, f"a divisor of model.n_heads={m.n_heads}")
    if m.head_dim == 0 and m.d_model % m.n_heads:
        _fail(
            "model.d_model",
            m.d_model,
            f"a multiple of model.n_heads={m.n_heads} (or set model.head_dim)",
        )
    if m.head_dim < 0 or m.head_dim % 2:
        _fail("model.head_dim", m.head_dim, "0 or a positive even integer (RoPE pairs)")
    if m.head_dim == 0 and (m.d_model // m.n_heads) % 2:
        _fail(
            "model.d_model",
            m.d_model,
            f"a multiple of model.n_heads={m.n_heads} giving an even head width (it gives "
            f"{m.d_model // m.n_heads}; RoPE rotates pairs), or set model.head_dim",
        )
    for key in ("attention_block_q", "attention_block_kv", "attention_window", "loss_chunk"):
        if m[key] < 0:
            _fail(f"model.{key}", m[key], "0 (default / off) or a positive integer")


def _validate_data(cfg: ml_collections.ConfigDict) -> None:
    """data: a positive seq_len, non-negative counts, a tokenizer that exists."""
    d = cfg.data
    if d.seq_len <= 0:
        _fail("data.seq_len", d.seq_len, "a positive integer")
    if d.shuffle_window < 0:
        _fail("data.shuffle_window", d.shuffle_window, "0 (off) or a positive number of rows")
    if d.shards < 0:
        _fail("data.shards", d.shards, "0 (the process count) or a positive integer")
    if d.read_threads < 0:
        _fail("data.read_threads", d.read_threads, "an integer >= 0")
    if d.tokenizer != "byte" and not os.path.isfile(d.tokenizer):
        _fail(
            "data.tokenizer",
            d.tokenizer,
            "'byte' or an existing SentencePiece .model / HF tokenizer.json file",
        )


def _validate_train(cfg: ml_collections.ConfigDict) -> None:
    """train: positive counts, and microbatches that divide the global batch."""
    t = cfg.train
    for key in ("steps", "global_batch_size", "microbatches", "log_every", "eval_batches"):
        if t[key] <= 0:
            _fail(f"train.{key}", t[key], "a positive integer")
    if t.stop_at < 0:
        _fail("train.stop_at", t.stop_at, "0 (off) or a positive step")
    if t.eval_every < 0:
        _fail("train.eval_every", t.eval_every, "0 (only at the end) or a positive integer")
    if t.global_batch_size % t.microbatches:
        _fail(
            "train.microbatches",
            t.microbatches,
            f"a divisor of train.global_batch_size={t.global_batch_size}",
        )


def _validate_optim(cfg: ml_collections.ConfigDict) -> None:
    """optim: a non-negative warm-up (the float fields are checked by _check_floats)."""
    if cfg.optim.warmup_steps < 0:
        _fail("optim.warmup_steps", cfg.optim.warmup_steps, "an integer >= 0")


def _validate_checkpoint(cfg: ml_collections.ConfigDict) -> None:
    """checkpoint: non-negative save and keep counts."""
    for key in ("every", "keep", "keep_every"):
        if cfg.checkpoint[key] < 0:
            _fail(f"checkpoint.{key}", cfg.checkpoint[key], "an integer >= 0")


def _validate_mesh(cfg: ml_collections.ConfigDict) -> None:
    """mesh: positive axis sizes, at most one -1 (fill), a positive dcn_data."""
    for key in ("data", "fsdp", "tensor"):
        if cfg.mesh[key] == 0 or cfg.mesh[key] < -1:
            _fail(f"mesh.{key}", cfg.mesh[key], "a positive integer or -1 (fill)")
    if sum(cfg.mesh[k] == -1 for k in ("data", "fsdp", "tensor")) > 1:
        raise ConfigError("config.mesh: at most one of data, fsdp, tensor may be -1")
    if cfg.mesh.dcn_data <= 0:
        _fail("mesh.dcn_data", cfg.mesh.dcn_data, "a positive integer")


def _validate_diloco(cfg: ml_collections.ConfigDict) -> None:
    """diloco: counts, fragments within the layers and the inner steps (compression: last)."""
    m, dl = cfg.model, cfg.diloco
    shard_bytes = dl.shard_bytes
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 64:
        _fail("diloco.shard_bytes", dl.shard_bytes, "an integer >= 64")
    if dl.replicas < 0:
        _fail("diloco.replicas", dl.replicas, "0 (off) or a positive integer")
    groups = dl.replica_groups
    if groups < 0 or (groups and (not dl.replicas or dl.replicas % groups)):
        _fail(
            "diloco.replica_groups",
            groups,
            f"0 (one per replica) or a divisor of diloco.replicas={dl.replicas}",
        )
    if dl.inner_steps < 1:
        _fail("diloco.inner_steps", dl.inner_steps, "a positive integer")
    if dl.outer_optimizer == "sparseloco" and dl.outer_momentum not in (-1, 0):
        _fail(
            "diloco.outer_momentum",
            dl.outer_momentum,
            "-1 or 0 with outer_optimizer=sparseloco (error feedback replaces momentum)",
        )
    if not 1 <= dl.fragments <= min(m.n_layers, dl.inner_steps):
        _fail(
            "diloco.fragments",
            dl.fragments,
            f"an integer in [1, min(model.n_layers={m.n_layers}, diloco.inner_steps="
            f"{dl.inner_steps})]",
        )


def _validate_contrib(cfg: ml_collections.ConfigDict) -> None:
    """contrib: counts, shuffled data when on, the attestation and allowed hashes; then
    diloco.compression, which has always been checked last."""
    c, dl = cfg.contrib, cfg.diloco
    if c.top_g < 1:
        _fail("contrib.top_g", c.top_g, "a positive integer")
    if c.enabled and not cfg.data.shuffle:
        _fail(
            "contrib.enabled",
            c.enabled,
            "only with data.shuffle=True (scoring batches must be unpredictable)",
        )
    for name in ("score_batches", "assigned_batches"):
        if c[name] < 1:
            _fail(f"contrib.{name}", c[name], "a positive integer")
    for name in ("validate_sample", "new_keys_per_round"):
        if c[name] < 0:
            _fail(f"contrib.{name}", c[name], "an integer >= 0 (0 = off)")
    if c.validate_sample and c.aggregation == "top_g":
        _fail(
            "contrib.validate_sample",
            c.validate_sample,
            "0 with contrib.aggregation=top_g (it ranks every contribution by score)",
        )
    if not isinstance(c.attestation, str) or not (
        c.attestation == "code_hash" or re.fullmatch(r"[\w.]+:\w+", c.attestation)
    ):
        _fail("contrib.attestation", c.attestation, "code_hash or package.module:factory")
    for code in filter(None, (h.strip() for h in c.allowed_code.split(","))):
        if not re.fullmatch(r"[0-9a-f]{64}", code):
            _fail("contrib.allowed_code", c.allowed_code, "comma-separated sha256 hex hashes")
    try:
        CompressionSpec.parse(dl.compression)
    except ValueError as e:
        _fail("diloco.compression", dl.compression, " ".join(str(e).split()))
