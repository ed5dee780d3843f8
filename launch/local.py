"""Runs N training processes on this machine: a real multi-process JAX job on CPU.

    python -m launch.local -n 4 -- --config=configs/tiny.py --workdir=/tmp/run4
    python -m launch.local -n 2 -- python -m near_jax.diloco.island --island=eu-1 ...

Each process gets `--devices_per_process` simulated CPU devices (XLA's host device count),
joins the job through `jax.distributed` on localhost (gloo collectives), and trains over a
mesh spanning all processes' devices; its data pipeline reads its own share of the documents,
and only process 0 writes metrics. After `--` come the train flags, or a whole command
starting with `python` (run with this interpreter: e.g. a multi-host island). Output lines
are prefixed with `[i]`. The exit status is 0 when every process succeeds; otherwise the
first failure's status, and the others are stopped.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time

from launch import TRAIN_MODULE, ArgumentParser, split_train_args

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
    """A TCP port that is free on localhost right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(
    base: dict[str, str], index: int, count: int, port: int, devices: int
) -> dict[str, str]:
    """The environment of process `index`: CPU platform, its device count, the job's address."""
    env = dict(base)
    xla = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{xla} --xla_force_host_platform_device_count={devices}".strip()
    env.update(
        JAX_PLATFORMS="cpu",
        NEAR_JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        NEAR_JAX_NUM_PROCESSES=str(count),
        NEAR_JAX_PROCESS_ID=str(index),
        PYTHONUNBUFFERED="1",
    )
    # The repo root on the path, so `-m launch._worker` resolves from any working directory.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _pump(index: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[{index}] {line}")
        out.flush()
    stream.close()


def run(
    train_args: list[str],
    num_processes: int,
    devices_per_process: int = 1,
    timeout_s: float = 0,
    module: str = TRAIN_MODULE,
) -> int:
    """Starts the processes, streams their output, and returns the job's exit status."""
    port = free_port()
    procs, pumps = [], []
    for i in range(num_processes):
        env = process_env(dict(os.environ), i, num_processes, port, devices_per_process)
        proc = subprocess.Popen(
            command(train_args, module),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(i, proc.stdout, sys.stdout), daemon=True)
        pump.start()
        pumps.append(pump)
    status = _wait(procs, timeout_s)
    for pump in pumps:
        pump.join(timeout=5)
    return status


def command(args: list[str], module: str = TRAIN_MODULE) -> list[str]:
    """What each process runs: `python ...` as given (with this interpreter), else the
    train worker with these flags."""
    if args and os.path.basename(args[0]).startswith("python"):
        return [sys.executable, *args[1:]]
    return [sys.executable, "-m", module, *args]


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> int:
    """Waits for all; on the first failure (or the timeout) stops the rest."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    status = 0
    while None in [p.poll() for p in procs]:  # a list: poll every process each time
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        late = deadline is not None and time.monotonic() > deadline
        if failed or late:
            status = failed[0] if failed else 124
            if late:
                print(f"launch.local: timed out after {timeout_s:.0f}s", file=sys.stderr)
            _stop(procs)
            break
        time.sleep(0.1)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode), 0)
    return status


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits `[launcher flags] -- [train flags]`; bad launcher flags exit 2 with one line."""
    mine, train_args = split_train_args(argv)
    parser = ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--num_processes", type=int, default=2, help="processes to run")
    parser.add_argument(
        "--devices_per_process", type=int, default=1, help="simulated CPU devices per process"
    )
    parser.add_argument("--timeout_s", type=float, default=0, help="stop all after this; 0=never")
    args = parser.parse_args(mine)
    if args.num_processes < 1:
        parser.error(f"-n must be >= 1, got {args.num_processes}")
    if args.devices_per_process < 1:
        parser.error(f"--devices_per_process must be >= 1, got {args.devices_per_process}")
    if not train_args:
        parser.error("no train flags: use  -- --config=configs/tiny.py --workdir=DIR ...")
    return args, train_args


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    return run(train_args, args.num_processes, args.devices_per_process, args.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
