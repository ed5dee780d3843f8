"""Metrics: JSONL + TensorBoard writers, MFU, and the progress display.

A run directory holds `metrics.jsonl` (one JSON object per line: `step`, `split`, `time`, and
the metrics; strict JSON, so a NaN or infinite metric is null) and `tb/` (TensorBoard event
files). The JSONL file is the source of truth: it is
appended to across restarts and read back by `read_metrics` (and `python -m near_jax.plot`).

Train metrics: loss, lr, grad_norm, tokens (cumulative), tokens_per_s, tokens_per_s_per_device,
mfu (None when the peak FLOP/s of the device is unknown), step_time_s. Eval: loss, perplexity.

Heavy imports (jax, tensorboardX, tqdm) happen only where they are needed, so reading and
plotting metrics stays quick.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import logging

from near_jax.hardware import PEAK_FLOPS_BF16

if TYPE_CHECKING:
    import jax

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

# Chips with two TensorCores that JAX shows as one "megacore" device by default; a device with
# `num_cores == 1` on them is half a chip (split mode).
_MEGACORE_KINDS = ("tpu v4", "tpu v5p", "tpu v5")


def _peak_for_kind(device_kind: str) -> float | None:
    kind = device_kind.lower()
    if "lite" in kind and kind.startswith("tpu v4"):
        return None  # TPU v4i ("TPU v4 lite") is not a v4; its peak is not in the table.
    for key, peak in PEAK_FLOPS_BF16.items():
        if key in kind:
            return peak
    return None


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of `device` (default: `jax.devices()[0]`); None if unknown/CPU."""
    if device is None:
        import jax

        device = jax.devices()[0]
    if getattr(device, "platform", "") == "cpu":
        return None
    kind = str(getattr(device, "device_kind", ""))
    peak = _peak_for_kind(kind)
    if peak is not None and kind.lower().startswith(_MEGACORE_KINDS):
        if getattr(device, "num_cores", None) == 1:
            peak /= 2
    return peak


def mfu(
    flops_per_token: float, tokens_per_s: float, num_devices: int, peak: float | None
) -> float | None:
    """Model FLOPs utilization in [0, 1]: achieved FLOP/s over the devices' total peak.

    `flops_per_token` counts the forward and backward pass (about 6 x params + attention);
    `tokens_per_s` is over all devices; `peak` is per device. None when `peak` is None or
    not positive, or `num_devices` is not positive.
    """
    if peak is None or peak <= 0 or num_devices <= 0:
        return None
    return flops_per_token * tokens_per_s / (num_devices * peak)


def _to_number(name: str, value: Any) -> int | float:
    """A Python int or float from a Python, numpy or jax scalar (integers stay integers)."""
    dtype = getattr(value, "dtype", None)
    if getattr(value, "size", None) == 1 and hasattr(value, "item"):
        value = value.item()  # numpy / jax scalar or 1-element array -> Python scalar
    if isinstance(value, numbers.Integral):
        return int(value)  # bool included
    try:
        if dtype is not None and dtype.kind == "f" and dtype.itemsize <= 4:
            # The shortest decimal that is the same float32: 3e-4, not 0.0003000000142492354.
            return float(str(np.float32(value)))
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {name!r} is not a scalar: {value!r}") from e


_RESERVED = ("step", "split", "time")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def json_line(record: Mapping[str, Any]) -> str:
    """`record` as strict JSON (no newline): NaN and ±Inf become null, which every parser
    reads; Python's default writes bare NaN/Infinity, which strict parsers reject."""
    return json.dumps(_finite_or_none(record), allow_nan=False)


