"""Tests of near_jax.train.metrics: writers, reading back, MFU, peak table, formatting, progress."""

import glob
import io
import json
import logging
import math
import os
import struct
import sys
import time

import numpy as np
import pytest

from near_jax import hardware
from near_jax.train import metrics


def _read_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return f.read().splitlines()


def _read_tb_scalars(workdir):
    """(tag, step, value) of every scalar in the event files under workdir/tb (TFRecord)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            pos += 12  # length + its masked crc
            event = event_pb2.Event.FromString(data[pos : pos + length])
            pos += length + 4  # payload + its masked crc
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


def test_writer_writes_and_appends(tmp_path):
    rng = np.random.default_rng(0)
    workdir = str(tmp_path / "run")
    losses = rng.uniform(1, 5, size=3)
    t0 = time.time()
    with metrics.MetricsWriter(workdir) as w:
        w.write(10, {"loss": np.float32(losses[0]), "tokens": np.int64(4096), "mfu": None})
        w.write(20, {"loss": float(losses[1]), "lr": np.float32(3e-4)})
    # A resumed run appends to the same file.
    with metrics.MetricsWriter(workdir) as w:
        w.write(20, {"loss": losses[2], "perplexity": np.exp(losses[2])}, split="eval")

    lines = _read_lines(workdir)
    assert len(lines) == 3
    records = metrics.read_metrics(workdir)
    assert records == [json.loads(line) for line in lines]
    a, b, c = records
    assert [r["step"] for r in records] == [10, 20, 20]
    assert [r["split"] for r in records] == ["train", "train", "eval"]
    assert all(t0 - 1 <= r["time"] <= time.time() + 1 for r in records)
    assert "mfu" not in a  # None values are skipped
    assert a["tokens"] == 4096 and isinstance(a["tokens"], int)
    assert a["loss"] == pytest.approx(losses[0], rel=1e-6)
    assert b["lr"] == 3e-4  # float32 written as its shortest decimal
    assert c["perplexity"] == pytest.approx(np.exp(losses[2]))
    assert set(a) == {"step", "split", "time", "loss", "tokens"}


def _strict(line):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("filename", ["metrics.jsonl", "eval.jsonl"])
def test_non_finite_metrics_are_strict_json_null(tmp_path, filename):
    workdir = str(tmp_path / "run")
    with metrics.MetricsWriter(workdir, filename=filename) as w:
        w.write(5, {"loss": float("nan"), "grad_norm": np.float32("inf"), "lr": -np.inf})
        w.write(6, {"loss": 2.5})
    with open(os.path.join(workdir, filename)) as f:
        first, second = (_strict(line) for line in f.read().splitlines())
    assert first["loss"] is None and first["grad_norm"] is None and first["lr"] is None
    assert second["loss"] == 2.5
    assert metrics.json_line({"a": [1.0, math.nan], "b": {"c": math.inf}}) == (
        '{"a": [1.0, null], "b": {"c": null}}'
    )


def test_writer_converts_jax_scalars(tmp_path):
    import jax.numpy as jnp

    with metrics.MetricsWriter(str(tmp_path)) as w:
        w.write(1, {"loss": jnp.float32(2.5), "n": jnp.array(7), "g": jnp.array([0.5])})
    (r,) = metrics.read_metrics(str(tmp_path))
    assert r["loss"] == 2.5 and r["n"] == 7 and r["g"] == 0.5
    assert isinstance(r["n"], int) and isinstance(r["loss"], float)


def test_writer_rejects_reserved_and_non_scalars(tmp_path):
    with metrics.MetricsWriter(str(tmp_path)) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write(1, {"step": 3})
        with pytest.raises(TypeError, match="not a scalar"):
            w.write(1, {"loss": np.ones(3)})


def test_tensorboard_events(tmp_path):
    rng = np.random.default_rng(1)
    losses = rng.uniform(1, 5, size=4)
    with metrics.MetricsWriter(str(tmp_path)) as w:
        for i, loss in enumerate(losses):
            w.write(10 * (i + 1), {"loss": loss, "lr": 1e-3})
        w.write(40, {"loss": 1.5}, split="eval")
    files = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert files and all(os.path.getsize(f) > 0 for f in files)
    scalars = _read_tb_scalars(str(tmp_path))
    train_loss = [(s, v) for tag, s, v in scalars if tag == "train/loss"]
    assert [s for s, _ in train_loss] == [10, 20, 30, 40]
    np.testing.assert_allclose([v for _, v in train_loss], losses, rtol=1e-6)
    assert ("eval/loss", 40, 1.5) in scalars
    assert sum(tag == "train/lr" for tag, _, _ in scalars) == 4


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with metrics.MetricsWriter(str(workdir), enabled=False) as w:
        w.write(1, {"loss": 1.0})
    assert not workdir.exists()
    assert metrics.read_metrics(str(workdir)) == []


def test_torn_trailing_line(tmp_path):
    workdir = str(tmp_path)
    with metrics.MetricsWriter(workdir) as w:
        w.write(1, {"loss": 3.0})
        w.write(2, {"loss": 2.0})
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "split": "train", "lo')  # killed mid-line
    assert [r["step"] for r in metrics.read_metrics(workdir)] == [1, 2]

    # A resumed run's first record is not glued onto the torn fragment.
    with metrics.MetricsWriter(workdir) as w:
        w.write(3, {"loss": 1.0})
    assert [r["step"] for r in metrics.read_metrics(workdir)] == [1, 2, 3]
    assert len(_read_lines(workdir)) == 4


def test_drop_superseded():
    def r(step, split="train"):
        return {"step": step, "split": split}

    # Run reached 50 (eval at 40), was resumed from a checkpoint at 30.
    records = [r(10), r(20), r(30), r(40), r(40, "eval"), r(50), r(40), r(50), r(60)]
    kept = metrics.drop_superseded(records)
    assert [(k["step"], k["split"]) for k in kept] == [
        (10, "train"),
        (20, "train"),
        (30, "train"),
        (40, "train"),
        (50, "train"),
        (60, "train"),
    ]
    assert kept[3] is records[6]  # the resumed run's step 40
    assert metrics.drop_superseded([r(10), r(10, "eval"), r(20)]) == [r(10), r(10, "eval"), r(20)]
    # The same step and split twice (a final eval at an eval step): the later one is kept.
    records = [r(10), r(10, "eval"), r(20), r(10, "eval")]
    kept = metrics.drop_superseded(records)
    assert kept == [r(10), r(20), r(10, "eval")] and kept[2] is records[3]


def test_mfu_arithmetic():
    rng = np.random.default_rng(2)
    for _ in range(10):
        fpt = rng.uniform(1e6, 1e12)
        tps = rng.uniform(1e2, 1e6)
        n = int(rng.integers(1, 512))
        peak = rng.uniform(1e14, 1e15)
        assert metrics.mfu(fpt, tps, n, peak) == pytest.approx(fpt * tps / n / peak)
    assert metrics.mfu(6e9, 1e5, 8, 1e15) == pytest.approx(0.075)
    assert metrics.mfu(1.0, 1.0, 8, None) is None
    assert metrics.mfu(1.0, 1.0, 0, 1e15) is None


class FakeDevice:
    def __init__(self, device_kind, platform="gpu", **attrs):
        self.device_kind = device_kind
        self.platform = platform
        self.__dict__.update(attrs)


@pytest.mark.parametrize(
    "kind, platform, peak",
    [
        ("TPU v4", "tpu", 275e12),
        ("TPU v5 lite", "tpu", 197e12),
        ("TPU v5e", "tpu", 197e12),
        ("TPU v5", "tpu", 459e12),
        ("TPU v5p", "tpu", 459e12),
        ("TPU v6 lite", "tpu", 918e12),
        ("TPU7x", "tpu", 2307e12 / 2),
        ("TPU v4 lite", "tpu", None),
        ("NVIDIA A100-SXM4-80GB", "gpu", 312e12),
        ("NVIDIA A100 80GB PCIe", "gpu", 312e12),
        ("NVIDIA H100 80GB HBM3", "gpu", 989.5e12),
        ("NVIDIA H100 PCIe", "gpu", 756.5e12),
        ("NVIDIA H200", "gpu", 989.5e12),
        ("NVIDIA B200", "gpu", 2.25e15),
        ("NVIDIA GB200", "gpu", 2.5e15),
        ("NVIDIA GeForce RTX 4090", "gpu", None),
        ("cpu", "cpu", None),
    ],
)
def test_peak_lookup(kind, platform, peak):
    assert metrics.peak_flops_per_device(FakeDevice(kind, platform)) == peak


def test_peak_split_megacore_and_cpu():
    # v5p in split mode: each device is one of the chip's two TensorCores.
    assert metrics.peak_flops_per_device(FakeDevice("TPU v5", "tpu", num_cores=1)) == 459e12 / 2
    assert metrics.peak_flops_per_device(FakeDevice("TPU v5", "tpu", num_cores=2)) == 459e12
    assert metrics.peak_flops_per_device() is None  # the test devices are CPUs


def test_peak_table_order():
    keys = list(hardware.PEAK_FLOPS_BF16)
    assert all(k == k.lower() for k in keys)
    for i, earlier in enumerate(keys):
        for later in keys[i + 1 :]:
            assert earlier not in later, f"{earlier!r} shadows {later!r}"


def test_human():
    cases = {
        0: "0",
        950: "950",
        12.34: "12.3",
        21300: "21.3k",
        2662.5: "2.7k",
        999_960: "1.0M",
        1.5e9: "1.5B",
        3e12: "3.0T",
    }
    for x, want in cases.items():
        assert metrics.human(x) == want


def test_format_metrics():
    m = {
        "loss": 2.3141,
        "lr": 3e-4,
        "grad_norm": 0.8412,
        "tokens": 123456,
        "tokens_per_s": 21300.0,
        "tokens_per_s_per_device": 2662.5,
        "mfu": None,
        "step_time_s": 0.4,
    }
    want = "loss 2.314 | lr 3.0e-04 | grad_norm 0.84 | tok/s 21.3k | tok/s/dev 2.7k | mfu n/a"
    assert metrics.format_metrics(m) == want
    assert metrics.format_metrics({"mfu": 0.4123}) == "mfu 41.2%"
    assert metrics.format_metrics({"loss": 2.0, "perplexity": 7.389}) == "loss 2.000 | ppl 7.39"
    assert metrics.format_metrics({"aux": 0.123456, "x": None}) == "aux 0.1235 | x n/a"


def test_progress_lines(caplog):
    m = {"loss": 2.3141, "lr": 3e-4, "tokens_per_s": 21300.0, "mfu": None}
    with caplog.at_level(logging.INFO, logger="absl"):
        p = metrics.Progress(300, mode="lines", initial_step=100)
        assert p.mode == "lines"
        p.update(120, m)
        p.update(140, m)
        p.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2
    assert lines[0].startswith("step 120/300 | loss 2.314 | lr 3.0e-04 | tok/s 21.3k | mfu n/a | ")
    assert lines[1].startswith("step 140/300 | ")
    assert " elapsed, eta " in lines[1]


def test_progress_bar_without_tty(capsys):
    p = metrics.Progress(300, mode="bar", initial_step=100)
    assert p.mode == "bar"
    p.update(120, {"loss": 2.5, "tokens_per_s": 21300.0, "mfu": 0.4})
    p.update(140, {"loss": 2.4, "tokens_per_s": 21000.0, "mfu": None})
    p.update(140, {"loss": 2.4})  # no progress: nothing to add
    assert p._bar.n == 140
    p.log("eval | loss 2.500")
    p.close()
    p.close()  # idempotent
    err = capsys.readouterr().err
    assert "140/300" in err and "eval | loss 2.500" in err


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_auto_mode(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    assert metrics.Progress(10, mode="auto").mode == "lines"
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    p = metrics.Progress(10, mode="auto")
    assert p.mode == "bar"
    p.close()
    with pytest.raises(ValueError, match="progress mode"):
        metrics.Progress(10, mode="fancy")
