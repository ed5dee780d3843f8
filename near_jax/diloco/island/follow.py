"""How an island follows the run: waiting for versions, reading what others may have damaged,
catching up by updates or by a full pull, and its log lines."""

from __future__ import annotations

import sys
import time

from near_jax.diloco import protocol, quarantine
from near_jax.diloco.protocol import ProtocolError, Version
from near_jax.diloco.store import CorruptObject, ObjectStore

now = time.perf_counter


def log(island: str, message: str) -> None:
    print(f"island {island}: {message}", file=sys.stderr, flush=True)


def kb(n: int) -> str:
    return f"{n / 1e3:.1f} kB"


class Waiter:
    """Polls the store until a condition holds, within `timeout` seconds (0: forever)."""

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


def newer(store: ObjectStore, run: str, version: int, island: str) -> dict | None:
    """`latest` once it is past `version` or the run is finished, else None (also while
    `latest` is damaged: the aggregator moves such an object aside and rewrites it)."""
    latest = tolerant(island, lambda: protocol.read_latest(store, run))
    problem = quarantine.latest_problem(latest) if latest is not None else ""
    if problem:
        warn_once(island, f"{protocol.latest_key(run)}: {problem}")
        latest = None
    if latest and latest["version"] > version:
        return latest
    if not tolerant(island, lambda: store.exists(protocol.finished_key(run))):
        return None
    # `finished` is written after `latest` reaches the final version: read `latest` again, or
    # one read just before the last round was published would look like the final version.
    again = tolerant(island, lambda: protocol.read_latest(store, run))
    return again if again is not None and not quarantine.latest_problem(again) else latest


_warned: set[str] = set()


def warn_once(island: str, problem: str) -> None:
    if problem not in _warned:
        _warned.add(problem)
        log(island, f"warning: {problem}; treating it as not there yet")


def tolerant(island: str, read):
    """read(), or None when what it reads is damaged or not the aggregator's (planted by
    someone else): the island warns once and goes on as if it were not there yet, instead
    of stopping (the aggregator quarantines such objects, see `quarantine.py`)."""
    try:
        return read()
    except (ProtocolError, CorruptObject) as e:
        warn_once(island, str(e))
        return None


def catch_up(
    store: ObjectStore,
    run: str,
    island: str,
    held: Version | None,
    target: int,
    plan: protocol.ShardPlan,
    lr: float,
    mu: float,
    shards: list[int] | None = None,
    cache: protocol.PullCache | None = None,
) -> tuple[Version, bool]:
    """Version `target` (or newer) of the shards this host holds (`shards`; all by
    default): by applying updates if at most MAX_CHAIN behind, else (or on a mismatch) by
    a full pull, which resumes from `cache` if an earlier one stopped. Returns (version,
    whether it pulled in full)."""
    if held is not None and target - held.version <= protocol.MAX_CHAIN:
        try:
            while held.version < target:
                held = protocol.apply_update(store, run, plan, held, lr, mu)
            return held, False
        except (ProtocolError, CorruptObject) as e:
            log(island, f"cannot follow by updates ({e}); pulling the full version")
    for attempt in range(3):
        try:
            return protocol.pull_version(store, run, target, plan, shards, cache), True
        except (ProtocolError, CorruptObject):  # collected by --keep_versions meanwhile?
            if attempt == 2:
                raise
            target = (tolerant(island, lambda: protocol.read_latest(store, run)) or {}).get(
                "version", target
            )
    raise AssertionError("unreachable")
