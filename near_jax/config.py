"""The config schema: every field, its default and a one-line doc, and validation.

Configs are `ml_collections.ConfigDict`s. `configs/*.py` start from `default_config()` and
override fields; `validate(cfg)` runs once at start-up and raises `ConfigError` with one line
naming the key, the value and what is allowed.

The model section is defined once, as the `ModelConfig` dataclass (the hashable value the
model takes): each field carries its config default and doc, and SCHEMA["model"] is built
from them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from typing import Any

import ml_collections

from near_jax.diloco.codec.spec import CompressionSpec


def _field(default: Any, doc: str, *, required: bool = False) -> Any:
    """A ModelConfig field with its config default and one-line doc (SCHEMA["model"] reads both).

    `required`: a ModelConfig must be given the value (the shape, and vocab_size and head_dim
    resolved first, which the config leaves at 0); configs still start from `default`.
    """
    metadata = {"default": default, "doc": doc}
    if required:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model section of the config as a hashable value (a static argument for jit).

    The one definition of the model fields: SCHEMA["model"] (and so default_config and
    describe) is built from these fields, in this order.
    """

    vocab_size: int = _field(
        0, "Vocabulary size; 0 = the tokenizer's size rounded up to 128.", required=True
    )
    d_model: int = _field(512, "Width of the residual stream.", required=True)
    n_layers: int = _field(8, "Number of transformer blocks.", required=True)
    n_heads: int = _field(8, "Number of query heads.", required=True)
    n_kv_heads: int = _field(
        8,
        "Number of key/value heads (grouped-query attention); divides n_heads.",
        required=True,
    )
    head_dim: int = _field(0, "Width of one attention head; 0 = d_model // n_heads.", required=True)
    mlp_dim: int = _field(1536, "Hidden width of the SwiGLU MLP.", required=True)
    rope_theta: float = _field(500_000.0, "RoPE base frequency.")
    norm_eps: float = _field(1e-5, "RMSNorm epsilon.")
    tie_embeddings: bool = _field(False, "Share the input embedding with the output projection.")
    z_loss: float = _field(
        0.0, "Coefficient of the z-loss (log(Z)^2) that keeps logits small; 0 = off."
    )
    init_std: float = _field(
        0.02, "Standard deviation of the normal initializer of weight matrices."
    )
    dtype: str = _field("bfloat16", "Compute dtype of activations and matmuls.")
    param_dtype: str = _field("float32", "Storage dtype of the parameters.")
    remat: str = _field("none", "Rematerialization of each block: none | full | dots_saveable.")
    scan_layers: bool = _field(
        True, "Stack the blocks with scan (compile time independent of depth)."
    )
    attention: str = _field(
        "auto", "Attention implementation: auto | xla | pallas | cudnn | splash."
    )
    attention_block_q: int = _field(
        0, "Pallas query block (TPU: multiple of 128; GPU: power of 2 >= 16); 0 = default."
    )
    attention_block_kv: int = _field(
        0, "Pallas key/value block (same rules as attention_block_q); 0 = default."
    )
    attention_window: int = _field(0, "Sliding-window (local) attention span in tokens; 0 = full.")

    @classmethod
    def from_config(cls, cfg: Any) -> ModelConfig:
        """Builds a ModelConfig from a `model` ConfigDict (or returns a ModelConfig as is)."""
        if isinstance(cfg, ModelConfig):
            return cfg
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in cfg.items() if k in fields}
        if values["vocab_size"] <= 0:
            raise ValueError("model.vocab_size must be resolved (> 0) before building the model")
        values["head_dim"] = head_dim(cfg)
        return cls(**values)


