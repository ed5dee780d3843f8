"""near_jax._io: one-line error text, short reprs, fsync_dir, atomic_write."""

import ast
import errno
import os
import sqlite3
import stat
import sys

import pytest

from near_jax import _io
from near_jax._io import atomic_write, fsync_dir, one_line, open_record_db, short_repr


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


# ------------------------------------------------------------------------------ one_line


def test_one_line_collapses_newlines_and_whitespace_runs():
    e = ValueError("first line\n\n  second\tline \r\n third  ")
    assert one_line(e) == "first line second line third"


def test_one_line_of_an_exception_without_a_message_is_its_type():
    assert one_line(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert one_line(OSError(" \n ")) == "OSError"
    assert one_line(ValueError(), typed=True) == "ValueError"


def test_one_line_typed_prefixes_the_type_name():
    assert one_line(KeyError("k"), typed=True) == "KeyError: 'k'"


def test_one_line_of_a_string_is_the_string():
    assert one_line("  a\nb ") == "a b"
    assert one_line("") == ""  # no type name for a plain string


def test_one_line_keeps_both_ends_of_a_long_message_around_a_marker():
    e = RuntimeError("START " + "x" * 1000 + " END")
    text = one_line(e)
    assert len(text) == 300 == _io.ONE_LINE_LIMIT
    assert text.startswith("START xxx") and text.endswith("xxx END") and " ... " in text
    typed = one_line(e, 50, typed=True)
    assert len(typed) == 50 and typed.startswith("RuntimeError: START") and typed.endswith("END")


def test_one_line_at_the_limit_is_not_cut_and_none_never_cuts():
    assert one_line("y" * 300) == "y" * 300
    assert one_line("y" * 5000, None) == "y" * 5000


def test_one_line_with_a_tiny_limit_still_respects_it():
    assert one_line("abcdefghij", 4) == "abcd"
    assert one_line("abcdefghij", 0) == ""


# ---------------------------------------------------------------------------- short_repr


def test_short_repr_cuts_with_a_trailing_marker():
    assert short_repr("abc") == "'abc'"
    long = short_repr("z" * 200)
    assert len(long) == 80 and long.endswith("...") and long.startswith("'zzz")
    assert short_repr(list(range(100)), limit=10) == "[0, 1, ..."


def test_short_repr_of_a_value_too_deep_to_repr_is_a_placeholder():
    deep: list = []
    # Past Python's recursion limit and past 3.12's own C-level limit, which repr obeys there.
    for _ in range(sys.getrecursionlimit() + 100_000):
        deep = [deep]
    assert short_repr(deep) == "<a list nested too deeply>"


# ----------------------------------------------------------------------------- fsync_dir


def test_fsync_dir_on_a_real_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    fsync_dir(tmp_path)
    fsync_dir(str(tmp_path))
    assert len(synced) == 2


def test_fsync_dir_is_best_effort(tmp_path, monkeypatch):
    fsync_dir(tmp_path / "absent")  # cannot be opened: nothing to do, no error
    opened, closed = [], []
    real_open, real_close = os.open, os.close

    def open_(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    def refuse(fd):
        raise OSError(errno.EINVAL, "fsync of a directory is not supported here")

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", refuse)
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    fsync_dir(tmp_path)
    assert opened and closed == opened  # the descriptor is closed even when fsync fails


# -------------------------------------------------------------------------- atomic_write


def test_atomic_write_creates_and_replaces(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, b"one")
    assert path.read_bytes() == b"one"
    atomic_write(str(path), "twö\n")  # a str is written as UTF-8
    assert path.read_bytes() == "twö\n".encode()
    assert _leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["f.json"]


def test_atomic_write_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    atomic_write(tmp_path / "f", b"x")
    assert calls == ["fsync", "replace", "fsync"]  # data, then rename, then the directory


def test_atomic_write_default_mode_is_what_open_would_give(tmp_path):
    atomic_write(tmp_path / "new", b"x")
    with open(tmp_path / "plain", "wb"):
        pass
    assert _mode(tmp_path / "new") == _mode(tmp_path / "plain") == 0o666 & ~_umask()


def test_atomic_write_default_mode_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "private", b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private") == 0o600


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_atomic_write_explicit_mode_is_exact_whatever_the_umask(tmp_path, mode):
    path = tmp_path / "key"
    atomic_write(path, b"old", mode=0o666)
    old = os.umask(0o022)
    try:
        atomic_write(path, b"secret", mode=mode)  # replacing a wider file narrows it
    finally:
        os.umask(old)
    assert _mode(path) == mode and path.read_bytes() == b"secret"


def test_atomic_write_explicit_mode_is_set_before_any_data(tmp_path, monkeypatch):
    seen = []
    real_fchmod = os.fchmod

    def fchmod(fd, mode):
        seen.append((os.fstat(fd).st_size, stat.S_IMODE(os.fstat(fd).st_mode), mode))
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", fchmod)
    atomic_write(tmp_path / "key", b"secret", mode=0o600)
    size, created, mode = seen[0]
    assert size == 0 and created & 0o077 == 0 and mode == 0o600  # never readable by others


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_rename_leaves_the_old_content_and_no_temp_file(tmp_path, monkeypatch, existing):
    path = tmp_path / "f"
    if existing:
        path.write_bytes(b"old")

    def fail(src, dst):
        assert os.path.exists(src) and open(src, "rb").read() == b"new"  # complete before
        raise OSError(errno.EXDEV, "simulated")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        atomic_write(path, b"new")
    assert (path.read_bytes() == b"old") if existing else not path.exists()
    assert _leftovers(tmp_path) == []


def test_a_write_that_fails_midway_leaves_the_old_content_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "full")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="full"):
        atomic_write(path, b"new" * 1000)
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_an_interrupt_midway_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_before_replace_sees_the_complete_temp_file_and_can_veto(tmp_path):
    path = tmp_path / "ledger"
    path.write_bytes(b"old")
    seen = []

    def check(tmp):
        seen.append((os.path.dirname(tmp), open(tmp, "rb").read(), path.read_bytes()))
        raise ValueError("does not verify")

    with pytest.raises(ValueError, match="does not verify"):
        atomic_write(path, b"new", before_replace=check)
    assert seen == [(str(tmp_path), b"new", b"old")]
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []
    atomic_write(path, b"new", before_replace=lambda tmp: None)
    assert path.read_bytes() == b"new"


