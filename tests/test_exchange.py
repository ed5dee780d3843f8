"""Hugging Face files (`near_jax.hf.exchange`): an exported run loads in transformers with the
same logits, import then export is exact and sharded, and refusals leave no directory.
(The tensor mapping: test_convert.py; the command line: test_hf.py.)"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from helpers import (
    HF_THETA,
    hf_ids,
    hf_llama_model,
    hf_logits,
    hf_torch,
    near_logits,
    random_params,
    small_config,
)

from near_jax import model
from near_jax.data.tokenizer import load_tokenizer
from near_jax.hf import exchange
from near_jax.hf.convert import HFError
from near_jax.hf.exchange import INDEX_FILE, SafetensorsDir, export_run, import_hf
from near_jax.infer import loading
from near_jax.train import checkpoint, checkpoint_reads

pytest.importorskip("safetensors.numpy")  # the rest of near_jax does not need it

jax.config.update("jax_default_matmul_precision", "highest")

TIED = pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])


def _near_config(tied: bool) -> ml_collections.ConfigDict:
    return small_config(tie_embeddings=tied, rope_theta=HF_THETA)


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
def test_export_files_load_in_transformers_with_same_logits(tied, tmp_path, tokenizer_json):
    torch, transformers = hf_torch()
    cfg = _near_config(tied)
    if tied:  # one variant also carries an HF tokenizer across
        cfg.data.tokenizer = tokenizer_json
    params = random_params(cfg)
    _save_run(tmp_path / "run", cfg, params)
    written = export_run(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert written.params == sum(x.size for x in jax.tree.leaves(params))

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    ids = hf_ids(384)
    want = near_logits(params, model.ModelConfig.from_config(cfg.model), ids)
    np.testing.assert_allclose(hf_logits(torch, hf_model, ids), want, rtol=0, atol=1e-4)

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
    torch, transformers = hf_torch()
    hf_model = hf_llama_model(transformers, tied=False)
    hf_dir, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
    hf_model.save_pretrained(str(hf_dir), max_shard_size="200KB")
    (hf_dir / "tokenizer.json").write_text(open(tokenizer_json).read())
    assert (hf_dir / INDEX_FILE).exists()  # a sharded checkpoint is read

    written = import_hf(str(hf_dir), str(run))
    assert written.params == sum(p.numel() for p in hf_model.parameters())
    loaded = loading.load_run(str(run))
    assert loaded.step == 0 and loaded.tokenizer.name == "hf:tokenizer.json"
    assert loaded.model_cfg.rope_theta == HF_THETA and loaded.model_cfg.n_kv_heads == 2
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


def test_export_refusals_and_a_crash_leaves_no_directory(tmp_path, monkeypatch):
    cfg = small_config()
    _save_run(tmp_path / "run", cfg, random_params(cfg))
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
