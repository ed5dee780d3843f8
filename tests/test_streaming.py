"""Tests of near_jax.diloco.protocol.streaming: the round closed shard by shard, in bounded
memory, with the bits of the whole-tree computation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import LIKE, LR, MU, REPO, RUN, SPEC, bits_equal, plan, push, reference_update, tree

from near_jax.diloco import protocol, robust
from near_jax.diloco.aggregator import Aggregator
from near_jax.diloco.codec.compress import Payload
from near_jax.diloco.store import ObjectStore


@pytest.mark.parametrize("rule", [None, "median", "trimmed_mean:0.25"])
def test_derive_equals_the_whole_tree_computation(started, rule):
    """Per shard = per whole tree: robust rules work per coordinate, the mean adds in order."""
    store, _, agg = started
    deltas = [tree(70 + i, 1e-2) for i in range(4)]
    for name, delta in zip("abcd", deltas, strict=True):
        push(store, name, 0, delta)
    cut = plan()
    base = protocol.load_version(store, RUN, 0, cut)
    verdicts = sorted(
        (
            protocol.check_contribution(store, RUN, base, cut, k)
            for k in protocol.contrib_keys(store, RUN, 0)
        ),
        key=lambda v: v.island,
    )
    parsed = None if rule is None else robust.Rule.parse(rule)
    derived = protocol.derive(store, RUN, cut, base, verdicts, SPEC, LR, MU, parsed)
    # Whole-tree reference: decode every contribution in full, combine, then per shard encode.
    whole = [protocol.read_contribution(store, RUN, 0, cut, name) for name in "abcd"]
    combined = protocol.average(whole) if parsed is None else robust.combine(parsed, whole)
    pieces = cut.split(combined)
    update = {}
    for s in range(cut.num_shards):
        payload, _ = protocol.encode(pieces[s], SPEC)
        update[s] = protocol.decode(payload)
    if parsed is None:
        assert bits_equal(cut.assemble(update), reference_update(deltas))
    params, _ = protocol.outer_update(
        tree(1), protocol.zeros_like(LIKE), cut.assemble(update), LR, MU
    )
    new = protocol.pull_version(store, RUN, 0, cut)  # version 0's shards, then replace
    new.version, new.manifest = 1, derived.version.manifest
    for s in range(cut.num_shards):
        for part in ("params", "momentum"):
            key = derived.version.manifest.key(part, s)
            getattr(new, part)[s] = protocol.decode(Payload.from_bytes(store.get(key)))
    assert bits_equal(new.tree(cut), params)
    # write=False computes the same hashes and writes nothing.
    written = store.bytes_written
    again = protocol.derive(store, RUN, cut, base, verdicts, SPEC, LR, MU, parsed, write=False)
    assert again.version.hashes() == derived.version.hashes() and store.bytes_written == written


_CHILD = """
import json, resource, sys
import numpy as np
from near_jax.diloco.aggregator import Aggregator
from near_jax.diloco.store import ObjectStore

path, n = sys.argv[1], int(sys.argv[2])
like = {f"w{i}": np.zeros((256, 4096), np.float32) for i in range(4)}
agg = Aggregator(ObjectStore.open(path), "mem", like, spec="int8", lr=0.7, momentum=0.9,
                 quorum=n, round_timeout=60.0, shard_bytes=1 << 19)
agg.load()
stats = agg.run_round()
print(json.dumps({"accepted": stats["accepted"],
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _round_peak_rss(path, n) -> tuple[int, int]:
    """(accepted, peak RSS bytes) of an aggregator process closing a round of n int8
    contributions of a 4M-parameter model (16 MB in fp32) cut into 512 KiB shards."""
    path.mkdir()
    store = ObjectStore.open(str(path))
    like = {f"w{i}": np.zeros((256, 4096), np.float32) for i in range(4)}
    cut = protocol.plan_shards(like, 1 << 19)
    agg = Aggregator(
        store,
        "mem",
        like,
        spec="int8",
        lr=0.7,
        momentum=0.9,
        quorum=n,
        round_timeout=60.0,
        shard_bytes=1 << 19,
    )
    agg.create({k: np.ones_like(v) for k, v in like.items()}, {})
    base = protocol.load_version(store, "mem", 0, cut)
    rng = np.random.default_rng(0)
    for i in range(n):  # one Δ at a time: this process never holds them all either
        delta = {k: rng.standard_normal(v.shape, dtype=np.float32) * 1e-3 for k, v in like.items()}
        protocol.push_contribution(store, "mem", f"i{i:02d}", base, cut, cut.split(delta), "int8")
        del delta
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(n)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["accepted"], result["peak"]


def test_aggregator_memory_stays_bounded_as_contributions_grow(tmp_path):
    """From 4 to 16 contributions the aggregator's peak RSS grows far less than the 12 ×
    16 MB (192 MB) that holding every decoded contribution would add."""
    accepted4, peak4 = _round_peak_rss(tmp_path / "n4", 4)
    accepted16, peak16 = _round_peak_rss(tmp_path / "n16", 16)
    assert (accepted4, accepted16) == (4, 16)
    model = 4 * 256 * 4096 * 4
    print(f"aggregator peak RSS: N=4 {peak4 / 1e6:.0f} MB, N=16 {peak16 / 1e6:.0f} MB")
    assert peak16 - peak4 < 12 * model / 4, (peak4, peak16)
