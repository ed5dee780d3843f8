"""The one prepared command for a lent GPU: install the wheels it lacks, then run each part.

    bench/accelerator/run.sh [--dry-run] [--parts=tests,attention,train,serve,diloco]
        [--out=DIR] [--no-install]

Parts, in order, each under its own time budget (killed at it, with its children; a part's
failure or timeout never stops the next; the GPU budgets add up to under 8 minutes):
  tests      the GPU-relevant test files (model, attention, train, checkpoint) on the GPU
  attention  bench/attention.py: pallas, cudnn, xla; fwd and fwd+bwd; bf16, head_dim 128,
             L 2048-8192, GQA 4:1, causal, unpacked and 4 packed documents per row
  train      bench/train_throughput.py at the 0.5B rung's shape (m500m, batch 8 x 4096) on
             one device, once per remat choice: tokens/s, MFU, memory
  serve      bench/serve.py --preset=gpu: 32 requests, 1 and 32 clients
  diloco     bench/diloco.py --preset=gpu: its shortest rows (M=2, H=25, 50 steps)
Each writes DIR/<part>.json (status, seconds, the bench's JSON or its rows so far, the log's
tail); DIR/run.txt gathers the environment and every part's table; DIR/run.json the
summary. DIR is $OUT where set (the device tool), else ./accelerator_out. At most 8 files,
so the device tool brings them all back.

Install (skipped by --dry-run and --no-install): bench/accelerator/wheels.txt's wheels from
.whl/ (bench/accelerator/fetch_wheels.sh puts them there) with pip --no-index --no-deps, so
the image's jax, CUDA and numpy stay as they are; protobuf only if the image's is older than
grain needs.

--dry-run runs every part at toy size on the CPU (tests/test_bench_accelerator.py does, in
the suite), so the command cannot rot between the sessions that have a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WHEELS = REPO / ".whl"
TAIL_LINES = 60  # of a part's log, in its JSON
# Protobuf comes along as a fallback only: grain needs >= 5.28.3.
PROTOBUF_MIN = (5, 28, 3)

# The GPU-relevant test files: the model, attention, the train step, checkpoints.
TEST_FILES = [
    "tests/test_transformer.py",
    "tests/test_layers.py",
    "tests/test_loss.py",
    "tests/test_attention.py",
    "tests/test_flash_attention.py",
    "tests/test_flash_blocks.py",
    "tests/test_step.py",
    "tests/test_train.py",
    "tests/test_checkpoint.py",
]
DRY_TEST_FILES = ["tests/test_hardware.py"]  # the plumbing, not the GPU
ATTENTION_SHAPES = "4,2048,32,8,128;2,4096,32,8,128;1,8192,32,8,128"  # B,L,H,G,K: GQA 4:1
REMATS = ("full", "dots_saveable", "none")


@dataclasses.dataclass
class Part:
    """A named list of commands sharing one time budget; `rows` is a JSONL file they fill."""

    name: str
    budget_s: float
    commands: list[list[str]]
    rows: Path | None = None


def python() -> str:
    return sys.executable


def parts_for(dry_run: bool, tmp: Path) -> dict[str, Part]:
    """Every part's commands: the GPU sizes, or toy sizes on the CPU for `dry_run`."""
    py = python()
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_rows"]
    tests += DRY_TEST_FILES if dry_run else TEST_FILES
    attention = [py, "bench/attention.py", f"--rows_out={tmp / 'attention.jsonl'}"]
    if dry_run:
        attention += ["--quick", "--shapes=1,128,4,1,128", "--segments=0,2", "--impls=pallas,xla"]
    else:
        attention += ["--impls=pallas,cudnn,xla", f"--shapes={ATTENTION_SHAPES}"]
        attention += ["--segments=0,4", "--iters=10", "--warmup=2"]
    if dry_run:
        shape = ["--config=configs/tiny.py", "--config.model.n_layers=2", "--steps=2"]
        shape += ["--config.data.seq_len=64", "--config.train.global_batch_size=4", "--warmup=1"]
        remats = REMATS[:2]
    else:
        shape = [
            "--config=configs/ladder.py:m500m",
            "--config.mesh.data=1",
            "--config.mesh.fsdp=-1",
            "--config.train.microbatches=1",
            "--config.train.global_batch_size=8",
            "--steps=5",
            "--warmup=1",
        ]
        remats = REMATS
    train = [
        [py, "bench/train_throughput.py", *shape, f"--config.model.remat={remat}"]
        for remat in remats
    ]
    serve = [py, "bench/serve.py", "--repeats=1"]
    if dry_run:
        serve += ["--requests=4", "--max_tokens=4", "--prompt_len=8", "--context=32"]
        serve += ["--concurrency=1,2", "--slots=2", "--prefill_chunk=8"]
    else:
        serve += ["--preset=gpu", "--requests=32", "--max_tokens=48", "--concurrency=1,32"]
    diloco = [py, "bench/diloco.py", f"--rows={tmp / 'diloco.jsonl'}", "--dp-lrs=2e-3"]
    diloco += ["--outer-lrs=0.7", "--replicas=2", "--sparse=", "--compression=int4"]
    if dry_run:
        diloco += ["--steps=4", "--inner=2", "--groups=1"]
    else:
        diloco += ["--preset=gpu", "--steps=50", "--inner=25"]
    budgets = dict(tests=140, attention=100, train=120, serve=45, diloco=45)
    if dry_run:
        budgets = dict(tests=60, attention=60, train=90, serve=60, diloco=60)
    return {
        "tests": Part("tests", budgets["tests"], [tests], tmp / "tests.jsonl"),
        "attention": Part("attention", budgets["attention"], [attention], tmp / "attention.jsonl"),
        "train": Part("train", budgets["train"], train),
        "serve": Part("serve", budgets["serve"], [serve]),
        "diloco": Part("diloco", budgets["diloco"], [diloco], tmp / "diloco.jsonl"),
    }


