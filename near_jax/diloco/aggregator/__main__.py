"""The aggregator of DiLoCo across islands: closes rounds and publishes global versions.

    python -m near_jax.diloco.aggregator --store=gs://bucket/runs --run=demo \\
        --config=configs/tiny.py --rounds=100 --quorum=3 --round_timeout=600 [--workdir=DIR]

Creates the run at version 0 (params from `config.checkpoint.init_from` — a trained or grown
run, the ladder's next rung — or else from `config.seed`, exactly as `near_jax.train` would
start) if it is new — idempotently: a restarted or racing aggregator keeps what
is stored. Then, for each round r: waits until `--quorum` valid contributions arrived or
`--round_timeout` seconds passed since version r was published, validates everything it
reads, commits the decision, publishes version r + 1 (see `near_jax.diloco.protocol` for the
protocol and its commit point), evaluates the new params on a few fixed validation batches
(`--eval_batches`, 0 = off) and logs the round. After `--rounds` rounds it marks the run
finished, which makes the islands exit.

Kill it at any moment and run the same command again: it continues from the store, and a
round it had committed is finished exactly once. The run's compression spec and outer
optimizer come from the run's manifest once the run exists (the config's `diloco` section
is used only to create it); its model and data settings must match the manifest.

Memory and workers: a round is closed one shard at a time (`config.diloco.shard_bytes`,
fixed when the run is created), so the aggregator holds a few shards, not the model
(`--eval_batches` > 0 reads the whole version once per round to evaluate it). With
`--shards=i/K` the shards are split over K processes or machines running this same
command: `--shards=0/K` is the coordinator (it decides and commits), `--shards=i/K` for
i = 1..K-1 are workers that derive shards s with s mod K == i of each round and exit when
the run is finished. Kill any of them at any moment and start it again.

Contributor runs (`config.contrib.enabled`, `--key`): `--allowlist=PROMOTION` (a document
from `python -m near_jax.contrib promote --out --key`, only when creating the run) admits
only the promoted contributors, fixed in the manifest (more later: `near_jax.contrib
admit`); `--allow_code` / `--revoke_code` change the code hashes accepted from now on.

Metrics (`--workdir`/metrics.jsonl, split "aggregator", step = round): accepted, rejected,
late, closed_by_quorum, round_s (open → close), outer_step_s (decode + average + encode +
outer step), bytes_read, bytes_written (store bytes in the round), eval_loss, replayed
(1 when the round was finished from a decision written before a restart).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time

from absl import flags

from near_jax import cli
from near_jax.cli import load_config_flag, quiet_library_logs, usage_error
from near_jax.contrib import allowlist, building, identity
from near_jax.diloco import protocol, startup
from near_jax.diloco.aggregator.core import Aggregator
from near_jax.diloco.aggregator.loop import aggregate, create_run, outer_settings
from near_jax.diloco.aggregator.workers import ShardWorker, parse_shards
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.store import ObjectStore, StoreError
from near_jax.train.checkpoint import CheckpointError
from near_jax.train.loop import trainer_for


def _log(message: str) -> None:
    print(f"aggregator: {message}", file=sys.stderr, flush=True)


def _main(argv: list[str]) -> None:
    quiet_library_logs()
    f = flags.FLAGS
    try:
        index, count = parse_shards(f.shards)
    except ValueError as e:
        usage_error(str(e))
    if index == 0 and (f.rounds is None or f.rounds < 1):  # a worker follows the coordinator
        usage_error("--rounds must be a positive integer")
    if f.quorum < 1:
        usage_error(f"--quorum={f.quorum} must be a positive integer")
    if f.round_timeout <= 0:
        usage_error(f"--round_timeout={f.round_timeout} must be positive (seconds)")
    if f.keep_versions < 0:
        usage_error(f"--keep_versions={f.keep_versions} must be 0 (all) or positive")
    cfg, mesh, store, run, manifest = _prepare(argv)
    try:
        if index > 0:
            code = _work(cfg, mesh, store, run, index, count)
        else:
            code = _aggregate(cfg, mesh, store, run, manifest, count)
    except (ProtocolError, StoreError) as e:
        print(f"near_jax.diloco.aggregator: error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


def _prepare(argv: list[str]):
    """(resolved config, mesh, store, run, manifest or None), or a one-line exit 2."""
    f = flags.FLAGS
    try:
        run = startup.check_args(
            argv, store=f.store, run=f.run, poll_seconds=f.poll_seconds, link=f.link
        )
    except startup.UsageError as e:
        usage_error(str(e))
    cfg = load_config_flag(f.config)
    try:
        cfg, mesh, store, manifest = startup.open_run(cfg, f.store, run, f.workdir, f.link)
    except startup.UsageError as e:
        usage_error(str(e))
    return cfg, mesh, store, run, manifest


def _work(cfg, mesh, store: ObjectStore, run: str, index: int, count: int) -> int:
    """Worker `index` of `count`: derives its shards of each round until the run ends."""
    like = trainer_for(cfg, mesh).abstract_state.params
    deadline = time.monotonic() + flags.FLAGS.round_timeout
    while protocol.read_json(store, protocol.manifest_key(run)) is None:
        if time.monotonic() > deadline:  # the coordinator creates the run
            usage_error(f"unknown run {run!r} in {store.url}: no coordinator created it")
        time.sleep(flags.FLAGS.poll_seconds)
    worker = ShardWorker(
        store, run, like, index, count, poll_seconds=flags.FLAGS.poll_seconds, log=_log
    )
    _log(f"worker {index}/{count} of run {run!r}: shards s mod {count} == {index}")
    worker.serve()
    _log(f"run {run!r} is finished; worker {index}/{count} derived {worker.done} proposals")
    return 0


def _aggregate(
    cfg, mesh, store: ObjectStore, run: str, manifest: dict | None, count: int = 1
) -> int:
    """Builds the run's Aggregator from the flags and runs it; the exit code."""
    f = flags.FLAGS
    if protocol.read_json(store, protocol.finished_key(run)) is not None:
        _log(f"run {run!r} is already finished")
        return 0
    trainer = trainer_for(cfg, mesh)
    kwargs = dict(
        **outer_settings(cfg, manifest),
        quorum=f.quorum,
        round_timeout=f.round_timeout,
        poll_seconds=f.poll_seconds,
        keep_versions=f.keep_versions,
        shard_bytes=cfg.diloco.shard_bytes,
        split_axes=startup.split_axes(trainer.state_shardings.params),
        workers=count,
        fragments=cfg.diloco.fragments,
    )
    if manifest is None and cfg.diloco.fragments > 1 and cfg.contrib.enabled:
        usage_error(
            f"config.diloco.fragments={cfg.diloco.fragments} is not allowed with contributors "
            "(contrib.enabled): their screening and scoring see whole updates; use 1"
        )
    contributors = "contrib" in manifest if manifest is not None else cfg.contrib.enabled
    if f.allowlist and not contributors:
        usage_error(
            f"--allowlist={f.allowlist} applies to contributor runs only: run {run!r} does not "
            "take contributors (config.contrib.enabled)"
        )
    if contributors:
        agg = _contrib_aggregator(cfg, trainer, store, run, manifest, kwargs)
    else:
        if f.key or f.ledger or f.score_source or f.allow_code or f.revoke_code:
            _log(
                f"warning: the contributor flags (--key, --ledger, --score_source, "
                f"--allow_code, --revoke_code) are ignored: run {run!r} does not take "
                "contributors (config.contrib.enabled is fixed at its creation)"
            )
        try:
            agg = Aggregator(store, run, trainer.abstract_state.params, log=_log, **kwargs)
        except ValueError as e:
            usage_error(str(e))
    created = False
    if manifest is None:
        try:
            created = create_run(agg, trainer, cfg, rounds=f.rounds)
        except (ValueError, CheckpointError) as e:  # CheckpointError: init_from unreadable
            usage_error(str(e))
    agg.load()
    if contributors and f.allow_code:
        allowed = agg.allow_code(_hashes(f.allow_code))
        _log(f"code hashes allowed besides the manifest's: {', '.join(h[:12] for h in allowed)}")
    if contributors and f.revoke_code:
        revoked = agg.revoke_code(_hashes(f.revoke_code))
        _log(f"code hashes revoked: {', '.join(h[:12] for h in revoked)}")
    batches = cfg.train.eval_batches if f.eval_batches < 0 else f.eval_batches
    aggregate(
        agg, trainer, rounds=f.rounds, created=created, eval_batches=batches, workdir=f.workdir
    )
    return 0


