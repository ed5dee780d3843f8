"""What the serving engine takes and hands back: Request, its checks, Ticket, the errors.

Engine.submit checks a Request (check_request) and returns a Ticket; `emit`, the caller's
callback, hears the request's tokens and its finish from the engine thread (see Emit).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from near_jax.infer.sampling import Sampling

# emit(tokens, finish), called from the engine thread: ([token], None) per new token, then
# ([], finish) exactly once, finish in FINISHES: "stop" (EOS drawn, not emitted), "length"
# (max_tokens reached), "cancelled" (Ticket.cancel or shutdown), "error" (the engine failed).
# It must be cheap (the batch waits for it); what it raises is logged and ignored.
Emit = Callable[[list[int], "str | None"], None]
FINISHES = ("stop", "length", "cancelled", "error")


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


def check_request(request: Request, *, vocab_limit: int, max_len: int) -> None:
    """Raises ValueError (one line) for a request an engine with token ids in
    [0, vocab_limit) and a context of max_len tokens (prompt and output) cannot serve."""
    prompt, m = request.prompt, request.max_tokens
    if not prompt:
        raise ValueError("an empty prompt is not allowed: it needs at least one token (BOS)")
    bad = next((i for i, t in enumerate(prompt) if not 0 <= t < vocab_limit), None)
    if bad is not None:
        raise ValueError(
            f"prompt token {prompt[bad]} at index {bad} is not allowed: ids must be in "
            f"[0, {vocab_limit})"
        )
    if m < 1:
        raise ValueError(f"max_tokens={m} is not allowed: must be >= 1")
    if len(prompt) >= max_len:
        raise ValueError(
            f"a prompt of {len(prompt)} tokens is not allowed: the model's context is "
            f"{max_len} tokens, prompt and output together (at most {max_len - 1} prompt "
            "tokens)"
        )
    if len(prompt) + m > max_len:
        raise ValueError(
            f"max_tokens={m} is not allowed: at most {max_len - len(prompt)} (the model's "
            f"context of {max_len} tokens less the prompt's {len(prompt)})"
        )
    Sampling(request.temperature, request.top_k, request.top_p)  # its one-line errors
    if not 0 <= request.seed < 2**32:
        raise ValueError(f"seed={request.seed} is not allowed: must be in [0, 2**32)")


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