def child_env(dry_run: bool, rows: Path | None) -> dict[str, str]:
    """The parts' environment: the GPU first (CPU too, for tests that ask for it), the repo
    and bench/ importable, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu" if dry_run else "cuda,cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "bench"), str(HERE), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    if rows is not None:
        env["NEAR_JAX_TEST_ROWS"] = str(rows)
    return env


def run_commands(
    commands: list[list[str]], budget_s: float, env: dict[str, str], cwd: Path = REPO
) -> dict[str, Any]:
    """Runs `commands` one after another inside one budget; each runs in its own process
    group, killed with its children when the budget runs out. Returns status (ok | failed |
    timed_out), the exit codes, seconds and the combined output."""
    start = time.monotonic()
    output: list[str] = []
    codes: list[int | None] = []
    status = "ok"
    for cmd in commands:
        left = budget_s - (time.monotonic() - start)
        if left <= 0:
            status = "timed_out"
            output.append(f"[run.py] not started, budget spent: {' '.join(cmd)}\n")
            codes.append(None)
            continue
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            status = "timed_out"
            out += f"\n[run.py] killed at the part's {budget_s:.0f} s budget\n"
        output.append(out)
        codes.append(proc.returncode)
        if proc.returncode != 0 and status == "ok":
            status = "failed"
    return {
        "status": status,
        "returncodes": codes,
        "seconds": round(time.monotonic() - start, 1),
        "output": "".join(output),
    }


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects printed one per line (the benches' result lines)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{") and line.endswith("}"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def read_rows(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tests_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Outcome counts and the failing tests with their last message line."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    failures = [r for r in rows if r["outcome"] in ("failed", "error")]
    return {"counts": counts, "failures": failures}


def run_part(part: Part, dry_run: bool, out: Path) -> dict[str, Any]:
    """Runs one part and writes out/<name>.json; returns that record."""
    if part.rows is not None and part.rows.exists():
        part.rows.unlink()
    result = run_commands(part.commands, part.budget_s, child_env(dry_run, part.rows))
    text = result.pop("output")
    rows = read_rows(part.rows)
    record: dict[str, Any] = {
        "part": part.name,
        "dry_run": dry_run,
        "budget_s": part.budget_s,
        **result,
        "commands": [" ".join(c) for c in part.commands],
        "results": json_lines(text),
        "log_tail": text.splitlines()[-TAIL_LINES:],
    }
    if part.name == "tests":
        record["summary"] = tests_summary(rows)
        if result["status"] == "ok" and not rows:
            record["status"] = "failed"  # pytest passed without a test reporting: no plugin
    elif rows:
        record["rows"] = rows
    if part.name != "tests" and result["status"] == "ok" and not record["results"]:
        record["status"] = "failed"  # a bench that ended without its JSON line
    (out / f"{part.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    record["text"] = text
    return record


def installed_version(name: str) -> tuple[int, ...] | None:
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def wanted_wheels(wheels_txt: Path = HERE / "wheels.txt") -> list[str]:
    """wheels.txt's pins; protobuf only when the installed one is missing or too old."""
    pins = []
    for line in wheels_txt.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("protobuf=="):
            have = installed_version("protobuf")
            if have is not None and have >= PROTOBUF_MIN:
                continue
        pins.append(line)
    return pins


