"""The config schema: every field, its default and a one-line doc.

Configs are `ml_collections.ConfigDict`s. `configs/*.py` start from `default_config()` and
override fields; `validate(cfg)` runs once at start-up and raises `ConfigError` with one line
naming the key, the value and what is allowed.

The model section is defined once, as the `ModelConfig` dataclass (the hashable value the
model takes): each field carries its config default and doc, and SCHEMA["model"] is built
from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections


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
    loss_chunk: int = _field(
        0, "Tokens per device per chunk of the fused head + loss (no [B,L,V] logits); 0 = off."
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
        "replica_groups": (
            0,
            "Device groups the replicas are spread over (a divisor of replicas); 0 = one "
            "per replica. Fewer groups train several replicas per group, vmapped (e.g. 8 "
            "replicas on one CPU device).",
        ),
        "inner_steps": (50, "H: inner (AdamW) steps between outer steps."),
        "outer_optimizer": (
            "nesterov",
            "nesterov: SGD with Nesterov momentum on the averaged pseudo-gradient (DiLoCo) | "
            "sparseloco: plain SGD, with error feedback decayed by feedback_decay in place of "
            "outer momentum (SparseLoCo; pair it with int2 chunked top-k compression).",
        ),
        "outer_lr": (
            -1.0,
            "Outer learning rate; -1 = the outer optimizer's default (nesterov 0.7, "
            "sparseloco 1.0).",
        ),
        "outer_momentum": (
            -1.0,
            "Outer Nesterov momentum; -1 = the default (nesterov 0.9); 0 = plain SGD. "
            "sparseloco has none: -1 or 0.",
        ),
        "feedback_decay": (
            -1.0,
            "beta: each round the error-feedback residual is scaled by beta before the new "
            "pseudo-gradient joins it; -1 = the default (nesterov 1 = nothing dropped, "
            "sparseloco 0.95).",
        ),
        "compression": (
            "fp32",
            "Pseudo-gradient compression: FORMAT[:block=N][:chunk=C][+topk=F], FORMAT one "
            "of fp32 | bf16 | int8 | int4 | fp4 | int2; chunk=C: top-k of each C values "
            "(SparseLoCo: int2:chunk=4096+topk=0.01).",
        ),
        "fragments": (
            1,
            "Streaming DiLoCo: the params split into F fragments synced at staggered steps "
            "(peak bandwidth / F); in-mesh: layer groups; islands: groups of the run's shards, "
            "one fragment per round, a round every H/F inner steps.",
        ),
        "drop_prob": (
            0.0,
            "Simulated unreliable islands: each replica's pseudo-gradient is left out of an "
            "outer step with this probability (benchmarks; 0 = never).",
        ),
        "shard_bytes": (
            64 << 20,
            "Islands: params, contributions and updates are stored as shards of at most "
            "this many float32 bytes (large leaves cut along their FSDP axis); the aggregator "
            "streams one shard at a time. Fixed by the run at its creation.",
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
        "assigned_data": (
            True,
            "Each contributor trains round r on batches assigned by (run, r, its key); a "
            "validated Δ must lower the loss on its assigned batches more than on random "
            "train batches, or it is rejected as lazy.",
        ),
        "assigned_batches": (
            2,
            "Assigned and random train batches per validated contribution for that check.",
        ),
        "validate_sample": (
            0,
            "Validate (score, assigned-data check) K contributions a round, chosen by the "
            "round's committed seed, plus every new or low-rated contributor; 0 = all.",
        ),
        "new_keys_per_round": (
            4,
            "Open runs (no allowlist): contributors with no accepted round yet that one round "
            "admits, in commit order (0 = no cap).",
        ),
        "copy_overlap": (
            0.4,
            "Sparse (top-k) payloads: a Δ whose index set overlaps an earlier one's this much "
            "is a copy (0 = off).",
        ),
        "centered_cosine": (
            0.5,
            "Cosine, after removing the round's mean update, at which a Δ counts as a copy.",
        ),
        "low_rating": (
            -5.0,
            "A contributor whose rating (OpenSkill μ − 3σ) is below this is validated every "
            "round (newcomers start at 0; one that keeps failing is below -5 within two "
            "rounds, honest ones drift a few points around 0).",
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
    "diloco.outer_optimizer": ("nesterov", "sparseloco"),
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
    "diloco.outer_lr": (lambda x: x == -1 or x > 0, "-1 (default) or a finite number > 0"),
    "diloco.outer_momentum": (
        lambda x: x == -1 or 0 <= x < 1,
        "-1 (default) or a finite number in [0, 1)",
    ),
    "diloco.feedback_decay": (lambda x: x == -1 or 0 < x <= 1, "-1 (default) or in (0, 1]"),
    "diloco.drop_prob": (lambda x: 0 <= x < 1, "a probability in [0, 1)"),
    "contrib.trim_fraction": (lambda x: 0 <= x < 0.5, "a fraction in [0, 0.5)"),
    "contrib.max_norm_ratio": (lambda x: x == 0 or x > 1, "0 (off) or a ratio > 1, finite"),
    "contrib.zero_norm_ratio": (lambda x: 0 <= x < 1, "a ratio in [0, 1)"),
    "contrib.duplicate_cosine": (lambda x: 0 < x <= 1, "a cosine in (0, 1]"),
    "contrib.min_score": (lambda x: True, "a finite number"),
    "contrib.copy_overlap": (lambda x: 0 <= x <= 1, "an overlap in [0, 1] (0 = off)"),
    "contrib.centered_cosine": (lambda x: 0 < x <= 1, "a cosine in (0, 1]"),
    "contrib.low_rating": (lambda x: True, "a finite number"),
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


def head_dim(model_cfg: Any) -> int:
    """The attention head width: model.head_dim, or d_model // n_heads when it is 0.

    The one place the width is derived; `model_cfg` is the model section or a ModelConfig.
    """
    return model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads
