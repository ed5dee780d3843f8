"""Continuous batching over one dense KV cache: requests join and leave a running batch.

The engine owns `slots` rows of one KV cache (serve/slots.py) and a background thread that
loops:

1. cancelled requests leave (their slot is free at once; queued ones are dropped);
2. waiting requests are admitted to free slots, oldest first;
3. prompts are prefilled in chunks of `prefill_chunk` tokens, one slot's chunk per call, at
   most `prefill_per_step` chunks per iteration (so rows already decoding are not starved
   by a long prompt); after a prompt's last chunk the slot samples its first token and
   joins the decode batch;
4. one decode step over all slots draws the next token of every decoding row; the tokens
   come back to the host in one transfer ([slots] ints) and are emitted; a row that draws
   EOS (not emitted: finish "stop") or reaches max_tokens ("length") leaves, and its slot
   takes the next waiting request at the next iteration.

The decode step runs every slot, also free or still prefilling ones: those compute garbage
that is dropped, and their cache write must be harmless. A free slot writes at position 0,
which the next request's first chunk overwrites before anything reads it; a slot between
prefill chunks writes at its next chunk's start, which that chunk overwrites. (A row only
attends to positions <= its own, all written by its own request.)

Dense slots, not pages: every slot holds max_len positions whatever its request needs, so
memory bounds `slots`, not the tokens actually in flight. A paged KV cache (blocks handed
out as rows grow) and prefix caching (shared prompt blocks computed once) are the next
steps; they are not built here.

Host state is numpy arrays per slot, touched by the engine thread only; the queue and the
counters behind stats() are shared under a lock. If the loop raises, every queued and
in-flight request finishes with "error", the error is kept (stats()["error"]) and submit()
refuses new requests.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from near_jax import model, sharding
from near_jax.infer import generator, loading
from near_jax.infer.sampling import Sampling
from near_jax.serve.slots import SlotSteps

# emit(tokens, finish), called from the engine thread: ([token], None) per new token, then
# ([], finish) exactly once, finish in FINISHES: "stop" (EOS drawn, not emitted), "length"
# (max_tokens reached), "cancelled" (Ticket.cancel or shutdown), "error" (the engine failed).
# It must be cheap (the batch waits for it); what it raises is logged and ignored.
Emit = Callable[[list[int], "str | None"], None]
FINISHES = ("stop", "length", "cancelled", "error")
_FREE, _PREFILL, _DECODE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion: prompt token ids (BOS included), how many tokens, how to sample."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0  # 1 = all tokens
    seed: int = 0  # the n-th token's key is fold_in(key(seed), n)

    def __post_init__(self):
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already (an API answers 429)."""


class EngineError(RuntimeError):
    """The engine failed or was shut down: it takes no more requests."""


class Ticket:
    """A submitted request: cancel() from any thread; wall-clock times (time.time()) for
    metrics, None until they happen."""

    def __init__(self, request: Request, emit: Emit, request_id: str, wake: Callable[[], None]):
        self.request, self.request_id = request, request_id
        self._emit, self._wake = emit, wake
        self.queued_at = time.time()
        self.started_at: float | None = None  # admitted to a slot
        self.slot: int | None = None  # the slot it was given (kept after it leaves)
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.finish: str | None = None
        self.completion_tokens = 0  # tokens emitted (EOS not counted)
        self.cancelled = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt)

    def cancel(self) -> None:
        """Asks the engine to stop this request; it emits ([], "cancelled") at its next
        iteration (nothing if the request has finished already)."""
        self.cancelled = True
        self._wake()


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


class Engine:
    """Continuous batching of completion requests over one model, params and mesh."""

    def __init__(
        self,
        params: Any,
        model_cfg: model.ModelConfig,
        mesh: jax.sharding.Mesh,
        *,
        eos_id: int,
        pad_id: int,
        vocab_limit: int | None = None,
        max_len: int,
        slots: int = 16,
        prefill_chunk: int = 64,
        max_queue: int = 256,
        prefill_per_step: int = 1,
    ):
        """`max_len`: prompt plus output tokens at most (the model's context); `slots` is
        rounded up to a multiple of the data-parallel size; the cache holds max_len rounded
        up to a multiple of `prefill_chunk` positions per slot."""
        for name, value, least in [
            ("max_len", max_len, 2),
            ("slots", slots, 1),
            ("prefill_chunk", prefill_chunk, 1),
            ("max_queue", max_queue, 0),
            ("prefill_per_step", prefill_per_step, 1),
        ]:
            if value < least:
                raise ValueError(f"{name}={value} is not allowed: must be >= {least}")
        self.params, self.model_cfg, self.mesh = params, model_cfg, mesh
        self.eos_id, self.pad_id = eos_id, pad_id
        self.vocab_limit = vocab_limit or model_cfg.vocab_size
        self.max_len, self.max_queue = max_len, max_queue
        self.prefill_chunk, self.prefill_per_step = prefill_chunk, prefill_per_step
        self.slots = _round_up(slots, sharding.data_parallel_size(mesh))
        self.cache_len = _round_up(max_len, prefill_chunk)
        # Raises ValueError where the cache does not fit the devices' free memory.
        self.device = SlotSteps(
            model_cfg,
            mesh,
            slots=self.slots,
            cache_len=self.cache_len,
            chunk=prefill_chunk,
            vocab_limit=self.vocab_limit,
        )
        self.cache_bytes_per_device = self.device.cache_bytes_per_device()
        self._cache: dict[str, jax.Array] | None = None

        # Per-slot host state (engine thread only).
        n = self.slots
        self._state = np.full(n, _FREE, np.int8)
        self._tickets: list[Ticket | None] = [None] * n
        self._next_start = np.zeros(n, np.int64)  # next prefill chunk's first position
        self._position = np.zeros(n, np.int64)  # position of the token fed next (decoding)
        self._token = np.full(n, pad_id, np.int64)  # token fed next (decoding)
        self._prefilling: collections.deque[int] = collections.deque()  # admission order

        # Shared with submitting threads, under the lock.
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: collections.deque[Ticket] = collections.deque()
        self._cancel_pending = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.error: str | None = None
        self._counters = dict(
            steps=0,
            prefill_chunks=0,
            prompt_tokens=0,
            tokens_out=0,
            requests_submitted=0,
            requests_rejected=0,
            decode_seconds=0.0,
            prefill_seconds=0.0,
        )
        self._finished = dict.fromkeys(FINISHES, 0)

    # ------------------------------------------------------------------------- public API

    def check(self, request: Request) -> None:
        """Raises ValueError (one line) for a request this engine cannot serve."""
        prompt, m = request.prompt, request.max_tokens
        if not prompt:
            raise ValueError("an empty prompt is not allowed: it needs at least one token (BOS)")
        bad = next((i for i, t in enumerate(prompt) if not 0 <= t < self.vocab_limit), None)
        if bad is not None:
            raise ValueError(
                f"prompt token {prompt[bad]} at index {bad} is not allowed: ids must be in "
                f"[0, {self.vocab_limit})"
            )
        if m < 1:
            raise ValueError(f"max_tokens={m} is not allowed: must be >= 1")
        if len(prompt) >= self.max_len:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens is not allowed: the model's context is "
                f"{self.max_len} tokens, prompt and output together (at most "
                f"{self.max_len - 1} prompt tokens)"
            )
        if len(prompt) + m > self.max_len:
            raise ValueError(
                f"max_tokens={m} is not allowed: at most {self.max_len - len(prompt)} (the "
                f"model's context of {self.max_len} tokens less the prompt's {len(prompt)})"
            )
        Sampling(request.temperature, request.top_k, request.top_p)  # its one-line errors
        if not 0 <= request.seed < 2**32:
            raise ValueError(f"seed={request.seed} is not allowed: must be in [0, 2**32)")

    def submit(self, request: Request, emit: Emit, request_id: str | None = None) -> Ticket:
        """Checks and queues a request; `emit` is called from the engine thread (see the
        module docstring). Raises ValueError, QueueFull, or EngineError (stopped/failed)."""
        self.check(request)
        with self._lock:
            if self.error is not None or self._stopping:
                raise EngineError(f"the engine is not serving: {self.error or 'shut down'}")
            if len(self._queue) >= self.max_queue:
                self._counters["requests_rejected"] += 1
                raise QueueFull(
                    f"the queue is full: {len(self._queue)} requests waiting "
                    f"(max_queue={self.max_queue})"
                )
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            ticket = Ticket(request, emit, rid, self._on_cancel)
            self._queue.append(ticket)
            self._counters["requests_submitted"] += 1
            self._wakeup.notify()
        return ticket

    def warmup(self) -> None:
        """Allocates the cache and compiles both steps (the only shapes serving uses).
        Called by start(); runs in the calling thread, so call it before start() or not at
        all."""
        if self._thread is not None:
            return
        with jax.set_mesh(self.mesh):
            if self._cache is None:
                self._cache = self.device.new_cache()
            self._cache = self.device.warmup(self.params, self._cache, self.pad_id)

    def start(self) -> None:
        """Warms up, then starts the engine thread (once)."""
        if self._thread is not None:
            return
        self.warmup()
        self._thread = threading.Thread(target=self._run, name="near_jax-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stops the thread; queued and in-flight requests finish with "cancelled"."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._drop_all("cancelled")

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for metrics: queue_depth, active_slots (prefilling +
        decoding), prefilling, decoding, slots, steps (decode steps), prefill_chunks,
        prompt_tokens (prefilled), tokens_out (emitted), requests_submitted,
        requests_rejected (QueueFull), finished {finish: count}, decode_seconds and
        prefill_seconds (device time, cumulative), cache_len, max_len, prefill_chunk,
        cache_bytes_per_device, running, error (None or the failure, one line)."""
        state = self._state.copy()
        with self._lock:
            return dict(
                queue_depth=len(self._queue),
                active_slots=int(np.sum(state != _FREE)),
                prefilling=int(np.sum(state == _PREFILL)),
                decoding=int(np.sum(state == _DECODE)),
                slots=self.slots,
                **self._counters,
                finished=dict(self._finished),
                cache_len=self.cache_len,
                max_len=self.max_len,
                prefill_chunk=self.prefill_chunk,
                cache_bytes_per_device=self.cache_bytes_per_device,
                running=self._thread is not None and self._thread.is_alive(),
                error=self.error,
            )

    # ------------------------------------------------------------------------- engine thread

    def _on_cancel(self) -> None:
        with self._lock:
            self._cancel_pending = True
            self._wakeup.notify()

    def _has_work(self) -> bool:
        free = bool(np.any(self._state == _FREE))
        return (
            self._cancel_pending
            or bool(np.any(self._state != _FREE))
            or (free and bool(self._queue))
        )

    def _run(self) -> None:
        try:
            with jax.set_mesh(self.mesh):
                while True:
                    with self._lock:
                        while not self._stopping and not self._has_work():
                            self._wakeup.wait()
                        if self._stopping:
                            return
                        cancels, self._cancel_pending = self._cancel_pending, False
                        dropped = self._take_cancelled_queued() if cancels else []
                        self._admit()
                    for ticket in dropped:
                        self._end(ticket, "cancelled")
                    self._iteration()
        except Exception as e:  # noqa: BLE001 - every request must hear of the failure
            logging.exception("serving engine failed")
            with self._lock:
                self.error = f"{type(e).__name__}: {e}".splitlines()[0]
            self._drop_all("error")

    def _take_cancelled_queued(self) -> list[Ticket]:
        dropped = [t for t in self._queue if t.cancelled]
        if dropped:
            self._queue = collections.deque(t for t in self._queue if not t.cancelled)
        return dropped

    def _admit(self) -> None:
        for slot in np.flatnonzero(self._state == _FREE):
            if not self._queue:
                break
            ticket = self._queue.popleft()
            slot = int(slot)
            self._tickets[slot] = ticket
            self._state[slot], self._next_start[slot] = _PREFILL, 0
            self._prefilling.append(slot)
            ticket.started_at, ticket.slot = time.time(), slot

    def _iteration(self) -> None:
        for slot in np.flatnonzero(self._state != _FREE):
            ticket = self._tickets[slot]
            if ticket is not None and ticket.cancelled:
                self._free(int(slot), "cancelled")
        for _ in range(self.prefill_per_step):
            if not self._prefilling:
                break
            self._prefill_chunk(self._prefilling[0])
        if np.any(self._state == _DECODE):
            self._decode_step()

    def _prefill_chunk(self, slot: int) -> None:
        ticket = self._tickets[slot]
        request = ticket.request
        prompt, start, c = request.prompt, int(self._next_start[slot]), self.prefill_chunk
        piece = prompt[start : start + c]
        tokens_C = np.full(c, self.pad_id, np.int32)
        tokens_C[: len(piece)] = piece
        began = time.perf_counter()
        token, self._cache = self.device.run_prefill(
            self.params,
            self._cache,
            tokens_C,
            slot,
            start,
            len(piece) - 1,
            (request.temperature, request.top_k, request.top_p),
            request.seed,
        )
        last = start + c >= len(prompt)
        token = int(token) if last else None  # waits for the device on the last chunk only
        with self._lock:
            self._counters["prefill_chunks"] += 1
            self._counters["prompt_tokens"] += len(piece)
            self._counters["prefill_seconds"] += time.perf_counter() - began
        if not last:
            self._next_start[slot] = start + c
            return
        self._prefilling.popleft()
        self._state[slot], self._position[slot] = _DECODE, len(prompt)
        self._accept(slot, token)

    def _decode_step(self) -> None:
        decoding = self._state == _DECODE
        counts = np.array([t.completion_tokens if t else 0 for t in self._tickets])
        ints_4xB = np.stack(
            [
                np.where(decoding, self._token, self.pad_id),
                # Not decoding: a position the slot's next prefill chunk overwrites.
                np.where(decoding, self._position, self._next_start),
                counts,
                [t.request.top_k if t else 0 for t in self._tickets],
            ]
        )
        seeds_B = [t.request.seed if t else 0 for t in self._tickets]
        floats_2xB = [
            [t.request.temperature if t else 0.0 for t in self._tickets],
            [t.request.top_p if t else 1.0 for t in self._tickets],
        ]
        began = time.perf_counter()
        tokens_B, self._cache = self.device.run_decode(
            self.params, self._cache, ints_4xB, seeds_B, floats_2xB
        )
        tokens_B = np.asarray(tokens_B)  # the step's one device-to-host transfer
        with self._lock:
            self._counters["steps"] += 1
            self._counters["decode_seconds"] += time.perf_counter() - began
        for slot in np.flatnonzero(decoding):
            self._position[slot] += 1
            self._accept(int(slot), int(tokens_B[slot]))

    def _accept(self, slot: int, token: int) -> None:
        """The slot's next token: emitted, or the end of its request."""
        ticket = self._tickets[slot]
        if token == self.eos_id:
            self._free(slot, "stop")
            return
        if ticket.first_token_at is None:
            ticket.first_token_at = time.time()
        ticket.completion_tokens += 1
        with self._lock:
            self._counters["tokens_out"] += 1
        self._call(ticket, [token], None)
        if ticket.completion_tokens >= ticket.request.max_tokens:
            self._free(slot, "length")
            return
        self._token[slot] = token

    def _free(self, slot: int, finish: str) -> None:
        ticket = self._tickets[slot]
        self._tickets[slot] = None
        self._state[slot], self._next_start[slot] = _FREE, 0
        if slot in self._prefilling:
            self._prefilling.remove(slot)
        self._end(ticket, finish)

    def _end(self, ticket: Ticket, finish: str) -> None:
        ticket.finish, ticket.finished_at = finish, time.time()
        with self._lock:
            self._finished[finish] += 1
        self._call(ticket, [], finish)

    def _call(self, ticket: Ticket, tokens: list[int], finish: str | None) -> None:
        try:
            ticket._emit(tokens, finish)
        except Exception:  # noqa: BLE001 - a client's callback must not stop the engine
            logging.exception("emit of request %s raised; ignored", ticket.request_id)

    def _drop_all(self, finish: str) -> None:
        """Ends every in-flight and queued request with `finish` (the thread has stopped)."""
        for slot in np.flatnonzero(self._state != _FREE):
            self._free(int(slot), finish)
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
        for ticket in queued:
            self._end(ticket, finish)


def engine_for_run(run: loading.LoadedRun, **kw: Any) -> Engine:
    """An Engine over a loaded run, stopping at its tokenizer's EOS; max_len defaults to the
    run's context (data.seq_len; for sliding-window attention, also data.seq_len)."""
    tok = run.tokenizer
    kw.setdefault("max_len", generator.context_len(run) or int(run.cfg.data.seq_len))
    return Engine(
        run.params,
        run.model_cfg,
        run.mesh,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        vocab_limit=tok.vocab_size,
        **kw,
    )
