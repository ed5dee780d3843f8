"""Cloud TPU pods: create a queued resource, copy the code, and train on every worker.

    python -m launch.tpu --name=m7b-run --zone=us-east5-a --accelerator=v5p-128 \\
        [--slices=2] [--spot] [--project=P] [--dry_run] \\
        -- --config=configs/ladder.py:m7b --workdir=gs://bucket/m7b

Steps (each one `gcloud` command; --dry_run prints them and runs nothing):
  1. `gcloud compute tpus queued-resources create` (multi-slice: --node-count/--node-prefix);
  2. poll `queued-resources describe` until the resource is ACTIVE;
  3. copy this repository to every worker of every slice (`tpu-vm scp --worker=all`) and
     `pip install` it (skip both with --skip_setup);
  4. `tpu-vm ssh --worker=all --command=...` on every slice at once: each worker runs the
     training process; `near_jax.train.distributed` finds the other workers from the TPU metadata.
Multi-slice runs are data-parallel across slices over the data-center network: the mesh's
`dcn_data` must equal --slices (it is added to the train flags when missing).

The train flags are checked first: the config must load, and its mesh (data*fsdp*tensor)
must fill one slice's devices. Errors are one line, exit status 2.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

from launch import (
    TRAIN_MODULE,
    ArgumentParser,
    LaunchError,
    check_mesh,
    load_train_config,
    split_train_args,
)

# version -> (runtime version, accelerator-type number counts TensorCores (2 per chip)?)
TPU_TYPES: dict[str, tuple[str, bool]] = {
    "v4": ("tpu-ubuntu2204-base", True),
    "v5p": ("v2-alpha-tpuv5", True),
    "v5litepod": ("v2-alpha-tpuv5-lite", False),
    "v6e": ("v2-alpha-tpuv6e", False),
}
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,48}[a-z0-9])?")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_accelerator(accelerator: str) -> tuple[str, int]:
    """'v5p-128' -> ('v5p', 64 chips). LaunchError for unknown types or sizes."""
    match = re.fullmatch(r"([a-z0-9]+)-([0-9]+)", accelerator)
    version = match.group(1) if match else ""
    if version in ("tpu7x", "v7", "v7x"):
        raise LaunchError(
            f"--accelerator={accelerator}: TPU7x (Ironwood) is provisioned through GKE or "
            "Compute Engine, not Cloud TPU queued resources"
        )
    if not match or version not in TPU_TYPES:
        raise LaunchError(
            f"--accelerator={accelerator!r} is not a known TPU type; want one of "
            f"{', '.join(v + '-N' for v in TPU_TYPES)}, e.g. v5p-128"
        )
    count = int(match.group(2))
    cores = TPU_TYPES[version][1]
    if count <= 0 or (cores and count % 2):
        raise LaunchError(f"--accelerator={accelerator}: bad size {count}")
    return version, count // 2 if cores else count


def node_names(name: str, slices: int) -> list[str]:
    """The TPU VM node of each slice (queued resources name them PREFIX-0, PREFIX-1, ...)."""
    return [name] if slices == 1 else [f"{name}-{i}" for i in range(slices)]


def _where(args) -> list[str]:
    out = [f"--zone={args.zone}"]
    return out + [f"--project={args.project}"] if args.project else out


def create_command(args, runtime: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, *_where(args)]
    cmd += [f"--accelerator-type={args.accelerator}", f"--runtime-version={runtime}"]
    if args.slices == 1:
        cmd.append(f"--node-id={args.name}")
    else:
        cmd += [f"--node-count={args.slices}", f"--node-prefix={args.name}"]
    return cmd + (["--spot"] if args.spot else [])


def describe_command(args) -> list[str]:
    return [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        args.name,
        *_where(args),
        "--format=value(state.state)",
    ]


def setup_commands(args, node: str) -> list[list[str]]:
    ssh = ["gcloud", "compute", "tpus", "tpu-vm"]
    copy = ssh + [
        "scp",
        "--recurse",
        REPO,
        f"{node}:{args.repo_dir}",
        *_where(args),
        "--worker=all",
    ]
    install = f'cd {args.repo_dir} && python3 -m pip install -q -e ".[tpu]"'
    return [copy, ssh + ["ssh", node, *_where(args), "--worker=all", f"--command={install}"]]


def run_command(args, node: str, train_args: list[str]) -> list[str]:
    remote = f"cd {args.repo_dir} && python3 -m {TRAIN_MODULE} {shlex.join(train_args)}"
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        node,
        *_where(args),
        "--worker=all",
        f"--command={remote}",
    ]


def plan_commands(args, train_args: list[str]) -> list[list[str]]:
    """Every command of the launch in order (the poll is the describe command)."""
    version, _ = parse_accelerator(args.accelerator)
    runtime = args.runtime_version or TPU_TYPES[version][0]
    cmds = [create_command(args, runtime), describe_command(args)]
    nodes = node_names(args.name, args.slices)
    if not args.skip_setup:
        cmds += [c for node in nodes for c in setup_commands(args, node)]
    return cmds + [run_command(args, node, train_args) for node in nodes]


def checked_train_args(args, train_args: list[str]) -> list[str]:
    """Validates the config against the slice; adds --config.mesh.dcn_data for multi-slice."""
    _, chips = parse_accelerator(args.accelerator)
    cfg = load_train_config(train_args)
    has_dcn = any(a.startswith("--config.mesh.dcn_data=") for a in train_args)
    if args.slices > 1 and not has_dcn and cfg.mesh.dcn_data == 1:
        train_args = [*train_args, f"--config.mesh.dcn_data={args.slices}"]
        cfg.mesh.dcn_data = args.slices
    where = f"{args.slices} x {args.accelerator}" if args.slices > 1 else args.accelerator
    check_mesh(cfg, chips, args.slices, where)
    return train_args


def _run(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _wait_active(args, poll_s: float = 30.0) -> None:
    while True:
        state = subprocess.run(describe_command(args), check=True, capture_output=True, text=True)
        status = state.stdout.strip()
        print(f"queued resource {args.name}: {status}", flush=True)
        if status == "ACTIVE":
            return
        if status in ("FAILED", "SUSPENDED"):
            raise SystemExit(f"launch.tpu: queued resource {args.name} is {status}")
        time.sleep(poll_s)


def launch(args, train_args: list[str]) -> int:
    """Runs the commands for real: create, wait, set up, then all slices at once."""
    cmds = plan_commands(args, train_args)
    _run(cmds[0])
    _wait_active(args)
    runs = cmds[-args.slices :]
    for cmd in cmds[2 : len(cmds) - args.slices]:
        _run(cmd)
    procs = []
    for cmd in runs:
        print("+", shlex.join(cmd), flush=True)
        procs.append(subprocess.Popen(cmd))
    return max(p.wait() for p in procs)


def parse_args(argv: list[str]):
    mine, train_args = split_train_args(argv)
    parser = ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="queued resource (and node) name")
    parser.add_argument("--zone", required=True, help="e.g. us-east5-a")
    parser.add_argument("--accelerator", required=True, help="TPU type of one slice, e.g. v5p-128")
    parser.add_argument("--slices", type=int, default=1, help="slices (multi-slice over DCN)")
    parser.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    parser.add_argument("--project", default="", help="GCP project (default: gcloud's)")
    parser.add_argument("--runtime_version", default="", help="default: per TPU version")
    parser.add_argument("--repo_dir", default="~/near_jax", help="where the code goes on VMs")
    parser.add_argument("--skip_setup", action="store_true", help="code already on the VMs")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(mine)
    if not _NAME.fullmatch(args.name):
        parser.error(
            f"--name={args.name!r}: lowercase letters, digits and '-', start with a letter"
        )
    if not _ZONE.fullmatch(args.zone):
        parser.error(f"--zone={args.zone!r} is not a zone like us-east5-a")
    if args.slices < 1:
        parser.error(f"--slices={args.slices}: must be >= 1")
    if not train_args:
        parser.error("no train flags: add  -- --config=... --workdir=gs://...")
    try:
        train_args = checked_train_args(args, train_args)
        plan_commands(args, train_args)
    except LaunchError as e:
        parser.error(str(e))
    return args, train_args


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        for cmd in plan_commands(args, train_args):
            print(shlex.join(cmd))
        return 0
    return launch(args, train_args)


if __name__ == "__main__":
    sys.exit(main())
