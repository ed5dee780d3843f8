"""Continuous batching over one dense KV cache: requests join and leave a running batch.

The engine owns `slots` rows of one KV cache (serve/slots.py) and a background thread that
loops:

1. cancelled requests leave (their slot is free at once; queued ones are dropped);
2. waiting requests are admitted to free slots, oldest first, each to the first free slot
   in SlotSteps.order (so busy slots stay packed at the start of the order);
3. prompts are prefilled in chunks of `prefill_chunk` tokens (the next chunk of each of
   the oldest prompts in one call, as many as the budget allows, up to step_tokens /
   prefill_chunk) within a token budget per iteration, as vLLM's chunked prefill:
   `step_tokens` less one per decoding row, `prefill_chunk` a chunk, but at least
   `prefill_per_step` chunks. So a burst is prefilled many chunks an iteration while the
   batch is small, and decoding rows wait for about step_tokens tokens of prefill at most.
   After a prompt's last chunk the slot samples its first token and joins the batch;
4. one decode step over the first b slots of the order, b the smallest decode bucket
   (slots.py: powers of two, and `slots`) holding every decoding row, attending over the
   smallest span (slots.py) past every decoding row's position, draws their tokens; they
   come back to the host in one transfer ([b] ints); a row that draws EOS (not emitted:
   finish "stop") or reaches max_tokens ("length") leaves, and its slot takes the next
   waiting request at the next iteration;
5. after the prefills and after the decode step, the counters are added under the lock
   (once), then the tokens and finishes are emitted (so stats() counts all a client heard).

The decode step runs all b slots of its bucket, also free or still prefilling ones: those compute
garbage that is dropped, and their cache write must be harmless. A free slot writes at
position 0, which the next request's first chunk overwrites before anything reads it; a slot
between prefill chunks writes at its next chunk's start, which that chunk overwrites. (A row
only attends to positions <= its own, all written by its own request.)

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
import itertools
import math
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from near_jax import model, sharding
from near_jax.infer import generator, loading
from near_jax.serve import requests

# The request types are the engine's API too: importable from here.
from near_jax.serve.requests import FINISHES, Emit, EngineError, QueueFull, Request, Ticket
from near_jax.serve.slots import SlotSteps

_FREE, _PREFILL, _DECODE = 0, 1, 2
_COUNTS = (
    "steps decode_rows prefill_chunks prefill_calls prompt_tokens tokens_out requests_submitted"
)
_COUNTERS = (*_COUNTS.split(), "requests_rejected", "decode_seconds", "prefill_seconds")


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
        step_tokens: int = 512,
        length_buckets: int = 4,
    ):
        """`max_len`: prompt plus output tokens at most (the model's context); `slots` is
        rounded up to a multiple of the data-parallel size; the cache holds max_len rounded
        up to a multiple of `prefill_chunk` positions per slot; `step_tokens` and
        `prefill_per_step` bound the prefill chunks of one iteration (module docstring);
        `length_buckets` attention spans (slots.py) are compiled for every decode bucket."""
        for name, value, least in [
            ("max_len", max_len, 2),
            ("slots", slots, 1),
            ("prefill_chunk", prefill_chunk, 1),
            ("max_queue", max_queue, 0),
            ("prefill_per_step", prefill_per_step, 1),
            ("step_tokens", step_tokens, 1),
            ("length_buckets", length_buckets, 1),
        ]:
            if value < least:
                raise ValueError(f"{name}={value} is not allowed: must be >= {least}")
        self.params, self.model_cfg, self.mesh = params, model_cfg, mesh
        self.eos_id, self.pad_id = eos_id, pad_id
        self.vocab_limit = vocab_limit or model_cfg.vocab_size
        self.max_len, self.max_queue = max_len, max_queue
        self.prefill_chunk, self.prefill_per_step = prefill_chunk, prefill_per_step
        self.step_tokens = step_tokens
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
            length_buckets=length_buckets,
            prefill_rows=max(1, step_tokens // prefill_chunk),
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
        self._count = np.zeros(n, np.int64)  # tokens drawn so far (the next key's index)
        self._top_k = np.zeros(n, np.int64)  # the request's sampling, by slot
        self._seed = np.zeros(n, np.uint32)
        self._temperature = np.zeros(n, np.float32)
        self._top_p = np.ones(n, np.float32)
        # This iteration's counter increments and emits, flushed at its end (_flush).
        self._delta: collections.Counter[str] = collections.Counter()
        self._events: list[tuple[Ticket, list[int], str | None]] = []
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
        self._counters = {k: 0.0 if k.endswith("seconds") else 0 for k in _COUNTERS}
        self._finished = dict.fromkeys(FINISHES, 0)

    # ------------------------------------------------------------------------- public API

    def check(self, request: Request) -> None:
        """Raises ValueError (one line) for a request this engine cannot serve."""
        requests.check_request(request, vocab_limit=self.vocab_limit, max_len=self.max_len)

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
        """Allocates the cache and compiles prefill and every decode bucket (the only shapes
        serving uses; nothing compiles later).
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
        decoding), prefilling, decoding, slots, steps (decode steps), decode_rows (slots
        the steps ran: a bucket each), prefill_chunks, prefill_calls (a call runs several
        slots' chunks), prompt_tokens (prefilled),
        tokens_out (emitted), requests_submitted,
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

    def _has_work(self) -> bool:  # (with no busy slot, every slot is free)
        return self._cancel_pending or bool(self._queue) or bool(np.any(self._state != _FREE))

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
                    self._iteration(cancels)
                    self._flush()
        except Exception as e:  # noqa: BLE001 - every request must hear of the failure
            logging.exception("serving engine failed")
            with self._lock:
                self.error = f"{type(e).__name__}: {e}".splitlines()[0]
            self._drop_all("error")
        finally:
            self._flush()

    def _take_cancelled_queued(self) -> list[Ticket]:
        dropped = [t for t in self._queue if t.cancelled]
        if dropped:
            self._queue = collections.deque(t for t in self._queue if not t.cancelled)
        return dropped

    def _admit(self) -> None:
        order = self.device.order
        for slot in order[self._state[order] == _FREE].tolist():
            if not self._queue:
                break
            ticket = self._queue.popleft()
            self._tickets[slot] = ticket
            self._state[slot], self._next_start[slot] = _PREFILL, 0
            self._prefilling.append(slot)
            ticket.started_at, ticket.slot = time.time(), slot
            r = ticket.request
            self._count[slot], self._top_k[slot], self._seed[slot] = 0, r.top_k, r.seed
            self._temperature[slot], self._top_p[slot] = r.temperature, r.top_p

    def _iteration(self, cancels: bool) -> None:
        # Ticket.cancel marks the ticket before it sets _cancel_pending: none are missed.
        for slot in np.flatnonzero(self._state != _FREE) if cancels else ():
            if self._tickets[slot].cancelled:
                self._free(int(slot), "cancelled")
        budget = self.step_tokens - int(np.sum(self._state == _DECODE))
        chunks, c = 0, self.prefill_chunk
        while self._prefilling and (chunks < self.prefill_per_step or budget >= c):
            # The oldest prompts' next chunks, one per slot, in one call.
            room = max(budget // c, self.prefill_per_step - chunks, 1)
            batch = list(itertools.islice(self._prefilling, min(room, self.device.prefill_rows)))
            self._prefill_chunks(batch)
            chunks, budget = chunks + len(batch), budget - len(batch) * c
        self._flush()  # first tokens out before the decode step
        if np.any(self._state == _DECODE):
            self._decode_step()

    def _prefill_chunks(self, slots: list[int]) -> None:
        """The next chunk of each slot's prompt, in one call; a slot whose prompt ends with
        its chunk takes its first token and joins the decode batch."""
        c = self.prefill_chunk
        tokens_PxC = np.full((len(slots), c), self.pad_id, np.int32)
        ints_4xP = np.empty((4, len(slots)), np.int32)
        floats_2xP = np.empty((2, len(slots)), np.float32)
        seeds_P = np.empty(len(slots), np.uint32)
        ends = []  # (row, slot) whose prompt ends with this chunk
        for i, slot in enumerate(slots):
            request = self._tickets[slot].request
            start = int(self._next_start[slot])
            piece = request.prompt[start : start + c]
            tokens_PxC[i, : len(piece)] = piece
            ints_4xP[:, i] = (slot, start, len(piece) - 1, request.top_k)
            floats_2xP[:, i] = (request.temperature, request.top_p)
            seeds_P[i] = request.seed
            self._delta["prompt_tokens"] += len(piece)
            if start + c >= len(request.prompt):
                ends.append((i, slot))
            else:
                self._next_start[slot] = start + c
        began = time.perf_counter()
        tokens_P, self._cache = self.device.run_prefill(
            self.params, self._cache, tokens_PxC, ints_4xP, seeds_P, floats_2xP
        )
        # Waits for the device only where a prompt ended (its first token is needed now).
        tokens_P = np.asarray(tokens_P).tolist() if ends else []
        self._delta["prefill_chunks"] += len(slots)
        self._delta["prefill_calls"] += 1
        self._delta["prefill_seconds"] += time.perf_counter() - began
        for i, slot in ends:
            self._prefilling.remove(slot)
            self._state[slot] = _DECODE
            self._position[slot] = len(self._tickets[slot].request.prompt)
            self._accept(slot, tokens_P[i])

    def _decode_step(self) -> None:
        last = np.flatnonzero(self._state[self.device.order] == _DECODE)[-1]
        b = self.device.bucket(int(last) + 1)
        slots_B = self.device.bucket_slots[b]
        decoding_B = self._state[slots_B] == _DECODE
        ints_4xB = np.empty((4, b), np.int32)
        ints_4xB[0] = np.where(decoding_B, self._token[slots_B], self.pad_id)
        # Not decoding: a position the slot's next prefill chunk overwrites.
        ints_4xB[1] = np.where(decoding_B, self._position[slots_B], self._next_start[slots_B])
        ints_4xB[2], ints_4xB[3] = self._count[slots_B], self._top_k[slots_B]
        floats_2xB = np.stack([self._temperature[slots_B], self._top_p[slots_B]])
        span = self.device.span(int(np.max(ints_4xB[1], where=decoding_B, initial=0)) + 1)
        began = time.perf_counter()
        tokens_B, self._cache = self.device.run_decode(
            self.params, self._cache, ints_4xB, self._seed[slots_B], floats_2xB, span
        )
        tokens_B = np.asarray(tokens_B).tolist()  # the step's one device-to-host transfer
        self._delta.update(steps=1, decode_rows=b)
        self._delta["decode_seconds"] += time.perf_counter() - began
        self._position[slots_B] += decoding_B
        for i in np.flatnonzero(decoding_B).tolist():
            self._accept(int(slots_B[i]), tokens_B[i])

    def _accept(self, slot: int, token: int) -> None:
        """The slot's next token: emitted, or the end of its request."""
        ticket = self._tickets[slot]
        if token == self.eos_id:
            self._free(slot, "stop")
            return
        if ticket.first_token_at is None:
            ticket.first_token_at = time.time()
        ticket.completion_tokens += 1
        self._count[slot] += 1
        self._delta["tokens_out"] += 1
        self._events.append((ticket, [token], None))
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
        self._delta["finished_" + finish] += 1
        self._events.append((ticket, [], finish))

    def _flush(self) -> None:
        """Adds the counted increments under the lock (once), then calls the emits."""
        delta, self._delta = self._delta, collections.Counter()
        events, self._events = self._events, []
        if delta:
            with self._lock:
                for key, value in delta.items():
                    if key.startswith("finished_"):
                        self._finished[key.removeprefix("finished_")] += value
                    else:
                        self._counters[key] += value
        for ticket, tokens, finish in events:
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
        self._flush()


def engine_for_run(run: loading.LoadedRun, **kw: Any) -> Engine:
    """An Engine over a loaded run, stopping at its tokenizer's EOS; max_len defaults to the
    run's context (data.seq_len; for sliding-window attention, also data.seq_len)."""
    tok = run.tokenizer
    kw.setdefault("max_len", generator.context_len(run) or int(run.cfg.data.seq_len))
    kw = dict(eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_limit=tok.vocab_size, **kw)
    return Engine(run.params, run.model_cfg, run.mesh, **kw)
