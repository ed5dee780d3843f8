"""Tests of near_jax.config: the schema, its defaults and describe(), ModelConfig (the one
definition of the model fields), head_dim, and validate(): one case per rule of every
section, float ranges, and the order in which a config with several errors is refused."""

import ast
import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys

import ml_collections
import pytest

from near_jax import config

FLOAT_FIELDS = [
    f"{section}.{key}"
    for section, fields in config.SCHEMA.items()
    for key, (default, _) in fields.items()
    if isinstance(default, float)
]


def _with(key: str, value):
    cfg = config.default_config()
    section, field = key.split(".")
    cfg[section][field] = value
    return cfg


def test_the_schema_has_float_fields():
    assert len(FLOAT_FIELDS) >= 11 and "optim.lr" in FLOAT_FIELDS


@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_every_float_field_refuses_nan_and_inf(key):
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(config.ConfigError) as e:
            config.validate(_with(key, value))
        message = str(e.value)
        assert "\n" not in message
        assert message.startswith(f"config.{key}={value!r} is not allowed: "), message


def test_every_float_field_has_a_range_that_takes_its_default():
    assert set(config.FLOAT_RANGES) == set(FLOAT_FIELDS)
    for key in FLOAT_FIELDS:
        section, field = key.split(".")
        check, _ = config.FLOAT_RANGES[key]
        assert check(config.SCHEMA[section][field][0]), key
    config.validate(config.default_config())


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("optim.lr", 0.0, "> 0"),
        ("optim.eps", 0.0, "> 0"),
        ("optim.weight_decay", -0.1, ">= 0"),
        ("optim.min_lr_ratio", 1.5, "in [0, 1]"),
        ("optim.b2", 1.0, "in [0, 1)"),
        ("model.rope_theta", -1.0, "> 0"),
        ("model.norm_eps", 0.0, "> 0"),
        ("diloco.outer_momentum", 1.0, "in [0, 1)"),
        ("diloco.outer_lr", 0.0, "-1 (default) or a finite number > 0"),
        ("diloco.feedback_decay", 1.5, "in (0, 1]"),
        ("diloco.drop_prob", -0.5, "in [0, 1)"),
        ("data.val_fraction", 1.0, "in (0, 1)"),
        ("contrib.max_norm_ratio", 0.5, "0 (off) or a ratio > 1"),
    ],
)
def test_out_of_range_floats_name_the_key_and_the_range(key, value, allowed):
    with pytest.raises(
        config.ConfigError, match=rf"^config\.{key}={value!r} .*{re.escape(allowed)}"
    ):
        config.validate(_with(key, value))


def _with_all(**values):
    """The default config with `section__key=value` overrides (e.g. model__d_model=64)."""
    cfg = config.default_config()
    for name, value in values.items():
        section, field = name.split("__")
        cfg[section][field] = value
    return cfg


def _refused(cfg) -> str:
    with pytest.raises(config.ConfigError) as e:
        config.validate(cfg)
    message = str(e.value)
    assert "\n" not in message, message
    return message


