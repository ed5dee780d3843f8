"""Tests of near_jax.data: sources, splits, packing, determinism, checkpointing, hosts."""

import json
import pickle
import re

import grain
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from near_jax import config, data
from near_jax.config import ConfigError
from near_jax.data import pipeline
from near_jax.data.tokenizer import load_tokenizer

SEQ = 64
BYTE = load_tokenizer("byte")
MARK = re.compile(r"<(\d{4})>")


def _cfg(**overrides):
    cfg = config.default_config().data
    cfg.seq_len = SEQ
    cfg.shuffle_window = 0  # rows in stream order; tests that want the window set it
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _it(cfg, split="train", seed=0, batch=8, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return data.make_iterator(cfg, split=split, seed=seed, global_batch_size=batch, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _doc_text(i: int) -> str:
    return f"<{i:04d}>" * 5 + "\n"


def _markers(batch) -> set[int]:
    """Document numbers whose marker appears in any segment of the batch."""
    found = set()
    for row, segs in zip(batch["inputs"], batch["segment_ids"], strict=True):
        for s in np.unique(segs[segs > 0]):
            found.update(int(m) for m in MARK.findall(BYTE.decode(row[segs == s])))
    return found


@pytest.fixture
def txt_dir(tmp_path):
    d = tmp_path / "txt"
    (d / "sub").mkdir(parents=True)
    for i in range(60):
        (d / ("sub" if i % 3 == 0 else "") / f"doc{i:04d}.txt").write_text(_doc_text(i))
    (d / "ignored.md").write_text("not a source file")
    return d


def _split_markers(cfg, split) -> set[int]:
    docs = data.list_documents(cfg)
    ids = data.split_documents(docs, split, cfg.val_fraction)
    return {int(re.search(r"doc(\d{4})", docs.identity(int(i))).group(1)) for i in ids}


def _check_row_invariants(batch, tok, seq=SEQ, specials=True):
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


def test_stdlib_shapes_and_packing_invariants():
    cfg = _cfg()
    batches = _take(_it(cfg, batch=4), 6)
    for b in batches:
        assert set(b) == set(data.FEATURES)
        assert all(v.shape == (4, SEQ) for v in b.values())
        _check_row_invariants(b, BYTE)
        assert np.all(b["segment_ids"] > 0)  # an endless stream never pads
    # rows hold real Python source text
    text = BYTE.decode(np.concatenate([b["inputs"].ravel() for b in batches]))
    assert "def " in text or "import " in text


def test_finite_stream_pads_with_zero_weight():
    docs = [np.arange(n, dtype=np.int32) + 10 for n in (5, 30, 7)]
    ds = grain.MapDataset.source(docs).to_iter_dataset()
    rows = list(data.PackIterDataset(ds, row_len=17, pad_id=99))
    assert len(rows) == 3
    batch = pipeline._features({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    # row 3: the last token of document 2, document 3 (7 tokens), 9 padding tokens
    assert rows[-1]["segment_ids"].tolist() == [1] + [2] * 7 + [0] * 9
    assert rows[-1]["positions"].tolist()[:8] == [0, *range(7)]
    assert batch["weights"][-1].tolist() == [0] + [1] * 6 + [0] * 9
    assert np.all(batch["inputs"][-1][8:] == 99) and np.all(batch["segment_ids"][-1][8:] == 0)
    np.testing.assert_array_equal(
        np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows]),
        np.concatenate(docs),
    )
    assert batch["weights"][0].tolist() == [1] * 4 + [0] + [1] * 11  # doc 1 ends at 4


def test_same_seed_same_batches_different_seed_different():
    cfg = _cfg(shuffle_window=32)
    a, b = _take(_it(cfg, seed=3), 4), _take(_it(cfg, seed=3), 4)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    c = _take(_it(cfg, seed=4), 4)
    assert not all(_same(x, y) for x, y in zip(a, c, strict=True))
    # thread count changes nothing
    d = _take(_it(_cfg(read_threads=0, shuffle_window=32), seed=3), 4)
    assert all(_same(x, y) for x, y in zip(a, d, strict=True))


@pytest.mark.parametrize("window", [0, 32])
def test_checkpoint_state_restores_next_batch(window):
    cfg = _cfg(shuffle_window=window)
    it = _it(cfg, seed=1)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # as grain's checkpoint handler stores it
    want = _take(it, 3)
    it2 = _it(cfg, seed=1)
    next(it2)
    it2.set_state(state)
    got = _take(it2, 3)
    assert all(_same(x, y) for x, y in zip(want, got, strict=True))


def test_row_window_shuffle_mixes_long_documents(tmp_path):
    # Four documents of ~190 rows each (one held out): in stream order a batch of 8 rows
    # spans at most two documents; a window over all rows mixes them.
    for i in range(4):
        (tmp_path / f"long{i}.txt").write_text(_doc_text(i) * 400)

    def docs_per_batch(window):
        cfg = _cfg(source=str(tmp_path), val_fraction=0.25, shuffle_window=window)
        return [len(_markers(b)) for b in _take(_it(cfg), 6)]

    assert max(docs_per_batch(0)) <= 2
    assert min(docs_per_batch(1024)) >= 2


def test_val_is_fixed_and_disjoint_from_train(txt_dir):
    cfg = _cfg(source=str(txt_dir), val_fraction=0.2)
    train_ids, val_ids = _split_markers(cfg, "train"), _split_markers(cfg, "val")
    assert val_ids and train_ids and not (val_ids & train_ids)
    assert val_ids | train_ids == set(range(60))
    # fresh val iterators, any seed: the same batches, only val documents
    v1, v2 = _take(_it(cfg, "val", seed=0), 3), _take(_it(cfg, "val", seed=9), 3)
    assert all(_same(x, y) for x, y in zip(v1, v2, strict=True))
    seen_val = set().union(*map(_markers, v1))
    seen_train = set().union(*map(_markers, _take(_it(cfg, "train"), 12)))
    assert seen_val <= val_ids and seen_train <= train_ids
    assert seen_val == val_ids and len(seen_train) > len(train_ids) // 2


def test_val_seed_draws_other_val_batches_reproducibly(txt_dir):
    cfg = _cfg(source=str(txt_dir), val_fraction=0.3)
    val_ids = _split_markers(cfg, "val")
    fixed = _take(_it(cfg, "val"), 2)
    a, b = _take(_it(cfg, "val", val_seed=11), 2), _take(_it(cfg, "val", val_seed=11), 2)
    other = _take(_it(cfg, "val", val_seed=12), 2)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))  # a seed is reproducible
    assert not all(_same(x, y) for x, y in zip(a, other, strict=True))
    assert not all(_same(x, y) for x, y in zip(a, fixed, strict=True))
    assert set().union(*map(_markers, a + other)) <= val_ids  # still only val documents


