"""Graceful stop on SIGTERM / SIGINT: finish the step, checkpoint, exit 0.

The first signal only sets a flag that the training loop polls after each step; a second
signal restores the default handler and re-delivers itself, so it aborts at once. With
several processes (`jax.distributed`), all hosts must stop at the same step: JAX's
preemption sync point decides that.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers (main thread only) and answers `should_stop(step)`."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum
        logging.warning(
            "received %s: stopping after this step (send it again to abort at once)",
            signal.Signals(signum).name,
        )

    def should_stop(self, step: int) -> bool:
        """True when training must stop after `step` (the same answer on every host)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                # The coordination service relays SIGTERM to every host and picks the step.
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:
                # No preemption service: agree on the local flags (a tiny allgather a step).
                return _all_agree(self.signal is not None)
        return self.signal is not None

    def close(self) -> None:
        """Puts the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _all_agree(local: bool) -> bool:
    # Any host that was signalled stops every host, at the same step.
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([local], dtype=np.int32))
    return bool(np.asarray(flags).any())
