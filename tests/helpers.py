"""Small shared builders for tests, and the scaffolding for running the CLIs in subprocesses."""

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from near_jax import config as config_lib
from near_jax import model
from near_jax.plan.compiled import fast_cpu_xla_flags

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


def params_like_tree(seed=0):
    """A tree shaped like a model's params: nested dicts, a list, a scalar, an empty leaf."""
    return {
        "layers": {"attn": {"q": delta((2, 3, 67), seed)}, "norm": delta((129,), seed + 1)},
        "embed": delta((64, 64), seed + 2),
        "scalars": [delta((), seed + 3), delta((7,), seed + 4)],
        "empty": np.zeros((0, 4), np.float32),
    }


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


# ------------------------------------------ DiLoCo across islands: a run in-process (numpy)

RUN, SPEC, LR, MU = "demo", "int8", 0.7, 0.9
SHAPES = {"w": (4, 33), "b": (33,), "blocks": {"k": (2, 3, 5)}}


def random_tree(seed, shapes, scale=1.0):
    """A float32 tree of standard normal × scale leaves shaped like `shapes` (a tree of
    shape tuples), from seed."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (rng.standard_normal(s) * scale).astype(np.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def tree(seed, scale=1.0):
    """A float32 tree shaped like SHAPES, standard normal × scale, from seed."""
    return random_tree(seed, SHAPES, scale)


LIKE = tree(0)
# Small shards, so the in-process runs cut leaves and group them: b and blocks.k share
# shard 0, w is cut into 4 slices of one row (shards 1-4).
SHARD_BYTES = 256


def plan():
    """The shard plan of the in-process runs (LIKE cut at SHARD_BYTES)."""
    from near_jax.diloco import protocol

    return protocol.plan_shards(LIKE, SHARD_BYTES)


def make_aggregator(store, clock, quorum=3, timeout=10.0):
    """An Aggregator of run RUN (int8, lr 0.7, μ 0.9) over LIKE, on a FakeClock."""
    from near_jax.diloco.aggregator import Aggregator

    return Aggregator(
        store,
        RUN,
        LIKE,
        spec=SPEC,
        lr=LR,
        momentum=MU,
        quorum=quorum,
        round_timeout=timeout,
        poll_seconds=0.5,
        shard_bytes=SHARD_BYTES,
        clock=clock,
        sleep=clock.sleep,
    )


def started_run(tmp_path):
    """(store, clock, aggregator) of a run created at version 0 from tree(1), in a file store
    at tmp_path (conftest's `started` fixture)."""
    from near_jax.diloco.store import ObjectStore

    store, clock = ObjectStore.open(str(tmp_path)), FakeClock()
    agg = make_aggregator(store, clock)
    assert agg.create(tree(1), {"inner_steps": 3})
    assert not make_aggregator(store, clock).create(tree(99), {})  # idempotent: kept
    agg.load()
    return store, clock, agg


def push(store, island, version, delta, **kw):
    """Island `island` pushes delta for the round on `version` (pulled from the store)."""
    from near_jax.diloco import protocol

    cut = plan()
    base = protocol.pull_version(store, RUN, version, cut)
    return protocol.push_contribution(store, RUN, island, base, cut, cut.split(delta), SPEC, **kw)


def reference_update(deltas):
    """The update of a round applying `deltas` (in order), computed independently of the
    protocol: per shard, each Δ through the codec, their fp32 mean through it again."""
    from near_jax.diloco.codec.compress import decode, encode

    cut, out = plan(), {}
    for s in range(cut.num_shards):
        decoded = [decode(encode(cut.split(d)[s], SPEC)[0]) for d in deltas]
        total = decoded[0]
        for other in decoded[1:]:
            total = [a + b for a, b in zip(total, other, strict=True)]
        out[s] = decode(encode([x / np.float32(len(deltas)) for x in total], SPEC)[0])
    return cut.assemble(out)


def optax_rounds(params, updates):
    """The reference: optax outer_step applied to each update in turn (eager, float32)."""
    from near_jax.diloco.outer import outer_optimizer, outer_step

    opt = outer_optimizer(LR, MU)
    state = opt.init(params)
    for update in updates:
        params, state = outer_step(opt, params, state, update)
    return params, state[0].trace


def bits_equal(a, b):
    """Whether two trees hold the same float32 bits, leaf by leaf."""
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(
        np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))
        for x, y in leaves
    )


# ------------------------------------------- DiLoCo across islands: processes on localhost

# The tiny model the island and aggregator programs are started with in tests.
MODEL = [
    "--config=configs/tiny.py",
    "--config.model.d_model=32",
    "--config.model.n_layers=1",
    "--config.model.n_heads=2",
    "--config.model.n_kv_heads=1",
    "--config.model.mlp_dim=64",
    "--config.data.seq_len=32",
    "--config.train.global_batch_size=4",
    "--config.train.eval_batches=2",
    "--config.optim.warmup_steps=0",
    "--config.optim.lr=1e-2",
    "--config.diloco.inner_steps=3",
    "--config.diloco.compression=int8",
]


def model_like(*flags):
    """The abstract params of the model the island programs train with these flags (MODEL
    by default): a run's `like`."""
    from launch import load_train_config
    from near_jax import sharding
    from near_jax.data.tokenizer import load_tokenizer
    from near_jax.train.loop import trainer_for
    from near_jax.train.step import resolve_config

    cfg = load_train_config(list(flags or MODEL))
    cfg = resolve_config(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size)
    return trainer_for(cfg, sharding.make_mesh(cfg.mesh)).abstract_state.params


def fast_xla() -> str:
    """XLA_FLAGS of a lighter CPU back end for the island and aggregator processes: compiles
    ~3x faster, and every process of a test uses the same flags (their bits agree with each
    other). Only the flags this jaxlib knows: an unknown one in XLA_FLAGS aborts a process."""
    return fast_cpu_xla_flags()


class Procs:
    """Subprocesses on one CPU device each, sharing a persistent compilation cache."""

    def __init__(self, tmp_path):
        self.tmp, self.procs = tmp_path, {}
        cache = tmp_path.parent / "jax_cache"  # session-wide
        self.env = subprocess_env(devices=1, compilation_cache=cache, PYTHONPATH=REPO)
        self.env["XLA_FLAGS"] += f" {fast_xla()}"

    def start(self, name, module, *args):
        with open(self.tmp / f"{name}.log", "w") as log:  # the child keeps its own handle
            self.procs[name] = start_module(
                f"near_jax.diloco.{module}", *args, env=self.env, stdout=log, stderr=log
            )
        return self.procs[name]

    def log(self, name):
        return (self.tmp / f"{name}.log").read_text()

    def logs(self):
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)

    def wait_for(self, what, fn, timeout):
        deadline = time.monotonic() + timeout
        while not fn():
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() not in (None, -9)}
            if time.monotonic() > deadline or any(dead.values()):
                pytest.fail(f"timed out waiting for {what} ({dead})\n{self.logs()}")
            time.sleep(0.2)

    def kill_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def latest_version(store):
    """The version `latest` names in run RUN of store (-1 while there is none)."""
    from near_jax.diloco import protocol

    body = store.get(protocol.latest_key(RUN))
    return json.loads(body)["version"] if body else -1


def metric_records(path, split):
    """JSONL records of `split` (a line torn by SIGKILL is skipped)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [x for x in records if x.get("split") == split]


# ------------------------------------------------------- the data pipeline on small sources

SEQ_LEN = 64  # the row length of data_cfg()
DOC_MARK = re.compile(r"<(\d{4})>")


def data_cfg(**overrides):
    """config.data with rows of SEQ_LEN and no shuffle window, fields overridden."""
    cfg = config_lib.default_config().data
    cfg.seq_len = SEQ_LEN
    cfg.shuffle_window = 0  # rows in stream order; tests that want the window set it
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def data_it(cfg, split="train", seed=0, batch=8, **kw):
    """data.make_iterator on one host (process_index / process_count overridable)."""
    from near_jax import data

    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return data.make_iterator(cfg, split=split, seed=seed, global_batch_size=batch, **kw)


def take(it, n):
    """The next n items of an iterator."""
    return [next(it) for _ in range(n)]


def doc_text(i: int) -> str:
    """Document i's text: its number as a marker, five times (see doc_markers)."""
    return f"<{i:04d}>" * 5 + "\n"


def doc_markers(batch) -> set[int]:
    """Document numbers whose marker appears in any segment of the batch (byte tokens)."""
    from near_jax.data.tokenizer import load_tokenizer

    byte = load_tokenizer("byte")
    found = set()
    for row, segs in zip(batch["inputs"], batch["segment_ids"], strict=True):
        for s in np.unique(segs[segs > 0]):
            found.update(int(m) for m in DOC_MARK.findall(byte.decode(row[segs == s])))
    return found


def check_row_invariants(batch, tok, seq=SEQ_LEN, specials=True):
    """Asserts what every packed batch holds: dtypes, next-token targets, ordered segments,
    positions from 0 per segment, BOS/EOS at boundaries (specials), weights, padding."""
    x, y = batch["inputs"], batch["targets"]
    seg, pos, w = batch["segment_ids"], batch["positions"], batch["weights"]
    for key in ("inputs", "targets", "positions", "segment_ids"):
        assert batch[key].dtype == np.int32 and batch[key].shape[1] == seq
    assert w.dtype == np.float32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the next inputs
    for r in range(len(x)):
        real = seg[r] > 0
        assert np.all(seg[r][real][1:] >= seg[r][real][:-1])  # segments in order
        assert np.all(w[r][~real] == 0) and np.all(x[r][~real] == tok.pad_id)
        for t in range(seq):
            if t == 0 or seg[r, t] != seg[r, t - 1]:
                assert pos[r, t] == 0
                if specials and t > 0 and seg[r, t] > 0:  # a document starts in the row
                    assert x[r, t] == tok.bos_id and x[r, t - 1] == tok.eos_id
                    assert w[r, t - 1] == 0  # no loss across the boundary
            else:
                assert pos[r, t] == pos[r, t - 1] + 1
        # weight 1 exactly where the target continues the input's document
        same = np.append(seg[r][1:] == seg[r][:-1], True) & real
        np.testing.assert_array_equal(w[r][:-1], same[:-1].astype(np.float32))


H = {c: c * 64 for c in "0123456789abcdef"}  # distinct valid sha256 hex strings


def statement_fields(**over) -> dict:
    """A valid contribution statement (identity.STATEMENT_FIELDS), with `over` applied."""
    f = {
        "run": "demo",
        "round": 3,
        "contributor": "alice",
        "base_sha256": H["a"],
        "payload_sha256": H["b"],
        "code_sha256": H["c"],
        "config_sha256": H["d"],
    }
    f.update(over)
    return f


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


# ------------------------------------- Hugging Face interop (test_convert.py, test_exchange.py)

HF_THETA = 12345.0  # a non-default RoPE theta: a conversion that drops it changes the logits


hf_apply = jax.jit(model.apply, static_argnums=4)  # the model config is static


