"""The round protocol of DiLoCo across islands that share only an object store.

    keys           store keys (below), run and island names, FORMAT, LATE_WINDOW, MAX_CHAIN,
                   ProtocolError
    objects        canonical JSON, sha256, float32 trees stored as fp32 payloads, bounded reads
    shards         the run's shard plan: which leaves and slices of leaves form each shard
    manifests      version and contribution manifests (shard hashes), shard reads
    versions       the numpy outer step (outer_update, average), Version in memory and in the
                   store, resumable shard-by-shard pulls (PullCache), `latest`
    contributions  an island's sharded contribution (push_shards, contribution_body), the
                   aggregator's Verdict on one (check_contribution), streamed shard reads
    streaming      closing a round shard by shard (derive, derive_slice, finish)
    decisions      recording a round (make_decision), replaying it (replay_decision),
                   following it (apply_update), checking a run (verify_run)

Every public name is re-exported here: callers write `protocol.pull_version(...)`.

Islands never talk to each other or to the aggregator: everything goes through framed,
validated objects (`near_jax.diloco.store`). Round r starts from global version r (θ_r and
the outer momentum m_r); each island trains H inner steps from θ_r and pushes Δ = θ_r −
θ_island; the aggregator closes the round and publishes version r + 1.

Shards
------
Nothing that holds a whole model is one object. The run's shard plan (`shards.py`: leaves
grouped, and large leaves cut along their FSDP axis, up to `diloco.shard_bytes`; recorded
in run.json) cuts params, momentum, error feedback, contributions and updates alike, and a
small manifest lists each shard object's sha256. The "hash" of a sharded object (what
`latest`, decisions and tags call params_sha256, …) is the root: sha256 of the canonical
JSON list of its shard hashes. Parties read one shard at a time, bounded by its size and
checked against its manifest hash, so no one needs the whole model in memory to verify it.

Fragments (streaming DiLoCo)
----------------------------
A run created with `diloco.fragments` F > 1 (fixed in run.json) syncs one fragment a round:
round r covers the shards of fragment r mod F (`ShardPlan.fragment`: F contiguous, near-equal
groups of shards in tree order; with scanned blocks a layer's weights span leaves, so these
are parameter groups, not layer groups), and rounds come every H/F inner steps, so each
shard is synced once every H steps and the peak push is 1/F of the model. A contribution's
manifest lists only those shards (None for the others; anything else is rejected), the
aggregator derives only them, and version r + 1's manifest carries the other shards over:
its `origin` names, per shard, the prefix of the version that last wrote it, and its update
lists None for the shards the round left alone. Garbage collection (`--keep_versions`)
deletes a shard object only once no kept version names it.

Keys (under `RUN/`; r, v 8 digits, shard s 6 digits; JSON objects are UTF-8, sorted keys)
------------------------------------------------------------------------------------------
    run.json                      manifest: spec, outer optimizer (lr, momentum, error-
                                  feedback decay), H, fragments, model config, the shard
                                  plan {shard_bytes, axes}, version 0's hashes and manifest.
                                  Aggregator, put_if_absent (creates the run).
    latest                        {"version": v, params/momentum/server_ef roots, "manifest":
                                  key, "manifest_sha256", "published_at"}: the newest
                                  complete version. Aggregator, moved forward only
                                  (compare-and-swap), written last.
    finished                      {"version": N, ...}: the run is over. Aggregator.
    versions/00000000/{params,momentum,server_ef}/s, versions/00000000/manifest
                                  version 0 (each object first-writer-wins).
    rounds/r/contrib/ISLAND       an island's Δ for round r: u32 length | JSON tag {run,
                                  round, island, base_sha256 = root of θ_r, inner_loss, …}
                                  | shard manifest {spec, plan, shards: [[sha256, bytes]…]}.
                                  The island, put_if_absent after every shard is written;
                                  the one thing a contributor signs.
    rounds/r/shards/ISLAND/s      shard s of that Δ: a compressed payload of the shard's
                                  pieces. The island (a host of a multi-host island: its
                                  own shards).
    rounds/r/out/P/{params,momentum,server_ef,update}/s, rounds/r/out/P/manifest
                                  version r + 1 and Û_r, written by the aggregator (or its
                                  workers) before the decision, for proposal P = the id of
                                  the applied set (`streaming.proposal_id`). Û_r is the
                                  combined Δ compressed with the run's spec (with the
                                  aggregator's error feedback) — what every party applies.
    rounds/r/proposals/P          with `--shards=i/K` only: the applied set the coordinator
                                  proposes; worker i writes rounds/r/out/P/worker-i-of-K (its
                                  shards' hashes, or the contribution it found bad)
                                  (`near_jax.diloco.aggregator.workers`).
    rounds/r/decision             the COMMIT POINT of round r: which contributions were
                                  applied (key + sha256 of the object), which were rejected
                                  and why, which pushes to earlier rounds arrived late, why
                                  the round closed (quorum / deadline), the root of Û_r and
                                  version r + 1's hashes and manifest. Aggregator,
                                  put_if_absent. Runs of untrusted contributors add the
                                  aggregation rule (replays combine with it), every
                                  contribution's ledger entry, the seed reveal and the
                                  aggregator's signature (`near_jax/contrib/validator.py`).
                                  A round that applied nothing names version r's manifest.

Who computes what (determinism)
-------------------------------
Version r + 1 is a pure function of version r and decision r, shard by shard: decode the
applied contributions' shard, sum them in island-id order in float32, divide by their
count, encode with the run's spec and the shard of `server_ef` (→ Û_r's shard and the new
server_ef), then the outer step `outer_update` in numpy float32 — SGD with Nesterov
momentum (momentum 0 for SparseLoCo, whose islands decay their own error feedback instead),
bit-identical to
`outer.outer_optimizer` + `outer.outer_step` (tests check it). Numpy's elementwise float32
add/multiply are correctly rounded IEEE operations, so every machine gets the same bits.
A round with no applied contribution publishes version r + 1 = version r unchanged (no
step, so momentum does not move the params).

Islands keep their shards of θ_r and m_r in host memory and follow the run by pulling only
their shards of Û_r each round (`apply_update`), checking each new shard against version
r + 1's manifest; on a mismatch, or when more than MAX_CHAIN versions behind, or when
(re)starting, they pull their shards of the full version (`pull_version`), each checked
against the manifest that run.json (version 0) or the decision that produced it names. A
pull that stops resumes from the shards it already has (`PullCache`).

Crash safety (aggregator)
-------------------------
Closing round r: check the contribution objects → stream the shards (a contribution whose
shard turns out missing, changed or invalid is rejected and the set decided again) →
write every output shard, then the manifest, under rounds/r/out/P/ → write the decision
(put_if_absent; commit point) → move `latest`. Nothing before the decision is visible: a
killed aggregator restarts from version `latest` = r; without decision r it decides
again (outputs of another set land under another P and are deleted once a decision
commits); with decision r it re-reads the recorded contributions (checking their sha256),
recomputes — identical bytes, checked against the decision's hashes — rewriting the
outputs, and moves `latest`: the round is applied exactly once, always to version r. The
outer momentum and error feedback are part of each version, so they survive restarts. If
two aggregators race, put_if_absent makes one decision win and the other finishes from it.
With `--shards=i/K`, workers write their shards' outputs and a result object listing their
hashes (`rounds/r/out/P/worker-i-of-K`); the coordinator (i = 0) waits for all K, writes
the manifest and commits: a killed worker's slice is simply computed again.

Planted objects (slots only the aggregator writes)
--------------------------------------------------
Anyone with write access to the store can put an object in `rounds/r/decision` or `latest`.
The aggregator reads those slots only through `quarantine.read_own`: an object that is torn,
not JSON, not shaped like what it writes (wrong run/round/base, missing fields), does not
replay to its recorded hashes (trusted runs) or is not signed by its key (contributor runs)
is moved to `quarantine/<key>.<ms>` (raw bytes kept as evidence, deleted only if unchanged
meanwhile) with a warning naming both keys; the round is then decided again and `latest` is
rebuilt from the newest version that verifies. Islands treat an unreadable decision or
`latest` as "not there yet": they warn once and keep waiting. Reads of anything another
party can write are bounded (shard and manifest limits, `store.MAX_OBJECT_BYTES`); file
stores refuse links.

Late, invalid and restarted islands
-----------------------------------
Each contribution names its round in its key and the hash of its base version in its tag,
so it can only ever be applied to that version. Pushes that land after round r's decision
are listed as late in a later decision (looking back LATE_WINDOW rounds) and never applied.
A contribution that is corrupt, untagged, mis-tagged, built on another base, shaped unlike
the params, or non-finite is rejected with its reason in the decision.
"""