def test_stdlib_split_is_stable_and_nonempty():
    cfg = _cfg()
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
        lines = [json.dumps({"body": _doc_text(i), "id": i}) for i in nums]
        lines.insert(3, "")  # blank lines are skipped
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    (tmp_path / "c.txt").write_text(_doc_text(99))  # not matched by the glob
    cfg = _cfg(source=str(tmp_path / "*.jsonl"), jsonl_field="body", val_fraction=0.25)
    docs = data.list_documents(cfg)
    assert len(docs) == 45
    assert docs.identity(0) == "a.jsonl:1" and docs.identity(3) == "a.jsonl:5"
    assert docs.read_text(20) == _doc_text(20)
    seen = set()
    for split in ("train", "val"):
        for b in _take(_it(cfg, split), 4):
            _check_row_invariants(b, BYTE)
            seen |= _markers(b)
    assert seen == set(range(45))


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_source(tmp_path, dtype):
    for name, n in (("x.bin", 1000), ("y.bin", 555)):
        (np.arange(n) % 200).astype(dtype).tofile(tmp_path / name)
    cfg = _cfg(source=str(tmp_path), bin_dtype=dtype, seq_len=16)
    docs = data.list_documents(cfg)
    assert len(docs) == 1000 // 17 + 1 + 555 // 17 + 1  # last partial chunks kept
    assert docs.identity(0) == "x.bin#0" and docs.identity(59) == "y.bin#0"
    np.testing.assert_array_equal(docs.read_tokens(1, BYTE), np.arange(17, 34))
    np.testing.assert_array_equal(docs.read_tokens(58, BYTE), np.arange(986, 1000) % 200)
    docs2 = pickle.loads(pickle.dumps(docs))  # open memmaps are not pickled
    np.testing.assert_array_equal(docs2.read_tokens(1, BYTE), np.arange(17, 34))
    for b in _take(_it(cfg, batch=4), 20):
        _check_row_invariants(b, BYTE, seq=16, specials=False)
        x, seg = b["inputs"], b["segment_ids"]
        # chunks come through unchanged: consecutive ids within a segment
        same = seg[:, 1:] == seg[:, :-1]
        assert np.all(((x[:, 1:] - x[:, :-1]) % 200 == 1)[same])
    np.full(17, 300, dtype).tofile(tmp_path / "z.bin")
    docs = data.list_documents(cfg)
    with pytest.raises(ConfigError, match=r"config\.data\.source=.*z\.bin#0.*vocab_size 259"):
        for i in range(len(docs)):
            docs.read_tokens(i, BYTE)


