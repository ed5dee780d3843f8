"""An island of DiLoCo: trains on its own devices and meets the others only in the store.

    python -m near_jax.diloco.island --store=gs://bucket/runs --run=demo --island=eu-1 \\
        --config=configs/tiny.py [--config.KEY=V ...] [--rounds=N] [--workdir=DIR]

Builds the normal trainer (`near_jax.train.loop.trainer_for`) on this machine's devices and
compiles its step, then joins the run: pulls the newest global version in full (params and outer
momentum, checked against their hashes) and loops, each round r:

  1. train H = the run's `inner_steps` steps of the ordinary train step from θ_r, keeping
     the inner AdamW state from round to round (as DiLoCo does);
  2. push Δ = θ_r − θ_island compressed with the run's spec, carrying the compressor's
     error feedback (kept only when the contribution was applied); if round r's decision
     already exists the push is skipped (it could only be late);
  3. wait for version r + 1, then follow: pull only the published update Û_r and apply the
     outer step locally (bit-identical to the aggregator's, checked against the hash in the
     decision); pull the full version instead when more than MAX_CHAIN versions behind or
     on a hash mismatch.

It exits 0 after `--rounds` rounds (0 = no limit) or when the run is marked finished.

Multi-host islands: run the same command on every host of a TPU slice or GPU cluster (or
`python -m launch.local -n 2 -- python -m near_jax.diloco.island ...` on one machine); the
processes join through `jax.distributed` (`--coordinator_address/--num_processes/
--process_id` or the launcher's environment) and train one model sharded over all their
devices. No host gathers it: each pulls, applies and pushes only its own shards
(`near_jax.diloco.island.hosts`), host 0 writes the contribution's manifest once every
shard is in, and speaks for the island (name claim, signatures, metrics).

Data order: each island reads the train split with seed = blake2b(config seed, island id,
version it joined at) (`island_seed`): islands see different orders, and a restarted island
does not replay what it read before its restart. A restart starts a fresh inner optimizer.
In a contributor run whose policy assigns data, round r trains instead on batches that
(run, r, the public key of --key) determine (`near_jax.diloco.assignment`): every host
loads --key to compute them.

The model and data settings must match the run's (fixed by whoever created it); the
compression spec, outer optimizer and H come from the run's manifest, not this config.

Metrics (`--workdir`/metrics.jsonl, split "island", step = round): inner_loss, bytes_pushed,
bytes_pulled (full pulls when joining or behind, updates every round, small JSON objects),
full_pull, wait_s (from the push to the next version), train_s (inner steps), idle_s (not
training, waiting for the round's exchange), wall_s, utilization (train_s / wall_s), accepted,
late, version.
"""

from __future__ import annotations

import sys

import jax
from absl import flags

from near_jax import cli
from near_jax.cli import load_config_flag, quiet_library_logs, usage_error
from near_jax.contrib import contributor, identity
from near_jax.diloco import claims, protocol, startup
from near_jax.diloco.island.follow import log
from near_jax.diloco.island.loop import train_island
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.startup import UsageError
from near_jax.diloco.store import StoreError
from near_jax.train import distributed


