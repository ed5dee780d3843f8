"""The aggregator of DiLoCo across islands: closes rounds and publishes global versions.

    python -m near_jax.diloco.aggregator --store=gs://bucket/runs --run=demo \\
        --config=configs/tiny.py --rounds=100 --quorum=3 --round_timeout=600 [--workdir=DIR]

Creates the run at version 0 (params from `config.seed`, exactly as `near_jax.train` would
initialize them) if it is new — idempotently: a restarted or racing aggregator keeps what
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

Metrics (`--workdir`/metrics.jsonl, split "aggregator", step = round): accepted, rejected,
late, closed_by_quorum, round_s (open → close), outer_step_s (decode + average + encode +
outer step), bytes_read, bytes_written (store bytes in the round), eval_loss, replayed
(1 when the round was finished from a decision written before a restart).
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from absl import flags

from near_jax import cli
from near_jax.cli import load_config_flag, quiet_library_logs, usage_error
from near_jax.diloco import protocol, quarantine
from near_jax.diloco.codec.compress import PayloadError
from near_jax.diloco.protocol import ProtocolError, Verdict, Version
from near_jax.diloco.store import CorruptObject, ObjectStore, StoreError

now = time.perf_counter


class Aggregator:
    """Closes the rounds of one run in a store; no JAX model needed (tests drive it)."""

    signs_decisions = False  # contrib: its decisions carry its signature (see `authentic`)

    def __init__(
        self,
        store: ObjectStore,
        run: str,
        like: Any,
        *,
        spec: str,
        lr: float,
        momentum: float,
        quorum: int,
        round_timeout: float,
        poll_seconds: float = 0.25,
        keep_versions: int = 0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] = lambda message: None,
    ):
        for name, value in (("outer lr", lr), ("outer momentum", momentum)):
            if not math.isfinite(value):  # caught before anything is written to the store
                raise ValueError(f"the {name} is {value}; it must be finite")
        self.store, self.run, self.like, self.log = store, run, like, log
        self.spec, self.lr, self.momentum = spec, lr, momentum
        self.quorum, self.round_timeout = quorum, round_timeout
        self.poll_seconds, self.keep_versions = poll_seconds, keep_versions
        self.clock, self.sleep = clock, sleep
        self.state: Version | None = None
        self.opened_at = 0.0
        self._decisions: dict[int, dict] = {}
        self.poll_index = 0  # listings of the store so far (contrib: who arrived first)

    # ----------------------------------------------------------------------- run lifecycle

    def create(self, params0: Any, manifest: dict) -> bool:
        """Creates the run at version 0 unless it exists; True if this call created it.

        Each version-0 object is first-writer-wins and run.json records the hashes of what
        is stored, so racing or restarted aggregators agree even if their inits differ.
        """
        store, run = self.store, self.run
        fixed = {
            **manifest,
            "format": protocol.FORMAT,
            "run": run,
            "compression": self.spec,
            "outer_lr": self.lr,
            "outer_momentum": self.momentum,
        }
        try:  # all of the manifest must be storable before its first object is written
            protocol.dumps(fixed)
        except (TypeError, ValueError) as e:
            raise ValueError(f"run {run!r} cannot be created: its manifest {e}") from None
        if protocol.read_json(store, protocol.manifest_key(run)) is None:
            zeros = protocol.zeros_like(params0)
            trees = {"params": protocol.as_float32(params0), "momentum": zeros, "server_ef": zeros}
            hashes = {}
            for part, tree in trees.items():
                key = protocol.version_key(run, 0, part)
                store.put_if_absent(key, protocol.tree_bytes(tree))
                hashes[f"{part}_sha256"] = protocol.sha256(store.get(key))
            manifest = {**fixed, "version0": hashes, "created_at": self.clock()}
            created = store.put_if_absent(protocol.manifest_key(run), protocol.dumps(manifest))
        else:
            created = False
        if self._latest() is None:
            quarantine.recover_latest(store, run, self.like, self.clock())
        return created

    def load(self) -> Version:
        """Loads the newest published version (params, momentum, error feedback); a `latest`
        this aggregator did not write is moved aside and rebuilt (`quarantine.py`)."""
        latest = self._latest()
        if latest is None:
            if protocol.read_json(self.store, protocol.manifest_key(self.run)) is None:
                raise ProtocolError(f"run {self.run!r} has no {protocol.latest_key(self.run)}")
            quarantine.recover_latest(self.store, self.run, self.like, self.clock())
            latest = self._latest()
        try:
            self.state = protocol.pull_version(
                self.store, self.run, latest["version"], self.like, with_server_ef=True
            )
        except ProtocolError:  # the version `latest` names does not verify: rebuild it
            quarantine.move_aside(self.store, self.run, protocol.latest_key(self.run), self.clock())
            self.state = quarantine.recover_latest(self.store, self.run, self.like, self.clock())
            latest = self._latest()
        self.opened_at = float(latest["published_at"])
        return self.state

    def _latest(self) -> dict | None:
        return quarantine.read_own(
            self.store,
            self.run,
            protocol.latest_key(self.run),
            quarantine.latest_problem,
            self.log,
            self.clock(),
        )

    def finish(self) -> None:
        """Marks the run finished at the current version (islands then exit)."""
        body = {"version": self.state.version, **self.state.hashes(), "finished_at": self.clock()}
        self.store.put_if_absent(protocol.finished_key(self.run), protocol.dumps(body))

    # ------------------------------------------------------------------------------ rounds

    def run_round(self) -> dict[str, Any]:
        """Closes round r = the current version (or finishes a committed one); publishes
        version r + 1 and returns the round's stats."""
        store, run, base = self.store, self.run, self.state
        r = base.version
        read0, written0 = store.bytes_read, store.bytes_written
        t0 = now()  # committed before a restart, or by a racing aggregator: replay it
        committed = self._committed(base)
        replayed = committed is not None
        if committed is None:
            verdicts, reason = self._collect(base)
            late = self._late(r)
            t0 = now()
            committed = new, update, decision = self.decide(base, verdicts, late, reason)
            for _ in range(3):  # a failed put: a racing aggregator won, or a planted object
                if store.put_if_absent(protocol.decision_key(run, r), protocol.dumps(decision)):
                    break
                t0 = now()
                if (theirs := self._committed(base)) is not None:
                    committed, replayed = theirs, True
                    break
            else:
                raise ProtocolError(f"{protocol.decision_key(run, r)} keeps being overwritten")
        new, update, decision = committed
        outer_s = now() - t0
        self.recorded(decision)  # before `latest` moves: no reader sees an unrecorded round
        self._publish(r, new, update)
        self._decisions[r] = decision
        self._collect_garbage(new.version)
        self.state, opened = new, self.opened_at
        self.opened_at = self.clock()
        return {
            "round": r,
            "version": new.version,
            "accepted": len(decision["accepted"]),
            "rejected": len(decision["rejected"]),
            "late": len(decision["late"]),
            "closed_by_quorum": int(decision["reason"] == "quorum"),
            "reason": decision["reason"],
            "round_s": decision["closed_at"] - opened,
            "outer_step_s": outer_s,
            "bytes_read": store.bytes_read - read0,
            "bytes_written": store.bytes_written - written0,
            "replayed": int(replayed),
            "decision": decision,
        }

    def authentic(self, decision: dict, base: Version) -> str:
        """Why `decision` is not one this aggregator wrote for round base.version ("" if it
        may be): a hook, contrib also checks its signature."""
        return quarantine.decision_problem(decision, self.run, base)

    def _committed(self, base: Version) -> tuple[Version, bytes | None, dict] | None:
        """(version r + 1, update, decision) replayed from round r's committed decision; None
        if there is none. An object in the slot this aggregator did not write is moved
        aside (`quarantine.py`): the round is then decided (again)."""
        key = protocol.decision_key(self.run, base.version)
        decision = quarantine.read_own(
            self.store, self.run, key, lambda d: self.authentic(d, base), self.log, self.clock()
        )
        if decision is None:
            return None
        try:
            new, update = protocol.replay_decision(
                self.store, self.run, base, decision, self.spec, self.lr, self.momentum, self.like
            )
        except (ProtocolError, PayloadError) as e:
            if self.signs_decisions:  # signed by us: a real inconsistency, not a forgery
                raise
            aside = quarantine.move_aside(self.store, self.run, key, self.clock())
            self.log(
                f"warning: {key} does not replay ({e}); moved it to {aside}, deciding "
                f"round {base.version} again"
            )
            return None
        return new, update, decision

    def check(self, base: Version, key: str) -> Verdict:
        """Reads and validates one contribution to round base.version (a hook: contrib adds
        signatures, registration, replay and attestation checks)."""
        return protocol.check_contribution(self.store, self.run, base, key, self.like)

    def decide(
        self, base: Version, verdicts: list[Verdict], late: list[dict], reason: str
    ) -> tuple[Version, bytes | None, dict]:
        """(version r + 1, update bytes, decision) from the round's verdicts: here the mean
        of every valid contribution (a hook: contrib screens, scores and aggregates
        robustly). Must be a pure function of what it records in the decision."""
        accepted = sorted((v for v in verdicts if v.valid), key=lambda v: v.island)
        new, update = protocol.derive(
            base, [v.payload for v in accepted], self.spec, self.lr, self.momentum, self.like
        )
        decision = protocol.make_decision(
            self.run, base, new, verdicts, late, reason, update, self.clock()
        )
        return new, update, decision

    def recorded(self, decision: dict) -> None:
        """Called once round `decision` is committed, before its version is published, also
        when a restart finishes it (a hook: contrib appends it to the ledger; idempotent)."""

    def _publish(self, r: int, new: Version, update: bytes | None) -> None:
        """Derived objects, then `latest` (a separate method so tests can crash here)."""
        protocol.write_derived(self.store, self.run, r, new, update)
        protocol.advance_latest(self.store, self.run, new, self.clock())

    def _collect(self, base: Version) -> tuple[list[Verdict], str]:
        """Reads and validates contributions until the quorum or the deadline."""
        deadline = self.opened_at + self.round_timeout
        verdicts: dict[str, Verdict] = {}
        while True:
            self.poll_index += 1
            for key in protocol.contrib_keys(self.store, self.run, base.version):
                if key not in verdicts:  # insertion order = arrival order (copy detection)
                    verdicts[key] = self.check(base, key)
            if sum(v.valid for v in verdicts.values()) >= self.quorum:
                return list(verdicts.values()), "quorum"
            left = deadline - self.clock()
            if left <= 0:
                return list(verdicts.values()), "deadline"
            self.sleep(min(self.poll_seconds, left))

    def _decision(self, r: int) -> dict:
        if r not in self._decisions:
            key = protocol.decision_key(self.run, r)
            try:
                decision = protocol.read_json(self.store, key)
            except (ProtocolError, CorruptObject) as e:  # damaged after it was published
                self.log(f"warning: {key} is unreadable ({e}); its pushes may be listed late")
                decision = {"accepted": [], "rejected": [], "late": []}
            if decision is None:
                raise ProtocolError(f"round {r} is closed but has no decision")
            self._decisions[r] = decision
        return self._decisions[r]

    def _late(self, r: int) -> list[dict]:
        """Pushes to the previous LATE_WINDOW rounds that no decision has seen yet."""
        lo = max(0, r - protocol.LATE_WINDOW)
        known = set()
        for earlier in range(lo, r):
            d = self._decision(earlier)
            known |= {e["key"] for e in d["accepted"] + d["rejected"] + d["late"]}
        late = []
        for earlier in range(lo, r):
            for key in protocol.contrib_keys(self.store, self.run, earlier):
                if key not in known:
                    late.append({"island": key.rsplit("/", 1)[-1], "round": earlier, "key": key})
        for old in [k for k in self._decisions if k < lo]:
            del self._decisions[old]
        return late

    def _collect_garbage(self, version: int) -> None:
        """Deletes the full objects of version − keep_versions (updates/decisions stay)."""
        old = version - self.keep_versions
        if self.keep_versions > 0 and old >= 0:
            for part in ("params", "momentum", "server_ef"):
                self.store.delete(protocol.version_key(self.run, old, part))