# (overrides, the key the error names, the value it shows, a piece of what is allowed): at
# least one case per rule of every section validator; values vary, not only 0.
RULES = [
    # model
    (dict(model__d_model=-64), "model.d_model", -64, "a positive integer"),
    (dict(model__n_layers=0), "model.n_layers", 0, "a positive integer"),
    (dict(model__n_heads=-3), "model.n_heads", -3, "a positive integer"),
    (dict(model__n_kv_heads=-1), "model.n_kv_heads", -1, "a positive integer"),
    (dict(model__mlp_dim=-1536), "model.mlp_dim", -1536, "a positive integer"),
    (dict(model__vocab_size=-7), "model.vocab_size", -7, "0 (from the tokenizer)"),
    (dict(model__n_kv_heads=3), "model.n_kv_heads", 3, "a divisor of model.n_heads=8"),
    (
        dict(model__d_model=100, model__n_heads=8),
        "model.d_model",
        100,
        "a multiple of model.n_heads=8 (or set model.head_dim)",
    ),
    (dict(model__head_dim=-2), "model.head_dim", -2, "0 or a positive even integer"),
    (dict(model__head_dim=37), "model.head_dim", 37, "(RoPE pairs)"),
    (dict(model__attention_block_q=-128), "model.attention_block_q", -128, "0 (default / off)"),
    (dict(model__attention_block_kv=-16), "model.attention_block_kv", -16, "0 (default / off)"),
    (dict(model__attention_window=-5), "model.attention_window", -5, "0 (default / off)"),
    (dict(model__loss_chunk=-1), "model.loss_chunk", -1, "0 (default / off)"),
    # data
    (dict(data__seq_len=-256), "data.seq_len", -256, "a positive integer"),
    (dict(data__seq_len=0), "data.seq_len", 0, "a positive integer"),
    (dict(data__shuffle_window=-9), "data.shuffle_window", -9, "0 (off) or a positive number"),
    (dict(data__shards=-2), "data.shards", -2, "0 (the process count)"),
    (dict(data__read_threads=-4), "data.read_threads", -4, "an integer >= 0"),
    (
        dict(data__tokenizer="/nonexistent/tok.model"),
        "data.tokenizer",
        "/nonexistent/tok.model",
        "'byte' or an existing SentencePiece",
    ),
    # train
    (dict(train__steps=-1000), "train.steps", -1000, "a positive integer"),
    (dict(train__global_batch_size=0), "train.global_batch_size", 0, "a positive integer"),
    (dict(train__microbatches=-2), "train.microbatches", -2, "a positive integer"),
    (dict(train__log_every=-10), "train.log_every", -10, "a positive integer"),
    (dict(train__eval_batches=0), "train.eval_batches", 0, "a positive integer"),
    (dict(train__stop_at=-5), "train.stop_at", -5, "0 (off) or a positive step"),
    (dict(train__eval_every=-100), "train.eval_every", -100, "0 (only at the end)"),
    (
        dict(train__global_batch_size=32, train__microbatches=5),
        "train.microbatches",
        5,
        "a divisor of train.global_batch_size=32",
    ),
    # optim (its float fields: see the FLOAT_RANGES tests)
    (dict(optim__warmup_steps=-100), "optim.warmup_steps", -100, "an integer >= 0"),
    # checkpoint
    (dict(checkpoint__every=-100), "checkpoint.every", -100, "an integer >= 0"),
    (dict(checkpoint__keep=-3), "checkpoint.keep", -3, "an integer >= 0"),
    (dict(checkpoint__keep_every=-1), "checkpoint.keep_every", -1, "an integer >= 0"),
    # mesh
    (dict(mesh__data=0), "mesh.data", 0, "a positive integer or -1 (fill)"),
    (dict(mesh__fsdp=-2), "mesh.fsdp", -2, "a positive integer or -1 (fill)"),
    (dict(mesh__tensor=-8), "mesh.tensor", -8, "a positive integer or -1 (fill)"),
    (dict(mesh__dcn_data=0), "mesh.dcn_data", 0, "a positive integer"),
    (dict(mesh__dcn_data=-1), "mesh.dcn_data", -1, "a positive integer"),
    # diloco
    (dict(diloco__replicas=-4), "diloco.replicas", -4, "0 (off) or a positive integer"),
    (
        dict(diloco__replicas=4, diloco__replica_groups=3),
        "diloco.replica_groups",
        3,
        "0 (one per replica) or a divisor of diloco.replicas=4",
    ),
    (
        dict(diloco__replica_groups=2),
        "diloco.replica_groups",
        2,
        "0 (one per replica) or a divisor of diloco.replicas=0",
    ),
    (dict(diloco__inner_steps=0), "diloco.inner_steps", 0, "a positive integer"),
    (
        dict(diloco__fragments=0),
        "diloco.fragments",
        0,
        "[1, min(model.n_layers=8, diloco.inner_steps=50)]",
    ),
    (
        dict(diloco__fragments=9),
        "diloco.fragments",
        9,
        "[1, min(model.n_layers=8, diloco.inner_steps=50)]",
    ),
    (
        dict(diloco__fragments=4, diloco__inner_steps=3),
        "diloco.fragments",
        4,
        "[1, min(model.n_layers=8, diloco.inner_steps=3)]",
    ),
    (dict(diloco__compression="int9"), "diloco.compression", "int9", "int9"),
    (dict(diloco__compression="int8:block=0"), "diloco.compression", "int8:block=0", ""),
    # contrib (its float fields: see the FLOAT_RANGES tests)
    (dict(contrib__top_g=0), "contrib.top_g", 0, "a positive integer"),
    (
        dict(contrib__enabled=True, data__shuffle=False),
        "contrib.enabled",
        True,
        "only with data.shuffle=True",
    ),
    (dict(contrib__score_batches=-2), "contrib.score_batches", -2, "a positive integer"),
    (
        dict(contrib__validate_sample=4, contrib__aggregation="top_g"),
        "contrib.validate_sample",
        4,
        "0 with contrib.aggregation=top_g",
    ),
    (
        dict(contrib__attestation="no factory here"),
        "contrib.attestation",
        "no factory here",
        "code_hash or package.module:factory",
    ),
    (
        dict(contrib__allowed_code="abc123"),
        "contrib.allowed_code",
        "abc123",
        "comma-separated sha256 hex hashes",
    ),
    (
        dict(contrib__allowed_code="a" * 64 + ", " + "B" * 64),
        "contrib.allowed_code",
        "a" * 64 + ", " + "B" * 64,
        "sha256 hex",
    ),
    # choices, checked for every section before the section rules
    (dict(model__dtype="float64"), "model.dtype", "float64", "one of float32 | bfloat16 | float16"),
    (dict(model__remat="some"), "model.remat", "some", "one of none | full | dots_saveable"),
    (dict(data__bin_dtype="int32"), "data.bin_dtype", "int32", "one of uint16 | uint32"),
    (dict(optim__schedule="cos"), "optim.schedule", "cos", "one of cosine | linear | constant"),
    (dict(train__progress="tqdm"), "train.progress", "tqdm", "one of auto | bar | lines"),
    (dict(contrib__aggregation="max"), "contrib.aggregation", "max", "one of mean |"),
]


