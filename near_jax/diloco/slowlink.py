"""A slow link in front of an object store: bandwidth and latency, for benchmarks.

    store = SlowLink(ObjectStore.open(url), bandwidth_bps=100e6, latency_s=0.05)
    bandwidth_bps, latency_s = parse_link("100Mbit,50ms")   # the programs' --link flag

`SlowLink` has the public interface of `ObjectStore` and delegates every call to it; it
only makes callers wait, so a benchmark on a local (file://) store can show how much of an
island's time goes to the network, with and without overlapping transfers and compute.
Results, errors (None for a missing key, CorruptObject, StoreError, ...) and the byte
counters are the inner store's, unchanged.

The model: one request per store call (a real store's `get` makes two or three ranged
reads; the link charges one latency), moving the framed bytes the inner store's counters
count for it (`frame` size of the body; 0 for exists, list, delete and failed reads).

  * latency: each request waits `latency_s` (propagation plus request overhead); the
    latencies of concurrent requests overlap, as on a real link.
  * bandwidth: a serialized FIFO link shared by every thread of the process (and every
    SlowLink given the same `Link`): one lock-protected "busy until" time. A request's
    bytes go on the wire once its latency has passed and the link is free, and occupy it
    for bytes * 8 / bandwidth_bps seconds, so concurrent transfers queue: two 1 MB reads
    started together on 8 Mbit/s with 50 ms latency finish at 1.05 s and 2.05 s. Not a
    token bucket: an idle link saves up no burst.

Writes wait before the inner write (the object appears only once it has been "uploaded");
reads wait after the inner read (the body arrives when it has been "downloaded"). The time
the inner store itself takes counts towards the wait, not on top of it. `clock` and `sleep`
are injectable (tests pass a fake clock).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable

from near_jax.diloco.store import HEADER, MAX_OBJECT_BYTES, ObjectStore

_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_RATE_UNITS = {p + u: v for p, v in _SI.items() for u in ("bit", "bit/s", "bps")}
_TIME_UNITS = {"ms": 1e-3, "s": 1.0}
_PART = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z/]*)\s*", re.I)
FORM = (
    "expected RATE[,LATENCY] such as 100Mbit,50ms (RATE in bit, kbit, Mbit or Gbit per "
    "second, 0 = unlimited; LATENCY in ms or s)"
)


def parse_link(text: str) -> tuple[float, float]:
    """(bandwidth_bps, latency_s) of a link spec "RATE[,LATENCY]": "100Mbit,50ms", "1Gbit",
    "0,10ms" (unlimited bandwidth, 10 ms per request), "2.5Mbit,0.1s"; ValueError (one line
    naming the defect and the allowed form) for anything else."""
    parts = str(text).split(",")
    if not str(text).strip() or len(parts) > 2:
        raise ValueError(f"bad link {text!r}: {FORM}")
    bandwidth = _quantity(text, parts[0], _RATE_UNITS, "rate")
    latency = _quantity(text, parts[1], _TIME_UNITS, "latency") if len(parts) == 2 else 0.0
    return bandwidth, latency


def _quantity(text: str, part: str, units: dict[str, float], what: str) -> float:
    """A non-negative number with one of `units` (case-insensitive; a bare 0 needs none)."""
    m = _PART.fullmatch(part)
    if not m:
        raise ValueError(f"bad link {text!r}: {what} {part.strip()!r} is not a number+unit; {FORM}")
    number, unit = float(m[1]), m[2].lower()
    if not unit and number == 0:
        return 0.0
    if unit not in units:
        got = f"unknown unit {m[2]!r}" if unit else "no unit"
        raise ValueError(f"bad link {text!r}: {what} {part.strip()!r} has {got}; {FORM}")
    value = number * units[unit]
    if not math.isfinite(value):
        raise ValueError(f"bad link {text!r}: {what} {part.strip()!r} is not finite; {FORM}")
    return value


class Link:
    """The shared wire: bandwidth, latency and the time it is busy until (thread-safe)."""

    def __init__(
        self,
        bandwidth_bps: float = 0,
        latency_s: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        for name, value in (("bandwidth_bps", bandwidth_bps), ("latency_s", latency_s)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} must be a finite number >= 0")
        self.bandwidth_bps, self.latency_s = float(bandwidth_bps), float(latency_s)
        self.clock, self.sleep = clock, sleep
        self.waited_s = 0.0  # total seconds callers were made to wait
        self._busy_until = -math.inf
        self._lock = threading.Lock()

    def finish(self, start: float, nbytes: int) -> None:
        """Waits until a request started at `start` (this clock) that moves `nbytes` is done:
        its latency, then its turn on the wire and its transfer time."""
        with self._lock:
            done = start + self.latency_s
            if self.bandwidth_bps > 0 and nbytes > 0:
                done = max(done, self._busy_until) + nbytes * 8 / self.bandwidth_bps
                self._busy_until = done
            wait = done - self.clock()
            if wait > 0:
                self.waited_s += wait
        if wait > 0:
            self.sleep(wait)


class SlowLink:
    """An ObjectStore behind a slow `Link` (see the module docstring); same interface."""

    def __init__(
        self,
        store: ObjectStore,
        bandwidth_bps: float = 0,
        latency_s: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        link: Link | None = None,
    ):
        self.inner = store
        self.link = link or Link(bandwidth_bps, latency_s, clock=clock, sleep=sleep)

    @classmethod
    def open(
        cls, url: str, *, must_exist: bool = True, bandwidth_bps: float = 0, latency_s=0.0
    ) -> SlowLink:
        """`ObjectStore.open(url)` behind a link of this bandwidth and latency."""
        return cls(ObjectStore.open(url, must_exist=must_exist), bandwidth_bps, latency_s)

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def bytes_read(self) -> int:
        return self.inner.bytes_read

    @property
    def bytes_written(self) -> int:
        return self.inner.bytes_written

    def __repr__(self) -> str:
        link = self.link
        return f"SlowLink({self.url!r}, {link.bandwidth_bps:g} bit/s, {link.latency_s:g} s)"

    # -------------------------------------------------------------------------------- reads

    def get(self, key: str, max_bytes: int = MAX_OBJECT_BYTES) -> bytes | None:
        return self._read(lambda: self.inner.get(key, max_bytes), _framed)

    def exists(self, key: str) -> bool:
        return self._read(lambda: self.inner.exists(key), lambda _: 0)

    def list(self, prefix: str = "") -> list[str]:
        return self._read(lambda: self.inner.list(prefix), lambda _: 0)

    def get_with_generation(
        self, key: str, max_bytes: int = MAX_OBJECT_BYTES
    ) -> tuple[bytes | None, bytes]:
        return self._read(lambda: self.inner.get_with_generation(key, max_bytes), _framed_first)

    def read_prefix(self, key: str, max_bytes: int) -> tuple[bytes, bool, bytes] | None:
        return self._read(lambda: self.inner.read_prefix(key, max_bytes), _raw_first)

    # ------------------------------------------------------------------------------- writes

    def put(self, key: str, body: bytes) -> int:
        self.link.finish(self.link.clock(), _framed(body))
        return self.inner.put(key, body)

    def put_if_absent(self, key: str, body: bytes) -> bool:
        self.link.finish(self.link.clock(), _framed(body))  # charged even if it exists
        return self.inner.put_if_absent(key, body)

    def put_if_generation(self, key: str, body: bytes, generation: bytes) -> bool:
        self.link.finish(self.link.clock(), _framed(body))
        return self.inner.put_if_generation(key, body, generation)

    def delete(self, key: str, if_equal: bytes | None = None) -> bool:
        self.link.finish(self.link.clock(), 0)
        return self.inner.delete(key, if_equal)

    # ----------------------------------------------------------------------------- helpers

    def _read(self, call, size):
        """call()'s result after the link's delay for size(result) bytes (latency alone if
        it raised: the exception passes through unchanged)."""
        start, moved = self.link.clock(), 0
        try:
            result = call()
            moved = size(result)
            return result
        finally:
            self.link.finish(start, moved)


def _framed(body: bytes | None) -> int:
    """The stored size of a body (what the store's counters count), 0 for None."""
    return 0 if body is None else HEADER.size + len(body)


def _framed_first(result) -> int:
    return _framed(result[0])


def _raw_first(result) -> int:
    return 0 if result is None else len(result[0])
