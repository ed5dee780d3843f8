"""grow_run and `python -m near_jax.grow`: a source run's checkpoint -> a new run that trains."""

import dataclasses
import functools
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_inputs, random_params, run_module, save_run, small_config

from near_jax import model, sharding
from near_jax.eval.checkpoints import Evaluator
from near_jax.grow import GrowError, grow_params
from near_jax.grow.run import RECORD, grow_on_mesh, grow_run
from near_jax.hf.exchange import export_run
from near_jax.infer import loading
from near_jax.train import checkpoint
from near_jax.train.loop import train

SHAPE = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}
BIGGER = {"d_model": 96, "n_layers": 3, "n_heads": 6, "n_kv_heads": 3, "mlp_dim": 192}


def _target(**mesh):
    cfg = small_config(**{**SHAPE, **BIGGER})
    for key, value in mesh.items():
        cfg.mesh[key] = value
    return cfg


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A saved run of the small model with random (not initial) params, at step 5."""
    workdir = tmp_path_factory.mktemp("grow") / "source"
    cfg = small_config(**SHAPE)
    save_run(workdir, cfg, steps=(5,), params=random_params(cfg, seed=4))
    return str(workdir), cfg


def _logits(run: loading.LoadedRun) -> jax.Array:
    inputs = model_inputs(jax.random.key(0), 2, 16)
    return model.apply(run.params, *inputs, run.model_cfg)


@pytest.fixture(scope="module")
def grown(source, tmp_path_factory):
    """The source grown (clone, identity: the function is kept) on an fsdp x tensor mesh."""
    workdir = str(tmp_path_factory.mktemp("grow") / "grown")
    cfg = _target(data=1, fsdp=4, tensor=2)
    result = grow_run(source[0], cfg, workdir, width="clone", depth="identity", seed=1)
    return result, cfg


def test_the_grown_run_computes_the_source_function(source, grown):
    result, _ = grown
    src, big = loading.load_run(source[0]), loading.load_run(result.workdir)
    assert big.step == 0 and big.model_cfg.d_model == 96 and big.model_cfg.n_layers == 3
    want = _logits(src)
    np.testing.assert_allclose(_logits(big), want, atol=2e-6 * float(jnp.max(jnp.abs(want))))
    assert result.source_step == 5 and result.params_grown > result.params_source


def test_the_record_says_where_the_params_came_from(source, grown):
    result, cfg = grown
    with open(os.path.join(result.workdir, RECORD)) as f:
        record = json.load(f)
    assert record["from"] == os.path.abspath(source[0]) and record["step"] == 5
    assert record["width"] == "clone" and record["depth"] == "identity" and record["seed"] == 1
    assert record["grows"]["d_model"] == [64, 96] and record["grows"]["n_layers"] == [2, 3]
    assert record["preserves_function"]["identity"].startswith("yes")
    with open(os.path.join(result.workdir, "config.json")) as f:
        assert json.load(f)["model"]["d_model"] == 96


def test_eval_and_hf_export_read_the_grown_run(source, grown, tmp_path):
    result, _ = grown
    losses = [
        Evaluator(workdir, max_tokens=1024, batch_size=4).evaluate(None)["loss"]
        for workdir in (source[0], result.workdir)
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # clone + identity keep the function
    written = export_run(result.workdir, str(tmp_path / "hf"))
    assert written.params == result.params_grown
    with open(tmp_path / "hf" / "config.json") as f:
        hf = json.load(f)
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_key_value_heads"]) == (96, 3, 3)


def test_grown_params_land_in_the_target_shardings_and_are_the_same_on_any_mesh(source):
    src_cfg, new_cfg = source[1], _target()
    src_model = model.ModelConfig.from_config(src_cfg.model)
    new_model = model.ModelConfig.from_config(new_cfg.model)
    values = []
    for fsdp, tensor in ((1, 1), (4, 2)):
        mesh_cfg = new_cfg.mesh.copy_and_resolve_references()
        mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = -1, fsdp, tensor
        mesh = sharding.make_mesh(mesh_cfg)
        params = loading.load_run(source[0], mesh=mesh).params
        out = grow_on_mesh(params, src_model, new_model, mesh, "clone", "stack", 0.01, 3)
        want = loading.param_shardings(new_model, mesh)
        for got, target in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True):
            assert got.shape == target.shape and got.sharding == target.sharding
        values.append(out)
    # The q weights are sharded on tensor=2 in the second mesh: a real split, not replication.
    assert not values[1]["blocks"]["attn"]["q"].sharding.is_fully_replicated
    # Equal up to rounding: the noise's scale is a mean over each matrix, which XLA sums in
    # an order that depends on the sharding.
    for a, b in zip(jax.tree.leaves(values[0]), jax.tree.leaves(values[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)


def test_the_grown_run_trains_in_place_and_resumes(grown):
    result, cfg = grown
    cfg = cfg.copy_and_resolve_references()
    cfg.train.steps, cfg.checkpoint.every, cfg.train.eval_every = 2, 2, 0
    cfg.train.progress = "lines"
    first = train(cfg, result.workdir)
    assert first["start_step"] == 0 and np.isfinite(first["train_loss"])
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(result.workdir), read_only=True)
    assert ckpt.good_steps() == [0, 2]  # the grown origin is kept beside the run's own step
    ckpt.close()
    cfg.train.steps = 3
    again = train(cfg, result.workdir)
    assert again["start_step"] == 2


def test_a_grow_killed_before_it_finished_is_set_aside_and_redone(source, tmp_path):
    workdir = tmp_path / "grown"
    unfinished = checkpoint.checkpoint_dir(workdir) / "0"
    unfinished.mkdir(parents=True)
    (unfinished / "state").mkdir()  # no commit marker, no manifest: never finished
    result = grow_run(source[0], _target(), str(workdir))
    assert loading.committed_steps(result.workdir) == [0]
    aside = list((tmp_path / "grown" / "checkpoints.damaged").iterdir())
    assert [p.name.split("-")[0] for p in aside if p.is_dir()] == ["0"]
    with pytest.raises(GrowError, match=r"already holds a run \(checkpoint steps \[0\]\)"):
        grow_run(source[0], _target(), str(workdir))


def test_another_tokenizer_is_refused(source, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "def": 4, "x": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = _target()
    cfg.data.tokenizer = str(tmp_path / "tokenizer.json")
    with pytest.raises(GrowError, match=r"tokenizer.json' is not the source run's tokenizer"):
        grow_run(source[0], cfg, str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_a_source_that_is_not_a_run_names_the_from_flag(source, tmp_path):
    with pytest.raises(loading.RunError, match=r"^--from='.*nothing': no such directory"):
        grow_run(str(tmp_path / "nothing"), _target(), str(tmp_path / "new"))
    spec = f"{source[0]}:7"
    with pytest.raises(loading.RunError, match=rf"^--from={spec}: step 7 not found; .* \[5\]"):
        grow_run(spec, _target(), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_a_workdir_a_run_started_in_is_refused(source, tmp_path):
    workdir = tmp_path / "started"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")  # a train killed before its first save
    with pytest.raises(GrowError, match=r"is not empty \(a run config.json\)"):
        grow_run(f"{source[0]}/checkpoints", _target(), str(workdir))
    (workdir / "config.json").unlink()
    (workdir / "metrics.jsonl").write_text("")
    with pytest.raises(GrowError, match=r"is not empty \(metrics.jsonl\)"):
        grow_run(source[0], _target(), str(workdir))


CONFIG_FILE = """
from near_jax.config import default_config