@pytest.mark.parametrize(
    "overrides, key, value, allowed", RULES, ids=[f"{r[1]}={r[2]!r}"[:60] for r in RULES]
)
def test_each_rule_refuses_a_bad_value_naming_the_key(overrides, key, value, allowed):
    message = _refused(_with_all(**overrides))
    assert message.startswith(f"config.{key}={value!r} is not allowed: "), message
    assert allowed in message, message


def test_every_section_has_a_rule_case():
    sections = {key.split(".")[0] for _, key, _, _ in RULES}
    assert sections == set(config.SCHEMA)


# (key, the lowest value its rule allows, other overrides that value needs): one below is
# refused, the value itself passes.
LOWEST = [
    ("model.vocab_size", 0, {}),
    ("model.d_model", 1, dict(model__n_heads=1, model__n_kv_heads=1, model__head_dim=2)),
    ("model.n_layers", 1, {}),
    ("model.n_heads", 1, dict(model__n_kv_heads=1)),
    ("model.n_kv_heads", 1, {}),
    ("model.head_dim", 0, {}),
    ("model.mlp_dim", 1, {}),
    ("model.attention_block_q", 0, {}),
    ("model.attention_block_kv", 0, {}),
    ("model.attention_window", 0, {}),
    ("model.loss_chunk", 0, {}),
    ("data.seq_len", 1, {}),
    ("data.shuffle_window", 0, {}),
    ("data.shards", 0, {}),
    ("data.read_threads", 0, {}),
    ("train.steps", 1, {}),
    ("train.global_batch_size", 1, {}),
    ("train.microbatches", 1, {}),
    ("train.log_every", 1, {}),
    ("train.eval_batches", 1, {}),
    ("train.stop_at", 0, {}),
    ("train.eval_every", 0, {}),
    ("optim.warmup_steps", 0, {}),
    ("checkpoint.every", 0, {}),
    ("checkpoint.keep", 0, {}),
    ("checkpoint.keep_every", 0, {}),
    ("mesh.dcn_data", 1, {}),
    ("diloco.replicas", 0, {}),
    ("diloco.replica_groups", 0, {}),
    ("diloco.inner_steps", 1, {}),
    ("diloco.fragments", 1, {}),
    ("diloco.shard_bytes", 64, {}),
    ("contrib.top_g", 1, {}),
    ("contrib.score_batches", 1, {}),
    ("contrib.assigned_batches", 1, {}),
    ("contrib.validate_sample", 0, {}),
    ("contrib.new_keys_per_round", 0, {}),
]


