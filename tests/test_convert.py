"""Hugging Face conversion (`near_jax.hf.convert`): logits parity on import, the tensor
mapping of scanned and unrolled params, and refusals of what cannot be represented. (Files:
test_exchange.py; the command line: test_hf.py.)"""

import dataclasses

import jax
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
from near_jax.hf.convert import HFError, llama_config, params_from_hf, params_to_hf

pytest.importorskip("safetensors.numpy")  # the rest of near_jax does not need it

jax.config.update("jax_default_matmul_precision", "highest")

TIED = pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])


@TIED
def test_import_matches_transformers_logits(tied):
    torch, transformers = hf_torch()
    hf_model = hf_llama_model(transformers, tied)
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    overrides, params = params_from_hf(state, hf_model.config)
    assert overrides["tie_embeddings"] is tied and overrides["rope_theta"] == HF_THETA
    cfg = model.ModelConfig(**overrides, dtype="float32")
    ids = hf_ids(300)
    want = hf_logits(torch, hf_model, ids)
    got = near_logits(params, cfg, ids)
    assert np.abs(want).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # The theta is really used: the default one gives other logits (the test can fail).
    other = model.ModelConfig(**{**overrides, "rope_theta": 10_000.0}, dtype="float32")
    assert np.abs(near_logits(params, other, ids) - want).max() > 1e-3


def test_unscanned_params_export_like_scanned():
    cfg = small_config()
    params = random_params(cfg)
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
    cfg = small_config(rope_theta=HF_THETA)
    return llama_config(cfg.model), params_to_hf(random_params(cfg), cfg.model)


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
