"""Preemption: the first SIGTERM asks for a save and a stop, a second one aborts at once."""

import signal
import subprocess
import sys

from helpers import REPO, subprocess_env

SECOND_SIGNAL = """
import os, signal, sys, time
from near_jax.train.preemption import StopRequest
stop = StopRequest()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
print("first signal: stop requested" if stop.should_stop(1) else "first signal lost", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("second signal ignored", flush=True)
"""


def test_second_signal_aborts_at_once():
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL],
        cwd=REPO,
        env=subprocess_env(devices=1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "first signal: stop requested" in proc.stdout
    assert "second signal ignored" not in proc.stdout
    assert proc.returncode == -signal.SIGTERM
