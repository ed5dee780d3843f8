"""Contributors: identity, policy, validation, ledger, audit, rewards.

identity       ed25519 keys, key files, signed contribution statements
registry       the run's key registry: self-signed name -> public key entries in the store
attest         code/config hashes and the pluggable attestation verifier (TEE quotes)
policy         what a run accepts: its Policy, the config hash signed, allowed code hashes
allowlist      allowlisted runs: signed promotions, admissions, who is admitted (checks, islands)
signing        what the aggregator's key signs: round seeds (commit, reveal), decisions
screening      free-riders, norm outliers, copies; scoring by eval-loss improvement
checks         the validator's checks of each contribution as it arrives (Candidate)
streamed       the validator's shard-by-shard reads: the Gram matrix, moved params, history
commits        commitments: store-ordered slots that say which of two copies came first
ledger         the append-only, hash-chained SQLite ledger: entries, hashes, appends
ledger_verify  verify_chain: the problems of a ledger file, against optional anchors
ledger_mirror  the store's copy of the ledger (RUN/ledger/: round segments, signed index)
recorder       the aggregator's local ledger: opened or rebuilt, recorded from decisions
admission      commitment order, the new-key cap, ledger entries (late pushes too)
judging        a round's judgement: sampled validation, assigned-data check, ratings, rewards
validator      the aggregator's validator role (check, quorum, decide, record)
building       `build`: a contributor run's aggregator from its config or manifest
contributor    an island's side: its Signer, the start-up checks, its slot's owner
audit          auditing a run from its store alone (what `verify` runs): gathers, summarizes
audit_checks   the audit's checks: entry signatures, decisions and seeds, rewards
rewards        standings over a window: leaderboard and promotion
ratings        OpenSkill ratings over rounds, the round's reward weights, their ledger audit
__main__       python -m near_jax.contrib: keygen, register, verify, leaderboard, promote,
               admit, codehash

The robust aggregation rules live in `near_jax.diloco.robust` (the protocol replays them).
"""
