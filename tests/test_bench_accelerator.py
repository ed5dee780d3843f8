"""bench/accelerator/run.py: the prepared GPU command, dry-run on the CPU, and its plumbing."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import tomllib

import pytest
from helpers import REPO

PARTS = ["tests", "attention", "train", "serve", "diloco"]


def _run_module():
    path = pathlib.Path(REPO) / "bench" / "accelerator" / "run.py"
    spec = importlib.util.spec_from_file_location("bench_accelerator_run", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_part_and_writes_its_json(tmp_path):
    out = tmp_path / "out"
    script = pathlib.Path(REPO) / "bench" / "accelerator" / "run.sh"
    proc = subprocess.run(
        [str(script), "--dry-run", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Few enough files that the device tool brings every one back (at most 8).
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{p}.json" for p in PARTS] + ["run.json", "run.txt"]
    )
    records = {p: json.loads((out / f"{p}.json").read_text()) for p in PARTS}
    assert all(r["status"] == "ok" and r["dry_run"] for r in records.values()), {
        p: r["log_tail"][-5:] for p, r in records.items() if r["status"] != "ok"
    }
    tests = records["tests"]["summary"]
    assert tests["counts"].get("passed", 0) >= 1 and not tests["failures"]
    attention = records["attention"]
    assert [r["segments"] for r in attention["rows"]] == [0, 0, 2, 2]
    assert attention["results"][0]["rows"] == attention["rows"]
    assert all(r["fwd_bwd_ms"] > 0 for r in attention["rows"])
    train = records["train"]["results"]
    assert [r["remat"] for r in train] == ["full", "dots_saveable"]
    assert all(r["tokens_per_s"] > 0 for r in train)
    serve = records["serve"]["results"][0]["rows"]
    assert all(r["tokens_per_s"] > 0 for r in serve) and serve[-1]["mismatches"] == 0
    diloco = records["diloco"]["rows"]
    assert [(r["method"], r["compression"]) for r in diloco] == [
        ("data-parallel", "fp32"),
        ("diloco", "fp32"),
        ("diloco", "int4"),
    ]
    summary = json.loads((out / "run.json").read_text())
    assert list(summary["parts"]) == PARTS and summary["installed"] is None
    text = (out / "run.txt").read_text()
    assert all(f"== {p}: ok" in text for p in PARTS) and "jax " in text


def test_a_part_past_its_budget_is_killed_with_its_children_and_the_rest_skipped():
    run = _run_module()
    grandchild = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    start = time.monotonic()
    result = run.run_commands(
        [[sys.executable, "-c", grandchild], [sys.executable, "-c", "print('never')"]],
        budget_s=3,
        env=dict(os.environ),
    )
    assert time.monotonic() - start < 20
    assert result["status"] == "timed_out" and result["returncodes"][1] is None
    assert "never" not in result["output"].replace("print('never')", "")
    pid = int(result["output"].split()[0])
    time.sleep(0.5)
    assert not _alive(pid)  # the grandchild went with its group


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_failing_command_fails_its_part_but_the_next_command_runs():
    run = _run_module()
    result = run.run_commands(
        [[sys.executable, "-c", "raise SystemExit(3)"], [sys.executable, "-c", "print('next')"]],
        budget_s=60,
        env=dict(os.environ),
    )
    assert result["status"] == "failed" and result["returncodes"] == [3, 0]
    assert "next" in result["output"]


def test_gpu_parts_fit_eight_minutes_and_cover_the_issue():
    run = _run_module()
    parts = run.parts_for(False, pathlib.Path("/tmp/x"))
    assert list(parts) == PARTS
    assert sum(p.budget_s for p in parts.values()) <= 8 * 60 - 30  # install and start-up
    attention = " ".join(parts["attention"].commands[0])
    assert "--impls=pallas,cudnn,xla" in attention and "--segments=0,4" in attention
    shapes = [tuple(map(int, s.split(","))) for s in run.ATTENTION_SHAPES.split(";")]
    assert {s[1] for s in shapes} == {2048, 4096, 8192}
    assert all(s[2] == 4 * s[3] and s[4] == 128 for s in shapes)
    train = [" ".join(c) for c in parts["train"].commands]
    assert [c.split("--config.model.remat=")[1] for c in train] == list(run.REMATS)
    assert all("ladder.py:m500m" in c for c in train)
    assert "--preset=gpu" in " ".join(parts["serve"].commands[0])
    assert "--preset=gpu" in " ".join(parts["diloco"].commands[0])
    env = run.child_env(False, None)
    assert env["JAX_PLATFORMS"] == "cuda,cpu" and "XLA_FLAGS" not in env


def test_wheels_skip_protobuf_when_the_image_has_a_new_enough_one(tmp_path, monkeypatch):
    run = _run_module()
    wheels = tmp_path / "wheels.txt"
    wheels.write_text("# comment\ngrain==0.2.18\n\nprotobuf==7.36.2\n")
    monkeypatch.setattr(run, "installed_version", lambda name: (6, 31, 1))
    assert run.wanted_wheels(wheels) == ["grain==0.2.18"]
    monkeypatch.setattr(run, "installed_version", lambda name: (4, 25, 0))
    assert run.wanted_wheels(wheels) == ["grain==0.2.18", "protobuf==7.36.2"]
    pins = run.wanted_wheels()
    assert all("==" in p for p in pins) and "ml-collections==1.1.0" in pins


def test_unknown_part_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _run_module().main(["--dry-run", "--parts=tests,bogus"])
    assert exc.value.code == 2
    assert "bogus" in capsys.readouterr().err


def _names(path: pathlib.Path) -> set[str]:
    lines = path.read_text().splitlines()
    return {_normal(line) for line in lines if line.strip() and not line.startswith("#")}


def _normal(requirement: str) -> str:
    """A requirement's distribution name, normalized ("ml_collections>=1.0" -> ml-collections)."""
    return re.split(r"[\[<>=!~; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_the_wheels_and_the_image_cover_every_dependency():
    here = pathlib.Path(REPO) / "bench" / "accelerator"
    project = tomllib.loads((pathlib.Path(REPO) / "pyproject.toml").read_text())["project"]
    needed = {_normal(r) for r in project["dependencies"]}
    image, wheels = _names(here / "device_packages.txt"), _names(here / "wheels.txt")
    assert len(image) > 100 and {"jax", "flax", "numpy"} <= image
    assert not needed - image - wheels, "add them to bench/accelerator/wheels.txt"
    # Only what the image lacks travels; protobuf is the one fallback (grain's minimum).
    assert wheels & image == {"protobuf"}
