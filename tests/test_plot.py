"""Tests of near_jax.plot: the loss plot and the command line's error handling."""

import json
import os

import numpy as np
import pytest
from helpers import run_module

from near_jax import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(workdir, records, torn_tail=False):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps({"time": 0.0, **r}) + "\n")
        if torn_tail:
            f.write('{"step": 99999, "spl')


def _synthetic_run(seed=0, steps=200, log_every=10, eval_every=50, tokens_per_step=4096):
    rng = np.random.default_rng(seed)
    records = []
    for step in range(log_every, steps + 1, log_every):
        loss = 5.0 * np.exp(-step / 100) + 1.5 + rng.normal(0, 0.05)
        records.append(
            {"step": step, "split": "train", "loss": loss, "tokens": step * tokens_per_step}
        )
        if step % eval_every == 0:
            records.append({"step": step, "split": "eval", "loss": loss + rng.uniform(0, 0.2)})
    return records


def _run_cli(*args):
    return run_module("near_jax.plot", *args, timeout=60)


def _assert_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC
    assert os.path.getsize(path) > 1000


def test_plot_writes_png(tmp_path):
    workdir = str(tmp_path / "run")
    _write_metrics(workdir, _synthetic_run(), torn_tail=True)
    path = plot.plot_loss(workdir)
    assert path == os.path.join(workdir, "loss.png")
    _assert_png(path)

    out = str(tmp_path / "figs" / "custom.png")
    assert plot.plot_loss(workdir, out) == out
    _assert_png(out)


def test_loss_series_eval_tokens():
    records = [
        {"step": 5, "split": "eval", "loss": 4.0},  # before any train record: no tokens
        {"step": 10, "split": "train", "loss": 3.0, "tokens": 100},
        {"step": 20, "split": "train", "loss": 2.5, "tokens": 200},
        {"step": 25, "split": "eval", "loss": 2.6},  # takes tokens of step 20
        {"step": 30, "split": "eval", "loss": 2.4},  # logged before train step 30
        {"step": 30, "split": "train", "loss": 2.2, "tokens": 300},
        {"step": 40, "split": "train", "lr": 1e-3},  # no loss: not plotted
    ]
    s = plot.loss_series(records)
    assert s["train"]["step"] == [10, 20, 30]
    assert s["train"]["tokens"] == [100, 200, 300]
    assert s["eval"]["step"] == [5, 25, 30]
    assert s["eval"]["tok_step"] == [25, 30]
    assert s["eval"]["tokens"] == [200, 300]
    assert s["eval"]["tok_loss"] == [2.6, 2.4]


def test_loss_series_resumed_run():
    # Logged up to step 40, then resumed from a checkpoint at step 20.
    records = [{"step": st, "split": "train", "loss": float(st), "tokens": st} for st in (10, 20)]
    records += [{"step": st, "split": "train", "loss": 0.0, "tokens": st} for st in (30, 40)]
    records += [{"step": st, "split": "train", "loss": float(st), "tokens": st} for st in (30,)]
    s = plot.loss_series(records)
    assert s["train"]["step"] == [10, 20, 30]
    assert s["train"]["loss"] == [10.0, 20.0, 30.0]


def test_loss_series_eval_only_and_no_tokens(tmp_path):
    records = [{"step": 100, "split": "eval", "loss": 2.0}]
    assert set(plot.loss_series(records)) == {"eval"}
    _write_metrics(str(tmp_path), records)
    _assert_png(plot.plot_loss(str(tmp_path)))


def test_cli_prints_path(tmp_path):
    workdir = str(tmp_path / "run")
    _write_metrics(workdir, _synthetic_run(seed=3))
    out = str(tmp_path / "out.png")
    result = _run_cli(f"--workdir={workdir}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == out
    _assert_png(out)


@pytest.mark.parametrize("case", ["missing_workdir", "no_metrics", "no_loss", "no_flag"])
def test_cli_errors(tmp_path, case):
    workdir = tmp_path / "run"
    if case != "missing_workdir":
        workdir.mkdir()
    if case == "no_loss":
        _write_metrics(str(workdir), [{"step": 1, "split": "train", "lr": 1e-3}], torn_tail=True)
    args = [] if case == "no_flag" else [f"--workdir={workdir}"]
    result = _run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    want = {
        "missing_workdir": "does not exist",
        "no_metrics": "no metrics.jsonl",
        "no_loss": "no loss records",
        "no_flag": "--workdir",
    }[case]
    assert want in lines[0]
    assert not (workdir / "loss.png").exists()
