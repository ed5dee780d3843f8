"""Tests of near_jax.data.pipeline: batches, determinism, splits, checkpointing, hosts, meshes."""

import json
import re

import jax
import numpy as np
import pytest
from helpers import SEQ_LEN, check_row_invariants, data_cfg, data_it, doc_markers, doc_text, take
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from near_jax import data
from near_jax.data.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def txt_dir(tmp_path):
    d = tmp_path / "txt"
    (d / "sub").mkdir(parents=True)
    for i in range(60):
        (d / ("sub" if i % 3 == 0 else "") / f"doc{i:04d}.txt").write_text(doc_text(i))
    (d / "ignored.md").write_text("not a source file")
    return d


def _split_markers(cfg, split) -> set[int]:
    docs = data.list_documents(cfg)
    ids = data.split_documents(docs, split, cfg.val_fraction)
    return {int(re.search(r"doc(\d{4})", docs.identity(int(i))).group(1)) for i in ids}


def test_stdlib_shapes_and_packing_invariants():
    cfg = data_cfg()
    batches = take(data_it(cfg, batch=4), 6)
    for b in batches:
        assert set(b) == set(data.FEATURES)
        assert all(v.shape == (4, SEQ_LEN) for v in b.values())
        check_row_invariants(b, BYTE)
        assert np.all(b["segment_ids"] > 0)  # an endless stream never pads
    # rows hold real Python source text
    text = BYTE.decode(np.concatenate([b["inputs"].ravel() for b in batches]))
    assert "def " in text or "import " in text


def test_same_seed_same_batches_different_seed_different():
    cfg = data_cfg(shuffle_window=32)
    a, b = take(data_it(cfg, seed=3), 4), take(data_it(cfg, seed=3), 4)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    c = take(data_it(cfg, seed=4), 4)
    assert not all(_same(x, y) for x, y in zip(a, c, strict=True))
    # thread count changes nothing
    d = take(data_it(data_cfg(read_threads=0, shuffle_window=32), seed=3), 4)
    assert all(_same(x, y) for x, y in zip(a, d, strict=True))


@pytest.mark.parametrize("window", [0, 32])
def test_checkpoint_state_restores_next_batch(window):
    cfg = data_cfg(shuffle_window=window)
    it = data_it(cfg, seed=1)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # as grain's checkpoint handler stores it
    want = take(it, 3)
    it2 = data_it(cfg, seed=1)
    next(it2)
    it2.set_state(state)
    got = take(it2, 3)
    assert all(_same(x, y) for x, y in zip(want, got, strict=True))


def test_row_window_shuffle_mixes_long_documents(tmp_path):
    # Four documents of ~190 rows each (one held out): in stream order a batch of 8 rows
    # spans at most two documents; a window over all rows mixes them.
    for i in range(4):
        (tmp_path / f"long{i}.txt").write_text(doc_text(i) * 400)

    def docs_per_batch(window):
        cfg = data_cfg(source=str(tmp_path), val_fraction=0.25, shuffle_window=window)
        return [len(doc_markers(b)) for b in take(data_it(cfg), 6)]

    assert max(docs_per_batch(0)) <= 2
    assert min(docs_per_batch(1024)) >= 2


def test_val_is_fixed_and_disjoint_from_train(txt_dir):
    cfg = data_cfg(source=str(txt_dir), val_fraction=0.2)
    train_ids, val_ids = _split_markers(cfg, "train"), _split_markers(cfg, "val")
    assert val_ids and train_ids and not (val_ids & train_ids)
    assert val_ids | train_ids == set(range(60))
    # fresh val iterators, any seed: the same batches, only val documents
    v1, v2 = take(data_it(cfg, "val", seed=0), 3), take(data_it(cfg, "val", seed=9), 3)
    assert all(_same(x, y) for x, y in zip(v1, v2, strict=True))
    seen_val = set().union(*map(doc_markers, v1))
    seen_train = set().union(*map(doc_markers, take(data_it(cfg, "train"), 12)))
    assert seen_val <= val_ids and seen_train <= train_ids
    assert seen_val == val_ids and len(seen_train) > len(train_ids) // 2


