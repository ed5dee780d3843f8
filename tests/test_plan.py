"""`python -m near_jax.plan`: JSON out, one-line errors, the target hardware and devices."""

import json

import pytest
from helpers import run_module, small_config

from near_jax.config import ConfigError
from near_jax.plan.__main__ import target
from near_jax.plan.planner import load_ladder


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
        (
            ["--config=configs/ladder.py:m27b"],
            "unknown rung 'm27b': the ladder's rungs are now m500m, m2b, m7b, m30b, m70b, "
            "m350b, m1400b (m27b became m30b)",
        ),
    ):
        out = _cli(*bad)
        assert out.returncode == 2, (bad, out.stderr)
        assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_a_renamed_rung_is_one_line_for_train_too(tmp_path):
    out = run_module(
        "near_jax.train", "--config=configs/ladder.py:m100b", f"--workdir={tmp_path}", timeout=120
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "(m100b became m70b)" in out.stderr, out.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_gpu_target_is_picked_from_the_config_and_the_ladder_shows_both():
    out = _cli("--config=configs/ladder.py:m7b,gpu", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["name"], result["hardware"], result["devices"]) == ("m7b,gpu", "h100", 64)
    assert result["mesh"] == {"data": 8, "fsdp": 8, "tensor": 1, "dcn_data": 8}
    out = _cli("--ladder", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    names = list(load_ladder().RUNGS)
    assert [(r["target"], r["name"]) for r in rows] == [("tpu", n) for n in names] + [
        ("gpu", f"{n},gpu") for n in names
    ]
    assert {r["hardware"] for r in rows if r["target"] == "tpu"} == {"v5p"}
    assert {r["hardware"] for r in rows if r["target"] == "gpu"} <= {
        "h100",
        "h200",
        "b200",
        "gb200",
    }
    assert all(r["fits"] for r in rows)


def test_target_hardware_and_devices_come_from_flags_rung_or_mesh():
    ladder = load_ladder()
    acc, devices = target(ladder.get_config("m1400b"), "", 0)
    assert (acc.name, devices) == ("v5p", 8192)
    acc, devices = target(ladder.get_config("m7b"), "ironwood", 0)
    assert (acc.name, devices) == ("tpu7x", 64)  # the mesh's devices: 32 chips
    acc, devices = target(ladder.get_config("m1400b,gpu"), "", 0)
    assert (acc.name, devices) == ("gb200", 8192)
    acc, devices = target(ladder.get_config("m30b,gpu,tokens_per_param=10"), "", 0)
    assert (acc.name, devices) == ("h200", 256)  # 32 nodes of 8
    tiny = small_config()
    tiny.mesh.data, tiny.mesh.fsdp = 2, 4
    assert target(tiny, "cpu", 0)[1] == 8
    with pytest.raises(ConfigError, match="--hardware is required"):
        target(tiny, "", 0)
    tiny.mesh.data = -1
    with pytest.raises(ConfigError, match="--devices is required"):
        target(tiny, "cpu", 0)
