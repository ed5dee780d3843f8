"""Launchers: multi-process training on localhost, Cloud TPU and SLURM commands. (The
multi-host start-up, `near_jax.train.distributed`: test_distributed.py.)"""

import importlib.util
import json
import os
import random
import shlex
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers import REPO, fast_xla, run_module, subprocess_env

sys.path.insert(0, REPO)  # the launch/ package lives at the repository root
from launch import local, slurm, tpu  # noqa: E402
from near_jax import data, sharding  # noqa: E402
from near_jax.data.tokenizer import load_tokenizer  # noqa: E402
from near_jax.train.loop import trainer_for  # noqa: E402
from near_jax.train.step import resolve_config  # noqa: E402


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # launchers run from the repository root (configs/...)


# ----------------------------------------------------------------------------- Cloud TPU


def _tpu(*argv):
    args, train_args = tpu.parse_args(list(argv))
    return "\n".join(shlex.join(c) for c in tpu.plan_commands(args, train_args))


def test_tpu_dry_run_single_slice():
    got = _tpu(
        "--name=m7b-run",
        "--zone=us-east5-a",
        "--accelerator=v5p-128",
        "--",
        "--config=configs/ladder.py:m7b",
        "--workdir=gs://bucket/m7b",
    )
    want = textwrap.dedent(f"""\
        gcloud compute tpus queued-resources create m7b-run --zone=us-east5-a --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --node-id=m7b-run
        gcloud compute tpus queued-resources describe m7b-run --zone=us-east5-a '--format=value(state.state)'
        gcloud compute tpus tpu-vm scp --recurse {REPO} 'm7b-run:~/near_jax' --zone=us-east5-a --worker=all
        gcloud compute tpus tpu-vm ssh m7b-run --zone=us-east5-a --worker=all '--command=cd ~/near_jax && python3 -m pip install -q -e ".[tpu]"'
        gcloud compute tpus tpu-vm ssh m7b-run --zone=us-east5-a --worker=all '--command=cd ~/near_jax && python3 -m launch._worker --config=configs/ladder.py:m7b --workdir=gs://bucket/m7b'""")  # noqa: E501
    assert got == want


def test_tpu_dry_run_multi_slice_spot():
    train_flags = ["--config=configs/ladder.py:m7b", "--config.mesh.fsdp=128", "--workdir=gs://b/r"]
    got = _tpu(
        "--name=big",
        "--zone=europe-west4-b",
        "--accelerator=v5p-256",
        "--slices=2",
        "--spot",
        "--project=my-proj",
        "--skip_setup",
        "--",
        *train_flags,
    )
    where = "--zone=europe-west4-b --project=my-proj"
    run = (
        "'--command=cd ~/near_jax && python3 -m launch._worker --config=configs/ladder.py:m7b "
        "--config.mesh.fsdp=128 --workdir=gs://b/r --config.mesh.dcn_data=2'"
    )
    want = "\n".join(
        [
            f"gcloud compute tpus queued-resources create big {where} --accelerator-type=v5p-256 "
            "--runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=big --spot",
            f"gcloud compute tpus queued-resources describe big {where} "
            "'--format=value(state.state)'",
            f"gcloud compute tpus tpu-vm ssh big-0 {where} --worker=all {run}",
            f"gcloud compute tpus tpu-vm ssh big-1 {where} --worker=all {run}",
        ]
    )
    assert got == want