@pytest.mark.parametrize("key, lowest, extra", LOWEST, ids=[k for k, _, _ in LOWEST])
def test_int_rules_refuse_just_below_their_lowest_value(key, lowest, extra):
    name = key.replace(".", "__")
    config.validate(_with_all(**extra, **{name: lowest}))
    assert _refused(_with_all(**extra, **{name: lowest - 1})).startswith(
        f"config.{key}={lowest - 1} is not allowed: "
    )


def test_every_int_field_has_a_lowest_value_or_a_mesh_rule():
    int_fields = {
        f"{section}.{key}"
        for section, fields in config.SCHEMA.items()
        for key, (default, _) in fields.items()
        if type(default) is int
    }
    mesh_fill = {"mesh.data", "mesh.fsdp", "mesh.tensor"}
    assert int_fields == {k for k, _, _ in LOWEST} | mesh_fill


@pytest.mark.parametrize("axis", ["data", "fsdp", "tensor"])
def test_mesh_axes_take_positive_sizes_or_minus_one(axis):
    for size in (-1, 1, 3, 16):
        cfg = config.default_config()
        cfg.mesh.data = 2  # so that -1 on another axis is the only fill
        cfg.mesh[axis] = size
        config.validate(cfg)
    for size in (0, -2, -17):
        message = _refused(_with_all(**{f"mesh__{axis}": size}))
        assert (
            message == f"config.mesh.{axis}={size} is not allowed: a positive integer or -1 (fill)"
        )


@pytest.mark.parametrize("fill", [("data", "fsdp"), ("fsdp", "tensor"), ("data", "tensor")])
def test_mesh_allows_only_one_fill_axis(fill):
    cfg = config.default_config()
    cfg.mesh.data = 1
    for axis in fill:
        cfg.mesh[axis] = -1
    assert _refused(cfg) == "config.mesh: at most one of data, fsdp, tensor may be -1"
    cfg.mesh[fill[0]] = 4
    config.validate(cfg)


def test_values_at_the_edges_of_the_rules_pass(tmp_path):
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"not read by validate")
    cfg = _with_all(
        model__d_model=100,
        model__n_heads=10,
        model__n_kv_heads=5,
        model__head_dim=0,
        data__tokenizer=str(tokenizer),
        data__shuffle_window=0,
        data__read_threads=0,
        train__global_batch_size=48,
        train__microbatches=6,
        train__eval_every=0,
        optim__warmup_steps=0,
        checkpoint__every=0,
        mesh__data=-1,
        mesh__fsdp=2,
        diloco__fragments=8,
        diloco__inner_steps=8,
        diloco__compression="int4:block=32+topk=0.1",
        contrib__enabled=True,
        contrib__attestation="my_pkg.attest:make_verifier",
        contrib__allowed_code=" " + "0123456789abcdef" * 4 + " ,, " + "f" * 64,
    )
    assert config.validate(cfg) is cfg
    # head_dim set: d_model need not be a multiple of n_heads
    config.validate(_with_all(model__d_model=100, model__n_heads=8, model__head_dim=64))


