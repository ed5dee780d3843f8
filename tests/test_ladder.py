"""The model ladder: seven rungs of the promised sizes, each growable from the one below and
sized for a TPU and a GPU job that it fits."""

import itertools
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
    "m30b": 30e9,
    "m70b": 70e9,
    "m350b": 350e9,
    "m1400b": 1.4e12,
}
GROWN = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")
# A dense 1.4T model without pipeline parallelism must all-gather its FSDP shards across
# InfiniBand on GPUs (no NVLink domain holds its state), so the planner bounds it far lower.
GPU_MFU_FLOOR = {"m1400b": 0.1}


def test_there_are_seven_rungs_from_half_a_billion_to_1_4_trillion():
    assert list(ladder.RUNGS) == list(NOMINAL)
    assert ladder.TARGETS == ("tpu", "gpu")


@pytest.mark.parametrize("name", list(NOMINAL))
def test_parameter_count_from_shapes_is_within_3_percent_of_the_name(name):
    cfg = config_lib.validate(ladder.get_config(name))
    counts = model.param_counts(cfg.model)  # jax.eval_shape: nothing is allocated
    assert abs(counts["total"] / NOMINAL[name] - 1) <= 0.03, counts
    assert counts["total"] == ladder.param_count(ladder.RUNGS[name])
    assert cfg.model.vocab_size == 128_256 and cfg.name == name
    assert ladder.RUNGS[name].nominal == NOMINAL[name]


def test_each_rung_can_be_grown_from_the_one_below():
    rungs = list(ladder.RUNGS.values())
    for rung in rungs:
        assert rung.head_dim == 128 and rung.n_heads % rung.n_kv_heads == 0, rung
        assert all(getattr(rung, key) % 128 == 0 for key in ("d_model", "mlp_dim")), rung
    for small, big in itertools.pairwise(rungs):
        assert ladder.param_count(small) < ladder.param_count(big)
        for key in GROWN:  # width expansion and depth stacking only ever add
            assert getattr(small, key) <= getattr(big, key), (key, small, big)
    configs = [ladder.get_config(name).model for name in ladder.RUNGS]
    assert len({(m.vocab_size, m.head_dim, m.rope_theta, m.dtype) for m in configs}) == 1


@pytest.mark.parametrize("name", list(NOMINAL))
@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_each_job_fills_its_hardware_and_splits_the_model_and_batch_evenly(name, target):
    rung = ladder.RUNGS[name]
    job = rung.target(target)
    cfg = ladder.get_config(f"{name},{target}")
    acc = hardware.get(job.hardware)
    assert acc.name == job.hardware and acc.platform == target and job.describe
    if target == "tpu":
        version, chips = tpu.parse_accelerator(job.describe)
        assert acc.name == {"v5litepod": "v5e"}.get(version, version)
        assert math.prod(job.mesh) == chips and cfg.name == name
    else:
        assert f"{ladder.devices(rung, target)}x " in job.describe and cfg.name == f"{name},gpu"
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == job.mesh
    assert cfg.mesh.dcn_data == job.dcn_data and cfg.train.microbatches == job.microbatches
    assert ladder.devices(rung, target) == math.prod(job.mesh) * job.dcn_data
    # The model and the token budget do not depend on the target; only the job does.
    tpu_cfg = ladder.get_config(name)
    assert cfg.model == tpu_cfg.model and cfg.train.steps == tpu_cfg.train.steps
    # The batch splits evenly over data parallelism and micro-batches, and every sharded
    # dimension over its mesh axis (embed over fsdp; heads, kv heads, mlp, vocab over tensor).
    dp = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.dcn_data
    assert cfg.train.global_batch_size % (dp * cfg.train.microbatches) == 0
    assert rung.d_model % cfg.mesh.fsdp == 0
    for dim in (rung.n_heads, rung.n_kv_heads, rung.mlp_dim, cfg.model.vocab_size):
        assert dim % cfg.mesh.tensor == 0, (dim, cfg.mesh.tensor)
    assert cfg.model.remat in ("full", "dots_saveable", "none")
    assert cfg.model.loss_chunk == 1024  # the fused loss: no [B, L, V] logits


def test_the_ladder_config_names_the_target_and_the_token_budget():
    rung = ladder.RUNGS["m7b"]
    params = ladder.param_count(rung)
    cfg = ladder.get_config("m7b")
    assert cfg.train.steps == math.ceil(20 * params / rung.tokens_per_step)
    cfg40 = ladder.get_config("m7b,gpu,tokens_per_param=40")
    assert cfg40.train.steps == math.ceil(40 * params / rung.tokens_per_step)
    assert cfg40.name == "m7b,gpu" and cfg40.mesh.dcn_data == rung.gpu.dcn_data
    assert ladder.get_config("m7b,tpu").name == "m7b"
    assert ladder.lookup("m7b") == (rung, "tpu") and ladder.lookup("m7b,gpu") == (rung, "gpu")
    assert ladder.lookup("tiny") is None and ladder.lookup("m7b,x") is None
    with pytest.raises(ValueError, match="unknown rung 'm9b'; known: m500m, m2b"):
        ladder.get_config("m9b")
    with pytest.raises(ValueError, match="unknown ladder option 'tpp=3'"):
        ladder.get_config("m7b,tpp=3")


@pytest.mark.parametrize("old,new", [("m27b", "m30b"), ("m100b", "m70b"), ("m375b", "m350b")])
def test_a_renamed_rung_says_which_rung_replaced_it(old, new):
    expected = (
        f"unknown rung '{old}': the ladder's rungs are now m500m, m2b, m7b, m30b, m70b, "
        f"m350b, m1400b ({old} became {new})"
    )
    with pytest.raises(ValueError) as e:
        ladder.get_config(f"{old},gpu")
    assert str(e.value) == expected


@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_every_rung_fits_its_hardware_per_the_planner(target):
    plans = []
    for name, rung in ladder.RUNGS.items():
        acc = hardware.get(rung.target(target).hardware)
        cfg = ladder.get_config(f"{name},{target}")
        plans.append(make_plan(cfg, acc, ladder.devices(rung, target)))
    for name, p in zip(ladder.RUNGS, plans, strict=True):
        assert p.fits, (p.name, p.memory["total"] / 2**30)
        floor = GPU_MFU_FLOOR.get(name, 0.3) if target == "gpu" else 0.3
        assert floor < p.time["mfu_bound"] <= 1.0, (p.name, p.time)
    # The ladder grows: every rung costs more compute than the one below it.
    flops = [p.train_flops for p in plans]
    assert flops == sorted(flops)
    assert "m1400b" in format_ladder(plans)
