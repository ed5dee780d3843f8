"""An island's loop: join the run, then each round train H steps, push Δ, follow the run.

    train_island(cfg, mesh, store, run, "eu-1", manifest, rounds=0, poll_seconds=0.5)

Arguments are plain values; the program (`python -m near_jax.diloco.island`) reads them
from its flags. In a contributor run (a manifest with a `contrib` section) every push is
signed: the program passes `make_signer(manifest) -> sign(tag, payload bytes) -> fields`
and `slot_problem(store, key, signer, expect) -> str` (contrib's contributor module); when
its policy assigns data, `assigned_key` (the contributor's public key, on every host) picks
each round's train batches (`near_jax.diloco.assignment`). The
loop raises `UsageError` for a run it cannot join, ProtocolError / StoreError when the store
cannot go on, FloatingPointError for a diverged inner loss.

A run with F fragments has a round every H/F inner steps (`round_steps`): the island pushes
and restarts only that round's fragment, the rest trains on. With `overlap=τ` the round's
exchange (`exchange.Exchange.round`: push, wait, decision, pull) runs in a background thread
while τ more inner steps train; the island then restarts the changed shards from the new
version plus the progress made since the push (`restart_params`), so it idles only if the
exchange takes longer than τ steps. Each round logs train_s (inner steps), idle_s (waiting
for the exchange with nothing to train), wall_s (the rest is host work: Δ, the restart) and
utilization = train_s / wall_s.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from near_jax import data
from near_jax.diloco import assignment, claims, protocol
from near_jax.diloco.island.exchange import Exchange
from near_jax.diloco.island.follow import Waiter, catch_up, kb, log, newer, now
from near_jax.diloco.island.hosts import Hosts
from near_jax.diloco.protocol import ProtocolError
from near_jax.diloco.startup import UsageError, manifest_problem
from near_jax.diloco.store import ObjectStore
from near_jax.train import metrics
from near_jax.train.loop import trainer_for


def island_seed(seed: int, island: str, version: int) -> int:
    """The data seed of `island` joining at `version`: 31 bits of blake2b of all three."""
    digest = hashlib.blake2b(repr((int(seed), island, int(version))).encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


Signer = Callable[[dict, bytes], dict]


def train_island(
    cfg,
    mesh,
    store: ObjectStore,
    run: str,
    island: str,
    manifest: dict | None,
    *,
    claim: claims.Claim | None = None,
    rounds: int = 0,
    poll_seconds: float = 0.5,
    wait_timeout: float = 0.0,
    wait_for_run: float = 0.0,
    workdir: str | None = None,
    make_signer: Callable[[dict], Signer] | None = None,
    slot_problem: Callable[[ObjectStore, str, Signer, dict], str] | None = None,
    overlap: int | None = None,
    assigned_key: str | None = None,
) -> None:
    """Joins the run and trains rounds until `rounds` (0: no limit) or the run's end.

    `manifest` None: waits up to `wait_for_run` seconds for the run to be created. Polls
    every `poll_seconds`; waits at most `wait_timeout` seconds for a version (0: forever).
    `overlap` τ (0..H, one-process islands): after each push, train τ more inner steps while
    the push, the aggregation and the pull happen, then restart from the new version plus
    those τ steps' progress (a one-step-delayed outer step when τ = H); None: synchronous.
    `assigned_key`: the contributor's public key hex, required when the run assigns data.
    """
    waiter = Waiter(poll_seconds, wait_timeout)
    trainer = trainer_for(cfg, mesh)
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
        manifest = _wait_for_run(cfg, store, run, island, wait_for_run, poll_seconds)
    spec, lr, mu = manifest["compression"], manifest["outer_lr"], manifest["outer_momentum"]
    inner_steps, fragments = int(manifest["inner_steps"]), manifest.get("fragments", 1)
    shortest = inner_steps // fragments  # the inner steps of the shortest round
    if overlap is not None and not 0 <= overlap <= shortest:
        raise UsageError(
            f"--overlap={overlap} is not allowed: an integer in [0, H/F={shortest}] "
            f"(inner steps trained while a round is exchanged; H={inner_steps}, "
            f"F={fragments} fragments)"
        )
    plan = protocol.run_plan(manifest, abstract)
    protocol.run_fragment(plan, fragments, 0)  # ProtocolError if the record is unusable
    hosts = Hosts(plan, trainer.state_shardings.params)
    if overlap is not None and hosts.count > 1:
        # The exchange thread's broadcasts would race the train step's collectives.
        raise UsageError(
            f"--overlap is not allowed on a {hosts.count}-process island: one process only"
        )
    lead = hosts.index == 0  # reads what decides the island's path, writes the manifest
    signer = None
    if "contrib" in manifest and lead:  # a run of untrusted contributors: sign every push
        if make_signer is None:
            raise UsageError(f"run {run!r} takes signed contributions only")
        signer = make_signer(manifest)
    if assignment.assigned(manifest) and not assigned_key:
        raise UsageError(f"run {run!r} assigns data by contributor key: no key given (--key)")
    assigned_key = assigned_key if assignment.assigned(manifest) else None  # None: not assigned
    cache_dir = os.path.join(workdir, "pull_cache", f"host{hosts.index}") if workdir else None
    cache = protocol.PullCache(cache_dir)
    latest = waiter.until("the run's first version", lambda: newer(store, run, -1, island))
    target = hosts.agree(latest["version"])
    held, _ = catch_up(
        store, run, island, None, target, plan, lr, mu, shards=hosts.held, cache=cache
    )
    seed = island_seed(cfg.seed, island, held.version)
    batch_size = cfg.train.global_batch_size
    train_iter, stream_round = None, -1  # assigned data: each round's own stream
    if not assigned_key:
        train_iter = data.make_iterator(
            cfg.data, split="train", seed=seed, global_batch_size=batch_size
        )
    seeding = (
        "assigned per round (seed of round r from the key)" if assigned_key else f"seed {seed}"
    )
    where = f" | host {hosts.index}/{hosts.count}: {len(hosts.owned)} of {plan.num_shards} shards"
    log(
        island,
        f"joined run {run!r} at version {held.version} ({kb(store.bytes_read)} "
        f"pulled) | H={inner_steps} | spec {spec} | data: {seeding}"
        + (where if hosts.count > 1 else ""),
    )

    shardings, dtypes = trainer.state_shardings.params, jax.tree.map(lambda a: a.dtype, abstract)
    # Host 0's metrics are the island's; the others' (what each pushed and pulled) go below.
    where_metrics = workdir if lead or not workdir else os.path.join(workdir, f"host{hosts.index}")
    writer = metrics.MetricsWriter(where_metrics) if workdir else None
    decay = float(manifest.get("feedback_decay", 1.0))  # SparseLoCo's β; 1 = nothing dropped
    comm = Exchange(
        store, run, island, plan, hosts, waiter, (lr, mu), cache, (signer, slot_problem)
    )
    state = state._replace(params=hosts.device_params(held.params, shardings, dtypes))
    error_feedback: protocol.Shards = {}
    done, carried, late_losses = 0, False, []
    pulled_mark, full_pending = 0, True  # the join pull counts toward the first round
    end = hosts.agree(comm.finished_version() if lead else -1)
    try:
        while True:
            if end >= 0 and held.version >= end:
                log(island, f"run {run!r} is finished at version {end}")
                return
            r, round_start = held.version, now()
            fragment = protocol.run_fragment(plan, fragments, r)
            # 1. inner steps: H (H/F a round with F fragments) from θ_r, less τ after an
            # overlapped round (the τ steps trained while it was exchanged count here);
            # assigned data: round r's batches from index 0 (an overlapped round r − 1
            # already read the first τ of them: they belong to round r's Δ).
            steps = round_steps(inner_steps, fragments, r) - (overlap if carried else 0)
            if assigned_key and stream_round != r:
                train_iter = _assigned_stream(cfg, run, r, assigned_key, batch_size)
                stream_round = r
            t_train = now()
            state, losses = _train(trainer, state, train_iter, steps)
            train_s = now() - t_train  # inner steps only: host work (Δ, restart) is neither
            losses = late_losses + losses
            if claim is not None and claim.lost:
                raise ProtocolError(
                    f"island {claim.lost} took over the name {island!r}; "
                    "stopping so that only one island pushes under it"
                )
            # 2. this host's shards of Δ = θ_r − θ_island, pushed unless the round closed;
            # then wait for version r + 1 and follow: in the background while τ more inner
            # steps train (--overlap=τ), else in the foreground.
            hosts.gather_leaves(state.params)
            local = hosts.pieces(state.params, hosts.owned)
            delta = {
                s: [g - x for g, x in zip(held.params[s], local[s], strict=True)]
                for s in hosts.owned
                if s in fragment
            }
            feedback = {  # what compression owes from earlier rounds, decayed by β
                s: [e * np.float32(decay) for e in error_feedback[s]]
                if decay != 1
                else error_feedback[s]
                for s in delta
                if s in error_feedback
            }
            extra = {"inner_loss": _mean_loss(losses, r), "inner_steps": inner_steps}
            exchange = functools.partial(
                comm.round, held, delta, spec, feedback or None, extra, fragment
            )
            if overlap is None:
                t_exchange = now()
                result = exchange()
                idle_s, late_losses = now() - t_exchange, []  # nothing carried
            else:
                join = _in_background(exchange)
                if assigned_key:  # the τ steps count toward round r + 1: its batches
                    train_iter = _assigned_stream(cfg, run, r + 1, assigned_key, batch_size)
                    stream_round = r + 1
                t_more = now()
                state, late_losses = _train(trainer, state, train_iter, overlap)
                t_join = now()
                result = join()
                idle_s, train_s = now() - t_join, train_s + (t_join - t_more)
            if result.end_now:
                log(island, f"run {run!r} finished at version {r}; round {r} was not applied")
                return
            if result.accepted_own:  # else Δ was not applied: the old residual is still owed
                error_feedback.update(result.error_feedback)
            # 3. restart the shards the new version changed from it; with overlap, keep the
            # τ steps trained since the push: θ_{r+1} − (θ_push − θ_now), θ_{r+1} if τ = 0.
            held = result.held
            if fragments == 1 and overlap is None:
                params = held.params  # every shard changed; nothing trained since the push
            else:
                changed = set(range(plan.num_shards)) if result.full else set()
                for earlier in range(r, min(held.version, r + fragments)):
                    changed.update(protocol.run_fragment(plan, fragments, earlier))
                hosts.gather_leaves(state.params)
                current = hosts.pieces(state.params, hosts.held)
                pushed = None if overlap is None else local
                params = restart_params(held.params, pushed, current, changed)
                carried = overlap is not None
            state = state._replace(params=hosts.device_params(params, shardings, dtypes))
            end = result.end
            pulled = store.bytes_read - pulled_mark
            pulled_mark = store.bytes_read
            full, full_pending = result.full or full_pending, False
            wall_s = now() - round_start
            stats = {
                "round": r,
                "version": held.version,
                "inner_loss": extra["inner_loss"],
                "bytes_pushed": result.pushed_bytes,
                "bytes_pulled": pulled,
                "full_pull": int(full),
                "wait_s": result.wait_s,
                "train_s": train_s,
                "idle_s": idle_s,
                "wall_s": wall_s,
                "utilization": train_s / wall_s if wall_s > 0 else 1.0,
                "accepted": int(result.accepted),
                "late": int(result.late),
            }
            stats.update(result.scored)
            if writer:
                writer.write(r, stats, "island")
            log(
                island,
                f"round {r} | loss {extra['inner_loss']:.4f} | pushed "
                f"{kb(result.pushed_bytes)} | pulled {kb(pulled)}{' (full)' if full else ''} | "
                f"train {train_s:.2f}s | idle {idle_s:.2f}s ({stats['utilization']:.0%} busy) | "
                f"{result.outcome}{'; ' + result.note if result.note else ''} -> "
                f"version {held.version}",
            )
            done += 1
            if rounds and done >= rounds:
                log(island, f"done: {done} rounds")
                return
    finally:
        if writer:
            writer.close()


def _assigned_stream(cfg, run: str, r: int, key: str, batch_size: int):
    """Round r's assigned train batches (`diloco.assignment`), from index 0."""
    return assignment.stream(cfg.data, assignment.assigned_seed(run, r, key), batch_size)


