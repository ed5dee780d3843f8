"""bench/train_throughput.py: --compare parsing, and two variants timed in one run (warmup 0)."""

import importlib.util
import pathlib

import pytest
from helpers import REPO, small_config

from near_jax.config import ConfigError


def _bench():
    path = pathlib.Path(REPO) / "bench" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("bench_train_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_parse_compare_defaults_to_the_model_section_and_casts_types():
    bench = _bench()
    variants = bench.parse_compare("loss_chunk=0,loss_chunk=16+train.global_batch_size=16")
    assert variants == [
        {"model.loss_chunk": "0"},
        {"model.loss_chunk": "16", "train.global_batch_size": "16"},
    ]
    cfg = bench.with_overrides(small_config(), variants[1])
    assert cfg.model.loss_chunk == 16 and cfg.train.global_batch_size == 16
    assert bench.with_overrides(
        small_config(), {"model.tie_embeddings": "true"}
    ).model.tie_embeddings
    with pytest.raises(ValueError, match="not key=value"):
        bench.parse_compare("loss_chunk")
    with pytest.raises(ConfigError, match="model.no_such_field"):
        bench.with_overrides(small_config(), {"model.no_such_field": "1"})


def test_compare_times_both_variants_with_no_warmup():
    bench = _bench()
    variants = bench.parse_compare("loss_chunk=0,loss_chunk=8")
    results = bench.compare(small_config(), variants, steps=2, warmup=0)
    assert [r["variant"] for r in results] == ["loss_chunk=0", "loss_chunk=8"]
    assert results[0]["speedup"] == 1.0 and results[1]["speedup"] > 0
    # Same params, same batch: the fused loss is the same loss (float32 model).
    assert abs(results[0]["loss"] - results[1]["loss"]) < 1e-4
    assert results[1]["temp_bytes_per_device"] > 0
    table = bench.compare_table(results).splitlines()
    assert table[0].split()[:3] == ["variant", "step_s", "tokens/s"] and len(table) == 3


def test_hlo_ops_names_each_instruction_with_its_shape_and_jax_op():
    import jax
    import jax.numpy as jnp

    bench = _bench()
    text = jax.jit(lambda x: jnp.tanh(x @ x.T)).lower(jnp.ones((8, 4))).compile().as_text()
    ops = bench.hlo_ops(text)
    assert any(op.endswith("dot_general") for _, op in ops.values())
    assert all(shape.startswith(("f32[", "(")) for shape, _ in ops.values())
    entry_root = text.split("ENTRY", 1)[1].split("ROOT %", 1)[1].split(" ", 1)[0]
    assert entry_root in ops  # the entry computation's result, by name


def test_profile_lists_the_costliest_ops_of_traced_steps():
    bench = _bench()
    result = bench.measure(small_config(), steps=1, warmup=0, profile_steps=2)
    rows = result["profile"]
    assert 0 < len(rows) <= 12
    assert all(r["ms_per_step"] > 0 and 0 < r["share"] <= 1 for r in rows)
    assert [r["ms_per_step"] for r in rows] == sorted(
        (r["ms_per_step"] for r in rows), reverse=True
    )
    assert sum(r["share"] for r in rows) <= 1 + 1e-9
    # the step's matmuls are among what it spends most on
    assert any("dot_general" in r["jax_op"] for r in rows)
    table = bench.profile_table(rows).splitlines()
    assert "ms/step" in table[0] and len(table) == 1 + len(rows)