def test_random_model_shapes_pass_exactly_when_the_rules_hold():
    rng = random.Random(7)
    for _ in range(300):
        d_model, n_heads = rng.randint(1, 300), rng.randint(1, 24)
        n_kv_heads, head_dim = rng.randint(1, 24), rng.choice([0, 0, rng.randint(1, 80)])
        ok = (
            n_heads % n_kv_heads == 0
            and (head_dim != 0 or d_model % n_heads == 0)
            and (head_dim or d_model // n_heads) % 2 == 0  # set or derived: RoPE pairs
        )
        cfg = _with_all(
            model__d_model=d_model,
            model__n_heads=n_heads,
            model__n_kv_heads=n_kv_heads,
            model__head_dim=head_dim,
        )
        if ok:
            config.validate(cfg)
        else:
            refused = (
                "config.model.n_kv_heads=",
                "config.model.d_model=",
                "config.model.head_dim=",
            )
            assert _refused(cfg).startswith(refused)


def test_a_derived_odd_head_width_is_refused():
    # d_model // n_heads is the head width when head_dim is 0; RoPE needs it even.
    message = _refused(_with_all(model__d_model=24, model__n_heads=8, model__n_kv_heads=8))
    assert message.startswith("config.model.d_model=24 is not allowed: a multiple of "), message
    assert "it gives 3" in message and "\n" not in message
    config.validate(_with_all(model__d_model=24, model__n_heads=8, model__head_dim=4))


# One bad value per stage, in the order validate() checks them.
STAGES = [
    ("keys", dict(train__steps=True), "config.train.steps=True is not allowed: expected int"),
    ("choices", dict(model__dtype="int8"), "config.model.dtype='int8'"),
    ("floats", dict(optim__lr=-1.0), "config.optim.lr=-1.0"),
    ("model", dict(model__n_layers=-2), "config.model.n_layers=-2"),
    ("data", dict(data__seq_len=-1), "config.data.seq_len=-1"),
    ("train", dict(train__log_every=0), "config.train.log_every=0"),
    ("optim", dict(optim__warmup_steps=-3), "config.optim.warmup_steps=-3"),
    ("checkpoint", dict(checkpoint__keep=-1), "config.checkpoint.keep=-1"),
    ("mesh", dict(mesh__tensor=0), "config.mesh.tensor=0"),
    ("diloco", dict(diloco__replicas=-1), "config.diloco.replicas=-1"),
    ("contrib", dict(contrib__top_g=-5), "config.contrib.top_g=-5"),
    ("compression", dict(diloco__compression="fp8"), "config.diloco.compression='fp8'"),
]


def test_with_several_bad_values_the_earliest_stage_is_reported():
    rng = random.Random(3)
    for _ in range(60):
        picked = sorted(rng.sample(range(len(STAGES)), rng.randint(2, 5)))
        overrides = {}
        for i in picked:
            overrides.update(STAGES[i][1])
        assert _refused(_with_all(**overrides)).startswith(STAGES[picked[0]][2]), picked
    # each stage alone is refused with its own message
    for _, overrides, start in STAGES:
        assert _refused(_with_all(**overrides)).startswith(start)


def test_keys_unknown_missing_and_wrong_type():
    cfg = config.default_config()
    cfg.extra = 3
    assert _refused(cfg).startswith(
        "config.extra=3 is not allowed: unknown key; known: checkpoint,"
    )
    cfg = config.default_config()
    cfg.model.n_expert = 4
    message = _refused(cfg)
    assert message.startswith("config.model.n_expert=4 is not allowed: unknown key; known: ")
    assert "attention, attention_block_kv," in message

    raw = config.default_config().to_dict()
    del raw["mesh"]
    assert _refused(ml_collections.ConfigDict(raw)) == "config.mesh is missing"
    raw = config.default_config().to_dict()
    del raw["optim"]["b2"]
    assert _refused(ml_collections.ConfigDict(raw)) == "config.optim.b2 is missing"
    raw = config.default_config().to_dict()
    raw["model"]["d_model"] = "512"
    assert _refused(ml_collections.ConfigDict(raw)) == (
        "config.model.d_model='512' is not allowed: expected int"
    )
    raw["model"]["d_model"] = 512.0
    assert _refused(ml_collections.ConfigDict(raw)).endswith("expected int")
    raw["model"]["d_model"] = 512
    raw["model"]["rope_theta"] = 10_000  # an int in a float field is fine
    config.validate(ml_collections.ConfigDict(raw))


# --- defaults and describe() -------------------------------------------------------------


def _all_fields():
    yield from ((k, d, doc) for k, (d, doc) in config.TOP_LEVEL.items())
    for section, fields in config.SCHEMA.items():
        yield from ((f"{section}.{k}", d, doc) for k, (d, doc) in fields.items())


def test_default_config_holds_every_default_and_validates():
    cfg = config.default_config()
    assert config.validate(cfg) is cfg
    flat = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    expected = {k: d for k, d, _ in _all_fields()}
    assert flat == expected
    for key, default in expected.items():
        assert type(flat[key]) is type(default), key
        assert default is not None, key  # see SCHEMA: None cannot be overridden by flags


def test_default_config_round_trips_through_json():
    cfg = config.default_config()
    back = ml_collections.ConfigDict(json.loads(json.dumps(cfg.to_dict())))
    assert back.to_dict() == cfg.to_dict()
    assert config.validate(back).to_dict() == cfg.to_dict()
    for section in config.SCHEMA:
        for key, (default, _) in config.SCHEMA[section].items():
            assert type(back[section][key]) is type(default), f"{section}.{key}"


def test_default_configs_are_independent():
    a, b = config.default_config(), config.default_config()
    a.model.d_model, a.train.steps, a.name = 1024, 7, "changed"
    assert (b.model.d_model, b.train.steps, b.name) == (512, 1000, "")


def test_describe_lists_every_field_once_in_order_with_its_default_and_doc():
    lines = config.describe().splitlines()
    fields = list(_all_fields())
    assert len(lines) == len(fields) > 70
    for line, (key, default, doc) in zip(lines, fields, strict=True):
        match = re.fullmatch(r"([\w.]+) = (.+?)  # (.+)", line)
        assert match, line
        assert match[1] == key
        value = ast.literal_eval(match[2])
        assert value == default and type(value) is type(default), line
        assert match[3] == doc and doc.strip() and "\n" not in doc


# --- FLOAT_RANGES ------------------------------------------------------------------------


@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_float_fields_pass_exactly_the_values_their_range_takes(key):
    check, allowed = config.FLOAT_RANGES[key]
    assert allowed.strip()
    rng = random.Random(key)
    values = [rng.uniform(-2, 2) for _ in range(25)] + [rng.uniform(-1e6, 1e6) for _ in range(5)]
    values += [0.0, 0.5, 1.0, -0.0, 1e-12, 0.49999, 0.99999]
    for value in values:
        cfg = _with(key, value)
        if check(value):
            config.validate(cfg)
        else:
            assert _refused(cfg) == f"config.{key}={value!r} is not allowed: {allowed}"


def test_a_huge_int_in_a_float_field_does_not_overflow():
    # As a config read from JSON holds it (assigning it to a ConfigDict field converts to float).
    raw = config.default_config().to_dict()
    raw["contrib"]["min_score"] = 10**400  # math.isfinite(10**400) raises OverflowError
    raw["optim"]["lr"] = 10**400  # its range check compares the int itself
    cfg = ml_collections.ConfigDict(raw)
    assert isinstance(cfg.contrib.min_score, int) and isinstance(cfg.optim.lr, int)
    config.validate(cfg)
    raw["optim"]["lr"] = -(10**400)
    assert _refused(ml_collections.ConfigDict(raw)).startswith("config.optim.lr=-1000")


# --- ModelConfig: the one definition of the model fields ---------------------------------


def test_schema_model_section_is_built_from_model_config():
    fields = dataclasses.fields(config.ModelConfig)
    assert list(config.SCHEMA["model"]) == [f.name for f in fields]
    for f in fields:
        default, doc = config.SCHEMA["model"][f.name]
        assert type(default).__name__ == f.type, f.name
        if f.default is not dataclasses.MISSING:
            assert f.default == default and type(f.default) is type(default), f.name
        assert doc and "\n" not in doc


def test_model_config_defaults_and_required_fields():
    required = [
        f.name for f in dataclasses.fields(config.ModelConfig) if f.default is dataclasses.MISSING
    ]
    # The shape (and vocab_size/head_dim, resolved from 0 first) must be given explicitly.
    shape = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim"]
    assert required == shape
    c = config.ModelConfig(
        vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128
    )
    defaults = (c.rope_theta, c.norm_eps, c.init_std, c.dtype, c.scan_layers, c.attention)
    assert defaults == (500_000.0, 1e-5, 0.02, "bfloat16", True, "auto")
    with pytest.raises(TypeError):
        config.ModelConfig(vocab_size=384)


def test_model_config_from_config_resolves_head_dim_and_is_hashable():
    rng = random.Random(11)
    for _ in range(50):
        n_heads = rng.choice([1, 2, 4, 6, 8, 12])
        head_dim = rng.choice([0, 0, 2 * rng.randint(1, 64)])
        cfg = _with_all(
            model__vocab_size=rng.randint(1, 70_000),
            model__d_model=n_heads * 2 * rng.randint(1, 64),
            model__n_heads=n_heads,
            model__n_kv_heads=rng.choice([d for d in range(1, n_heads + 1) if n_heads % d == 0]),
            model__head_dim=head_dim,
            model__remat=rng.choice(["none", "full", "dots_saveable"]),
            model__z_loss=rng.uniform(0, 1e-3),
        )
        m = config.validate(cfg).model
        mc = config.ModelConfig.from_config(m)
        want = head_dim or m.d_model // n_heads
        assert mc.head_dim == want == config.head_dim(m) == config.head_dim(mc)
        assert {k: getattr(mc, k) for k in m if k != "head_dim"} == {
            k: v for k, v in m.items() if k != "head_dim"
        }
        again = config.ModelConfig.from_config(cfg.model)
        assert again == mc and hash(again) == hash(mc)
        assert config.ModelConfig.from_config(mc) is mc
        assert len({mc, again, dataclasses.replace(mc, z_loss=mc.z_loss + 1)}) == 2


def test_model_config_from_config_refuses_an_unresolved_vocab():
    with pytest.raises(ValueError, match="vocab_size must be resolved"):
        config.ModelConfig.from_config(config.default_config().model)


def test_model_config_is_frozen_and_shared_with_the_model_module():
    from near_jax import model

    assert model.ModelConfig is config.ModelConfig
    mc = config.ModelConfig.from_config(_with_all(model__vocab_size=256).model)
    with pytest.raises(dataclasses.FrozenInstanceError):
        mc.d_model = 1


@pytest.mark.parametrize(
    "d_model, n_heads, head_dim, want",
    [(512, 8, 0, 64), (96, 3, 0, 32), (100, 8, 64, 64), (4096, 32, 0, 128), (768, 12, 0, 64)],
)
def test_head_dim(d_model, n_heads, head_dim, want):
    m = _with_all(model__d_model=d_model, model__n_heads=n_heads, model__head_dim=head_dim).model
    assert config.head_dim(m) == want


def test_config_and_hardware_are_a_bottom_layer():
    """config (with ModelConfig) and hardware (with the peak table) import neither JAX nor
    the layers above them; a fresh interpreter, since the tests have imported JAX already."""
    code = (
        "import sys, near_jax.config, near_jax.hardware\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')"
        " or m.startswith(('near_jax.model', 'near_jax.train'))))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "[]", out.stdout
