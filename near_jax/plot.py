"""Plots a run's train and eval loss: `python -m near_jax.plot --workdir=W [--out=W/loss.png]`.

Reads `W/metrics.jsonl` and writes one PNG with two panels: loss vs step, and loss vs tokens
seen (an eval point takes the token count of the last train record at or before its step).
Records that a resumed run superseded are left out (`metrics.drop_superseded`). Problems with
the input (no workdir, no metrics file, no loss records) print one line on stderr and exit 2.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

from near_jax.train import metrics as metrics_lib


class PlotError(Exception):
    """An input problem, reported as one line on stderr."""


def loss_series(records: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per split ("train", "eval"; absent if it has no loss): lists `step` and `loss`, and for
    the points that have a token count, `tok_step`, `tokens` and `tok_loss`.

    An eval point takes the tokens of the last train record at or before its step.
    """
    records = sorted(metrics_lib.drop_superseded(records), key=lambda r: r["step"])
    train_tokens = [
        (r["step"], r["tokens"])
        for r in records
        if r.get("split") == "train" and r.get("tokens") is not None
    ]
    out: dict[str, dict[str, list[float]]] = {}
    for split in ("train", "eval"):
        series: dict[str, list[float]] = {
            "step": [],
            "loss": [],
            "tok_step": [],
            "tokens": [],
            "tok_loss": [],
        }
        j, tokens = 0, None  # walk train_tokens alongside the sorted records
        for r in records:
            if r.get("split") != split or r.get("loss") is None:
                continue
            while j < len(train_tokens) and train_tokens[j][0] <= r["step"]:
                tokens = train_tokens[j][1]
                j += 1
            series["step"].append(r["step"])
            series["loss"].append(float(r["loss"]))
            if tokens is not None:
                series["tok_step"].append(r["step"])
                series["tokens"].append(float(tokens))
                series["tok_loss"].append(float(r["loss"]))
        if series["step"]:
            out[split] = series
    return out


def plot_loss(workdir: str, out: str | None = None) -> str:
    """Writes the loss plot of `workdir` to `out` (default `workdir/loss.png`); returns the path.

    Raises PlotError when there is nothing to plot.
    """
    if not os.path.isdir(workdir):
        raise PlotError(f"workdir {workdir} does not exist (or is not a directory)")
    path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    if not os.path.isfile(path):
        raise PlotError(f"no {metrics_lib.METRICS_FILE} in {workdir}")
    series = loss_series(metrics_lib.read_metrics(workdir))
    if not series:
        raise PlotError(f"no loss records in {path}")
    out = out or os.path.join(workdir, "loss.png")

    # Figure + the Agg canvas directly: no pyplot global state, no display needed.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font-cache chatter
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_tokens = fig.subplots(1, 2)
    style = {"train": {"lw": 1.2}, "eval": {"marker": "o", "ms": 4, "lw": 1.2}}
    for split, s in series.items():
        by_step.plot(s["step"], s["loss"], label=split, **style[split])
        if s["tokens"]:
            by_tokens.plot(s["tokens"], s["tok_loss"], label=split, **style[split])
    by_step.set_xlabel("step")
    by_tokens.set_xlabel("tokens")
    by_tokens.xaxis.set_major_formatter(EngFormatter(sep=""))  # 500k, 1M, 1.5M
    if not any(s["tokens"] for s in series.values()):
        by_tokens.text(
            0.5,
            0.5,
            "no token counts recorded",
            ha="center",
            va="center",
            transform=by_tokens.transAxes,
        )
    for ax in (by_step, by_tokens):
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(os.path.basename(os.path.normpath(workdir)) or workdir)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _define_flags() -> None:
    # Defined only when run as a program, so importing this module next to others that define
    # --workdir (train, eval) cannot clash.
    flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.")
    flags.DEFINE_string("out", "", "Output PNG; default WORKDIR/loss.png.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"plot: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    workdir, out = flags.FLAGS.workdir, flags.FLAGS.out
    if not workdir:
        print("plot: --workdir is required", file=sys.stderr)
        return 2
    try:
        path = plot_loss(workdir, out or None)
    except PlotError as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"plot: cannot write {out or os.path.join(workdir, 'loss.png')}: {e}", file=sys.stderr
        )
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