def test_val_seed_draws_other_val_batches_reproducibly(txt_dir):
    cfg = data_cfg(source=str(txt_dir), val_fraction=0.3)
    val_ids = _split_markers(cfg, "val")
    fixed = take(data_it(cfg, "val"), 2)
    a, b = take(data_it(cfg, "val", val_seed=11), 2), take(data_it(cfg, "val", val_seed=11), 2)
    other = take(data_it(cfg, "val", val_seed=12), 2)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))  # a seed is reproducible
    assert not all(_same(x, y) for x, y in zip(a, other, strict=True))
    assert not all(_same(x, y) for x, y in zip(a, fixed, strict=True))
    assert set().union(*map(doc_markers, a + other)) <= val_ids  # still only val documents


def test_two_hosts_get_disjoint_halves(txt_dir):
    cfg = data_cfg(source=str(txt_dir), val_fraction=0.2)
    hosts = [take(data_it(cfg, batch=8, process_index=i, process_count=2), 10) for i in (0, 1)]
    assert all(v.shape == (4, SEQ_LEN) for b in hosts[0] + hosts[1] for v in b.values())
    seen = [set().union(*map(doc_markers, h)) for h in hosts]
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    assert seen[0] | seen[1] == _split_markers(cfg, "train")


def test_fewer_documents_than_hosts_shards_rows(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i:04d}.txt").write_text(doc_text(i) * 3)
    cfg = data_cfg(source=str(tmp_path), val_fraction=0.01)  # one val document
    hosts = [
        take(data_it(cfg, "val", batch=4, process_index=i, process_count=2), 3) for i in (0, 1)
    ]
    assert all(b["inputs"].shape == (2, SEQ_LEN) for b in hosts[0] + hosts[1])
    rows = [np.concatenate([b["inputs"] for b in h]) for h in hosts]
    assert not any(np.array_equal(a, b) for a in rows[0] for b in rows[1])


def test_to_global_batch_on_8_device_mesh():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    local = next(data_it(data_cfg(), batch=16))
    batch = data.to_global_batch(local, sharding)
    assert set(batch) == set(local)
    for k, v in batch.items():
        assert v.shape == (16, SEQ_LEN) and v.dtype == local[k].dtype and v.sharding == sharding
        assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape == (2, SEQ_LEN)
        np.testing.assert_array_equal(np.asarray(v), local[k])


def _global(cfg, hosts, steps, split="train"):
    """The global batches, assembled from `hosts` per-host iterators."""
    its = [data_it(cfg, split, process_index=p, process_count=hosts) for p in range(hosts)]
    return its, [_concat([next(it) for it in its]) for _ in range(steps)]


def _concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_global_stream_does_not_depend_on_the_host_count(txt_dir):
    cfg = data_cfg(source=str(txt_dir), shards=4, shuffle_window=16)
    _, one = _global(cfg, 1, 4)
    for hosts in (2, 4):
        _, many = _global(cfg, hosts, 4)
        assert all(_same(a, b) for a, b in zip(one, many, strict=True))


@pytest.mark.parametrize("before, after", [(2, 1), (2, 4), (4, 2)])
def test_resume_on_another_host_count_continues_the_stream(txt_dir, before, after):
    cfg = data_cfg(source=str(txt_dir), shards=4, shuffle_window=16)
    its, _ = _global(cfg, before, 3)
    merged = {"num_shards": 4, "shards": {}}
    for it in its:  # what a checkpoint holds: every host's shard states
        merged["shards"].update(json.loads(json.dumps(it.get_state()))["shards"])
    want = [_concat([next(it) for it in its]) for _ in range(3)]
    resumed = [data_it(cfg, process_index=p, process_count=after) for p in range(after)]
    for it in resumed:
        it.set_state(merged)
    got = [_concat([next(it) for it in resumed]) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(want, got, strict=True))


def test_changing_the_shard_count_of_a_run_is_refused(txt_dir):
    state = data_it(data_cfg(source=str(txt_dir), shards=2)).get_state()
    with pytest.raises(ValueError, match="for 2 data shards, this run has 4"):
        data_it(data_cfg(source=str(txt_dir), shards=4)).set_state(state)