# (section, key) -> (default, doc); the model section is ModelConfig's fields. Defaults never
# use None: ml_collections cannot override a None-typed field from the command line, so
# "unset" is 0 or "".
SCHEMA: dict[str, dict[str, tuple[Any, str]]] = {
    "model": {
        f.name: (f.metadata["default"], f.metadata["doc"]) for f in dataclasses.fields(ModelConfig)
    },
    "data": {
        "source": ("stdlib", "stdlib (Python's own .py files) or a path/glob of .txt/.jsonl/.bin."),
        "jsonl_field": ("text", "Field holding the text in .jsonl records."),
        "bin_dtype": ("uint16", "Token dtype of pre-tokenized .bin files: uint16 | uint32."),
        "tokenizer": ("byte", "byte, or a path to a SentencePiece .model or HF tokenizer.json."),
        "seq_len": (256, "Tokens per packed training sequence."),
        "val_fraction": (0.02, "Fraction of documents held out for validation."),
        "shuffle": (True, "Shuffle documents (deterministically, from the seed)."),
        "shuffle_window": (
            4096,
            "Packed rows mixed by a window shuffle so a batch spans many documents; 0 = off.",
        ),
        "read_threads": (2, "Threads that read and tokenize documents (per data shard)."),
        "shards": (
            0,
            "Fixed data shards of the run (0 = the process count at its start); the host "
            "count can change on resume if it divides the global batch.",
        ),
    },
    "train": {
        "steps": (1000, "Number of optimizer steps."),
        "global_batch_size": (32, "Sequences per optimizer step, over all hosts."),
        "microbatches": (1, "Gradient accumulation: split each step's batch into this many."),
        "log_every": (10, "Log metrics every N steps."),
        "eval_every": (100, "Evaluate on the validation split every N steps; 0 = only at the end."),
        "eval_batches": (8, "Validation batches per evaluation."),
        "progress": ("auto", "Progress display: auto (bar on a terminal) | bar | lines."),
        "stop_at": (
            0,
            "Stop with a checkpoint after this step (schedule still spans steps); 0 = off.",
        ),
    },
    "optim": {
        "lr": (3e-4, "Peak learning rate."),
        "warmup_steps": (100, "Linear warm-up steps from 0 to lr."),
        "schedule": ("cosine", "Decay after warm-up: cosine | linear | constant."),
        "min_lr_ratio": (0.1, "Final learning rate as a fraction of lr."),
        "b1": (0.9, "AdamW beta1."),
        "b2": (0.95, "AdamW beta2."),
        "eps": (1e-8, "AdamW epsilon."),
        "weight_decay": (0.1, "Decoupled weight decay (not applied to norms)."),
        "decay_embeddings": (False, "Apply weight decay to the embedding matrices too."),
        "clip_norm": (1.0, "Clip gradients to this global norm; 0 = off."),
    },
    "checkpoint": {
        "every": (100, "Save a checkpoint every N steps (and at the end); 0 = never."),
        "keep": (3, "Keep the last K checkpoints; 0 = keep all."),
        "keep_every": (0, "Also keep every M-th step permanently; 0 = none."),
        "async_save": (True, "Write checkpoints in the background while training goes on."),
        "init_from": ("", "Start a new run from another run's params: PATH[:STEP]."),
    },
    "mesh": {
        "data": (-1, "Data-parallel axis size; -1 fills the remaining devices."),
        "fsdp": (1, "Fully-sharded data-parallel axis size (params sharded); -1 fills."),
        "tensor": (1, "Tensor-parallel axis size; -1 fills."),
        "dcn_data": (1, "Data-parallel size across slices (multi-slice DCN); 1 = one slice."),
    },
    "diloco": {
        "replicas": (
            0,
            "DiLoCo replicas in this program (0 = off, plain training); they split the "
            "devices and the global batch and meet only at outer steps.",
        ),
        "inner_steps": (50, "H: inner (AdamW) steps between outer steps."),
        "outer_lr": (0.7, "Outer learning rate (SGD with Nesterov momentum)."),
        "outer_momentum": (0.9, "Outer Nesterov momentum; 0 = plain SGD."),
        "compression": (
            "fp32",
            "Pseudo-gradient compression: FORMAT[:block=N][+topk=F], FORMAT one of "
            "fp32 | bf16 | int8 | int4 | fp4.",
        ),
        "fragments": (
            1,
            "Streaming DiLoCo: layers split into F fragments synced at staggered steps "
            "(peak bandwidth / F).",
        ),
        "drop_prob": (
            0.0,
            "Simulated unreliable islands: each replica's pseudo-gradient is left out of an "
            "outer step with this probability (benchmarks; 0 = never).",
        ),
    },
    "contrib": {
        "enabled": (
            False,
            "Untrusted islands: signed contributions, screening, scoring, robust aggregation "
            "and a ledger (fixed in the run's manifest when the aggregator creates it).",
        ),
        "aggregation": ("trimmed_mean", "Robust rule: mean | trimmed_mean | median | top_g."),
        "trim_fraction": (0.2, "trimmed_mean: fraction dropped at each end, per coordinate."),
        "top_g": (4, "top_g: apply only the G best-scoring contributions of a round."),
        "screen": (
            True,
            "Reject free-riders (zero updates), norm outliers and near-duplicates before "
            "aggregating.",
        ),
        "max_norm_ratio": (3.0, "Reject a Δ whose norm exceeds this × the round's median."),
        "zero_norm_ratio": (1e-3, "A Δ below this × the round's median norm is a free-rider."),
        "duplicate_cosine": (0.99, "Cosine similarity at which a Δ counts as a copy."),
        "min_score": (
            0.0,
            "With screening: a Δ scoring below this (eval-loss gain alone, at the round's "
            "median norm) is not applied.",
        ),
        "score_batches": (
            2,
            "Validation batches per round for scoring, drawn from a seed revealed when the "
            "round closes.",
        ),
        "attestation": (
            "code_hash",
            "Attestation verifier: code_hash (the signed code hash must be allowed) or "
            "package.module:factory.",
        ),
        "allowed_code": (
            "",
            "Comma-separated code hashes accepted besides the aggregator's own "
            "(python -m near_jax.contrib codehash).",
        ),
    },
}
TOP_LEVEL: dict[str, tuple[Any, str]] = {
    "seed": (0, "Seed of parameter init, data order and dropout-free training randomness."),
    "name": ("", "Human-readable name of the config (shown in logs)."),
}

CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots_saveable"),
    "model.attention": ("auto", "xla", "pallas", "cudnn", "splash"),
    "data.bin_dtype": ("uint16", "uint32"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.progress": ("auto", "bar", "lines"),
    "contrib.aggregation": ("mean", "trimmed_mean", "median", "top_g"),
}


# The range of every float field of SCHEMA: (check, what is allowed). Each value must also be
# finite: NaN slips through every comparison and Inf through most, and either only fails
# steps later inside the model. validate() looks up every float field here, so a new one
# without a range is a KeyError in tests, not a silent hole.
_POSITIVE = (lambda x: x > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda x: x >= 0, "a finite number >= 0")
_FRACTION_BELOW_1 = (lambda x: 0 <= x < 1, "a finite number in [0, 1)")
FLOAT_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "model.rope_theta": _POSITIVE,
    "model.norm_eps": _POSITIVE,
    "model.z_loss": (lambda x: x >= 0, "a finite number >= 0 (0 = off)"),
    "model.init_std": _POSITIVE,
    "data.val_fraction": (lambda x: 0 < x < 1, "a finite number in (0, 1)"),
    "optim.lr": _POSITIVE,
    "optim.min_lr_ratio": (lambda x: 0 <= x <= 1, "a finite number in [0, 1]"),
    "optim.b1": _FRACTION_BELOW_1,
    "optim.b2": _FRACTION_BELOW_1,
    "optim.eps": _POSITIVE,  # 0 divides 0 by 0 where a gradient entry stays 0
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.clip_norm": (lambda x: x >= 0, "a finite number >= 0 (0 = off)"),
    "diloco.outer_lr": _POSITIVE,
    "diloco.outer_momentum": _FRACTION_BELOW_1,
    "diloco.drop_prob": (lambda x: 0 <= x < 1, "a probability in [0, 1)"),
    "contrib.trim_fraction": (lambda x: 0 <= x < 0.5, "a fraction in [0, 0.5)"),
    "contrib.max_norm_ratio": (lambda x: x == 0 or x > 1, "0 (off) or a ratio > 1, finite"),
    "contrib.zero_norm_ratio": (lambda x: 0 <= x < 1, "a ratio in [0, 1)"),
    "contrib.duplicate_cosine": (lambda x: 0 < x <= 1, "a cosine in (0, 1]"),
    "contrib.min_score": (lambda x: True, "a finite number"),
}


class ConfigError(ValueError):
    """A config value that is not allowed; the message is one line naming the key."""


def default_config() -> ml_collections.ConfigDict:
    """Returns a ConfigDict holding every field of the schema at its default."""
    cfg = ml_collections.ConfigDict()
    for key, (value, _) in TOP_LEVEL.items():
        cfg[key] = value
    for section, fields in SCHEMA.items():
        cfg[section] = ml_collections.ConfigDict({k: v for k, (v, _) in fields.items()})
    return cfg


def describe() -> str:
    """Returns the schema as text: one line per field with its default and doc."""
    lines = [f"{k} = {v!r}  # {d}" for k, (v, d) in TOP_LEVEL.items()]
    for section, fields in SCHEMA.items():
        lines += [f"{section}.{k} = {v!r}  # {d}" for k, (v, d) in fields.items()]
    return "\n".join(lines)


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
    for key in ("attention_block_q", "attention_block_kv", "attention_window"):
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
    if dl.replicas < 0:
        _fail("diloco.replicas", dl.replicas, "0 (off) or a positive integer")
    if dl.inner_steps < 1:
        _fail("diloco.inner_steps", dl.inner_steps, "a positive integer")
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
    if c.score_batches < 1:
        _fail("contrib.score_batches", c.score_batches, "a positive integer")
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


def head_dim(model_cfg: Any) -> int:
    """The attention head width: model.head_dim, or d_model // n_heads when it is 0.

    The one place the width is derived; `model_cfg` is the model section or a ModelConfig.
    """
    return model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads
