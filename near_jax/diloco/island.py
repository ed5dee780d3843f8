"""An island of DiLoCo: trains on its own devices and meets the others only in the store.

    python -m near_jax.diloco.island --store=gs://bucket/runs --run=demo --island=eu-1 \\
        --config=configs/tiny.py [--config.KEY=V ...] [--rounds=N] [--workdir=DIR]

Builds the normal trainer (`train.make_trainer`) on this machine's devices and compiles its
step, then joins the run: pulls the newest global version in full (params and outer
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

Data order: each island reads the train split with seed = blake2b(config seed, island id,
version it joined at) (`island_seed`): islands see different orders, and a restarted island
does not replay what it read before its restart. A restart starts a fresh inner optimizer.

The model and data settings must match the run's (fixed by whoever created it); the
compression spec, outer optimizer and H come from the run's manifest, not this config.

Metrics (`--workdir`/metrics.jsonl, split "island", step = round): inner_loss, bytes_pushed,
bytes_pulled (full pulls when joining or behind, updates every round, small JSON objects),
full_pull, wait_s (idle, waiting for the next version), train_s, accepted, late, version.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time

import numpy as np
from absl import flags

from near_jax import cli
from near_jax.cli import quiet_library_logs, usage_error
from near_jax.diloco import claims, protocol, quarantine
from near_jax.diloco.aggregator import define_common_flags, manifest_problem, prepare
from near_jax.diloco.protocol import ProtocolError, Version
from near_jax.diloco.store import CorruptObject, ObjectStore, StoreError

now = time.perf_counter


def island_seed(seed: int, island: str, version: int) -> int:
    """The data seed of `island` joining at `version`: 31 bits of blake2b of all three."""
    digest = hashlib.blake2b(repr((int(seed), island, int(version))).encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


def _log(island: str, message: str) -> None:
    print(f"island {island}: {message}", file=sys.stderr, flush=True)


def _kb(n: int) -> str:
    return f"{n / 1e3:.1f} kB"


class _Waiter:
    """Polls the store until a condition holds, within --wait_timeout."""

    def __init__(self, poll: float, timeout: float):
        self.poll, self.timeout = poll, timeout

    def until(self, what: str, fn):
        start = now()
        while True:
            value = fn()
            if value:
                return value
            if self.timeout and now() - start > self.timeout:
                raise ProtocolError(f"waited {self.timeout:g}s for {what}")
            time.sleep(self.poll)


def train_island(
    cfg,
    mesh,
    store: ObjectStore,
    run: str,
    island: str,
    manifest: dict | None,
    claim: claims.Claim | None = None,
) -> int:
    """Joins the run and trains rounds until --rounds or the run's end; the exit code."""
    import jax

    from near_jax import data
    from near_jax.train import metrics
    from near_jax.train.loop import trainer_for as make_trainer

    f = flags.FLAGS
    waiter = _Waiter(f.poll_seconds, f.wait_timeout)
    trainer = make_trainer(cfg, mesh)
    abstract = trainer.abstract_state.params
    state = trainer.init(jax.random.key(cfg.seed))
    # Compile the step before joining, so the first round is not spent compiling.
    probe = data.make_iterator(
        cfg.data, split="val", seed=0, global_batch_size=cfg.train.global_batch_size
    )
    sample = data.to_global_batch(next(probe), trainer.batch_sharding)
    trainer.step.lower(trainer.abstract_state, sample).compile()
    del probe, sample

    if manifest is None:
        _log(island, f"waiting up to {f.wait_for_run:g}s for run {run!r} to be created")
        deadline = now() + f.wait_for_run
        while manifest is None and now() < deadline:
            time.sleep(f.poll_seconds)
            manifest = protocol.read_json(store, protocol.manifest_key(run))
        if manifest is None:
            usage_error(f"unknown run {run!r} in {store.url}: no {protocol.manifest_key(run)}")
        problem = manifest_problem(manifest, cfg)
        if problem:
            usage_error(problem)
    spec, lr, mu = manifest["compression"], manifest["outer_lr"], manifest["outer_momentum"]
    inner_steps = int(manifest["inner_steps"])
    signer = None
    if "contrib" in manifest:  # a run of untrusted contributors: sign every contribution
        from near_jax.contrib.contributor import prepare_signer

        try:
            signer = prepare_signer(cfg, store, run, island, manifest, f.key, f.attestation)
        except ValueError as e:
            usage_error(str(e))
        _log(island, f"signing as {island} (key id {signer.ident.key_id})")
    latest = waiter.until("the run's first version", lambda: _newer(store, run, -1, island))
    held, _ = _catch_up(store, run, island, None, latest["version"], abstract, spec, lr, mu)
    seed = island_seed(cfg.seed, island, held.version)
    train_iter = data.make_iterator(
        cfg.data, split="train", seed=seed, global_batch_size=cfg.train.global_batch_size
    )
    _log(island, f"joined run {run!r} at version {held.version} ({_kb(store.bytes_read)} "
                 f"pulled) | H={inner_steps} | spec {spec} | data seed {seed}")  # fmt: skip

    shardings, dtypes = trainer.state_shardings.params, jax.tree.map(lambda a: a.dtype, abstract)
    writer = metrics.MetricsWriter(f.workdir) if f.workdir else None
    error_feedback, done = None, 0
    pulled_mark, full_pending = 0, True  # the join pull counts toward the first round
    try:
        while True:
            finished = _tolerant(
                island, lambda: protocol.read_json(store, protocol.finished_key(run))
            )
            if finished is not None and held.version >= finished["version"]:
                _log(island, f"run {run!r} is finished at version {finished['version']}")
                return 0
            r = held.version
            # 1. inner steps from θ_r.
            t0 = now()
            params = jax.tree.map(lambda x, d: np.asarray(x, d), held.params, dtypes)
            state = state._replace(params=jax.device_put(params, shardings))
            losses = []
            for _ in range(inner_steps):
                batch = data.to_global_batch(next(train_iter), trainer.batch_sharding)
                state, stats = trainer.step(state, batch)
                losses.append(stats["loss"])
            local = jax.device_get(state.params)
            inner_loss = float(np.mean(jax.device_get(losses)))
            train_s = now() - t0
            if not math.isfinite(inner_loss):
                raise FloatingPointError(f"inner loss is {inner_loss} in round {r}")
            if claim is not None and claim.lost:
                raise ProtocolError(
                    f"island {claim.lost} took over the name {island!r}; "
                    "stopping so that only one island pushes under it"
                )
            # 2. push Δ = θ_r − θ_island (unless the round is already closed).
            delta = jax.tree.map(lambda g, p: g - np.asarray(p, np.float32), held.params, local)
            pushed_bytes, written, new_ef = 0, False, None
            if _tolerant(island, lambda r=r: store.exists(protocol.decision_key(run, r))):
                note = "round closed before the push (late; not sent)"
            else:
                written, pushed_bytes, new_ef = protocol.push_contribution(
                    store, run, island, held, delta, spec, error_feedback, sign=signer,
                    inner_loss=inner_loss, inner_steps=inner_steps,
                )  # fmt: skip
                note = (
                    ""
                    if written
                    else (
                        "our slot already held a contribution (pushed before a restart, or by "
                        "another island under this name)"
                    )
                )
                if not written and signer is not None:
                    from near_jax.contrib.contributor import slot_problem

                    expect = {"run": run, "round": r, "base_sha256": held.params_sha256}
                    key = protocol.contrib_key(run, r, island)
                    problem = slot_problem(store, key, signer, expect)
                    if problem:
                        note = (f"WARNING: our slot for round {r} already holds an object and "
                                f"{problem}: someone else wrote under our name")  # fmt: skip
            # 3. wait for version r + 1, learn the outcome, follow.
            t1 = now()
            latest = waiter.until(f"version {r + 1}", lambda r=r: _newer(store, run, r, island))
            wait_s = now() - t1
            if latest["version"] <= r:  # the run finished at version r meanwhile
                _log(island, f"run {run!r} finished at version {r}; round {r} was not applied")
                return 0
            key = protocol.decision_key(run, r)
            decision = _tolerant(island, lambda key=key: protocol.read_json(store, key)) or {}
            accepted = any(e["island"] == island for e in decision.get("accepted", []))
            rejected = [e["reason"] for e in decision.get("rejected", []) if e["island"] == island]
            late = not accepted and not rejected  # not in the decision: it came too late
            if accepted and written:
                error_feedback = new_ef  # else Δ was not applied: the old residual still owed
            held, full = _catch_up(
                store, run, island, held, latest["version"], abstract, spec, lr, mu
            )
            pulled = store.bytes_read - pulled_mark
            pulled_mark = store.bytes_read
            full, full_pending = full or full_pending, False
            outcome = "accepted" if accepted else f"rejected: {rejected[0]}" if rejected else "late"
            if not written and (accepted or rejected):  # the verdict is on the slot's object
                outcome = f"this push was NOT stored; the object already in our slot was {outcome}"
            mine = [
                e
                for e in decision.get("contrib", {}).get("entries", [])
                if e["contributor"] == island and e["key_id"]
            ]  # signed by us
            if mine and mine[0]["score"] is not None:
                outcome += f" (score {mine[0]['score']:.4g}, reward {mine[0]['reward']:.3f})"
            stats = {"round": r, "version": held.version, "inner_loss": inner_loss,
                     "bytes_pushed": pushed_bytes, "bytes_pulled": pulled, "full_pull": int(full),
                     "wait_s": wait_s, "train_s": train_s, "accepted": int(accepted),
                     "late": int(late)}  # fmt: skip
            if mine and mine[0]["score"] is not None:
                stats.update(score=mine[0]["score"], reward=mine[0]["reward"])
            if writer:
                writer.write(r, stats, "island")
            _log(island, f"round {r} | loss {inner_loss:.4f} | pushed {_kb(pushed_bytes)} | "
                         f"pulled {_kb(pulled)}{' (full)' if full else ''} | train {train_s:.2f}s"
                         f" | wait {wait_s:.2f}s | {outcome}{'; ' + note if note else ''} -> "
                         f"version {held.version}")  # fmt: skip
            done += 1
            if f.rounds and done >= f.rounds:
                _log(island, f"done: {done} rounds")
                return 0
    finally:
        if writer:
            writer.close()


def _newer(store: ObjectStore, run: str, version: int, island: str) -> dict | None:
    """`latest` once it is past `version` or the run is finished, else None (also while
    `latest` is damaged: the aggregator moves such an object aside and rewrites it)."""
    latest = _tolerant(island, lambda: protocol.read_latest(store, run))
    problem = quarantine.latest_problem(latest) if latest is not None else ""
    if problem:
        _warn_once(island, f"{protocol.latest_key(run)}: {problem}")
        latest = None
    if latest and latest["version"] > version:
        return latest
    return latest if _tolerant(island, lambda: store.exists(protocol.finished_key(run))) else None


_warned: set[str] = set()


def _warn_once(island: str, problem: str) -> None:
    if problem not in _warned:
        _warned.add(problem)
        _log(island, f"warning: {problem}; treating it as not there yet")


def _tolerant(island: str, read):
    """read(), or None when what it reads is damaged or not the aggregator's (planted by
    someone else): the island warns once and goes on as if it were not there yet, instead
    of stopping (the aggregator quarantines such objects, see `quarantine.py`)."""
    try:
        return read()
    except (ProtocolError, CorruptObject) as e:
        _warn_once(island, str(e))
        return None


def _catch_up(
    store, run, island, held: Version | None, target: int, like, spec, lr, mu
) -> tuple[Version, bool]:
    """Version `target` (or newer): by applying updates if at most MAX_CHAIN behind, else (or
    on a mismatch) by a full pull. Returns (version, whether it pulled in full)."""
    if held is not None and target - held.version <= protocol.MAX_CHAIN:
        try:
            while held.version < target:
                held = protocol.apply_update(store, run, held, spec, lr, mu, like)
            return held, False
        except (ProtocolError, CorruptObject) as e:
            _log(island, f"cannot follow by updates ({e}); pulling the full version")
    for attempt in range(3):
        try:
            return protocol.pull_version(store, run, target, like), True
        except (ProtocolError, CorruptObject):  # collected by --keep_versions meanwhile?
            if attempt == 2:
                raise
            target = (_tolerant(island, lambda: protocol.read_latest(store, run)) or {}).get(
                "version", target
            )
    raise AssertionError("unreachable")


