"""Contributors: identity, scoring, validation, ledger, rewards.

identity    ed25519 keys, signed contribution statements, the run's key registry
attest      code/config hashes and the pluggable attestation verifier (TEE quotes)
screening   free-riders, norm outliers, copies; scoring by eval-loss improvement
validator   the aggregator's validator role (checks, decide, seeds, ledger entries)
ledger      the append-only, hash-chained SQLite ledger and its store mirror
rewards     standings over a window: leaderboard and promotion

The robust aggregation rules live in `near_jax.diloco.robust` (the protocol replays them).
"""
