"""Loading a run for inference: refusals, any mesh, and an imported run that moves."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from helpers import DAMAGE_KINDS, damage_step, save_run, small_config

from near_jax import model
from near_jax.infer import loading
from near_jax.train import checkpoint_reads

TOKENIZER = os.path.join("tokenizer", "tokenizer.json")  # where an imported run keeps it


def _one_line_error(call, match):
    with pytest.raises(loading.RunError, match=match) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_run_directory(tmp_path):
    _one_line_error(lambda: loading.load_run(str(tmp_path / "absent")), "no such directory")


def test_directory_without_checkpoints(tmp_path):
    _one_line_error(lambda: loading.load_run(str(tmp_path)), "no committed checkpoint")
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1").mkdir(parents=True)  # never committed
    _one_line_error(lambda: loading.load_run(str(tmp_path)), "no committed checkpoint")


def test_unknown_step_lists_the_committed_steps(saved_run):
    _one_line_error(
        lambda: loading.load_run(str(saved_run), step=3),
        r"--step=3: not found in .*; committed steps: \[5\]$",
    )


def test_architecture_mismatch_names_the_param_and_both_shapes(saved_run):
    _one_line_error(
        lambda: loading.load_run(str(saved_run), model_overrides={"mlp_dim": 96}),
        r"a different architecture: params\['blocks'\]\['mlp'\]\['down'\] has shape "
        r"\(2, 128, 64\) in the checkpoint but \(2, 96, 64\) in the config",
    )


def test_any_mesh_loads_identical_params(saved_run):
    base = loading.load_run(str(saved_run))
    assert base.step == 5 and base.tokenizer.name == "byte" and len(base.mesh.devices.flat) == 8
    for fsdp, tensor in ((2, 2), (8, 1), (1, 4)):
        mesh = loading.inference_mesh(fsdp=fsdp, tensor=tensor)
        assert (mesh.shape["fsdp"], mesh.shape["tensor"]) == (fsdp, tensor)
        run = loading.load_run(str(saved_run), mesh=mesh)
        jax.tree.map(np.testing.assert_array_equal, run.params, base.params)
        q = run.params["blocks"]["attn"]["q"]
        assert q.sharding.mesh is mesh and not q.sharding.is_fully_replicated
    _one_line_error(lambda: loading.inference_mesh(fsdp=3), "must divide the 8 devices")


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    """A run imported from an HF directory with a tokenizer.json (no torch needed)."""
    safetensors = pytest.importorskip("safetensors.numpy")
    tokenizers = pytest.importorskip("tokenizers")
    from near_jax.hf.convert import llama_config, params_to_hf
    from near_jax.hf.exchange import import_hf

    base = tmp_path_factory.mktemp("imported")
    hf_dir = base / "hf"
    hf_dir.mkdir()
    cfg = small_config()
    shapes = jax.eval_shape(lambda: model.init(cfg.model, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), shapes)
    safetensors.save_file(params_to_hf(params, cfg.model), str(hf_dir / "model.safetensors"))
    (hf_dir / "config.json").write_text(json.dumps(llama_config(cfg.model)))
    words = ["<unk>", "<s>", "</s>", *"the a cat sat on mat".split()]
    vocab = {w: i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(hf_dir / "tokenizer.json"))
    import_hf(str(hf_dir), str(base / "run"))
    return base / "run", params


def test_imported_run_stores_a_relative_tokenizer_and_can_be_moved(
    imported_run, tmp_path, monkeypatch
):
    run, params = imported_run
    assert json.loads((run / "config.json").read_text())["data"]["tokenizer"] == TOKENIZER
    assert loading.run_config(str(run), 0).data.tokenizer == TOKENIZER  # the checkpoint's
    shutil.copytree(run, tmp_path / "before" / "run")  # the module's other tests use `run`
    assert loading.load_run(str(tmp_path / "before" / "run")).tokenizer.name == "hf:tokenizer.json"
    os.rename(tmp_path / "before", tmp_path / "after")
    moved = tmp_path / "after" / "run"
    monkeypatch.chdir(tmp_path / "after")  # TOKENIZER is not relative to here
    loaded = loading.load_run("run")  # a relative workdir too
    assert loaded.workdir == "run" and checkpoint_reads.is_params_only("run", 0)
    assert loaded.cfg.data.tokenizer == str(moved / TOKENIZER)
    assert loaded.tokenizer.name == "hf:tokenizer.json"
    assert loaded.tokenizer.encode("the cat sat on the mat") == [3, 5, 6, 7, 3, 8]
    np.testing.assert_array_equal(loaded.params["embed"], params["embed"])


def test_relative_tokenizer_is_found_in_the_run_then_in_the_current_directory(
    imported_run, tmp_path, monkeypatch
):
    run, _ = imported_run
    shutil.copytree(run, tmp_path / "run")
    shutil.move(tmp_path / "run" / "tokenizer", tmp_path / "tokenizer")
    monkeypatch.chdir(tmp_path)  # only relative to the current directory: still loads
    assert loading.load_run(str(tmp_path / "run")).tokenizer.name == "hf:tokenizer.json"
    assert loading.tokenizer_path(str(tmp_path / "run"), TOKENIZER) == TOKENIZER

    shutil.copytree(tmp_path / "tokenizer", tmp_path / "run" / "tokenizer")  # both: the run's
    want = str(tmp_path / "run" / TOKENIZER)
    assert loading.tokenizer_path(str(tmp_path / "run"), TOKENIZER) == want
    assert loading.tokenizer_path("run", TOKENIZER) == want  # absolute once resolved
    for spec in ("byte", want):  # unchanged
        assert loading.tokenizer_path(str(run), spec) == spec


def test_is_params_only(imported_run, saved_run, tmp_path):
    assert checkpoint_reads.is_params_only(str(imported_run[0]), 0)
    assert not checkpoint_reads.is_params_only(str(saved_run), 5)  # a training checkpoint
    assert not checkpoint_reads.is_params_only(str(saved_run), 4)  # no such step
    assert not checkpoint_reads.is_params_only(str(tmp_path), 0)  # no checkpoints at all


def test_a_tokenizer_that_is_gone_is_a_one_line_error(tmp_path):
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"not a tokenizer")  # the config only checks that the file exists
    cfg = small_config()
    cfg.data.tokenizer = str(tok)
    save_run(tmp_path / "run", cfg)
    _one_line_error(
        lambda: loading.load_run(str(tmp_path / "run")), "the run's tokenizer cannot be loaded"
    )


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run with checkpoints at steps 3 and 5 (copy it before damaging it)."""
    workdir = tmp_path_factory.mktemp("two_steps")
    save_run(workdir, small_config(), steps=(3, 5))
    return workdir


def _damaged(two_steps, tmp_path, kind, steps=(5,)):
    workdir = tmp_path / "run"
    shutil.copytree(two_steps, workdir)
    for step in steps:
        damage_step(workdir, step, kind)
    return str(workdir)


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_a_damaged_latest_step_falls_back_to_the_older_one(two_steps, tmp_path, kind, caplog):
    run = loading.load_run(_damaged(two_steps, tmp_path, kind))
    assert run.step == (5 if kind == "empty_newer_step" else 3) and run.cfg.model.d_model == 64
    warnings = [r.getMessage() for r in caplog.records if "trying an older step" in r.getMessage()]
    if kind in ("no_commit_marker", "empty_newer_step"):  # never committed: not a candidate
        assert not warnings
    else:
        (warning,) = warnings
        assert warning.startswith("checkpoint step 5: unreadable (") and "\n" not in warning


@pytest.mark.parametrize(
    "kind, why",
    [
        ("arrays_truncated", "the manifest says"),
        ("config_garbage", "config: JSONDecodeError"),
        ("config_list", "config: the saved config is a JSON list, not an object"),
        ("config_empty", "config: the saved config has no model section"),
    ],
)
def test_a_damaged_explicit_step_is_a_one_line_error(two_steps, tmp_path, kind, why):
    workdir = _damaged(two_steps, tmp_path, kind)
    with pytest.raises(
        loading.CheckpointUnreadable, match=r"^checkpoint step 5: unreadable \("
    ) as e:
        loading.load_run(workdir, step=5)
    assert why in str(e.value) and "\n" not in str(e.value) and e.value.step == 5
    assert loading.load_run(workdir, step=3).step == 3


def test_no_readable_step_is_one_line_saying_why_each_failed(two_steps, tmp_path):
    workdir = _damaged(two_steps, tmp_path, "arrays_deleted", steps=(3, 5))
    damage_step(workdir, 5, "config_list")
    message = _one_line_error(lambda: loading.load_run(workdir), "no checkpoint could be read")
    assert "checkpoint step 5: unreadable (" in message and "a JSON list" in message
    assert "checkpoint step 3: unreadable (" in message and "is missing" in message


@pytest.mark.parametrize(
    "saved, problem",
    [
        ([1, 2], "the saved config is a JSON list, not an object"),
        ({}, "the saved config has no model section"),
        ({"model": [], "data": {}}, "the saved config has no model section"),
        ({"model": {"d_model": 64}, "data": {}}, "model.vocab_size is None in the saved config"),
        ({"model": {"vocab_size": "x"}, "data": {}}, "model.vocab_size is 'x' in the saved"),
    ],
)
def test_run_config_checks_the_shape_of_the_saved_config(saved_run, monkeypatch, saved, problem):
    monkeypatch.setattr(checkpoint_reads, "read_config", lambda directory, step: saved)
    with pytest.raises(loading.CheckpointUnreadable) as e:
        loading.run_config(str(saved_run), 5)
    want = f"checkpoint step 5: unreadable ({saved_run}/checkpoints/5/config: {problem}"
    assert str(e.value).startswith(want) and "\n" not in str(e.value)