# ---------------------------------------------------------------------------------- CLI


def define_common_flags() -> None:
    """--config, --store, --run, --workdir, --poll_seconds (shared with the island)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py[:arg]); override fields with --config.KEY=V."
    )
    flags.DEFINE_string(
        "store", None, "Object store: gs://BUCKET/PREFIX, s3://…, file:///… or a path."
    )
    flags.DEFINE_string("run", None, "Run name: the store prefix of this run.")
    flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl and tb/ (optional).")
    flags.DEFINE_float("poll_seconds", 0.5, "Seconds between polls of the store.")


def prepare(argv: list[str]):
    """Shared CLI start: (resolved config, mesh, store, run) or a one-line exit 2."""
    from near_jax import config as config_lib
    from near_jax import sharding
    from near_jax.config import ConfigError
    from near_jax.data.tokenizer import load_tokenizer
    from near_jax.train.step import check_batch, resolve_config

    if len(argv) > 1:
        usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    for name in ("store", "run"):
        if not f[name].value:
            usage_error(f"--{name} is required")
    try:
        run = protocol.check_name("run", f.run)
    except ValueError as e:
        usage_error(str(e))
    if f.poll_seconds <= 0:
        usage_error(f"--poll_seconds={f.poll_seconds} must be positive")
    cfg = load_config_flag(f.config)
    try:
        config_lib.validate(cfg)
        cfg = resolve_config(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size)
        mesh = sharding.make_mesh(cfg.mesh)
        check_batch(cfg, mesh)
    except ConfigError as e:
        usage_error(str(e))
    if f.workdir:  # now, not after the run was created in the store
        try:
            os.makedirs(f.workdir, exist_ok=True)
        except OSError as e:
            usage_error(f"--workdir={f.workdir}: {e.strerror} (it must be a directory)")
    try:
        store = ObjectStore.open(f.store)
        manifest = protocol.read_json(store, protocol.manifest_key(run))
    except (StoreError, ProtocolError) as e:
        usage_error(str(e))
    if manifest is not None:
        problem = manifest_problem(manifest, cfg)
        if problem:
            usage_error(problem)
    return cfg, mesh, store, run, manifest


def manifest_fields(cfg) -> dict:
    """What a run fixes about the model and data (compared against each joiner's config)."""
    data = {k: cfg.data[k] for k in ("seq_len", "tokenizer")}
    return {"model": cfg.model.to_dict(), "data": data}


def manifest_problem(manifest: dict, cfg) -> str | None:
    """One line naming the first model/data field where `cfg` differs from the run, or None."""
    import json

    mine = json.loads(json.dumps(manifest_fields(cfg)))
    for section, fields in mine.items():
        theirs = manifest.get(section, {})
        for key in sorted(set(fields) | set(theirs)):
            if fields.get(key) != theirs.get(key):
                return (
                    f"config.{section}.{key}={fields.get(key)!r} is not allowed: run "
                    f"{manifest.get('run')!r} uses {theirs.get(key)!r}"
                )
    return None


def fixed_eval(
    trainer, num_batches: int, val_seed: int | None = None, source: str = ""
) -> Callable[[Any], float] | None:
    """Mean validation loss of host params on `num_batches` fixed val batches (None if 0);
    `val_seed` draws other val batches, and with `source` (a data source only this
    machine has) batches of that source drawn from `val_seed` (contribution scoring)."""
    if num_batches <= 0:
        return None
    import jax

    from near_jax import data

    cfg = trainer.cfg
    if source:  # private: its whole train split is held out from every contributor
        data_cfg = cfg.data.copy_and_resolve_references()
        data_cfg.source = source
        it = data.make_iterator(
            data_cfg, split="train", seed=val_seed or 0,
            global_batch_size=cfg.train.global_batch_size,
        )  # fmt: skip
    else:
        it = data.make_iterator(
            cfg.data, split="val", seed=cfg.seed, global_batch_size=cfg.train.global_batch_size,
            val_seed=val_seed,
        )  # fmt: skip
    batches = [data.to_global_batch(next(it), trainer.batch_sharding) for _ in range(num_batches)]
    shardings = trainer.state_shardings.params
    dtypes = jax.tree.map(lambda a: a.dtype, trainer.abstract_state.params)

    def evaluate(params: Any) -> float:
        params = jax.tree.map(lambda x, d: x.astype(d), params, dtypes)
        params = jax.device_put(params, shardings)
        total = weight = 0.0
        for batch in batches:
            s, w = jax.device_get(trainer.eval_step(params, batch))
            total, weight = total + float(s), weight + float(w)
        return total / max(weight, 1.0)

    return evaluate


def _log(message: str) -> None:
    print(f"aggregator: {message}", file=sys.stderr, flush=True)


def _main(argv: list[str]) -> None:
    quiet_library_logs()
    f = flags.FLAGS
    if f.rounds is None or f.rounds < 1:
        usage_error("--rounds must be a positive integer")
    if f.quorum < 1:
        usage_error(f"--quorum={f.quorum} must be a positive integer")
    if f.round_timeout <= 0:
        usage_error(f"--round_timeout={f.round_timeout} must be positive (seconds)")
    if f.keep_versions < 0:
        usage_error(f"--keep_versions={f.keep_versions} must be 0 (all) or positive")
    cfg, mesh, store, run, manifest = prepare(argv)
    try:
        code = aggregate(cfg, mesh, store, run, manifest)
    except (ProtocolError, StoreError) as e:
        print(f"near_jax.diloco.aggregator: error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


def aggregate(cfg, mesh, store: ObjectStore, run: str, manifest: dict | None) -> int:
    """The aggregator loop; returns the exit code."""
    import jax

    from near_jax.train import metrics
    from near_jax.train.loop import trainer_for as make_trainer

    f = flags.FLAGS
    if protocol.read_json(store, protocol.finished_key(run)) is not None:
        _log(f"run {run!r} is already finished")
        return 0
    dl = manifest if manifest is not None else cfg.diloco.to_dict()
    dl = {"compression": dl["compression"], "outer_lr": dl["outer_lr"],
          "outer_momentum": dl["outer_momentum"]}  # fmt: skip
    trainer = make_trainer(cfg, mesh)
    like = trainer.abstract_state.params
    kwargs = dict(spec=dl["compression"], lr=dl["outer_lr"], momentum=dl["outer_momentum"],
                  quorum=f.quorum, round_timeout=f.round_timeout, poll_seconds=f.poll_seconds,
                  keep_versions=f.keep_versions)  # fmt: skip
    contributors = "contrib" in manifest if manifest is not None else cfg.contrib.enabled
    if contributors:
        from near_jax.contrib import validator

        ledger_path = f.ledger or os.path.join(
            f.workdir or tempfile.mkdtemp(prefix="near_jax-ledger-"), "ledger.sqlite"
        )
        if f.allow_code:
            hashes = [h.strip() for h in f.allow_code.split(",") if h.strip()]
            if not all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes):
                usage_error(f"--allow_code={f.allow_code}: comma-separated sha256 hex hashes "
                            "(python -m near_jax.contrib codehash)")  # fmt: skip
        if f.score_source and f.score_source == cfg.data.source:
            usage_error(f"--score_source={f.score_source} is the run's training source: "
                        "score on data the contributors do not have")  # fmt: skip
        try:
            agg = validator.build(cfg, trainer, store, run, manifest, key_path=f.key,
                                  ledger_path=ledger_path, score_source=f.score_source,
                                  log=_log, **kwargs)  # fmt: skip
        except ValueError as e:
            usage_error(str(e))
        _log(f"contributor run: ledger {ledger_path}, mirrored to {run}/ledger.sqlite in "
             f"the store; rule {agg.policy.rule}; scoring on "
             f"{f.score_source or 'the public val split (see --score_source)'}")  # fmt: skip
        if f.quorum < 3:
            _log(f"warning: --quorum={f.quorum} lets the first {f.quorum} contribution(s) "
                 "close a round; untrusted runs want a quorum of several contributors")  # fmt: skip
    else:
        if f.key or f.ledger or f.score_source or f.allow_code:
            _log(f"warning: the contributor flags (--key, --ledger, --score_source, "
                 f"--allow_code) are ignored: run {run!r} does not take contributors "
                 "(config.contrib.enabled is fixed at its creation)")  # fmt: skip
        try:
            agg = Aggregator(store, run, like, log=_log, **kwargs)
        except ValueError as e:
            usage_error(str(e))
    created = False
    if manifest is None:
        params0 = jax.device_get(trainer.init(jax.random.key(cfg.seed)).params)
        info = {**manifest_fields(cfg), "seed": cfg.seed, "rounds": f.rounds,
                "inner_steps": cfg.diloco.inner_steps, "quorum": f.quorum,
                "round_timeout": f.round_timeout,
                "num_params": protocol.num_elements(like)}  # fmt: skip
        if contributors:
            info.update(agg.manifest_fields())
        try:
            created = agg.create(params0, info)
        except ValueError as e:
            usage_error(str(e))
    state = agg.load()
    if contributors and f.allow_code:
        allowed = agg.allow_code([h.strip() for h in f.allow_code.split(",") if h.strip()])
        _log(f"code hashes allowed besides the manifest's: {', '.join(h[:12] for h in allowed)}")
    batches = cfg.train.eval_batches if f.eval_batches < 0 else f.eval_batches
    evaluate = fixed_eval(trainer, batches)
    writer = metrics.MetricsWriter(f.workdir) if f.workdir else None
    _log(
        f"run {run!r} {'created' if created else 'resumed'} at version {state.version} in "
        f"{store.url} | {protocol.num_elements(like) / 1e6:.2f}M params | spec {agg.spec} | "
        f"quorum {agg.quorum} | timeout {agg.round_timeout:g}s"
    )
    try:
        if created and evaluate and writer:
            writer.write(0, {"version": 0, "eval_loss": evaluate(state.params)}, "aggregator")
        while agg.state.version < f.rounds:
            stats = agg.run_round()
            decision = stats.pop("decision")
            if evaluate:
                stats["eval_loss"] = evaluate(agg.state.params)
            reason = stats.pop("reason")
            if "contrib" in decision:
                stats.update(contrib_stats(decision))
            if writer:
                writer.write(stats["round"], stats, "aggregator")
            late = ", ".join(f"{e['island']}@{e['round']}" for e in decision["late"])
            rejected = "; ".join(f"{e['island']}: {e['reason']}" for e in decision["rejected"])
            _log(
                f"round {stats['round']} -> version {stats['version']} ({reason}"
                f"{', replayed' if stats['replayed'] else ''}) | accepted "
                f"{','.join(e['island'] for e in decision['accepted']) or '-'} | late "
                f"{late or '-'} | rejected {rejected or '-'} | outer {stats['outer_step_s']:.3f}s"
                f" | read {stats['bytes_read']} B written {stats['bytes_written']} B"
                + (f" | eval loss {stats['eval_loss']:.4f}" if evaluate else "")
                + (f" | best score {stats['best_score']:.4g}" if "best_score" in stats else "")
            )
        agg.finish()
        _log(f"run {run!r} finished at version {agg.state.version}")
    finally:
        if writer:
            writer.close()
        if contributors:
            agg.close()
    return 0


def contrib_stats(decision: dict) -> dict:
    """Per-round metrics of a contributor run: base loss, best and mean accepted score."""
    scores = [e["score"] for e in decision["contrib"]["entries"] if e["accepted"]]
    out = {"contributions": len(decision["contrib"]["entries"])}
    if decision["contrib"]["base_loss"] is not None:
        out["score_base_loss"] = decision["contrib"]["base_loss"]
    if scores:
        out["best_score"], out["mean_score"] = max(scores), sum(scores) / len(scores)
    return out


def define_flags() -> None:
    define_common_flags()
    flags.DEFINE_string(
        "key", None, "Contributor runs: the aggregator's ed25519 key (python -m near_jax."
        "contrib keygen); its signatures seed each round's scoring batches."
    )  # fmt: skip
    flags.DEFINE_string(
        "ledger", None, "Contributor runs: the local ledger file (default WORKDIR/ledger."
        "sqlite, else a temp dir); the store keeps the mirror."
    )  # fmt: skip
    flags.DEFINE_string(
        "allow_code", "", "Contributor runs: also accept contributions from these code hashes "
        "from now on (comma-separated; a new release mid-run), in a list this key signs."
    )  # fmt: skip
    flags.DEFINE_string(
        "score_source", "", "Contributor runs: score on this data source (a path/glob only "
        "the aggregator has) instead of the run's public val split, which contributors "
        "could train on."
    )  # fmt: skip
    flags.DEFINE_integer("rounds", None, "Close this many rounds, then mark the run finished.")
    flags.DEFINE_integer("quorum", 1, "Close a round once this many valid contributions arrived.")
    flags.DEFINE_float("round_timeout", 600.0, "Close a round this many seconds after it opened.")
    flags.DEFINE_integer(
        "eval_batches", -1, "Validation batches per version (-1: train.eval_batches; 0: off)."
    )
    flags.DEFINE_integer(
        "keep_versions", 0, "Keep full params of the last K versions only (0: keep all)."
    )


def main() -> None:
    """Console entry point."""
    cli.run(_main, define_flags)


if __name__ == "__main__":
    main()
