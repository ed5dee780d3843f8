"""Small shared builders for tests, and the scaffolding for running the CLIs in subprocesses."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from near_jax import config as config_lib
from near_jax import model

# The repository root: the working directory of every CLI a test runs (`python -m near_jax.X`
# finds the package there, and configs/... paths are relative to it).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(devices=None, compilation_cache=None, **overrides) -> dict[str, str]:
    """The environment of a child process: this one's (conftest's included) on the CPU platform.

    devices: the number of simulated CPU devices, XLA_FLAGS replaced by just that flag; None
      keeps this process's XLA_FLAGS (conftest's 8 devices appended to whatever was set).
    compilation_cache: a directory for a persistent compilation cache that children share, with
      every compile cached (for tests that start the same program several times).
    overrides: any other variables (strings), set last (e.g. XLA_FLAGS="" for XLA's defaults).
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if compilation_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.update(overrides)
    return env


def run_module(
    module, *args, cwd=REPO, env=None, timeout=300, **kwargs
) -> subprocess.CompletedProcess:
    """Runs `python -m module *args` to completion; returns the CompletedProcess, its stdout and
    stderr captured as text. env defaults to subprocess_env(); kwargs go to subprocess.run (e.g.
    preexec_fn). The exit status is the caller's to check."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=subprocess_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def start_module(module, *args, cwd=REPO, env=None, **popen_kwargs) -> subprocess.Popen:
    """Starts `python -m module *args` without waiting; returns the Popen. env defaults to
    subprocess_env(); popen_kwargs (stdout, stderr, text, ...) go to subprocess.Popen as given:
    nothing is captured unless asked for."""
    env = subprocess_env() if env is None else env
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, **popen_kwargs)


class FakeClock:
    """time.time / time.sleep stand-ins: starts at t = 1000.0, and sleeping advances the clock
    at once. Callables appended to on_sleep run (in order, once each) at the next sleep: what
    happens in the world while the sleeper waits."""

    def __init__(self):
        self.t, self.on_sleep = 1000.0, []

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds
        while self.on_sleep:
            self.on_sleep.pop(0)()


# A ~0.1M-parameter tiny.py run on the command line, saving every 5 steps (add steps,
# log_every and checkpoint.keep per test).
SMALL_TRAIN_FLAGS = [
    "--config=configs/tiny.py",
    "--config.model.d_model=64",
    "--config.model.n_layers=2",
    "--config.model.mlp_dim=128",
    "--config.data.seq_len=64",
    "--config.train.global_batch_size=8",
    "--config.train.eval_every=0",
    "--config.train.eval_batches=1",
    "--config.train.progress=lines",
    "--config.checkpoint.every=5",
]


def small_config(**model_overrides) -> ml_collections.ConfigDict:
    """A validated config of a tiny float32 model (vocab 384) for fast tests."""
    cfg = config_lib.default_config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 384, 64, 2, 4, 2
    m.mlp_dim, m.dtype, m.rope_theta = 128, "float32", 10_000.0
    for key, value in model_overrides.items():
        m[key] = value
    cfg.data.seq_len = 32
    cfg.train.global_batch_size = 8
    cfg.train.steps = 10
    cfg.optim.warmup_steps = 2
    return config_lib.validate(cfg)


class DataPosition:
    """A stand-in data iterator with a JSON state, for checkpoints written outside a run."""

    def __init__(self, position=0):
        self.position = position

    def get_state(self):
        return {"num_shards": 1, "shards": {"0": self.position}}

    def set_state(self, state):
        self.position = state


def save_run(workdir, cfg: ml_collections.ConfigDict, steps=(5,), params=None):
    """Writes checkpoints of a freshly initialized run (params optionally replaced) to workdir."""
    import jax

    from near_jax import sharding
    from near_jax.train import checkpoint
    from near_jax.train.loop import save_config, trainer_for

    trainer = trainer_for(cfg, sharding.make_mesh(cfg.mesh))
    state = trainer.init(jax.random.key(cfg.seed))
    if params is not None:
        state = state._replace(params=params)
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=0)
    for step in steps:
        ckpt.save(step, state._replace(step=state.step + step)._asdict(), DataPosition(), cfg)
    ckpt.close()
    save_config(cfg, str(workdir))
    return state


DAMAGE_KINDS = (
    "no_commit_marker",
    "arrays_deleted",
    "arrays_truncated",
    "config_garbage",
    "config_list",
    "config_empty",
    "empty_newer_step",
)


def damage_step(workdir, step, kind):
    """Damages checkpoint `step` of a run in place the way a crash or a bad disk would."""
    import pathlib

    directory = pathlib.Path(workdir) / "checkpoints" / str(step)
    arrays = [p for p in (directory / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    config = directory / "config" / "metadata"  # the JSON of the step's config item
    if kind == "no_commit_marker":
        (directory / "commit_success.txt").unlink()
    elif kind == "arrays_deleted":
        for path in arrays:
            path.unlink()
    elif kind == "arrays_truncated":
        for path in arrays:
            path.write_bytes(path.read_bytes()[:10])
    elif kind == "config_garbage":
        config.write_text("{not json")
    elif kind == "config_list":
        config.write_text("[1, 2]")
    elif kind == "config_empty":
        config.write_text("{}")
    elif kind == "empty_newer_step":  # a folder named like a newer step, with nothing in it
        (directory.parent / str(step + 100)).mkdir()
    else:
        raise ValueError(f"unknown damage kind {kind!r}")


def delta(shape, seed=0, outliers=3, scale=1e-3, spike=1000):
    """A pseudo-gradient-like tensor: small normal values, a few ×spike outliers, no zeros."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    flat = x.reshape(-1)
    flat[flat == 0] = scale
    flat[rng.choice(flat.size, size=min(outliers, flat.size), replace=False)] *= spike
    return x


def hashed_delta(shape, seed=0, scale=1e-3, spike=1000):
    """A pseudo-gradient-like float32 tensor that depends on no random number generator (so
    that golden hashes of what the codec or outer step make of it pin those, not numpy's
    RNG): uniform in ±scale from sha256 counter blocks, every 97th value ×spike, and a −0
    and a +0 where there is room. Exact float64 arithmetic, then one rounding to float32."""
    n = math.prod(shape)
    stream = b"".join(
        hashlib.sha256(f"near_jax {seed} {i}".encode()).digest() for i in range(-(-n // 8))
    )
    u = np.frombuffer(stream, "<u4")[:n].astype(np.float64)
    x = (u / 2.0**31 - 1.0) * scale  # exact in float64: u < 2³², a power-of-two divisor
    x[::97] *= spike
    x[5:6], x[6:7] = -0.0, 0.0
    return x.astype(np.float32).reshape(shape)


def hashed_tree(seed, scale=1e-3):
    """A small pytree of hashed_delta leaves (one a block multiple plus one, one a scalar)."""
    return {
        "w": hashed_delta((3, 100), seed, scale),
        "b": hashed_delta((129,), seed + 1, scale),
        "s": hashed_delta((), seed + 2, scale),
    }


def leaves_sha256(tree) -> str:
    """sha256 of a tree's float32 leaves' bytes, in tree order: a golden's fingerprint."""
    leaves = (np.asarray(x, np.float32).tobytes() for x in jax.tree.leaves(tree))
    return hashlib.sha256(b"".join(leaves)).hexdigest()


def write_lines(tmp_path, lines, name="task.jsonl") -> str:
    """Writes lines (newline-terminated, UTF-8) to tmp_path/name; returns the path."""
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def task_line(context="c", choices=("a", "b"), answer=0, **extra) -> str:
    """One line of a multiple-choice task file (extra fields as given)."""
    return json.dumps({"context": context, "choices": list(choices), "answer": answer} | extra)


def plan_config(model=None, mesh=None, remat="full", batch=16, seq=256, micro=1):
    """A float32 config for the planner's tests (XLA's CPU backend keeps bf16 activations in
    float32): model and mesh override the shape and the mesh (default data=8)."""
    cfg = small_config()
    shape = dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=512, vocab_size=4096)
    cfg.model.update({**shape, **(model or {}), "remat": remat})
    cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.microbatches = seq, batch, micro
    cfg.mesh.data = 1
    for key, value in (mesh or {"data": 8}).items():
        cfg.mesh[key] = value
    return cfg


def model_config(**overrides):
    """The ModelConfig of small_config(**overrides)."""
    return model.ModelConfig.from_config(small_config(**overrides).model)


def model_inputs(rng, batch, length, vocab=384):
    """Random tokens, positions 0..length-1 and one segment per row: the apply inputs."""
    tokens = jax.random.randint(rng, (batch, length), 0, vocab)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return tokens, positions, jnp.ones((batch, length), jnp.int32)


def damaged_copy(source, tmp_path, step, kind) -> str:
    """A copy of run directory source at tmp_path/run, with checkpoint `step` damaged (kind as
    in damage_step); returns its path."""
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    damage_step(workdir, step, kind)
    return str(workdir)


def mesh_trainer(**mesh):
    """The Trainer of small_config() on a mesh of the given axes (n: how many devices, 8)."""
    from near_jax import sharding
    from near_jax.train.loop import trainer_for

    cfg = small_config()
    for key, value in mesh.items():
        cfg.mesh[key] = value
    return trainer_for(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[: mesh.pop("n", 8)]))


def save_steps(directory, trainer, steps=(10, 20)):
    """Saves trainer's initial state at each step (state.step advanced 10 per save) in
    directory; returns the last state saved."""
    from near_jax.train import checkpoint

    ckpt = checkpoint.Checkpointer(directory, keep=0)
    state = trainer.init(jax.random.key(0))
    for step in steps:
        state = state._replace(step=state.step + 10)
        ckpt.save(step, state._asdict(), DataPosition(step), trainer.cfg)
    ckpt.close()
    return state
