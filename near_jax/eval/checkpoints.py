"""Evaluating a run's checkpoints from the command line.

    python -m near_jax.eval --workdir=/tmp/near_jax_tiny                # the latest step
    python -m near_jax.eval --workdir=RUN --all --tasks=python_syntax   # every step
    python -m near_jax.eval --workdir=RUN --watch                       # each new step

For each checkpoint: held-out loss, perplexity and bits per byte (`heldout.py`: the run's
validation split, or every document of `--data`), and the accuracy of multiple-choice tasks
(`tasks.py`, `--tasks`). Results are appended to `RUN/eval.jsonl` (one line per step, split
"checkpoint_eval") and TensorBoard (`RUN/tb/`, tags `checkpoint_eval/...`), and printed as
a table. Params are restored onto a mesh of this machine's devices (`--fsdp`, `--tensor`).

`--watch` evaluates the latest step, then polls for new committed checkpoints every
`--poll_seconds`. It exits when the run has reached its `train.steps`, or when no new
checkpoint has appeared for `--idle_timeout` seconds, so it never waits forever.

A step that cannot be read is skipped with a one-line warning and the others are evaluated;
the program then ends with a line saying which steps were skipped, and exit status 1.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from near_jax.eval import heldout, taskfile, tasks
from near_jax.infer import loading
from near_jax.train import metrics

EVAL_FILE = "eval.jsonl"
SPLIT = "checkpoint_eval"


class Evaluator:
    """Evaluates checkpoints of one run with fixed held-out data and tasks."""

    def __init__(
        self,
        workdir: str,
        *,
        data: str = "",
        max_tokens: int = 131072,
        task_names: tuple[str, ...] = (),
        num_fewshot: int = 0,
        batch_size: int = 16,
        fsdp: int = 1,
        tensor: int = 1,
    ):
        self.workdir = workdir
        self.data, self.max_tokens = data, max_tokens
        self.task_paths = [taskfile.resolve_task(t) for t in task_names]
        for path in self.task_paths:
            taskfile.load_task(path)  # a malformed task fails now, not after the first step
        self.num_fewshot, self.batch_size = num_fewshot, batch_size
        self.mesh = loading.inference_mesh(fsdp, tensor)
        self._heldout: heldout.HeldOut | None = None
        self.skipped: dict[int, str] = {}  # step -> why it could not be read (one line)
        self.train_steps: int | None = None  # the run's train.steps, from the last step read

    def _held_out(self, run: loading.LoadedRun) -> heldout.HeldOut:
        if self._heldout is None:  # the same documents for every step of the run
            data_cfg = run.cfg.data.copy_and_resolve_references()
            if self.data:
                data_cfg.source = self.data
            self._heldout = heldout.load_heldout(
                data_cfg, run.tokenizer, max_tokens=self.max_tokens, all_docs=bool(self.data)
            )
        return self._heldout

    def evaluate(self, step: int | None) -> dict[str, Any]:
        """Evaluates one step (None: the latest); returns the record written to eval.jsonl."""
        start = time.perf_counter()
        run = loading.load_run(self.workdir, step, self.mesh)
        self.train_steps = int(run.cfg.train.steps)
        held = self._held_out(run)
        result = heldout.evaluate_heldout(
            run.params, run.model_cfg, run.mesh, held, batch_size=self.batch_size
        )
        record: dict[str, Any] = {"step": run.step, "data": held.source, **result}
        for path in self.task_paths:
            task = tasks.evaluate_task(
                run.params,
                run.model_cfg,
                run.tokenizer,
                path,
                max_len=run.cfg.data.seq_len,
                num_fewshot=self.num_fewshot,
                mesh=run.mesh,
                batch_size=2 * self.batch_size,
            )
            for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"):
                record[f"{task['task']}/{key}"] = task[key]
        record["seconds"] = time.perf_counter() - start
        return record

    def try_evaluate(self, step: int, log=print) -> dict[str, Any] | None:
        """evaluate(step), or None with a warning (kept in `skipped`) if it cannot be read."""
        try:
            return self.evaluate(step)
        except loading.CheckpointUnreadable as e:
            log(f"{e}; skipped", file=sys.stderr)
            self.skipped[step] = str(e)
            return None


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


class Table:
    """Prints one row per evaluated step, with a header before the first."""

    def __init__(self):
        self.columns: list[str] | None = None

    def row(self, record: dict[str, Any]) -> None:
        if self.columns is None:
            self.columns = ["step", "loss", "perplexity", "bits_per_byte", "tokens"] + [
                k for k in record if k.endswith("/acc") or k.endswith("/acc_norm")
            ]
            print("  ".join(f"{c:>14}" for c in self.columns))
        print("  ".join(f"{_fmt(record.get(c)):>14}" for c in self.columns), flush=True)


def _record(writer: metrics.MetricsWriter, table: Table, record: dict[str, Any]) -> None:
    values = {k: v for k, v in record.items() if k != "step"}
    writer.write(record["step"], values, split=SPLIT)
    table.row(record)


def run_once(
    evaluator: Evaluator, steps: list[int | None], *, skip_unreadable: bool = False
) -> list[dict[str, Any]]:
    """Evaluates the given steps in order, writing and printing each.

    A step that cannot be read raises loading.CheckpointUnreadable, or with `skip_unreadable`
    is skipped with a warning (see `Evaluator.skipped`). None is the latest readable step.
    """
    loading.committed_steps(evaluator.workdir)  # a missing run fails before anything is written
    table, out = Table(), []
    with metrics.MetricsWriter(evaluator.workdir, filename=EVAL_FILE) as writer:
        for step in steps:
            if step is None or not skip_unreadable:
                record = evaluator.evaluate(step)
            elif (record := evaluator.try_evaluate(step)) is None:
                continue
            _record(writer, table, record)
            out.append(record)
    return out


def watch(
    evaluator: Evaluator, *, poll_seconds: float, idle_timeout: float, log=print
) -> list[dict[str, Any]]:
    """Evaluates each new checkpoint as it lands until the run is finished or goes idle.

    It starts from the latest step that can be read; steps that cannot are skipped (see
    `Evaluator.skipped`), so a damaged checkpoint never stops it.
    """
    table, out, done = Table(), [], set()
    last_new = time.monotonic()
    with metrics.MetricsWriter(evaluator.workdir, filename=EVAL_FILE) as writer:
        while True:
            try:
                steps = loading.committed_steps(evaluator.workdir)
            except loading.RunError:
                steps = []  # the run has not saved its first checkpoint yet
            forward = bool(out)
            if forward:  # after the first step read, every newer one in order
                new = [s for s in steps if s > max(done)]
            else:  # the latest readable one first: older steps only while newer ones fail
                new = [s for s in reversed(steps) if s not in done]
            for step in new:
                try:
                    record = evaluator.try_evaluate(step, log)
                except loading.RunError as e:  # e.g. deleted by checkpoint.keep meanwhile
                    log(f"step {step} skipped: {e}", file=sys.stderr)
                    record = None
                done.add(step)
                if record is None:
                    continue
                _record(writer, table, record)
                out.append(record)
                last_new = time.monotonic()
                if not forward:
                    break
            target = evaluator.train_steps
            if done and target is not None and max(done) >= target:
                log(f"run finished at step {max(done)}; stopping", file=sys.stderr)
                return out
            if time.monotonic() - last_new > idle_timeout:
                log(f"no new checkpoint for {idle_timeout:.0f} s; stopping", file=sys.stderr)
                return out
            time.sleep(poll_seconds)


# ----------------------------------------------------------------------------- command line