from near_jax.diloco.codec.compress import decode, encode
from near_jax.diloco.protocol.contributions import (
    MAX_TAG_BYTES,
    ShardDefect,
    Verdict,
    check_contribution,
    contribution_body,
    contribution_limit,
    pack_contribution,
    push_contribution,
    push_shards,
    put_contribution,
    read_contribution,
    read_delta,
    read_delta_shard,
    split_contribution,
)
from near_jax.diloco.protocol.decisions import (
    apply_update,
    combiner,
    make_decision,
    recorded_verdicts,
    replay_decision,
    run_fragment,
    run_plan,
    verify_run,
)
from near_jax.diloco.protocol.keys import (
    FORMAT,
    LATE_WINDOW,
    MAX_CHAIN,
    ProtocolError,
    check_name,
    contrib_key,
    contrib_keys,
    contrib_prefix,
    contrib_shard_key,
    decision_key,
    finished_key,
    latest_key,
    manifest_key,
    out_prefix,
    outs_prefix,
    version0_prefix,
)
from near_jax.diloco.protocol.manifests import (
    PARTS,
    ContribManifest,
    VersionManifest,
    manifest_limit,
    read_shard,
    root,
    shard_limit,
)
from near_jax.diloco.protocol.objects import (
    as_float32,
    dumps,
    num_elements,
    read_json,
    sha256,
    tree_bytes,
    zeros_like,
)
from near_jax.diloco.protocol.shards import (
    DEFAULT_SHARD_BYTES,
    ShardPlan,
    from_record,
    plan_shards,
)
from near_jax.diloco.protocol.streaming import (
    BaseDamaged,
    Derived,
    derive,
    derive_slice,
    finish,
    proposal_id,
)
from near_jax.diloco.protocol.versions import (
    PullCache,
    Shards,
    Version,
    advance_latest,
    average,
    fetch_shard,
    load_version,
    outer_update,
    pull_version,
    read_latest,
    version_hashes,
    write_manifest,
    write_version0,
)