def round_steps(inner_steps: int, fragments: int, r: int) -> int:
    """Inner steps of round r: H, or with F fragments the r mod F-th of F near-equal parts
    of H (fragment f's sync falls f·H // F steps into each H; they add up to H)."""
    f = r % fragments
    return (f + 1) * inner_steps // fragments - f * inner_steps // fragments


def restart_params(
    held: protocol.Shards,
    pushed: protocol.Shards | None,
    current: protocol.Shards,
    changed: set[int],
) -> protocol.Shards:
    """The params an island trains on after a round, per shard of `current` (its params
    now): unchanged shards go on as they are; changed ones restart from the new version
    `held`, plus, with overlap (`pushed`: the params at the push), the progress made since
    the push: θ_new − (θ_push − θ_now) in float32, which is θ_new bit for bit when nothing
    was trained (θ_push − θ_now = +0)."""
    out = {}
    for s, now_pieces in current.items():
        if s not in changed:
            out[s] = now_pieces
        elif pushed is None or s not in pushed:
            out[s] = held[s]
        else:
            out[s] = [g - (p - x) for g, p, x in zip(held[s], pushed[s], now_pieces, strict=True)]
    return out


def _train(trainer, state, train_iter, steps: int) -> tuple[Any, list]:
    """`steps` inner steps; (state, the per-step loss arrays, not yet fetched)."""
    losses = []
    for _ in range(steps):
        batch = data.to_global_batch(next(train_iter), trainer.batch_sharding)
        state, stats = trainer.step(state, batch)
        losses.append(stats["loss"])
    jax.block_until_ready(state.params)
    return state, losses