def _contrib_aggregator(cfg, trainer, store, run, manifest, kwargs) -> Aggregator:
    """The validator-built aggregator of a contributor run (contrib's key, ledger, scoring)."""
    f = flags.FLAGS
    ledger_path = f.ledger or os.path.join(
        f.workdir or tempfile.mkdtemp(prefix="near_jax-ledger-"), "ledger.sqlite"
    )
    for name in ("allow_code", "revoke_code"):
        if not all(re.fullmatch(r"[0-9a-f]{64}", h) for h in _hashes(f[name].value)):
            usage_error(
                f"--{name}={f[name].value}: comma-separated sha256 hex hashes "
                "(python -m near_jax.contrib codehash)"
            )
    both = set(_hashes(f.allow_code)) & set(_hashes(f.revoke_code))
    if both:
        usage_error(f"--allow_code and --revoke_code both name {min(both)[:12]}…: choose one")
    entry = None
    if f.allowlist and manifest is not None:
        _log(f"warning: --allowlist is ignored: run {run!r} exists (its manifest fixed it)")
    elif f.allowlist:
        entry = _allowlist(store, f.allowlist)
    if f.score_source and f.score_source == cfg.data.source:
        usage_error(
            f"--score_source={f.score_source} is the run's training source: "
            "score on data the contributors do not have"
        )
    try:
        agg = building.build(
            cfg,
            trainer,
            store,
            run,
            manifest,
            key_path=f.key,
            ledger_path=ledger_path,
            score_source=f.score_source,
            allowlist=entry,
            log=_log,
            **kwargs,
        )
    except ValueError as e:
        usage_error(str(e))
    _log(
        f"contributor run: ledger {ledger_path}, mirrored to {run}/ledger/ in "
        f"the store; rule {agg.policy.rule}; scoring on "
        f"{f.score_source or 'the public val split (see --score_source)'}"
    )
    if f.quorum < 3:
        _log(
            f"warning: --quorum={f.quorum} lets the first {f.quorum} contribution(s) "
            "close a round; untrusted runs want a quorum of several contributors"
        )
    return agg