def hf_torch():
    """torch and transformers, or a skip (the parity tests need both; the rest neither)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return torch, transformers


def hf_ids(vocab, batch=2, length=19):
    return np.random.default_rng(0).integers(0, vocab, (batch, length))


def near_logits(params, cfg, ids):
    """near_jax logits of unpacked rows: positions 0..L-1, one segment."""
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return np.asarray(hf_apply(params, ids, positions, np.ones_like(ids), cfg))


def hf_logits(torch, hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor(ids)).logits.numpy()


def hf_llama_model(transformers, tied, vocab=300):
    """A random tiny LlamaForCausalLM (GQA, non-default theta) with norms that are not ones."""
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=HF_THETA,
        rope_parameters={"rope_type": "default", "rope_theta": HF_THETA},
        tie_word_embeddings=tied,
        initializer_range=0.2,
        attn_implementation="eager",
        bos_token_id=1,
        eos_token_id=2,
    )
    hf_model = transformers.LlamaForCausalLM(config).eval()
    for name, p in hf_model.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    return hf_model


def random_params(cfg: ml_collections.ConfigDict, seed: int = 1):
    """Random params of exactly model.init's tree, norm scales away from ones.

    Drawn with numpy over `jax.eval_shape(model.init)`: model.init compiles afresh on every
    call (5-10 s here), which would dominate a test file's run time.
    """
    shapes = jax.eval_shape(lambda: model.init(cfg.model, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if "scale" in jax.tree_util.keystr(path):
            return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
        return (0.1 * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# ------------------------------------------- attention kernels (test_attention.py, test_splash.py)


def attention_qkv(length=256, heads=4, kv_heads=2, head_dim=64, dtype=jnp.float32, batch=2, seed=0):
    """Random q, k, v (batch, length, heads, head_dim) and sorted segment ids (batch, length)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), dtype)
    k, v = (
        jnp.asarray(rng.standard_normal((batch, length, kv_heads, head_dim)), dtype)
        for _ in range(2)
    )
    seg = jnp.asarray(np.sort(rng.integers(0, 4, (batch, length)), axis=1), jnp.int32)
    return q, k, v, seg


# ------------------------- the contributor audit and CLI: a damageable adversarial run's store

# Rounds of the module-scoped `world` fixture (conftest.py) of test_audit.py and
# test_contrib_cli.py: tests/contrib_world.py's adversarial run, closed by the aggregator.
ADVERSARIAL_ROUNDS = 3


def clone(world, tmp_path) -> tuple:
    """A copy of the run's store that a test may damage."""
    from near_jax.diloco.store import ObjectStore

    path = tmp_path / "store"
    shutil.copytree(world.path, path, ignore=shutil.ignore_patterns("local"))
    return ObjectStore.open(str(path)), path


def ledger_copy(world, tmp_path) -> os.PathLike:
    """The run's ledger as the store's mirror holds it, downloaded to tmp_path."""
    from contrib_world import RUN

    from near_jax.contrib import ledger_mirror

    path = tmp_path / "ledger.sqlite"
    assert ledger_mirror.download(world.store, RUN, str(path))
    return path


def sql(path: os.PathLike, *statements: str) -> None:
    """Runs the statements on the sqlite file at `path` and commits."""
    import sqlite3

    con = sqlite3.connect(path)
    for s in statements:
        con.execute(s)
    con.commit()
    con.close()


def rehash(path: os.PathLike, seq: int, **changes) -> None:
    """Changes entry `seq` and recomputes its hash and every later one: a forgery that
    leaves the chain itself valid."""
    import sqlite3

    from contrib_world import RUN

    from near_jax.contrib import ledger, ledger_verify

    with ledger.Ledger.open(str(path), RUN) as book:
        entries = book.entries()
    con = sqlite3.connect(path)
    prev = None
    for e in entries:
        if e["seq"] < seq:
            prev = e["entry_hash"]
            continue
        fields = {f: e[f] for f in ledger.ENTRY_FIELDS}
        if e["seq"] == seq:
            fields.update(changes)
        h = ledger.entry_hash(e["seq"], prev, fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        con.execute(
            f"UPDATE entries SET {sets}, prev_hash = ?, entry_hash = ? WHERE seq = ?",
            (*fields.values(), prev, h, e["seq"]),
        )
        prev = h
    con.commit()
    con.close()
    assert ledger_verify.verify_chain(str(path), RUN) == []


def row(path: os.PathLike, rnd: int, contributor: str) -> dict:
    """The ledger entry of `contributor` in round `rnd`."""
    from contrib_world import RUN

    from near_jax.contrib import ledger

    with ledger.Ledger.open(str(path), RUN) as book:
        return next(e for e in book.entries(rnd, rnd) if e["contributor"] == contributor)