def _error(module, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--accelerator=v5p-64"],
            "mesh (data=1, fsdp=64, tensor=1) does not fit v5p-64: "
            "data*fsdp*tensor must equal its 32 devices per slice",
        ),
        (["--accelerator=v5litepod-16"], "does not fit v5litepod-16"),
        (["--accelerator=v5p-128", "--zone=us-east5"], "--zone='us-east5' is not a zone"),
        (["--accelerator=v9-8"], "--accelerator='v9-8' is not a known TPU type"),
        (["--accelerator=tpu7x-128"], "TPU7x (Ironwood) is provisioned through GKE"),
        (["--accelerator=v5p-127"], "bad size 127"),
        (["--accelerator=v5p-128", "--name=Bad_Name"], "--name='Bad_Name'"),
        (
            ["--accelerator=v5p-128", "--slices=2", "--", "--config.mesh.dcn_data=3"],
            "config.mesh.dcn_data=3 does not match 2 slice(s) of 2 x v5p-128",
        ),
        (["--accelerator=v5p-128", "--", "--config.model.nope=1"], "unknown config key"),
        (["--accelerator=v5p-128", "--", "--config.mesh.fsdp=x"], "expected int"),
    ],
)
def test_tpu_errors_are_one_line(argv, message, capsys):
    mine = [a for a in argv if "config." not in a and a != "--"]
    base = {"--name": "run", "--zone": "us-east5-a"}
    for a in mine:
        base.pop(a.split("=")[0], None)
    extra = [a for a in argv if "config." in a]
    full = [f"{k}={v}" for k, v in base.items()] + mine + ["--dry_run", "--"]
    full += ["--config=configs/ladder.py:m7b", "--workdir=gs://b/r", *extra]
    assert message in _error(tpu, full, capsys)


# ----------------------------------------------------------------------------- SLURM