def _hashes(flag: str) -> list[str]:
    return [h.strip() for h in flag.split(",") if h.strip()]


def _allowlist(store: ObjectStore, path: str) -> dict:
    """The `contrib.allowlist` a new run records from promotion file `path` (a usage error
    when it is not a promotion signed by its run's aggregator)."""
    try:
        promotion = allowlist.read_promotion(path)
    except ValueError as e:
        usage_error(f"--allowlist={path}: {e}")
    problem = allowlist.source_problem(store, promotion)
    if problem:
        usage_error(f"--allowlist={path}: {problem}")
    _log(
        f"allowlist: {len(promotion.keys)} contributors promoted from run "
        f"{promotion.from_run!r} (signed by key id {identity.key_id(promotion.signer)})"
    )
    return promotion.manifest_entry()


def define_flags() -> None:
    startup.define_common_flags()
    for name in startup.COMMON_FLAGS:
        flags.declare_key_flag(name)  # listed by --help, as this program's own
    flags.DEFINE_string(
        "key",
        None,
        "Contributor runs: the aggregator's ed25519 key (python -m near_jax."
        "contrib keygen); its signatures seed each round's scoring batches.",
    )
    flags.DEFINE_string(
        "ledger",
        None,
        "Contributor runs: the local ledger file (default WORKDIR/ledger."
        "sqlite, else a temp dir); the store keeps the mirror.",
    )
    flags.DEFINE_string(
        "allow_code",
        "",
        "Contributor runs: also accept contributions from these code hashes "
        "from now on (comma-separated; a new release mid-run), in a list this key signs.",
    )
    flags.DEFINE_string(
        "revoke_code",
        "",
        "Contributor runs: refuse contributions from these code hashes from now on "
        "(comma-separated; the manifest's too), in the list this key signs.",
    )
    flags.DEFINE_string(
        "allowlist",
        "",
        "New contributor runs: admit only the contributors of this promotion document "
        "(python -m near_jax.contrib promote --out --key), fixed in the run's manifest.",
    )
    flags.DEFINE_string(
        "score_source",
        "",
        "Contributor runs: score on this data source (a path/glob only "
        "the aggregator has) instead of the run's public val split, which contributors "
        "could train on.",
    )
    flags.DEFINE_integer("rounds", None, "Close this many rounds, then mark the run finished.")
    flags.DEFINE_integer("quorum", 1, "Close a round once this many valid contributions arrived.")
    flags.DEFINE_float("round_timeout", 600.0, "Close a round this many seconds after it opened.")
    flags.DEFINE_integer(
        "eval_batches", -1, "Validation batches per version (-1: train.eval_batches; 0: off)."
    )
    flags.DEFINE_integer(
        "keep_versions", 0, "Keep full params of the last K versions only (0: keep all)."
    )
    flags.DEFINE_string(
        "shards",
        "0/1",
        "i/K: split each round's shards over K processes running this command; 0/K is "
        "the coordinator that decides, 1/K..K-1/K are workers.",
    )


def main() -> None:
    """Console entry point."""
    cli.run(_main, define_flags)


if __name__ == "__main__":
    main()
