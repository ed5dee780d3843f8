"""The workdir lock: one owner at a time, named when refused, free again when its holder dies."""

import os
import signal
import subprocess
import sys
import time

import pytest

from near_jax import workdir

HOLD = """
import sys, time
from near_jax import workdir
lock = workdir.acquire(sys.argv[1], program="holder")
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path):
    first = workdir.acquire(str(tmp_path), program="near_jax.train")
    with pytest.raises(workdir.WorkdirError) as e:
        workdir.acquire(str(tmp_path), program="near_jax.train")
    message = str(e.value)
    assert "\n" not in message
    assert f"is in use by near_jax.train (pid {os.getpid()} on" in message
    first.release()
    workdir.acquire(str(tmp_path), program="again").release()  # free after release


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir.WorkdirError, match=f"holder \\(pid {holder.pid} "):
            workdir.acquire(str(tmp_path), program="second")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops the flock with the process
        try:
            workdir.acquire(str(tmp_path), program="second").release()
            break
        except workdir.WorkdirError:
            assert time.time() < deadline
            time.sleep(0.05)


def test_a_file_in_the_way_is_one_line(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a directory")
    with pytest.raises(workdir.WorkdirError, match="is not a directory"):
        workdir.acquire(str(path), program="x")


def test_an_unwritable_workdir_is_one_line(tmp_path, monkeypatch):
    # As a read-only filesystem answers: root writes through permission bits, so ask access().
    monkeypatch.setattr(workdir.os, "access", lambda path, mode: False)
    with pytest.raises(workdir.WorkdirError, match="is not writable"):
        workdir.prepare(str(tmp_path))


def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(workdir.WorkdirError, match="cannot be created"):
        workdir.prepare(str(tmp_path / "file" / "run"))