def test_slurm_script_one_process_per_gpu(capsys):
    argv = [
        "--nodes=8",
        "--gpus_per_node=8",
        "--partition=gpu",
        "--account=lab",
        "--repo_dir=/shared/near_jax",
        "--dry_run",
        "--",
        "--config=configs/ladder.py:m7b",
        "--workdir=/shared/runs/m7b",
    ]
    assert slurm.main(argv) == 0
    assert capsys.readouterr().out == textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --job-name=near_jax
        #SBATCH --nodes=8
        #SBATCH --ntasks-per-node=8
        #SBATCH --gpus-per-node=8
        #SBATCH --time=24:00:00
        #SBATCH --partition=gpu
        #SBATCH --account=lab
        #SBATCH --chdir=/shared/near_jax
        #SBATCH --output=%x-%j.out
        set -euo pipefail
        # Process 0 runs on the first node; every process connects to it.
        head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        export NEAR_JAX_COORDINATOR_ADDRESS="${head_node}:8476"
        srun --kill-on-bad-exit=1 python3 -m launch._worker --config=configs/ladder.py:m7b --workdir=/shared/runs/m7b
        """)  # noqa: E501


def test_slurm_script_one_process_per_node(capsys):
    argv = [
        "--nodes=2",
        "--per=node",
        "--time=2-00:00:00",
        "--cpus_per_task=96",
        "--port=9999",
        "--repo_dir=/r",
        "--dry_run",
        "--",
        "--config=configs/ladder.py:m2b",
        "--workdir=/w",
        "--config.name=my run",
    ]
    assert slurm.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --cpus-per-task=96" in lines
    assert 'export NEAR_JAX_COORDINATOR_ADDRESS="${head_node}:9999"' in lines
    assert lines[-1].endswith("--workdir=/w '--config.name=my run'")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nodes=2"], "mesh (data=1, fsdp=64, tensor=1) does not fit 2 node(s) x 8 GPUs"),
        (["--nodes=8", "--time=forever"], "--time='forever' is not a SLURM time"),
        (["--nodes=8", "--", "--config.mesh.dcn_data=3"], "config.mesh.dcn_data=3 does not fit"),
        (["--nodes=0"], "must be >= 1"),
    ],
)
def test_slurm_errors_are_one_line(argv, message, capsys):
    mine = [a for a in argv if a != "--" and "config." not in a]
    extra = [a for a in argv if "config." in a]
    full = [*mine, "--dry_run", "--", "--config=configs/ladder.py:m7b", *extra]
    assert message in _error(slurm, full, capsys)


# ----------------------------------------------------------------------------- localhost


def test_local_launcher_stops_everyone_when_one_process_fails(tmp_path, monkeypatch, capsys):
    (tmp_path / "flaky.py").write_text(
        textwrap.dedent("""\
        import os, sys, time
        print("hello from", os.environ["NEAR_JAX_PROCESS_ID"], flush=True)
        if os.environ["NEAR_JAX_PROCESS_ID"] == "1":
            sys.exit(3)
        time.sleep(120)
        """)
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert local.run(["--x"], 3, module="flaky", timeout_s=100) == 3
    out = capsys.readouterr().out
    assert "[1] hello from 1" in out and "[0] hello from 0" in out
    with pytest.raises(SystemExit):
        local.main(["-n", "0", "--", "--config=x"])


def _docs(root) -> str:
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for i in range(64):
        (root / f"d{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(200)))
    return str(root)


def _tiny(docs: str) -> list[str]:
    """Train flags of a tiny, quick run over a (data=2, fsdp=2) mesh of 4 devices."""
    overrides = dict(
        data=dict(source=docs, seq_len=64, shuffle_window=16),
        model=dict(d_model=64, n_layers=2, mlp_dim=128),
        train=dict(steps=3, global_batch_size=8, log_every=1, eval_batches=1, progress="lines"),
        checkpoint=dict(every=0),
        mesh=dict(data=2, fsdp=2),
    )
    flags = [f"--config.{s}.{k}={v}" for s, kv in overrides.items() for k, v in kv.items()]
    return ["--config=configs/tiny.py", *flags]


def _reference_losses(train_flags: list[str], data_shards: int) -> list[tuple[float, float]]:
    """(loss, grad_norm) per step of one process on the same global mesh shape, reading the
    same global batches: a run's data is cut into `data.shards` fixed shards (default: its
    process count) and global row block s comes from shard s, so one process that reads all
    `data_shards` shards sees exactly the batches the processes assemble together."""
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs/tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for flag in train_flags[1:]:
        key, value = flag[len("--config.") :].split("=", 1)
        section, field = key.split(".")
        cfg[section][field] = type(cfg[section][field])(value)
    cfg.data.shards = data_shards
    cfg = resolve_config(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size)
    trainer = trainer_for(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:4]))
    state = trainer.init(jax.random.key(cfg.seed))
    batches = data.make_iterator(
        cfg.data,
        split="train",
        seed=cfg.seed,
        global_batch_size=8,
        process_index=0,
        process_count=1,
    )
    out = []
    for _ in range(cfg.train.steps):
        batch = jax.device_put(next(batches), trainer.batch_sharding)
        state, stats = trainer.step(state, batch)
        out.append((float(stats["loss"]), float(stats["grad_norm"])))
    return out


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return _docs(tmp_path_factory.mktemp("docs"))


# 4 processes of one device each: the most hosts this machine can run (2 also passes; it
# is left out to keep the suite short).
@pytest.mark.parametrize("num_processes", [4])
def test_multi_process_training_matches_one_process(num_processes, docs, tmp_path):
    flags = _tiny(docs)
    workdir = tmp_path / "run"
    # Workers: 4 devices in all, split over the processes. A lighter CPU back end compiles
    # ~3x faster (launch.local replaces the device count and keeps these flags).
    env = subprocess_env(XLA_FLAGS=fast_xla())
    args = [
        "-n",
        str(num_processes),
        f"--devices_per_process={4 // num_processes}",
        "--timeout_s=240",
        "--",
        *flags,
        f"--workdir={workdir}",
    ]
    run = run_module("launch.local", *args, env=env)
    assert run.returncode == 0, run.stdout[-3000:]
    assert f"4 devices, {num_processes} processes" in run.stdout
    for i in range(num_processes):
        assert f"[{i}] done:" in run.stdout
    with open(workdir / "metrics.jsonl") as f:  # only process 0 writes metrics
        rows = [json.loads(line) for line in f if '"train"' in line]
    got = [(r["loss"], r["grad_norm"]) for r in rows]
    want = _reference_losses(flags, num_processes)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Equal up to float32 reduction order (observed: <= 2e-7 relative).
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # ... while a one-shard stream (a single process's own default) is other batches.
    assert not np.allclose(_reference_losses(flags, 1), want, rtol=1e-4)


def test_local_launcher_runs_a_python_command_or_the_train_worker():
    island = ["python", "-m", "near_jax.diloco.island", "--island=a"]
    assert local.command(island) == [sys.executable, "-m", "near_jax.diloco.island", "--island=a"]
    assert local.command(["/usr/bin/python3.12", "x.py"]) == [sys.executable, "x.py"]
    flags = ["--config=configs/tiny.py", "--workdir=/tmp/w"]
    assert local.command(flags) == [sys.executable, "-m", "launch._worker", *flags]
