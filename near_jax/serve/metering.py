"""Metering: who is calling (`authorize`), whether they can afford it (`reserve`), and what
they owe once it is done (`settle`).

A request's worst case — its prompt plus every token it may generate — is held against its
key's limit from admission until it finishes, so concurrent requests cannot together spend
past the limit: reserve refuses (OverLimit) when spent + held + worst > limit. `settle`
records the actual usage in the usage ledger and only then drops the hold, so at no moment
is a request counted neither as spent nor as held. Spending is read from the ledger, so
limits hold across restarts.

Exceptions carry the HTTP status the API answers with: Unauthorized 401, OverLimit 402.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import threading
from typing import Any

from near_jax._io import short_repr
from near_jax.serve.keys import ApiKey, KeyRing, request_cost
from near_jax.serve.usage import UsageLedger


class MeterError(Exception):
    """A request refused by metering; `status` is the HTTP status to answer with."""

    status = 400


class Unauthorized(MeterError):
    """No API key, or one the keyring does not know (401)."""

    status = 401


class OverLimit(MeterError):
    """The request's worst-case cost would take its key past its spend limit (402)."""

    status = 402


@dataclasses.dataclass(frozen=True)
class Reservation:
    """A hold on `worst` micro-units of `key`'s limit while one request is in flight."""

    id: int
    key: ApiKey
    prompt_tokens: int
    max_tokens: int
    worst: int  # request_cost(prompt_tokens, max_tokens, key)


class Meter:
    """Authorizes requests, holds their worst-case cost while in flight and records what
    they used. Thread-safe."""

    def __init__(self, keyring: KeyRing, ledger: UsageLedger):
        self.keyring = keyring
        self.ledger = ledger
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._open: dict[int, Reservation] = {}  # reservation id → the hold not yet dropped
        self._held: dict[str, int] = {}  # key sha256 → micro-units held by its open holds

    def authorize(self, secret: str | None) -> ApiKey:
        """The key `secret` belongs to (any secret, or none, on an open keyring);
        Unauthorized if it is missing or unknown."""
        if self.keyring.is_open:
            return self.keyring.keys[0]  # the anonymous key
        if not secret:
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
        key = self.keyring.lookup(secret)
        if key is None:
            raise Unauthorized("unknown API key")
        return key

    def reserve(self, key: ApiKey, prompt_tokens: int, max_tokens: int) -> Reservation:
        """Holds the request's worst-case cost (prompt_tokens prompt tokens and max_tokens
        completion tokens) against `key`'s limit until settle or release; OverLimit if
        spent + held + worst would exceed it. ValueError for a negative or non-int count."""
        worst = request_cost(prompt_tokens, max_tokens, key)
        with self._lock:
            held = self._held.get(key.sha256, 0)
            if key.limit is not None:
                spent = self.ledger.spent(key.sha256)
                if spent + held + worst > key.limit:
                    raise OverLimit(
                        f"key {key.name!r} would exceed its limit of {key.limit} micro-units: "
                        f"spent {spent}, held by requests in flight {held}, this request up "
                        f"to {worst}"
                    )
            reservation = Reservation(next(self._ids), key, prompt_tokens, max_tokens, worst)
            self._open[reservation.id] = reservation
            self._held[key.sha256] = held + worst
        return reservation

    def settle(
        self,
        reservation: Reservation,
        request_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        finish: str,
        created: float,
    ) -> int:
        """Records the request's actual usage in the ledger, drops its hold and returns its
        cost (micro-units). Idempotent: settling the same request again records nothing and
        returns the same cost. ValueError, recording nothing, if the usage exceeds what was
        reserved; on any exception the hold stays (release it)."""
        fields, cost = self._usage(
            reservation, request_id, model, prompt_tokens, completion_tokens, finish, created
        )
        # recorded before the hold drops: a concurrent reserve may count this request twice
        # (refusing early) but never not at all
        self.ledger.record(**fields)
        self.release(reservation)
        return cost

    def settle_later(
        self,
        reservation: Reservation,
        request_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        finish: str,
        created: float,
    ) -> concurrent.futures.Future[int]:
        """`settle` with the record committed on the ledger's writer thread together with
        other requests' (`UsageLedger.submit`): the future resolves to the cost once the row
        is committed and the hold dropped, or to the error (the hold stays). ValueError at
        once, recording nothing, as settle."""
        fields, cost = self._usage(
            reservation, request_id, model, prompt_tokens, completion_tokens, finish, created
        )
        settled: concurrent.futures.Future[int] = concurrent.futures.Future()

        def done(recorded: concurrent.futures.Future[bool]) -> None:
            error = recorded.exception()
            if error is not None:
                settled.set_exception(error)
                return
            self.release(reservation)
            settled.set_result(cost)

        self.ledger.submit(**fields).add_done_callback(done)
        return settled

    def _usage(
        self,
        reservation: Reservation,
        request_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        finish: str,
        created: float,
    ) -> tuple[dict[str, Any], int]:
        """(the ledger row's fields, the cost) of a request's usage; ValueError if it does
        not fit the reservation."""
        if prompt_tokens != reservation.prompt_tokens or not (
            isinstance(completion_tokens, int) and completion_tokens <= reservation.max_tokens
        ):
            raise ValueError(
                f"usage of {short_repr(prompt_tokens)} prompt and {short_repr(completion_tokens)}"
                f" completion tokens does not fit the reservation of "
                f"{reservation.prompt_tokens} prompt and up to {reservation.max_tokens}"
            )
        key = reservation.key
        cost = request_cost(prompt_tokens, completion_tokens, key)
        fields = dict(
            request_id=request_id,
            key_name=key.name,
            key_sha256=key.sha256,
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost=cost,
            finish=finish,
            created=created,
        )
        return fields, cost

    def release(self, reservation: Reservation) -> None:
        """Drops the hold without recording anything (a request refused before any token
        was generated). Releasing twice, or after settle, does nothing."""
        with self._lock:
            if self._open.pop(reservation.id, None) is None:
                return
            sha = reservation.key.sha256
            # .get: holds of 0 (a free key) leave no entry behind
            left = self._held.get(sha, 0) - reservation.worst
            if left:
                self._held[sha] = left
            else:
                self._held.pop(sha, None)

    def held(self, key: ApiKey) -> int:
        """Micro-units held for `key` by requests in flight."""
        with self._lock:
            return self._held.get(key.sha256, 0)

    def remaining(self, key: ApiKey) -> int | None:
        """What `key` may still reserve (limit - spent - held, at least 0); None: no limit."""
        if key.limit is None:
            return None
        with self._lock:
            spent = self.ledger.spent(key.sha256)
            return max(key.limit - spent - self._held.get(key.sha256, 0), 0)
