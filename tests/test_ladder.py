"""The model ladder: seven rungs of the promised sizes, each sized for hardware it fits."""

import math

import pytest

from launch import tpu  # noqa: E402
from near_jax import config as config_lib
from near_jax import hardware, model
from near_jax.plan.planner import load_ladder, make_plan
from near_jax.plan.tables import format_ladder

ladder = load_ladder()
NOMINAL = {
    "m500m": 0.5e9,
    "m2b": 2e9,
    "m7b": 7e9,
    "m27b": 27e9,
    "m100b": 100e9,
    "m375b": 375e9,
    "m1400b": 1.4e12,
}


def test_there_are_seven_rungs_from_half_a_billion_to_1_4_trillion():
    assert list(ladder.RUNGS) == list(NOMINAL)


@pytest.mark.parametrize("name", list(NOMINAL))
def test_parameter_count_from_shapes_is_within_5_percent_of_the_name(name):
    cfg = config_lib.validate(ladder.get_config(name))
    counts = model.param_counts(cfg.model)  # jax.eval_shape: nothing is allocated
    assert abs(counts["total"] / NOMINAL[name] - 1) <= 0.05, counts
    assert counts["total"] == ladder.param_count(ladder.RUNGS[name])
    assert cfg.model.vocab_size == 128_256 and cfg.name == name


@pytest.mark.parametrize("name", list(NOMINAL))
def test_rung_names_hardware_whose_slices_its_mesh_fills(name):
    rung = ladder.RUNGS[name]
    cfg = ladder.get_config(name)
    version, chips = tpu.parse_accelerator(rung.accelerator)
    assert hardware.get(rung.hardware).name == {"v5litepod": "v5e"}.get(version, version)
    assert math.prod(rung.mesh) == chips
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == rung.mesh
    assert cfg.mesh.dcn_data == rung.slices
    assert ladder.devices(rung) == chips * rung.slices
    # The batch splits evenly over data parallelism and micro-batches.
    dp = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.dcn_data
    assert cfg.train.global_batch_size % (dp * cfg.train.microbatches) == 0
    assert cfg.model.remat in ("full", "dots_saveable", "none") and rung.gpus


def test_token_budget_is_20_tokens_per_parameter_and_configurable():
    rung = ladder.RUNGS["m7b"]
    params = ladder.param_count(rung)
    cfg = ladder.get_config("m7b")
    assert cfg.train.steps == math.ceil(20 * params / rung.tokens_per_step)
    cfg40 = ladder.get_config("m7b,tokens_per_param=40")
    assert cfg40.train.steps == math.ceil(40 * params / rung.tokens_per_step)
    with pytest.raises(ValueError, match="unknown rung 'm9b'"):
        ladder.get_config("m9b")
    with pytest.raises(ValueError, match="unknown ladder option"):
        ladder.get_config("m7b,tpp=3")


def test_every_rung_fits_its_hardware_per_the_planner():
    plans = []
    for name, rung in ladder.RUNGS.items():
        acc = hardware.get(rung.hardware)
        plans.append(make_plan(ladder.get_config(name), acc, ladder.devices(rung)))
    for p in plans:
        assert p.fits, (p.name, p.memory["total"] / 2**30)
        assert 0.3 < p.time["mfu_bound"] <= 1.0, (p.name, p.time)
    # The ladder grows: every rung costs more compute than the one below it.
    flops = [p.train_flops for p in plans]
    assert flops == sorted(flops)
    assert "m1400b" in format_ladder(plans)
