"""Held-out evaluation: bits per byte against a hand computation, the validation split."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from helpers import small_config

from near_jax import model, sharding
from near_jax.data.tokenizer import ByteTokenizer
from near_jax.eval import heldout

TEXTS = {
    "a.txt": "héllo wörld",  # 13 bytes: é and ö take two each
    "b.txt": "def f(x):\n    return x * 2\n",  # 9 + 1 + 16 + 1 = 27 bytes
    "c.txt": "€" * 30 + " long enough to span rows",  # 90 + 25 bytes: cut into pieces
}


HAND_BYTES = 13 + 27 + 115


def _nats(logits_LxV, targets_L) -> np.ndarray:
    logits = np.asarray(logits_LxV, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return lse - logits[np.arange(len(targets_L)), targets_L]


def test_bits_per_byte_matches_a_hand_computation(tmp_path):
    for name, text in TEXTS.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    cfg = small_config()
    cfg.data.source = str(tmp_path)
    cfg.data.seq_len = 32
    mcfg = model.ModelConfig.from_config(cfg.model)
    params = model.init(mcfg, jax.random.key(3))
    tok = ByteTokenizer()

    held = heldout.load_heldout(cfg.data, tok, max_tokens=10**6, all_docs=True)
    assert held.bytes == HAND_BYTES and held.docs == 3
    got = heldout.evaluate_heldout(params, mcfg, sharding.make_mesh(cfg.mesh), held, batch_size=3)

    # Reference: each document alone, cut into windows of 33 tokens that overlap by one.
    nats, count = 0.0, 0
    for text in TEXTS.values():
        ids = [tok.bos_id, *text.encode("utf-8"), tok.eos_id]
        for start in range(0, len(ids) - 1, 32):
            window = ids[start : start + 33]
            x = jnp.asarray([window[:-1]])
            logits = model.apply(params, x, jnp.arange(x.shape[1])[None], jnp.ones_like(x), mcfg)
            per_target = _nats(logits[0], np.asarray(window[1:]))
            is_text = [start + 1 + j < len(ids) - 1 for j in range(len(window) - 1)]
            nats += per_target[is_text].sum()
            count += sum(is_text)
    assert got["tokens"] == count == HAND_BYTES  # byte tokenizer: one token per byte
    np.testing.assert_allclose(got["loss"], nats / count, rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_byte"], nats / math.log(2) / HAND_BYTES, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(nats / count), rtol=1e-5)


def test_validation_split_is_the_default_and_whole_documents_are_taken():
    cfg = small_config()  # stdlib source
    held = heldout.load_heldout(cfg.data, ByteTokenizer(), max_tokens=2000)
    assert held.tokens >= 2000 and held.bytes == held.tokens  # ascii-dominated stdlib
    w = held.rows["weights"]
    assert w.sum() == held.tokens and set(np.unique(w)) <= {0.0, 1.0}