def test_two_hosts_get_disjoint_halves(txt_dir):
    cfg = _cfg(source=str(txt_dir), val_fraction=0.2)
    hosts = [_take(_it(cfg, batch=8, process_index=i, process_count=2), 10) for i in (0, 1)]
    assert all(v.shape == (4, SEQ) for b in hosts[0] + hosts[1] for v in b.values())
    seen = [set().union(*map(_markers, h)) for h in hosts]
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    assert seen[0] | seen[1] == _split_markers(cfg, "train")


def test_fewer_documents_than_hosts_shards_rows(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i:04d}.txt").write_text(_doc_text(i) * 3)
    cfg = _cfg(source=str(tmp_path), val_fraction=0.01)  # one val document
    hosts = [_take(_it(cfg, "val", batch=4, process_index=i, process_count=2), 3) for i in (0, 1)]
    assert all(b["inputs"].shape == (2, SEQ) for b in hosts[0] + hosts[1])
    rows = [np.concatenate([b["inputs"] for b in h]) for h in hosts]
    assert not any(np.array_equal(a, b) for a in rows[0] for b in rows[1])


def test_to_global_batch_on_8_device_mesh():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    local = next(_it(_cfg(), batch=16))
    batch = data.to_global_batch(local, sharding)
    assert set(batch) == set(local)
    for k, v in batch.items():
        assert v.shape == (16, SEQ) and v.dtype == local[k].dtype and v.sharding == sharding
        assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape == (2, SEQ)
        np.testing.assert_array_equal(np.asarray(v), local[k])


def test_bad_sources_raise_config_error(tmp_path):
    def raises(cfg, *patterns, split="train"):
        with pytest.raises(ConfigError) as e:
            next(_it(cfg, split))
        msg = str(e.value)
        assert msg.startswith("config.data.source=") and "\n" not in msg
        for p in patterns:
            assert p in msg, msg

    raises(_cfg(source=str(tmp_path / "nothing" / "*.txt")), "matches no")
    raises(_cfg(source=str(tmp_path)), "matches no")  # an empty directory
    (tmp_path / "only.txt").write_text("just one document")
    raises(_cfg(source=str(tmp_path / "only.txt")), "need >= 2")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    raises(_cfg(source=str(tmp_path / "odd.bin")), "not a multiple of 2")

    jd = tmp_path / "j"
    jd.mkdir()
    good = [json.dumps({"text": _doc_text(i)}) for i in range(6)]
    (jd / "ok.jsonl").write_text("\n".join(good))
    raises(_cfg(source=str(jd), jsonl_field="body"), "ok.jsonl:", "'body'", "jsonl_field")
    (jd / "bad.jsonl").write_text("\n".join([*good[:3], "{not json", *good[3:]]))
    cfg = _cfg(source=str(jd))
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
        _take(_it(cfg, bad_split), 3)


def _global(cfg, hosts, steps, split="train"):
    """The global batches, assembled from `hosts` per-host iterators."""
    its = [_it(cfg, split, process_index=p, process_count=hosts) for p in range(hosts)]
    return its, [_concat([next(it) for it in its]) for _ in range(steps)]


def _concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_global_stream_does_not_depend_on_the_host_count(txt_dir):
    cfg = _cfg(source=str(txt_dir), shards=4, shuffle_window=16)
    _, one = _global(cfg, 1, 4)
    for hosts in (2, 4):
        _, many = _global(cfg, hosts, 4)
        assert all(_same(a, b) for a, b in zip(one, many, strict=True))


@pytest.mark.parametrize("before, after", [(2, 1), (2, 4), (4, 2)])
def test_resume_on_another_host_count_continues_the_stream(txt_dir, before, after):
    cfg = _cfg(source=str(txt_dir), shards=4, shuffle_window=16)
    its, _ = _global(cfg, before, 3)
    merged = {"num_shards": 4, "shards": {}}
    for it in its:  # what a checkpoint holds: every host's shard states
        merged["shards"].update(json.loads(json.dumps(it.get_state()))["shards"])
    want = [_concat([next(it) for it in its]) for _ in range(3)]
    resumed = [_it(cfg, process_index=p, process_count=after) for p in range(after)]
    for it in resumed:
        it.set_state(merged)
    got = [_concat([next(it) for it in resumed]) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(want, got, strict=True))


def test_changing_the_shard_count_of_a_run_is_refused(txt_dir):
    state = _it(_cfg(source=str(txt_dir), shards=2)).get_state()
    with pytest.raises(ValueError, match="for 2 data shards, this run has 4"):
        _it(_cfg(source=str(txt_dir), shards=4)).set_state(state)
