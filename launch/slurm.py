"""SLURM GPU clusters: render an sbatch script that trains on every GPU of N nodes.

    python -m launch.slurm --nodes=8 --gpus_per_node=8 [--per=gpu|node] \\
        [--partition=P] [--account=A] [--time=48:00:00] [--dry_run] \\
        -- --config=configs/ladder.py:m7b --workdir=/shared/runs/m7b

`--per=gpu` (default) starts one process per GPU (`--ntasks-per-node=GPUS`, each process
sees its GPU through SLURM_LOCALID); `--per=node` starts one process per node that drives all
of its GPUs. The first node of the allocation (`scontrol show hostnames`) is the coordinator;
`near_jax.train.distributed` reads the rest (process count and index) from srun's environment.

--dry_run prints the script; otherwise it is written to --script and submitted with sbatch.
The config is checked first: its mesh (data*fsdp*tensor) must fill nodes x GPUs, and
`dcn_data` (data parallelism across processes) must be 1 or the number of processes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

from launch import (
    TRAIN_MODULE,
    ArgumentParser,
    LaunchError,
    check_mesh,
    load_train_config,
    split_train_args,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}")


def render(args, train_args: list[str]) -> str:
    """The sbatch script, as text."""
    tasks = args.gpus_per_node if args.per == "gpu" else 1
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
    ]
    if args.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
    lines += [f"#SBATCH --time={args.time}"]
    lines += [f"#SBATCH --partition={args.partition}"] if args.partition else []
    lines += [f"#SBATCH --account={args.account}"] if args.account else []
    lines += [
        f"#SBATCH --chdir={args.repo_dir}",
        "#SBATCH --output=%x-%j.out",
        "set -euo pipefail",
        "# Process 0 runs on the first node; every process connects to it.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'export NEAR_JAX_COORDINATOR_ADDRESS="${{head_node}}:{args.port}"',
        f"srun --kill-on-bad-exit=1 python3 -m {TRAIN_MODULE} {shlex.join(train_args)}",
    ]
    return "\n".join(lines) + "\n"


def check(args, train_args: list[str]) -> None:
    """LaunchError unless the config's mesh fits the allocation."""
    cfg = load_train_config(train_args)
    devices = args.nodes * args.gpus_per_node
    processes = args.nodes * (args.gpus_per_node if args.per == "gpu" else 1)
    where = f"{args.nodes} node(s) x {args.gpus_per_node} GPUs"
    dcn = cfg.mesh.dcn_data
    if dcn not in (1, processes):
        raise LaunchError(
            f"config.mesh.dcn_data={dcn} does not fit {where}: it must be 1 or the number "
            f"of processes ({processes})"
        )
    check_mesh(cfg, devices // dcn, dcn, where)


def parse_args(argv: list[str]):
    mine, train_args = split_train_args(argv)
    parser = ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    parser.add_argument("--gpus_per_node", type=int, default=8, help="GPUs on each node")
    parser.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per")
    parser.add_argument("--job_name", default="near_jax", help="SLURM job name")
    parser.add_argument("--time", default="24:00:00", help="time limit, [D-]HH:MM:SS")
    parser.add_argument("--partition", default="", help="SLURM partition")
    parser.add_argument("--account", default="", help="SLURM account")
    parser.add_argument("--cpus_per_task", type=int, default=0, help="0 = SLURM's default")
    parser.add_argument("--port", type=int, default=8476, help="coordinator port on node 0")
    parser.add_argument("--repo_dir", default=REPO, help="this repository on the cluster")
    parser.add_argument("--script", default="near_jax.sbatch", help="where to write the script")
    parser.add_argument("--dry_run", action="store_true", help="print the script only")
    args = parser.parse_args(mine)
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error(f"--nodes={args.nodes} and --gpus_per_node={args.gpus_per_node} must be >= 1")
    if not _TIME.fullmatch(args.time):
        parser.error(f"--time={args.time!r} is not a SLURM time like 24:00:00 or 2-00:00:00")
    if not 0 < args.port < 65536:
        parser.error(f"--port={args.port} is not a TCP port")
    if not train_args:
        parser.error("no train flags: add  -- --config=... --workdir=...")
    try:
        check(args, train_args)
    except LaunchError as e:
        parser.error(str(e))
    return args, train_args


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    script = render(args, train_args)
    if args.dry_run:
        print(script, end="")
        return 0
    with open(args.script, "w") as f:
        f.write(script)
    try:
        return subprocess.call(["sbatch", args.script])
    except FileNotFoundError:
        print(
            "python -m launch.slurm: error: sbatch not found (not a SLURM login node?)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
