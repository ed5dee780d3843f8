"""A run directory that one program owns: created up front with one-line errors, then locked.

    lock = workdir.acquire("/tmp/run", program="near_jax.train")   # WorkdirError if not usable
    ...
    lock.release()

The lock is an advisory `flock` on `<workdir>/.lock`, so the kernel drops it when the holder
exits however it exits (kill -9 included): a killed run never leaves its workdir stuck. The
file also names the holder (host, pid, program, start time) so a second program that finds
the lock taken can say who has it. `flock` is local to one machine's kernel; on a network
filesystem that does not forward it (some NFS set-ups), two hosts are not kept apart.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

LOCK_FILE = ".lock"


class WorkdirError(ValueError):
    """A workdir that cannot be used (not a directory, not writable, or held by another run)."""


def prepare(workdir: str) -> None:
    """Creates `workdir` if needed; WorkdirError (one line) if it cannot be a run directory."""
    if not workdir:
        raise WorkdirError("--workdir is empty: name a run directory")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is not a directory (a file is in the way)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir} cannot be created: {_reason(e)}") from e
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir={workdir} is not writable by this user")


class Lock:
    """The held lock on one workdir (see `acquire`)."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        """Drops the lock; the file stays (removing it would race with a new holder)."""
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(workdir: str, program: str) -> Lock:
    """Prepares `workdir` and locks it for `program`; WorkdirError names the holder if taken."""
    prepare(workdir)
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir}: cannot create {LOCK_FILE}: {_reason(e)}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _describe(_read_holder(fd))
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise WorkdirError(f"--workdir={workdir}: cannot lock {path}: {_reason(e)}") from e
        raise WorkdirError(
            f"--workdir={workdir} is in use by {holder}; wait for it to finish or stop it, "
            "or use another --workdir"
        ) from e
    holder = {
        "program": program,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    except OSError as e:
        os.close(fd)
        raise WorkdirError(f"--workdir={workdir}: cannot write {path}: {_reason(e)}") from e
    return Lock(path, fd)


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another program (its lock file names no holder yet)"
    return (
        f"{holder.get('program', 'another program')} (pid {holder['pid']} on "
        f"{holder.get('host', '?')}, since {holder.get('since', '?')})"
    )


def _reason(e: OSError) -> str:
    return e.strerror or str(e)
