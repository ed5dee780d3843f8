"""Tests of near_jax.config: every float field of the schema has a finite range."""

import math
import re

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
