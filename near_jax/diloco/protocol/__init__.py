"""The round protocol of DiLoCo across islands that share only an object store.

    keys           store keys (below), run and island names, FORMAT, LATE_WINDOW, MAX_CHAIN,
                   ProtocolError
    objects        canonical JSON, sha256, float32 trees stored as fp32 payloads, bounded reads
    versions       the numpy outer step (outer_update, average), Version in memory and in the
                   store, `latest` (moved forward only)
    contributions  an island's tagged contribution (pack, split, push) and the aggregator's
                   Verdict on one (check_contribution)
    decisions      closing a round (derive, make_decision, write_derived), replaying it
                   (replay_decision), following it (apply_update), checking a run (verify_run)

Every public name is re-exported here: callers write `protocol.pull_version(...)`.

Islands never talk to each other or to the aggregator: everything goes through framed,
validated objects (`near_jax.diloco.store`). Round r starts from global version r (θ_r and
the outer momentum m_r); each island trains H inner steps from θ_r and pushes Δ = θ_r −
θ_island; the aggregator closes the round and publishes version r + 1.

Keys (under `RUN/`, r and v zero-padded to 8 digits; JSON objects are UTF-8, sorted keys)
---------------------------------------------------------------------------------------
    run.json                      manifest: spec, outer lr/momentum, H, model config, hashes
                                  of version 0. Aggregator, put_if_absent (creates the run).
    latest                        {"version": v, "params_sha256", "momentum_sha256",
                                  "published_at"}: the newest complete version. Aggregator,
                                  moved forward only (compare-and-swap), written last.
    finished                      {"version": N, ...}: the run is over. Aggregator.
    versions/v/params             θ_v, full fp32 (a compress.Payload with spec fp32): joiners
    versions/v/momentum           m_v, the outer Nesterov trace, fp32 (islands need it too)
    versions/v/server_ef          the aggregator's error feedback of the update codec, fp32
    rounds/r/contrib/ISLAND       an island's Δ for round r: u32 length | JSON tag {run,
                                  round, island, base_sha256 = sha256 of θ_r, inner_loss, …}
                                  | compressed payload. The island, put_if_absent (immutable).
    rounds/r/decision             the COMMIT POINT of round r: which contributions were
                                  applied (key + sha256 of the object), which were rejected
                                  and why, which pushes to earlier rounds arrived late, why
                                  the round closed (quorum / deadline), and the sha256 of
                                  version r + 1. Aggregator, put_if_absent. Runs of
                                  untrusted contributors add the aggregation rule (replays
                                  combine with it), every contribution's ledger entry, the
                                  seed reveal and the aggregator's signature
                                  (`near_jax/contrib/validator.py`).
    rounds/r/update               Û_r: the mean of the applied Δ in fp32, compressed with the
                                  run's spec (with the aggregator's error feedback) and
                                  decoded again: what every party applies. Absent when no
                                  contribution was applied.

Who computes what (determinism)
-------------------------------
Version r + 1 is a pure function of version r and decision r: decode the applied
contributions, sum them in island-id order in float32, divide by their count, encode with
the run's spec and `server_ef` (→ Û_r and the new server_ef), then the outer step
`outer_update` in numpy float32 — SGD with Nesterov momentum, bit-identical to
`outer.outer_optimizer` + `outer.outer_step` (tests check it). Numpy's elementwise float32
add/multiply are correctly rounded IEEE operations, so every machine gets the same bits.
A round with no applied contribution publishes version r + 1 = version r unchanged (no
step, so momentum does not move the params).

Islands keep θ_r and m_r in host memory and follow the run by pulling only Û_r each round
(`apply_update`), then check sha256(θ_{r+1}) and sha256(m_{r+1}) against the decision; on a
mismatch, or when more than MAX_CHAIN versions behind, or when (re)starting, they pull the
full version (`pull_version`), checked against its recorded hashes (run.json for version 0,
else the decision that produced it).

Crash safety (aggregator)
-------------------------
Closing round r: validate contributions → compute version r + 1 in memory → write the
decision (put_if_absent; commit point) → write update, versions/r+1/* → move `latest`. A
restarted aggregator loads version `latest` = r from the store; if decision r exists it
re-reads the recorded contributions (checking their sha256), recomputes — identical bytes,
checked against the decision's hashes — rewrites the derived objects and moves `latest`:
the round is applied exactly once, always to version r. Before the decision nothing is
committed and the round simply continues. The outer momentum and error feedback live in
versions/v/, so they survive restarts. If two aggregators race, put_if_absent makes one
decision win and the other finishes from it.

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
party can write are bounded (`object_limit`, `store.MAX_OBJECT_BYTES`); file stores refuse
links.

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
    Verdict,
    check_contribution,
    pack_contribution,
    push_contribution,
    split_contribution,
    unpack_contribution,
)
from near_jax.diloco.protocol.decisions import (
    apply_update,
    combiner,
    derive,
    make_decision,
    replay_decision,
    verify_run,
    write_derived,
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
    decision_key,
    finished_key,
    latest_key,
    manifest_key,
    update_key,
    version_key,
)
from near_jax.diloco.protocol.objects import (
    as_float32,
    dumps,
    get_tree_object,
    num_elements,
    object_limit,
    read_json,
    sha256,
    tree_bytes,
    tree_from_bytes,
    tree_from_bytes_any,
    zeros_like,
)
from near_jax.diloco.protocol.versions import (
    Version,
    advance_latest,
    average,
    make_version,
    outer_update,
    pull_version,
    read_latest,
    version_hashes,
    write_version,
)

__all__ = [
    "FORMAT",
    "LATE_WINDOW",
    "MAX_CHAIN",
    "MAX_TAG_BYTES",
    "ProtocolError",
    "Verdict",
    "Version",
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
    "decision_key",
    "decode",
    "derive",
    "dumps",
    "encode",
    "finished_key",
    "get_tree_object",
    "latest_key",
    "make_decision",
    "make_version",
    "manifest_key",
    "num_elements",
    "object_limit",
    "outer_update",
    "pack_contribution",
    "pull_version",
    "push_contribution",
    "read_json",
    "read_latest",
    "replay_decision",
    "sha256",
    "split_contribution",
    "tree_bytes",
    "tree_from_bytes",
    "tree_from_bytes_any",
    "unpack_contribution",
    "update_key",
    "verify_run",
    "version_hashes",
    "version_key",
    "write_derived",
    "write_version",
    "zeros_like",
]
