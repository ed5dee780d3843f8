"""Tests of near_jax.data.tokenizer: byte, SentencePiece and Hugging Face tokenizers."""

import json
import pickle
import random

import numpy as np
import pytest

from near_jax.config import ConfigError
from near_jax.data.tokenizer import load_tokenizer

WORDS = "the quick brown fox jumps over lazy dog data model train token pack shard".split()


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n_lines)]


def _random_unicode(rng: random.Random, n: int) -> str:
    chars = []
    while len(chars) < n:
        c = rng.randint(0, 0x10FFFF)
        if not 0xD800 <= c <= 0xDFFF:  # surrogates are not encodable
            chars.append(chr(c))
    return "".join(chars)


def test_byte_round_trip_random_unicode():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    rng = random.Random(0)
    for n in (0, 1, 7, 100, 1000):
        text = _random_unicode(rng, n) + "héllo wörld ✓ 日本"
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
        np.testing.assert_array_equal(tok.encode_array(text), np.asarray(ids, np.int32))
    assert pickle.loads(pickle.dumps(tok)).encode("abc") == tok.encode("abc")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(_corpus()))
    sentencepiece.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "tiny"),
        vocab_size=320,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        minloglevel=2,
    )
    return str(d / "tiny.model")


def test_sentencepiece(sp_model):
    tok = load_tokenizer(sp_model)
    assert tok.name == "sentencepiece:tiny.model"
    # SentencePiece defaults: unk=0, bos=1, eos=2, no pad -> pad falls back to eos.
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 320)
    for text in _corpus(20, seed=1) + ["unseen zebra ünïcode"]:
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.encode("the lazy dog") == tok.encode("the lazy dog")


def _train_hf(specials: list[str]):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def test_hf_tokenizer_json(tmp_path):
    hf = _train_hf(["<pad>", "<s>", "</s>"])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer(str(path))
    assert tok.name == "hf:tokenizer.json"
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == hf.get_vocab_size()
    rng = random.Random(0)
    for text in _corpus(10, seed=2) + [_random_unicode(rng, 50), "tabs\tand\nnewlines  "]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.encode("quick fox") == tok.encode("quick fox")


def test_hf_specials_from_config_or_fresh_ids(tmp_path):
    # No special tokens at all: bos/eos get fresh ids after the vocabulary, pad = eos.
    hf = _train_hf([])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    n = hf.get_vocab_size()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (n, n + 1, n + 1, n + 2)
    assert tok.decode([tok.bos_id, *tok.encode("lazy dog"), tok.eos_id]) == "lazy dog"

    # Names given by a tokenizer_config.json next to the file win; one token for bos+eos.
    d = tmp_path / "gpt2like"
    d.mkdir()
    hf = _train_hf(["<|endoftext|>", "<unusual_pad>"])
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|endoftext|>"}, "pad_token": "<unusual_pad>"})
    )
    tok = load_tokenizer(str(d / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 1)


@pytest.mark.parametrize(
    "name, content",
    [
        ("missing.model", None),
        ("garbage.model", b"\x00\x01not a sentencepiece model\xff" * 10),
        ("tokenizer.json", b'{"version": "1.0", "model": '),
        ("weird.vocab", b"hello\nworld\n"),
    ],
)
def test_bad_tokenizer_files(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_tokenizer(str(path))
    msg = str(e.value)
    assert msg.startswith("config.data.tokenizer=") and str(path) in msg
    assert "'byte'" in msg and "\n" not in msg


def test_sentencepiece_feeds_the_data_pipeline(sp_model, tmp_path):
    from near_jax import config, data
    from near_jax.data import pipeline

    texts = _corpus(30, seed=3)
    for i, text in enumerate(texts):
        (tmp_path / f"{i:02d}.txt").write_text(text)
    cfg = config.default_config().data
    cfg.update(source=str(tmp_path), tokenizer=sp_model, seq_len=32)
    tok = load_tokenizer(sp_model)
    batch = next(
        data.make_iterator(
            cfg, split="train", seed=0, global_batch_size=4, process_index=0, process_count=1
        )
    )
    x, seg = batch["inputs"], batch["segment_ids"]
    assert x.max() < tok.vocab_size
    for row, segs in zip(x, seg, strict=True):
        for s in np.unique(segs)[1:-1]:  # whole documents: not the first or last piece
            piece = row[segs == s]
            assert piece[0] == tok.bos_id and piece[-1] == tok.eos_id
            assert tok.decode(piece) in texts
    reader = pipeline._ReadTokens(data.list_documents(cfg), tok)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(reader))(3), reader(3))