def test_no_overwrite_refuses_an_existing_file(tmp_path):
    path = tmp_path / "key"
    atomic_write(path, b"first", overwrite=False)
    assert path.read_bytes() == b"first"
    with pytest.raises(FileExistsError):
        atomic_write(path, b"second", overwrite=False)
    assert path.read_bytes() == b"first" and _leftovers(tmp_path) == []


def test_no_overwrite_without_hard_links_falls_back_to_check_then_rename(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "key"
    atomic_write(path, b"first", overwrite=False, mode=0o600)
    assert path.read_bytes() == b"first" and _mode(path) == 0o600
    with pytest.raises(FileExistsError):
        atomic_write(path, b"second", overwrite=False)
    assert path.read_bytes() == b"first" and _leftovers(tmp_path) == []


def test_an_unwritable_directory_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "absent" / "f", b"x")


def test_io_imports_only_the_standard_library():
    tree = ast.parse(open(_io.__file__).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {name.split(".")[0] for name in names} <= set(sys.stdlib_module_names) | {"__future__"}


def test_open_record_db_creates_checks_and_refuses_in_one_line(tmp_path):
    class Bad(Exception):
        pass

    schema = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);\nCREATE TABLE rows (x INT);"
    path = str(tmp_path / "r.sqlite")
    conn = open_record_db(path, schema, {"format": "1", "run": "a"}, "record", Bad)
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.execute("INSERT INTO rows VALUES (7)")
    conn.close()
    conn = open_record_db(path, schema, {"format": "1", "run": "a"}, "record", Bad)  # reopens
    assert conn.execute("SELECT x FROM rows").fetchall() == [(7,)]
    conn.close()
    for meta, message in [
        ({"format": "2", "run": "a"}, "has format '1', this reader: 2"),
        ({"format": "1", "run": "b"}, "belongs to run 'a', not 'b'"),
    ]:
        with pytest.raises(Bad, match=message):
            open_record_db(path, schema, meta, "record", Bad)
    other = str(tmp_path / "other.sqlite")
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE t (x INT)")
    with pytest.raises(Bad, match="is a SQLite database but not a record"):
        open_record_db(other, schema, {"format": "1"}, "record", Bad)
    (tmp_path / "garbage").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(Bad, match=r"^cannot open record .*garbage: "):
        open_record_db(str(tmp_path / "garbage"), schema, {"format": "1"}, "record", Bad)
