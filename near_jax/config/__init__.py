"""The config: schema and validation (layer 0: imports nothing above it).

schema       every field with its default and one-line doc; `ModelConfig` (the model section,
             defined once); CHOICES and FLOAT_RANGES; `default_config()`, `describe()`
validation   `validate(cfg)`: keys and types, choices, float ranges, then one validator per
             section; raises `ConfigError` with one line naming the key

Configs are `ml_collections.ConfigDict`s; `configs/*.py` start from `default_config()` and
override fields. The package re-exports both modules' public names (`config.validate`).
"""

from near_jax.config.schema import (
    CHOICES,
    FLOAT_RANGES,
    SCHEMA,
    TOP_LEVEL,
    ConfigError,
    ModelConfig,
    default_config,
    describe,
    head_dim,
)
from near_jax.config.validation import validate

__all__ = [
    "CHOICES",
    "FLOAT_RANGES",
    "SCHEMA",
    "TOP_LEVEL",
    "ConfigError",
    "ModelConfig",
    "default_config",
    "describe",
    "head_dim",
    "validate",
]