def _main(argv: list[str]) -> None:
    quiet_library_logs()
    f = flags.FLAGS
    try:  # a multi-host island: join the other processes before anything touches a device
        distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    except distributed.DistributedError as e:
        usage_error(str(e))
    if not f.island:
        usage_error("--island is required: this island's id, unique in the run")
    try:
        island = protocol.check_name("island", f.island)
    except ValueError as e:
        usage_error(str(e))
    for name in ("rounds", "wait_for_run", "wait_timeout"):
        if f[name].value < 0:
            usage_error(f"--{name}={f[name].value} must be >= 0")
    cfg, mesh, store, run, manifest = _prepare(argv)
    assigned_key = None
    if f.key:  # every host: an assigned-data run's batches follow from the public key
        try:
            assigned_key = identity.load(f.key).public_hex
        except identity.IdentityError as e:
            usage_error(str(e))
    if manifest is None and f.wait_for_run <= 0:
        usage_error(
            f"unknown run {run!r} in {store.url}: no {protocol.manifest_key(run)} (start the "
            "aggregator first, or pass --wait_for_run=SECONDS)"
        )
    claim = None
    if jax.process_index() == 0:  # host 0 speaks for the island (the others follow it)
        claim = claims.Claim(store, run, island)
        try:
            claim.acquire()
        except claims.NameTaken as e:
            usage_error(str(e))
        claim.start()

    def make_signer(manifest: dict) -> contributor.Signer:
        """The island's signer for a contributor run (registers its key); exit 2 if it
        cannot take part."""
        try:
            signer = contributor.prepare_signer(
                cfg, store, run, island, manifest, f.key, f.attestation
            )
        except ValueError as e:
            usage_error(str(e))
        log(island, f"signing as {island} (key id {signer.ident.key_id})")
        return signer

    try:
        train_island(
            cfg,
            mesh,
            store,
            run,
            island,
            manifest,
            claim=claim,
            rounds=f.rounds,
            poll_seconds=f.poll_seconds,
            wait_timeout=f.wait_timeout,
            wait_for_run=f.wait_for_run,
            workdir=f.workdir,
            make_signer=make_signer,
            slot_problem=contributor.slot_problem,
            overlap=f.overlap,
            assigned_key=assigned_key,
        )
        code = 0
    except UsageError as e:
        usage_error(str(e))
    except (ProtocolError, StoreError, FloatingPointError) as e:
        print(f"near_jax.diloco.island: error: {e}", file=sys.stderr)
        code = 1
    finally:
        try:
            if claim is not None:
                claim.release()
        except StoreError:
            pass  # it lapses after a lease
    sys.exit(code)


def _prepare(argv: list[str]):
    """(resolved config, mesh, store, run, manifest or None), or a one-line exit 2."""
    f = flags.FLAGS
    try:
        run = startup.check_args(
            argv, store=f.store, run=f.run, poll_seconds=f.poll_seconds, link=f.link
        )
    except UsageError as e:
        usage_error(str(e))
    cfg = load_config_flag(f.config)
    try:
        cfg, mesh, store, manifest = startup.open_run(cfg, f.store, run, f.workdir, f.link)
    except UsageError as e:
        usage_error(str(e))
    return cfg, mesh, store, run, manifest


def define_flags() -> None:
    startup.define_common_flags()
    for name in startup.COMMON_FLAGS:
        flags.declare_key_flag(name)  # listed by --help, as this program's own
    distributed.define_flags()  # --coordinator_address, --num_processes, --process_id
    flags.DEFINE_string("island", None, "This island's id (unique in the run): [A-Za-z0-9._-].")
    flags.DEFINE_integer("rounds", 0, "Rounds to contribute to, then exit 0 (0: until finished).")
    flags.DEFINE_string(
        "key",
        None,
        "Contributor runs: this island's ed25519 key (python -m near_jax.contrib "
        "keygen); registered under --island on first use.",
    )
    flags.DEFINE_string(
        "attestation",
        "",
        "Contributor runs: a file attached to every contribution for the "
        "run's attestation verifier (e.g. a TEE quote).",
    )
    flags.DEFINE_integer(
        "overlap",
        None,
        "Inner steps τ (0..H) to train while a round's push, aggregation and pull happen "
        "(one-process islands); then restart from the new version plus those steps' "
        "progress. Unset: wait for each round synchronously.",
    )
    flags.DEFINE_float(
        "wait_for_run", 0.0, "Seconds to wait for the run to be created (0: fail if unknown)."
    )
    flags.DEFINE_float(
        "wait_timeout", 0.0, "Fail after waiting this long for a new version (0: forever)."
    )


def main() -> None:
    """Console entry point."""
    cli.run(_main, define_flags)


if __name__ == "__main__":
    main()
