"""The planner: exact state sizes, a memory model that agrees with XLA, bounds, the CLI."""

import json

import jax
import pytest
from helpers import run_module, small_config

from near_jax import hardware
from near_jax.config import ConfigError
from near_jax.plan.__main__ import target
from near_jax.plan.compiled import compiled_memory
from near_jax.plan.estimate import layout, memory
from near_jax.plan.planner import load_ladder, make_plan, resolve


def _cfg(model=None, mesh=None, remat="full", batch=16, seq=256, micro=1):
    """A float32 config (XLA's CPU backend keeps bf16 activations in float32)."""
    cfg = small_config()
    shape = dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=512, vocab_size=4096)
    cfg.model.update({**shape, **(model or {}), "remat": remat})
    cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.microbatches = seq, batch, micro
    cfg.mesh.data = 1
    for key, value in (mesh or {"data": 8}).items():
        cfg.mesh[key] = value
    return cfg


# Shapes and meshes unlike those the planner's coefficients were measured on.
PAIRS = {
    "full, fsdp x tensor, 1 kv head": _cfg(
        dict(d_model=256, n_heads=4, n_kv_heads=1, mlp_dim=640, vocab_size=6144, n_layers=6),
        dict(fsdp=4, tensor=2),
        batch=8,
        seq=384,
    ),
    "dots_saveable, tensor x fsdp, big vocab": _cfg(
        dict(d_model=96, n_heads=4, n_kv_heads=4, mlp_dim=384, vocab_size=16384, n_layers=2),
        dict(tensor=4, fsdp=2),
        remat="dots_saveable",
        batch=32,
        seq=64,
    ),
    "full, data, 4 micro-batches": _cfg(
        dict(n_heads=8, mlp_dim=1536, vocab_size=2048, n_layers=5), batch=32, seq=192, micro=4
    ),
    "none, data x fsdp": _cfg(
        dict(d_model=192, n_heads=6, mlp_dim=768, vocab_size=3072, n_layers=3),
        dict(data=2, fsdp=4),
        remat="none",
        batch=24,
        seq=128,
    ),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_planner_memory_agrees_with_xla_within_15_percent(name):
    cfg = PAIRS[name]
    devices = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    xla = compiled_memory(cfg, jax.devices()[:devices])  # AOT: nothing is allocated
    planned = memory(resolve(cfg), layout(resolve(cfg), devices), "xla")
    ratio = planned["total"] / xla["total"]
    print(f"{name}: plan {planned['total'] / 2**20:.1f} MiB, XLA {xla['total'] / 2**20:.1f} MiB")
    assert 0.85 <= ratio <= 1.15, (ratio, planned, xla)
    # The donated train state is exact: params + AdamW mu and nu are XLA's arguments.
    state = planned["params"] + planned["optimizer"] + planned["batch"]
    assert abs(state / xla["arguments"] - 1) < 0.01


def test_state_is_sharded_by_fsdp_and_tensor_exactly():
    cfg = resolve(_cfg(mesh=dict(data=1)))
    full = memory(cfg, layout(cfg, 1))
    cfg8 = resolve(_cfg(mesh=dict(fsdp=4, tensor=2)))
    split = memory(cfg8, layout(cfg8, 8))
    # Every weight matrix splits 8 ways; only the norm scales (embed -> fsdp) split 4 ways.
    assert full["params"] / 8 < split["params"] < full["params"] / 7.9
    assert split["optimizer"] == 2 * split["params"]
    micro = resolve(_cfg(micro=2))
    lay = layout(micro, 8)
    assert memory(micro, lay)["grads"] == 2 * memory(micro, lay)["params"]


def test_remat_and_micro_batches_trade_memory_as_expected():
    lay = {"data": 8, "fsdp": 1, "tensor": 1, "dcn_data": 1, "devices": 8}
    acts = {
        r: memory(resolve(_cfg(remat=r)), lay)["activations"]
        for r in ("full", "dots_saveable", "none")
    }
    assert acts["full"] < acts["dots_saveable"] < acts["none"]
    one = memory(resolve(_cfg(batch=32)), lay)["activations"]
    four = memory(resolve(_cfg(batch=32, micro=4)), lay)["activations"]
    assert four < one / 3
    # Fused attention (TPU splash, GPU cuDNN) keeps no [length x length] scores.
    cfg = resolve(_cfg(remat="none", seq=1024, batch=8))
    assert memory(cfg, lay, "splash")["total"] < memory(cfg, lay, "xla")["total"]


def test_step_time_bound_and_hardware_table():
    cfg = load_ladder().get_config("m7b")
    p = make_plan(cfg, hardware.get("v5p"), 64)
    t = p.time
    assert t["step_s"] == max(t["compute_s"], t["hbm_s"], t["ici_s"], t["dcn_s"])
    # Full remat recomputes the forward pass: the bound is about 3/4 MFU when compute-bound.
    assert 0.7 < t["mfu_bound"] < 0.8
    assert p.fits and p.attention == "splash"
    # Across 8 H100 nodes FSDP traffic crosses InfiniBand: slower than in one TPU slice.
    gpu = make_plan(cfg, hardware.get("h100"), 64)
    assert gpu.time["ici_s"] > t["ici_s"] and gpu.attention == "cudnn"
    assert hardware.get("v5p").peak_flops == 459e12
    assert hardware.get("ironwood").hbm_bytes == 96 * 2**30  # per device: 2 per chip
    assert hardware.get("b200").hbm_bytes == 180e9
    with pytest.raises(ValueError, match="unknown hardware 'v9'"):
        hardware.get("v9")


def _cli(*args):
    return run_module("near_jax.plan", *args, timeout=120)


def test_cli_json_and_one_line_errors(tmp_path):
    bad_config = tmp_path / "bad.py"
    bad_config.write_text("def get_config(:\n")
    out = _cli(
        "--config=configs/ladder.py:m7b",
        "--config.mesh.fsdp=32",
        "--config.mesh.data=2",
        "--hardware=h100",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["mesh"] == {"data": 2, "fsdp": 32, "tensor": 1, "dcn_data": 1}
    assert result["hardware"] == "h100" and result["devices"] == 64
    assert {"params", "optimizer", "grads", "activations", "total"} <= set(result["memory"])
    for bad, message in (
        (
            ["--config=configs/ladder.py:m7b", "--config.mesh.fsdp=3", "--devices=64"],
            "config.mesh={data=1, fsdp=3, tensor=1} is not allowed",
        ),
        (["--bogus"], "Unknown command line flag 'bogus'"),
        ([f"--config={bad_config}"], f"syntax error in {bad_config}, line 1"),
    ):
        out = _cli(*bad)
        assert out.returncode == 2, (bad, out.stderr)
        assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_target_hardware_and_devices_come_from_flags_rung_or_mesh():
    ladder = load_ladder()
    acc, devices = target(ladder.get_config("m1400b"), "", 0)
    assert (acc.name, devices) == ("v5p", 8192)
    acc, devices = target(ladder.get_config("m7b"), "ironwood", 0)
    assert (acc.name, devices) == ("tpu7x", 64)  # the mesh's devices: 32 chips
    tiny = small_config()
    tiny.mesh.data, tiny.mesh.fsdp = 2, 4
    assert target(tiny, "cpu", 0)[1] == 8
    with pytest.raises(ConfigError, match="--hardware is required"):
        target(tiny, "", 0)
    tiny.mesh.data = -1
    with pytest.raises(ConfigError, match="--devices is required"):
        target(tiny, "cpu", 0)