def install(out_lines: list[str]) -> bool:
    """pip-installs the wanted wheels from .whl/ offline and without dependencies."""
    if not WHEELS.is_dir():
        out_lines.append(f"install: no {WHEELS}; run bench/accelerator/fetch_wheels.sh here")
        return False
    cmd = [python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--disable-pip-version-check", "--find-links", str(WHEELS), *wanted_wheels()]
    result = run_commands([cmd], 120, dict(os.environ))
    out_lines.append(f"install ({result['seconds']} s, {result['status']}): {' '.join(cmd)}")
    out_lines.extend(result["output"].splitlines()[-20:])
    return result["status"] == "ok"


def environment(dry_run: bool) -> list[str]:
    """Python, jax, the devices and the GPU's line of nvidia-smi, as text lines."""
    lines = [f"python {platform.python_version()} ({sys.executable}) on {platform.node()}"]
    probe = (
        "import jax, sys; d = jax.devices(); "
        "print('jax', jax.__version__, jax.default_backend(), len(d), d[0].device_kind)"
    )
    result = run_commands([[python(), "-c", probe]], 120, child_env(dry_run, None))
    lines += result["output"].strip().splitlines()[-3:]
    if not dry_run:
        smi = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"]
        try:
            lines += subprocess.run(smi, capture_output=True, text=True, timeout=20).stdout.split(
                "\n"
            )[1:2]
        except (OSError, subprocess.SubprocessError) as e:
            lines.append(f"nvidia-smi: {e}")
    return lines


def table_text(text: str) -> str:
    """A part's output without its JSON lines (which are in its JSON file)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("{"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--parts", default="", help="comma list; default: all, in order")
    parser.add_argument("--out", default="", help="default: $OUT, else ./accelerator_out")
    parser.add_argument("--no-install", action="store_true", help="skip the wheel install")
    args = parser.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or REPO / "accelerator_out")
    tmp = Path(tempfile.mkdtemp(prefix="near_jax_accelerator_"))
    everything = parts_for(args.dry_run, tmp)
    names = [p for p in args.parts.split(",") if p] or list(everything)
    unknown = [n for n in names if n not in everything]
    if unknown:
        parser.error(f"--parts: unknown {','.join(unknown)}; choose from {','.join(everything)}")
    out.mkdir(parents=True, exist_ok=True)

    start = time.monotonic()
    lines = [f"bench/accelerator/run.py {' '.join(argv if argv is not None else sys.argv[1:])}"]
    installed = None
    if not (args.dry_run or args.no_install):
        installed = install(lines)
    lines += environment(args.dry_run)
    print("\n".join(lines), flush=True)
    summary: dict[str, Any] = {"dry_run": args.dry_run, "installed": installed, "parts": {}}
    for name in names:
        record = run_part(everything[name], args.dry_run, out)
        text = record.pop("text")
        took = f"{record['status']} in {record['seconds']} s (budget {record['budget_s']} s)"
        head = f"== {name}: {took}"
        body = table_text(text)
        if name == "tests":
            body = "\n".join(
                [json.dumps(record["summary"]["counts"])]
                + [
                    f"{r['outcome']}: {r['test']}: {r.get('message', '')}"
                    for r in record["summary"]["failures"]
                ]
                + body.splitlines()[-5:]
            )
        lines += ["", head, body]
        print(f"\n{head}\n{body}", flush=True)
        summary["parts"][name] = {k: record[k] for k in ("status", "seconds", "returncodes")}
    summary["seconds"] = round(time.monotonic() - start, 1)
    lines += ["", f"total {summary['seconds']} s"]
    (out / "run.txt").write_text("\n".join(lines) + "\n")
    (out / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ntotal {summary['seconds']} s; files in {out}", flush=True)
    return 0 if all(p["status"] == "ok" for p in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