def _main(argv: list[str]) -> None:
    quiet_library_logs()
    f = flags.FLAGS
    if not f.island:
        usage_error("--island is required: this island's id, unique in the run")
    try:
        island = protocol.check_name("island", f.island)
    except ValueError as e:
        usage_error(str(e))
    for name in ("rounds", "wait_for_run", "wait_timeout"):
        if f[name].value < 0:
            usage_error(f"--{name}={f[name].value} must be >= 0")
    cfg, mesh, store, run, manifest = prepare(argv)
    if manifest is None and f.wait_for_run <= 0:
        usage_error(
            f"unknown run {run!r} in {store.url}: no {protocol.manifest_key(run)} (start the "
            "aggregator first, or pass --wait_for_run=SECONDS)"
        )
    claim = claims.Claim(store, run, island)
    try:
        claim.acquire()
    except claims.NameTaken as e:
        usage_error(str(e))
    claim.start()
    try:
        code = train_island(cfg, mesh, store, run, island, manifest, claim)
    except (ProtocolError, StoreError, FloatingPointError) as e:
        print(f"near_jax.diloco.island: error: {e}", file=sys.stderr)
        code = 1
    finally:
        try:
            claim.release()
        except StoreError:
            pass  # it lapses after a lease
    sys.exit(code)


def define_flags() -> None:
    define_common_flags()
    flags.DEFINE_string("island", None, "This island's id (unique in the run): [A-Za-z0-9._-].")
    flags.DEFINE_integer("rounds", 0, "Rounds to contribute to, then exit 0 (0: until finished).")
    flags.DEFINE_string(
        "key", None, "Contributor runs: this island's ed25519 key (python -m near_jax.contrib "
        "keygen); registered under --island on first use."
    )  # fmt: skip
    flags.DEFINE_string(
        "attestation", "", "Contributor runs: a file attached to every contribution for the "
        "run's attestation verifier (e.g. a TEE quote)."
    )  # fmt: skip
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
