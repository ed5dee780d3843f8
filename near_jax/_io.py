"""Small helpers written once: one-line error text, short reprs, atomic file writes.

The bottom layer of near_jax: this module imports only the standard library, so any module
(the stdlib-only object store included) can use it without pulling in anything else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
from collections.abc import Callable

ONE_LINE_LIMIT = 300  # characters: an error fits a log line or a terminal line or two
_CUT = " ... "
_TEMP_ATTEMPTS = 100  # as tempfile's TMP_MAX: names are random, so a clash is a fluke


def one_line(
    e: BaseException | str, limit: int | None = ONE_LINE_LIMIT, *, typed: bool = False
) -> str:
    """`e`'s message as one line of at most `limit` characters (None: no limit).

    Whitespace runs (newlines included) become one space; `typed` puts `Type: ` first. A
    longer text keeps its start and its end (where a wrapped error's cause often is) around
    " ... ". An exception with no message gives its type's name; a string is taken as is.
    """
    text = " ".join(str(e).split())
    if isinstance(e, BaseException):
        name = type(e).__name__
        text = (f"{name}: {text}" if typed else text) if text else name
    if limit is None or len(text) <= limit:
        return text
    keep = limit - len(_CUT)
    if keep < 2:  # no room for both ends and the marker
        return text[:limit]
    return text[: keep - keep // 2] + _CUT + text[len(text) - keep // 2 :]


def short_repr(value: object, limit: int = 80) -> str:
    """repr(value) for a message, cut to `limit` characters with a trailing "...".

    A value nested too deeply to repr (anything decoded from untrusted JSON may be) gives a
    placeholder instead of raising RecursionError.
    """
    try:
        text = repr(value)
    except RecursionError:
        return f"<a {type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Makes a rename or creation in `directory` durable, where the platform allows it.

    Best effort, never raising: callers use it after the rename, when the new content is
    already in place and visible, so failing then would report a write that happened as one
    that did not. Some platforms cannot open a directory (Windows) and some filesystems
    refuse to fsync one (EINVAL); there the rename is as durable as the filesystem makes it.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | str,
    *,
    mode: int | None = None,
    overwrite: bool = True,
    before_replace: Callable[[str], None] | None = None,
) -> None:
    """Writes `data` (a str as UTF-8) to `path` so that it holds the old content or the new,
    never a part, and leaves no temporary file behind, whatever fails.

    The data goes to a hidden temporary file in the same directory (a rename is atomic only
    within one filesystem), is flushed and fsynced, renamed onto `path`, and the directory
    is fsynced (`fsync_dir`).

    mode: None gives the permissions a plain `open(path, "w")` would (0o666 less the umask);
      an int gives exactly that mode, set before any data is written (a private key must
      never sit readable by others, even briefly).
    overwrite: False refuses to replace an existing `path` (FileExistsError), atomically
      where the filesystem has hard links, so a file created meanwhile is never clobbered.
    before_replace: called with the temporary file's path once it is complete and synced,
      just before the rename; whatever it raises propagates and leaves `path` as it was.

    Raises OSError (the caller words it) if the file cannot be written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # Created owner-only when an exact mode follows, so the file is never wider than `mode`
    # for a moment; otherwise 0o666 and the kernel applies the umask, as open() does.
    tmp, fd = _create_temp(directory, os.path.basename(path), 0o600 if mode is not None else 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # exact: the umask must not narrow (or widen) it
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # gone after a rename; after a link or a failure it is ours to drop
    fsync_dir(directory)


def _create_temp(directory: str, name: str, mode: int) -> tuple[str, int]:
    # tempfile.mkstemp always creates 0o600, which would leave an ordinary file private.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(_TEMP_ATTEMPTS - 1):
        tmp = _temp_name(directory, name)
        with contextlib.suppress(FileExistsError):
            return tmp, os.open(tmp, flags, mode)
    tmp = _temp_name(directory, name)
    return tmp, os.open(tmp, flags, mode)  # a last clash raises


def _temp_name(directory: str, name: str) -> str:
    return os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")


def _link_no_clobber(tmp: str, path: str) -> None:
    # link() fails if `path` exists, atomically, so a file created between a caller's
    # existence check and now is never replaced; rename would silently clobber it.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: fall back to check-then-rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
        os.replace(tmp, path)


def open_record_db(
    path: str, schema: str, meta: dict[str, str], what: str, error: type[Exception]
) -> sqlite3.Connection:
    """Opens (creating it if absent) a one-file SQLite database of an append-only record.

    The settings every near_jax ledger uses: the rollback journal (the file stays one file;
    a WAL setting persists in a file, so it is set explicitly), synchronous=FULL (a commit is
    on disk when it returns), explicit transactions (isolation_level None), shareable between
    threads under the caller's lock. A file without tables gets `schema` and the `meta`
    rows (table meta(key, value)), inside BEGIN IMMEDIATE so two openers never both create
    them; an existing one must have the schema's tables and exactly these meta values.
    Anything else raises `error`, one line naming `what` and `path`.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=60.0, check_same_thread=False)
    except sqlite3.Error as e:
        raise error(f"cannot open {what} {path}: {one_line(e)}") from None
    needed = set(re.findall(r"CREATE TABLE (\w+)", schema))
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            query = "SELECT name FROM sqlite_master WHERE type='table'"
            tables = {r[0] for r in conn.execute(query)}
            if not tables:
                for statement in schema.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
            elif not needed <= tables:
                raise error(f"{path} is a SQLite database but not a {what}")
            found = dict(conn.execute("SELECT key, value FROM meta"))
            for key, want in meta.items():
                if found.get(key) == want:
                    continue
                if key == "format":
                    raise error(f"{what} {path} has format {found.get(key)!r}, this reader: {want}")
                raise error(f"{what} {path} belongs to {key} {found.get(key)!r}, not {want!r}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        conn.close()
        raise error(f"cannot open {what} {path}: {one_line(e)}") from None
    except BaseException:
        conn.close()
        raise
    return conn
