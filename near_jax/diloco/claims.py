"""An island's claim on its name in a run: one live island per name.

Two islands started with the same `--island` would push to the same slot each round; one
push would be dropped. So an island first claims its name: `RUN/claims/ISLAND` holds
{"holder": host:pid:nonce, "renewed_at": unix seconds, "lease_s"}, written by
compare-and-swap. A claim renewed less than a lease ago by another holder refuses the start
(`NameTaken`, one line naming the holder); a claim whose holder stopped renewing (killed),
or whose holder is a dead process on this host, is taken over, so a killed island can be
restarted. The holder renews it from a background thread every lease/3 and notices when
someone else took it over (`lost`). Renewal times are compared across machines: clocks
must agree to well within a lease (default 60 s).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from near_jax.diloco.store import CorruptObject, ObjectStore

LEASE_SECONDS = 60.0
MAX_CLAIM_BYTES = 1 << 12


class NameTaken(RuntimeError):
    """Another live island holds the name (one line)."""


def claim_key(run: str, island: str) -> str:
    """The store key of `island`'s claim in `run`."""
    return f"{run}/claims/{island}"


def _renewed_at(claim: dict) -> float:
    """When a stored claim was renewed; 0 (long stale) if it says nothing usable."""
    try:
        renewed = float(claim.get("renewed_at", 0))
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return renewed if math.isfinite(renewed) else 0.0


def new_holder() -> str:
    """This process's holder id: host:pid:random nonce (a restart is a new holder)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _dead_here(holder: str) -> bool:
    """Whether `holder` names a process of this host that no longer runs."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: alive
        return False
    return False


class Claim:
    """This island's claim on `island` in `run` (see the module docstring)."""

    def __init__(
        self,
        store: ObjectStore,
        run: str,
        island: str,
        *,
        lease: float = LEASE_SECONDS,
        clock: Callable[[], float] = time.time,
        holder: str | None = None,
    ):
        self.store, self.key, self.island = store, claim_key(run, island), island
        self.lease, self.clock = lease, clock
        self.holder = holder or new_holder()
        self.lost = ""  # the holder that took the name over from us, once it happened
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[dict | None, bytes | None]:
        """(the stored claim or None, generation); an unreadable claim counts as none (and
        has generation None: it is replaced without a condition)."""
        try:
            body, generation = self.store.get_with_generation(self.key, MAX_CLAIM_BYTES)
        except CorruptObject:
            return None, None
        try:
            claim = json.loads(body) if body is not None else None
        except ValueError:
            claim = None
        return (claim if isinstance(claim, dict) else None), generation

    def _body(self) -> bytes:
        return json.dumps(
            {"holder": self.holder, "renewed_at": self.clock(), "lease_s": self.lease}
        ).encode()

    def acquire(self) -> None:
        """Claims the name; NameTaken if another holder's claim is live."""
        claim, generation = self._read()
        if claim is not None and claim.get("holder") != self.holder:
            age = self.clock() - _renewed_at(claim)
            holder = str(claim.get("holder"))[:120]
            if age < self.lease and not _dead_here(holder):
                raise NameTaken(
                    f"island name {self.island!r} is held by {holder} (renewed {age:.0f}s "
                    f"ago): another island runs under this name; choose another --island, "
                    f"or wait {self.lease - age:.0f}s if that island was killed"
                )
        if generation is None:  # unreadable: replace it unconditionally
            self.store.put(self.key, self._body())
        elif not self.store.put_if_generation(self.key, self._body(), generation):
            raise NameTaken(f"island name {self.island!r} was claimed by another island just now")

    def renew(self) -> bool:
        """Renews the claim; False (and `lost` set) once another holder has it."""
        claim, generation = self._read()
        if claim is not None and claim.get("holder") != self.holder:
            self.lost = str(claim.get("holder"))[:120]
            return False
        if generation is None:
            self.store.put(self.key, self._body())
            return True
        return self.store.put_if_generation(self.key, self._body(), generation) or self.renew()

    def start(self) -> None:
        """Renews every lease/3 in a daemon thread until `release`."""

        def beat() -> None:
            while not self._stop.wait(self.lease / 3):
                try:
                    if not self.renew():
                        return
                except Exception:  # noqa: BLE001 - a store hiccup: try again next beat
                    continue

        self._thread = threading.Thread(target=beat, name=f"claim-{self.island}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops renewing and removes the claim if it is still ours."""
        self._stop.set()
        claim, generation = self._read()
        if claim is not None and claim.get("holder") == self.holder:
            self.store.delete(self.key, if_equal=generation)