def get_config():
    cfg = default_config()
    cfg.model.update(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=16, mlp_dim=128, dtype="float32", rope_theta=10_000.0)
    cfg.data.seq_len = 32
    cfg.train.global_batch_size = 8
    return cfg
"""


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--config.model.n_layers=1"], r"the target is smaller: model.n_layers is 1"),
        (["--config.model.vocab_size=512", "--config.model.d_model=96"], r"model.vocab_size"),
        (["--width=copy", "--config.model.d_model=96"], r"--width='copy' is not allowed"),
        (["--from="], r"--from is required"),
    ],
)
def test_the_program_refuses_growth_that_cannot_work_in_one_line(source, tmp_path, flags, match):
    config = tmp_path / "small.py"
    config.write_text(textwrap.dedent(CONFIG_FILE))
    args = [f"--from={source[0]}", f"--config={config}", f"--workdir={tmp_path / 'new'}"]
    proc = run_module("near_jax.grow", *args, *flags)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grow.py: error: "), proc.stderr
    assert __import__("re").search(match, lines[0]), lines[0]
    assert not (tmp_path / "new").exists()  # nothing written


def test_the_program_grows_a_run(source, tmp_path):
    config = tmp_path / "small.py"
    config.write_text(textwrap.dedent(CONFIG_FILE))
    proc = run_module(
        "near_jax.grow",
        f"--from={source[0]}:5",
        f"--config={config}",
        "--config.model.d_model=128",
        "--config.model.n_layers=4",
        f"--workdir={tmp_path / 'new'}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "width=clone: function preserved: yes" in proc.stdout
    assert "depth=stack: function preserved: no" in proc.stdout
    assert loading.load_run(str(tmp_path / "new")).model_cfg.n_layers == 4


def test_growing_needs_only_a_share_of_the_models_per_device():
    """Compiled, not run: per-device temporaries stay a small multiple of each device's
    share of the grown model, so growth scales with the mesh (no matrix gathered whole)."""
    src = model.ModelConfig(1024, 512, 4, 4, 2, 128, 2048, dtype="float32")
    new = dataclasses.replace(src, d_model=1024, n_layers=8, n_heads=8, n_kv_heads=4, mlp_dim=4096)
    temps = {}
    for devices in (4, 8):
        mesh_cfg = small_config().mesh
        mesh_cfg.data, mesh_cfg.fsdp = 1, devices
        mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:devices])
        grow = jax.jit(
            functools.partial(grow_params, cfg=src, new_cfg=new, mesh=mesh),
            out_shardings=jax.tree.map(lambda x: x.sharding, loading.param_shardings(new, mesh)),
        )
        lowered = grow.lower(loading.param_shardings(src, mesh), rng=jax.random.key(0))
        memory = lowered.compile().memory_analysis()
        share = (
            sum(
                x.size * 4
                for x in jax.tree.leaves(jax.eval_shape(lambda: model.init(new, jax.random.key(0))))
            )
            / devices
        )
        assert memory.output_size_in_bytes == pytest.approx(share, rel=0.01)
        temps[devices] = memory.temp_size_in_bytes
        assert temps[devices] < 3 * share, (devices, temps[devices] / share)
    assert temps[8] < 0.6 * temps[4]  # twice the devices, half the temporaries each