__all__ = [
    "BaseDamaged",
    "ContribManifest",
    "DEFAULT_SHARD_BYTES",
    "Derived",
    "FORMAT",
    "LATE_WINDOW",
    "MAX_CHAIN",
    "MAX_TAG_BYTES",
    "PARTS",
    "ProtocolError",
    "PullCache",
    "ShardDefect",
    "ShardPlan",
    "Shards",
    "Verdict",
    "Version",
    "VersionManifest",
    "advance_latest",
    "apply_update",
    "as_float32",
    "average",
    "check_contribution",
    "check_name",
    "combiner",
    "contrib_key",
    "contrib_keys",
    "contrib_prefix",
    "contrib_shard_key",
    "contribution_limit",
    "decision_key",
    "decode",
    "derive",
    "derive_slice",
    "dumps",
    "encode",
    "fetch_shard",
    "finish",
    "finished_key",
    "from_record",
    "latest_key",
    "load_version",
    "make_decision",
    "manifest_key",
    "manifest_limit",
    "num_elements",
    "out_prefix",
    "outer_update",
    "outs_prefix",
    "pack_contribution",
    "plan_shards",
    "proposal_id",
    "pull_version",
    "contribution_body",
    "push_contribution",
    "push_shards",
    "put_contribution",
    "read_contribution",
    "read_delta",
    "read_delta_shard",
    "read_json",
    "read_latest",
    "read_shard",
    "recorded_verdicts",
    "replay_decision",
    "root",
    "run_fragment",
    "run_plan",
    "sha256",
    "shard_limit",
    "split_contribution",
    "tree_bytes",
    "verify_run",
    "version0_prefix",
    "version_hashes",
    "write_manifest",
    "write_version0",
    "zeros_like",
]