def _mean_loss(losses: list, r: int) -> float:
    """The mean inner loss of a round; FloatingPointError if it diverged."""
    loss = float(np.mean([np.asarray(x.addressable_data(0)) for x in losses])) if losses else 0.0
    if not math.isfinite(loss):
        raise FloatingPointError(f"inner loss is {loss} in round {r}")
    return loss


def _in_background(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Starts fn() in a daemon thread; returns join() -> its result (or raises its error).
    Daemon: a crash of the main loop does not wait for a round that may never close (store
    writes are atomic, so a write cut short leaves nothing behind)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread by join()
            box["error"] = e

    thread = threading.Thread(target=target, name="island-exchange", daemon=True)
    thread.start()

    def join() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


def _wait_for_run(
    cfg, store: ObjectStore, run: str, island: str, wait_for_run: float, poll_seconds: float
) -> dict:
    """The run's manifest once it is created, within `wait_for_run` seconds; UsageError if
    it is not, or if the run's model and data settings are not the config's."""
    log(island, f"waiting up to {wait_for_run:g}s for run {run!r} to be created")
    deadline = now() + wait_for_run
    manifest = None
    while manifest is None and now() < deadline:
        time.sleep(poll_seconds)
        manifest = protocol.read_json(store, protocol.manifest_key(run))
    if manifest is None:
        raise UsageError(f"unknown run {run!r} in {store.url}: no {protocol.manifest_key(run)}")
    problem = manifest_problem(manifest, cfg)
    if problem:
        raise UsageError(problem)
    return manifest