class MetricsWriter:
    """Appends metrics to `workdir/metrics.jsonl` (or `filename`) and TensorBoard scalars to
    `workdir/tb/`.

    Use one per run on process 0; other processes pass `enabled=False` and write nothing.
    Each `write` flushes, so a crash loses at most the line being written. Appending to an
    existing file (a resumed run) keeps its lines; a torn last line left by a killed process
    is closed with a newline first so it cannot corrupt the next record.
    """

    def __init__(self, workdir: str, enabled: bool = True, filename: str = METRICS_FILE):
        self.workdir = workdir
        self.enabled = enabled
        self.path = os.path.join(workdir, filename)
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        torn = False
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        if torn:
            self._file.write("\n")
            self._file.flush()

        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir=os.path.join(workdir, TB_DIR), flush_secs=5)

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Records `metrics` (numbers; strings go to the JSONL only; None skipped) at `step`.

        A NaN or infinite value is null in the JSONL (strict JSON) and NaN/Inf in TensorBoard.
        """
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsWriter.write after close()")
        step = int(step)
        values = {}
        for name, value in metrics.items():
            if name in _RESERVED:
                raise ValueError(f"metric name {name!r} is reserved ({', '.join(_RESERVED)})")
            if isinstance(value, str):
                values[name] = value  # a label (JSONL only; TensorBoard takes numbers)
            elif value is not None:
                values[name] = _to_number(name, value)
        record = {"step": step, "split": split, "time": time.time(), **values}
        self._file.write(json_line(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            if not isinstance(value, str):
                self._tb.add_scalar(f"{split}/{name}", value, global_step=step)
        self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of `workdir/metrics.jsonl` in file order; [] if there is no such file.

    Lines that do not parse (a torn last line from a killed process) are skipped; a bad line
    that is not the last one is also reported with a warning.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "step" not in record:
            if i != len(lines) - 1:
                logging.warning("%s:%d: skipping an unparseable line", path, i + 1)
            continue
        records.append(record)
    return records


def drop_superseded(records: Iterable[dict]) -> list[dict]:
    """The records of the latest timeline of a run that was resumed from a checkpoint.

    A record whose step is before the last kept record of its split marks a restart at that
    step: every kept record (of any split) at or after that step came from the abandoned
    attempt and is dropped. A record at the same step and split as an earlier one replaces it.
    """
    kept: list[dict] = []
    last: dict[str, int] = {}  # split -> its largest kept step
    for r in records:
        split, step = r.get("split", "train"), r["step"]
        if split in last and step <= last[split]:
            if step < last[split]:
                kept = [k for k in kept if k["step"] < step]
            else:
                kept = [k for k in kept if (k["step"], k.get("split", "train")) != (step, split)]
            last = {}
            for k in kept:
                s = k.get("split", "train")
                last[s] = max(last.get(s, k["step"]), k["step"])
        kept.append(r)
        last[split] = step
    return kept


# ---------------------------------------------------------------------------------------------
# Human-readable formatting and the progress display.


def human(x: float) -> str:
    """21300 -> '21.3k', 1.25e9 -> '1.2B'; values under 1000 keep one decimal at most."""
    if not math.isfinite(x):
        return str(x)
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale * 0.99995:
            return f"{x / scale:.1f}{suffix}"
    return f"{x:.1f}".removesuffix(".0") if x != int(x) else str(int(x))


def _fmt(fmt: str, value: Any) -> str:
    return "n/a" if value is None else format(float(value), fmt)


# Display order, label and formatter of known metrics; `tokens` and `step_time_s` stay in the
# JSONL/TensorBoard and out of the log line to keep it short. Unknown metrics follow, as `.4g`.
_DISPLAY = (
    ("loss", "loss", lambda v: _fmt(".3f", v)),
    ("perplexity", "ppl", lambda v: _fmt(".2f", v)),
    ("lr", "lr", lambda v: _fmt(".1e", v)),
    ("grad_norm", "grad_norm", lambda v: _fmt(".2f", v)),
    ("tokens_per_s", "tok/s", lambda v: "n/a" if v is None else human(float(v))),
    ("tokens_per_s_per_device", "tok/s/dev", lambda v: "n/a" if v is None else human(float(v))),
    ("mfu", "mfu", lambda v: "n/a" if v is None else f"{100 * float(v):.1f}%"),
)
_HIDDEN = ("tokens", "step_time_s")


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """'loss 2.314 | lr 3.0e-04 | grad_norm 0.84 | tok/s 21.3k | tok/s/dev 2.7k | mfu 41.2%'."""
    parts = [f"{label} {f(metrics[key])}" for key, label, f in _DISPLAY if key in metrics]
    known = {key for key, _, _ in _DISPLAY} | set(_HIDDEN)
    parts += [f"{k} {_fmt('.4g', v)}" for k, v in metrics.items() if k not in known]
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Training progress: a tqdm bar on a terminal, or plain log lines (for files and pods).

    `mode` is config `train.progress`: "bar", "lines", or "auto" (bar iff stderr is a TTY).
    `update(step, metrics)` is called at log steps only; the bar advances by the step delta.
    """

    MODES = ("auto", "bar", "lines")

    def __init__(self, total_steps: int, mode: str = "auto", initial_step: int = 0):
        if mode not in self.MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {' | '.join(self.MODES)}")
        if mode == "auto":
            mode = "bar" if _stderr_is_tty() else "lines"
        self.mode = mode
        self.total_steps = int(total_steps)
        self.step = int(initial_step)
        self._initial_step = self.step
        self._t0 = time.monotonic()
        self._first: tuple[float, int] | None = None  # (time, step) of the first update
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def _eta(self, now: float, step: int) -> str:
        # The rate since the first update leaves out compilation; until there is a second
        # update, the rate since start-up is the best there is.
        if self._first is not None and step > self._first[1]:
            t_ref, s_ref = self._first
        else:
            t_ref, s_ref = self._t0, self._initial_step
        if step <= s_ref or now <= t_ref:
            return "?"
        return _duration((self.total_steps - step) * (now - t_ref) / (step - s_ref))

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Shows `metrics` at `step` (a log step; steps since the last update count as done)."""
        step = int(step)
        now = time.monotonic()
        if self._bar is not None:
            postfix = []
            if metrics.get("loss") is not None:
                postfix.append(f"loss {float(metrics['loss']):.3f}")
            if metrics.get("tokens_per_s") is not None:
                postfix.append(f"tok/s {human(float(metrics['tokens_per_s']))}")
            if metrics.get("mfu") is not None:
                postfix.append(f"mfu {100 * float(metrics['mfu']):.1f}%")
            self._bar.set_postfix_str(", ".join(postfix), refresh=False)
            if step > self.step:
                self._bar.update(step - self.step)
            else:
                self._bar.refresh()
        else:
            eta = self._eta(now, step)
            logging.info(
                "step %d/%d | %s | %s elapsed, eta %s",
                step,
                self.total_steps,
                format_metrics(metrics),
                _duration(now - self._t0),
                eta,
            )
        if self._first is None:
            self._first = (now, step)
        self.step = max(self.step, step)

    def log(self, message: str) -> None:
        """Logs a line without breaking the bar (tqdm.write on a bar, logging.info otherwise)."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            logging.info("%s", message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
