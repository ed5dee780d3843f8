"""Hugging Face interop: logits parity both ways, files round trip, refusals, CLI errors."""

import dataclasses
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from helpers import damage_step, run_module, small_config, subprocess_env

from near_jax import hf, model
from near_jax.data.tokenizer import load_tokenizer
from near_jax.hf import exchange
from near_jax.hf.convert import HFError, llama_config, params_from_hf, params_to_hf
from near_jax.hf.exchange import INDEX_FILE, SafetensorsDir, export_run, import_hf
from near_jax.infer import loading
from near_jax.train import checkpoint, checkpoint_reads

pytest.importorskip("safetensors.numpy")  # the rest of near_jax does not need it

jax.config.update("jax_default_matmul_precision", "highest")
apply = jax.jit(model.apply, static_argnums=4)

THETA = 12345.0
TIED = pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])


def _torch():
    """torch and transformers, or a skip (the parity tests need both; the rest neither)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return torch, transformers


def _ids(vocab, batch=2, length=19):
    return np.random.default_rng(0).integers(0, vocab, (batch, length))


def _near_logits(params, cfg, ids):
    """near_jax logits of unpacked rows: positions 0..L-1, one segment."""
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return np.asarray(apply(params, ids, positions, np.ones_like(ids), cfg))


def _hf_logits(torch, hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor(ids)).logits.numpy()


def _hf_model(transformers, tied, vocab=300):
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
        rope_theta=THETA,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
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


def _near_config(tied: bool) -> ml_collections.ConfigDict:
    return small_config(tie_embeddings=tied, rope_theta=THETA)


def _near_params(cfg: ml_collections.ConfigDict, seed: int = 1):
    """Random params of exactly model.init's tree, norm scales away from ones.

    Drawn with numpy over `jax.eval_shape(model.init)`: model.init compiles afresh on every
    call (5-10 s here), which would dominate this file's run time.
    """
    shapes = jax.eval_shape(lambda: model.init(cfg.model, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if "scale" in jax.tree_util.keystr(path):
            return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
        return (0.1 * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


class _Position:
    def get_state(self):
        return {"num_shards": 1, "shards": {"0": 0}}


def _save_run(workdir, cfg, params, step=7):
    """A near_jax run directory holding one checkpoint, as training writes it."""
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), async_save=False)
    ckpt.save(step, {"step": np.int32(step), "params": params}, _Position(), cfg, wait=True)
    ckpt.close()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A tiny word-level HF tokenizer.json with <s> and </s> (no tokenizer_config.json)."""
    tokenizers = pytest.importorskip("tokenizers")
    words = "the a of and to in is it that for on with as was at by an be this".split()
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def _read_dir_tensors(directory) -> dict[str, np.ndarray]:
    tensors = SafetensorsDir(str(directory))
    return {name: tensors[name] for name in tensors}


@TIED
def test_import_matches_transformers_logits(tied):
    torch, transformers = _torch()
    hf_model = _hf_model(transformers, tied)
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    overrides, params = params_from_hf(state, hf_model.config)
    assert overrides["tie_embeddings"] is tied and overrides["rope_theta"] == THETA
    cfg = model.ModelConfig(**overrides, dtype="float32")
    ids = _ids(300)
    want = _hf_logits(torch, hf_model, ids)
    got = _near_logits(params, cfg, ids)
    assert np.abs(want).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # The theta is really used: the default one gives other logits (the test can fail).
    other = model.ModelConfig(**{**overrides, "rope_theta": 10_000.0}, dtype="float32")
    assert np.abs(_near_logits(params, other, ids) - want).max() > 1e-3


@TIED
def test_export_files_load_in_transformers_with_same_logits(tied, tmp_path, tokenizer_json):
    torch, transformers = _torch()
    cfg = _near_config(tied)
    if tied:  # one variant also carries an HF tokenizer across
        cfg.data.tokenizer = tokenizer_json
    params = _near_params(cfg)
    _save_run(tmp_path / "run", cfg, params)
    written = export_run(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert written.params == sum(x.size for x in jax.tree.leaves(params))

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    ids = _ids(384)
    want = _near_logits(params, model.ModelConfig.from_config(cfg.model), ids)
    np.testing.assert_allclose(_hf_logits(torch, hf_model, ids), want, rtol=0, atol=1e-4)

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["max_position_embeddings"] == 32
    if tied:
        assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
        text = "the cat is on a mat"
        want_ids = load_tokenizer(tokenizer_json).encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == want_ids
        assert hf_tok.bos_token == "<s>" and hf_tok.eos_token == "</s>"
    else:
        assert (config["bos_token_id"], config["eos_token_id"]) == (256, 257)  # byte
        assert not (tmp_path / "hf" / "tokenizer.json").exists()


def test_round_trip_import_export_is_exact_and_sharded(tmp_path, tokenizer_json):
    torch, transformers = _torch()
    hf_model = _hf_model(transformers, tied=False)
    hf_dir, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
    hf_model.save_pretrained(str(hf_dir), max_shard_size="200KB")
    (hf_dir / "tokenizer.json").write_text(open(tokenizer_json).read())
    assert (hf_dir / INDEX_FILE).exists()  # a sharded checkpoint is read

    written = import_hf(str(hf_dir), str(run))
    assert written.params == sum(p.numel() for p in hf_model.parameters())
    loaded = loading.load_run(str(run))
    assert loaded.step == 0 and loaded.tokenizer.name == "hf:tokenizer.json"
    assert loaded.model_cfg.rope_theta == THETA and loaded.model_cfg.n_kv_heads == 2
    # config.checkpoint.init_from=RUN restores these params into a fresh run's shapes.
    abstract = loading.param_shardings(loaded.model_cfg, loaded.mesh)
    step, params = checkpoint_reads.restore_params(str(run), abstract)
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, params, loaded.params)

    export_run(str(run), str(out), max_shard_size="150KB")
    assert (out / INDEX_FILE).exists() and (out / "tokenizer.json").exists()
    want, got = _read_dir_tensors(hf_dir), _read_dir_tensors(out)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in got.values())


def test_unscanned_params_export_like_scanned():
    cfg = small_config()
    params = _near_params(cfg)
    unrolled = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(cfg.model.n_layers):
        unrolled[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
    unrolled_cfg = dataclasses.replace(model.ModelConfig.from_config(cfg.model), scan_layers=False)
    assert jax.tree.structure(unrolled) == jax.tree.structure(
        jax.eval_shape(lambda: model.init(unrolled_cfg, jax.random.key(0)))
    )
    want = params_to_hf(params, cfg.model)
    got = params_to_hf(unrolled, unrolled_cfg)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    bf16 = params_to_hf(params, cfg.model, dtype="bfloat16")
    assert bf16["model.embed_tokens.weight"].dtype.name == "bfloat16"


@pytest.fixture(scope="module")
def good_hf():
    """A valid (hf config, state dict) pair from a near_jax model, no torch needed."""
    cfg = small_config(rope_theta=THETA)
    return llama_config(cfg.model), params_to_hf(_near_params(cfg), cfg.model)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"mlp_bias": True}, "mlp_bias=True is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"model_type": "mistral"}, "model_type='mistral' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        ({"hidden_size": None}, "'hidden_size' is missing"),
        ({"num_key_value_heads": 3}, "a divisor of 4 heads"),
        ({"vocab_size": "384"}, "vocab_size='384' is not allowed"),
    ],
)
def test_unrepresentable_configs_are_refused_in_one_line(good_hf, change, match):
    config, state = good_hf
    config = {**config, **change}
    with pytest.raises(HFError, match=match) as e:
        params_from_hf(state, config)
    assert "\n" not in str(e.value)


def test_bad_tensors_are_refused(good_hf):
    config, state = good_hf
    with pytest.raises(HFError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.b"):
        params_from_hf({**state, "model.layers.0.self_attn.q_proj.bias": np.zeros(64)}, config)
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(HFError, match="'model.norm.weight' is missing"):
        params_from_hf(missing, config)
    with pytest.raises(HFError, match=r"has shape \(64, 64\) but config.json implies"):
        params_from_hf({**state, "model.layers.1.mlp.up_proj.weight": np.zeros((64, 64))}, config)
    # Old checkpoints' saved RoPE buffers are recomputed, so they are skipped.
    params_from_hf({**state, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8)}, config)


def test_export_refusals_and_a_crash_leaves_no_directory(tmp_path, monkeypatch):
    cfg = small_config()
    _save_run(tmp_path / "run", cfg, _near_params(cfg))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(HFError, match="already exists and is not empty"):
        export_run(str(tmp_path / "run"), str(tmp_path / "full"))
    with pytest.raises(loading.RunError, match="--step=3: not found"):
        export_run(str(tmp_path / "run"), str(tmp_path / "out"), step=3)
    with pytest.raises(HFError, match="--max_shard_size='5 parsecs' is not allowed"):
        export_run(str(tmp_path / "run"), str(tmp_path / "out"), max_shard_size="5 parsecs")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(exchange, "_write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["full", "run"]  # no out, no temporary left


def _cli(*args):  # XLA_FLAGS="": XLA's defaults (one CPU device)
    return run_module("near_jax.hf", *args, env=subprocess_env(XLA_FLAGS=""), timeout=120)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = _cli("export", f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no such directory" in proc.stderr

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    proc = _cli("import", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "config.json: not valid JSON" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_hf_reexports_the_conversion():
    from near_jax.hf import convert as hf_convert

    names = (
        "DTYPES",
        "HFError",
        "iter_hf_tensors",
        "llama_config",
        "model_overrides",
        "params_from_hf",
        "params_to_hf",
    )
    for name in names:
        assert getattr(hf, name) is getattr(hf_convert, name), name


def test_cli_export_of_unreadable_checkpoints_is_one_line_and_exit_1(tmp_path, saved_run):
    shutil.copytree(saved_run, tmp_path / "run")
    damage_step(tmp_path / "run", 5, "arrays_deleted")
    proc = _cli("export", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) < 10, proc.stderr[-3000:]
    assert "export failed: " in lines[-1] and "no checkpoint could be read" in lines[-1]
    assert not (tmp_path / "out").exists()
