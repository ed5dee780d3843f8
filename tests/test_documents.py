"""Tests of near_jax.data.documents: sources (the stdlib, .txt, .jsonl, .bin), splits, errors."""

import json
import pickle

import numpy as np
import pytest
from helpers import check_row_invariants, data_cfg, data_it, doc_markers, doc_text, take

from near_jax import data
from near_jax.config import ConfigError
from near_jax.data.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")


def test_stdlib_split_is_stable_and_nonempty():
    cfg = data_cfg()
    docs = data.list_documents(cfg)
    val = data.split_documents(docs, "val", cfg.val_fraction)
    train = data.split_documents(docs, "train", cfg.val_fraction)
    assert len(val) >= 1 and len(val) + len(train) == len(docs)
    assert not set(val.tolist()) & set(train.tolist())
    names = [docs.identity(int(i)) for i in val]
    assert all(n.endswith(".py") and "site-packages" not in n for n in names)
    # a tiny fraction still holds out one document
    assert len(data.split_documents(docs, "val", 1e-9)) == 1


def test_jsonl_glob_with_custom_field(tmp_path):
    for name, nums in (("a.jsonl", range(0, 20)), ("b.jsonl", range(20, 45))):
        lines = [json.dumps({"body": doc_text(i), "id": i}) for i in nums]
        lines.insert(3, "")  # blank lines are skipped
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    (tmp_path / "c.txt").write_text(doc_text(99))  # not matched by the glob
    cfg = data_cfg(source=str(tmp_path / "*.jsonl"), jsonl_field="body", val_fraction=0.25)
    docs = data.list_documents(cfg)
    assert len(docs) == 45
    assert docs.identity(0) == "a.jsonl:1" and docs.identity(3) == "a.jsonl:5"
    assert docs.read_text(20) == doc_text(20)
    seen = set()
    for split in ("train", "val"):
        for b in take(data_it(cfg, split), 4):
            check_row_invariants(b, BYTE)
            seen |= doc_markers(b)
    assert seen == set(range(45))


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_source(tmp_path, dtype):
    for name, n in (("x.bin", 1000), ("y.bin", 555)):
        (np.arange(n) % 200).astype(dtype).tofile(tmp_path / name)
    cfg = data_cfg(source=str(tmp_path), bin_dtype=dtype, seq_len=16)
    docs = data.list_documents(cfg)
    assert len(docs) == 1000 // 17 + 1 + 555 // 17 + 1  # last partial chunks kept
    assert docs.identity(0) == "x.bin#0" and docs.identity(59) == "y.bin#0"
    np.testing.assert_array_equal(docs.read_tokens(1, BYTE), np.arange(17, 34))
    np.testing.assert_array_equal(docs.read_tokens(58, BYTE), np.arange(986, 1000) % 200)
    docs2 = pickle.loads(pickle.dumps(docs))  # open memmaps are not pickled
    np.testing.assert_array_equal(docs2.read_tokens(1, BYTE), np.arange(17, 34))
    for b in take(data_it(cfg, batch=4), 20):
        check_row_invariants(b, BYTE, seq=16, specials=False)
        x, seg = b["inputs"], b["segment_ids"]
        # chunks come through unchanged: consecutive ids within a segment
        same = seg[:, 1:] == seg[:, :-1]
        assert np.all(((x[:, 1:] - x[:, :-1]) % 200 == 1)[same])
    np.full(17, 300, dtype).tofile(tmp_path / "z.bin")
    docs = data.list_documents(cfg)
    with pytest.raises(ConfigError, match=r"config\.data\.source=.*z\.bin#0.*vocab_size 259"):
        for i in range(len(docs)):
            docs.read_tokens(i, BYTE)


def test_bad_sources_raise_config_error(tmp_path):
    def raises(cfg, *patterns, split="train"):
        with pytest.raises(ConfigError) as e:
            next(data_it(cfg, split))
        msg = str(e.value)
        assert msg.startswith("config.data.source=") and "\n" not in msg
        for p in patterns:
            assert p in msg, msg

    raises(data_cfg(source=str(tmp_path / "nothing" / "*.txt")), "matches no")
    raises(data_cfg(source=str(tmp_path)), "matches no")  # an empty directory
    (tmp_path / "only.txt").write_text("just one document")
    raises(data_cfg(source=str(tmp_path / "only.txt")), "need >= 2")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    raises(data_cfg(source=str(tmp_path / "odd.bin")), "not a multiple of 2")

    jd = tmp_path / "j"
    jd.mkdir()
    good = [json.dumps({"text": doc_text(i)}) for i in range(6)]
    (jd / "ok.jsonl").write_text("\n".join(good))
    raises(data_cfg(source=str(jd), jsonl_field="body"), "ok.jsonl:", "'body'", "jsonl_field")
    (jd / "bad.jsonl").write_text("\n".join([*good[:3], "{not json", *good[3:]]))
    cfg = data_cfg(source=str(jd))
    docs = data.list_documents(cfg)
    with pytest.raises(ConfigError, match=r"config\.data\.source=.*bad\.jsonl:4: bad JSON"):
        for i in range(len(docs)):
            docs.read_text(i)
    # and through the pipeline, whichever split the bad line landed in
    bad_split = next(
        s
        for s in ("train", "val")
        if any(
            docs.identity(int(i)) == "bad.jsonl:4"
            for i in data.split_documents(docs, s, cfg.val_fraction)
        )
    )
    with pytest.raises(ConfigError, match=r"bad\.jsonl:4"):
        take(data_it(cfg, bad_split), 3)
