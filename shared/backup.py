"""
Online backups of a fieldsync database, the hub's or an office's, and their checks.

:func:`backup` copies the database with SQLite's backup API from one read transaction
(a snapshot): in WAL mode writers go on committing while it copies, and the copy is
the database exactly as it stood when the snapshot began, never a mix. The copy is
written to a temporary file beside ``out``, created 0600 whatever the umask, made a
self-contained file (rollback journal, no ``-wal``), checked, and only then renamed
into place: a file named ``out`` is always a whole, verified copy.

Checked means: ``PRAGMA integrity_check`` passes, the caller's ``kind`` recognises it
(a hub database, an office database) and the counts it takes are the same in the copy
as in the snapshot the copy was made from.

What a side needs to do to its copy (the hub marks it as a backup, so that a hub
restored from it gets a new identity: hub/epoch.py) is the ``mark`` it passes.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared.errors import StoreError

# What a side counts in its database (name -> number), and how it recognises its kind:
# raises StoreError naming what is wrong.
Counter = Callable[[sqlite3.Connection], dict[str, int]]


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """A finished, verified copy."""

    path: Path
    size: int  # bytes
    counts: dict[str, int]
    seconds: float  # how long it took, copy and checks

    def line(self) -> str:
        """One line for people: the copy, its size and what it holds."""
        figures = ", ".join(f"{name} {value}" for name, value in self.counts.items())
        return f"{self.path}: {self.size} bytes, {figures}, verified ({self.seconds:.1f} s)"


def backup(
    source: Path,
    out: Path,
    *,
    count: Counter,
    mark: Callable[[sqlite3.Connection], None] | None = None,
    force: bool = False,
) -> BackupInfo:
    """Copy the database ``source`` to ``out`` while other programs use it; verify it.

    ``count`` recognises the kind of database (StoreError if not) and counts what it
    holds, in the source's snapshot and again in the copy; ``mark`` changes the copy
    before it is checked. ``out`` is replaced only with ``force``.
    """
    started = time.monotonic()
    if not source.is_file():
        raise StoreError(f"{source} does not exist")
    if out.exists() and not force:
        raise StoreError(f"{out} exists; choose another name, or use --force to replace it")
    if out.is_dir():
        raise StoreError(f"{out} is a directory; name the backup file")
    if not out.parent.is_dir():
        raise StoreError(f"cannot write {out}: directory {out.parent} does not exist")
    if out.resolve() == source.resolve():
        raise StoreError(f"{out} is the database itself; name another file")
    temporary = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    try:
        os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise StoreError(f"cannot write in {out.parent}: {exc.strerror or exc}") from None
    try:
        counts = _copy(source, temporary, count, mark)
        os.chmod(temporary, 0o600)
        with open(temporary, "rb") as copied:
            os.fsync(copied.fileno())
        os.replace(temporary, out)
        _sync_directory(out.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return BackupInfo(out, out.stat().st_size, counts, time.monotonic() - started)


def _copy(
    source: Path,
    target: Path,
    count: Counter,
    mark: Callable[[sqlite3.Connection], None] | None,
) -> dict[str, int]:
    """Copy ``source`` into the empty file ``target`` from one snapshot; check it."""
    try:
        src = sqlite3.connect(
            f"{source.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
        )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {source} ({exc})") from None
    try:
        src.execute("PRAGMA busy_timeout = 10000")
        try:
            src.execute("BEGIN")
            counts = count(src)  # recognises the kind too, before anything is copied
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{source} is not a fieldsync database ({exc})") from None
        except StoreError as exc:
            raise StoreError(f"{source} {exc}") from None
        dst = sqlite3.connect(target, isolation_level=None)
        try:
            # Copied from the snapshot opened above (the backup API reads through it).
            src.backup(dst)
            src.execute("COMMIT")
            # One self-contained file: nothing in a -wal beside it.
            dst.execute("PRAGMA journal_mode = DELETE")
            if mark is not None:
                dst.execute("BEGIN IMMEDIATE")
                mark(dst)
                dst.execute("COMMIT")
            _verify(dst, target, counts, count)
        finally:
            dst.close()
    finally:
        src.close()
    return counts


def _verify(conn: sqlite3.Connection, path: Path, counts: dict[str, int], count: Counter) -> None:
    """The copy is sound and holds what the snapshot held (StoreError otherwise)."""
    problems = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
    if problems != ["ok"]:
        raise StoreError(f"the copy failed its integrity check: {problems[0]}")
    found = count(conn)
    if found != counts:
        differ = ", ".join(
            f"{name} {counts.get(name)} in the database, {found.get(name)} in the copy"
            for name in sorted(set(counts) | set(found))
            if counts.get(name) != found.get(name)
        )
        raise StoreError(f"the copy does not hold what the database held: {differ}")


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the system allows)."""
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


def tables(conn: sqlite3.Connection) -> set[str]:
    """The names of the tables of the database of ``conn``."""
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def count_rows(conn: sqlite3.Connection, table: str) -> int:
    """How many rows ``table`` (a name of fieldsync's own, never user input) holds."""
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# Every SQLite connection to a WAL database holds a read lock on this byte of its -shm
# file while it is open (the "dead man switch" of SQLite's unix VFS, UNIX_SHM_DMS).
_SHM_DMS = 128


def in_use(path: Path) -> bool:
    """Whether another program has the WAL database ``path`` open (a serving hub).

    Tried as SQLite itself tells: a write lock on the -shm file's DMS byte is refused
    while any connection has the database open. No -shm file: nobody has. For a
    process with no connection of its own to ``path`` (POSIX locks are per process:
    closing this descriptor would drop that connection's locks), as the CLI is.
    """
    try:
        fd = os.open(f"{path}-shm", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, _SHM_DMS)
        return False
    finally:
        os.close(fd)


def restore(
    source: Path,
    target: Path,
    *,
    count: Counter,
    mark: Callable[[sqlite3.Connection], None] | None = None,
) -> tuple[BackupInfo, Path | None]:
    """Put the backup ``source`` in place as ``target``, which nobody may have open.

    The file replaced is kept beside it as ``TARGET.replaced-<time>`` (with its -wal);
    returns the copy put in place and that file's path (None: there was none).
    """
    if not source.is_file():
        raise StoreError(f"{source} does not exist")
    if target.exists() and in_use(target):
        raise StoreError(f"{target} is in use (is the hub running?); stop it, then restore again")
    aside = None
    if target.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = target.with_name(f"{target.name}.replaced-{stamp}")
        if aside.exists():
            raise StoreError(f"{aside} exists; wait a second and restore again")
        # Checked before anything moves: a bad backup leaves the database as it was.
        _check_file(source, count)
        os.replace(target, aside)
        for suffix in ("-wal", "-journal"):
            if Path(f"{target}{suffix}").exists():
                os.replace(f"{target}{suffix}", f"{aside}{suffix}")
        Path(f"{target}-shm").unlink(missing_ok=True)
    try:
        info = backup(source, target, count=count, mark=mark)
    except BaseException:
        if aside is not None and not target.exists():  # put back as it was
            os.replace(aside, target)
            if Path(f"{aside}-wal").exists():
                os.replace(f"{aside}-wal", f"{target}-wal")
        raise
    return info, aside


def _check_file(path: Path, count: Counter) -> None:
    """``path`` is sound and of the kind ``count`` recognises (StoreError otherwise)."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path} ({exc})") from None
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
        if problems != ["ok"]:
            raise StoreError(f"{path} failed its integrity check: {problems[0]}")
        count(conn)
    except StoreError as exc:
        raise StoreError(f"{path} {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a fieldsync database ({exc})") from None
    finally:
        conn.close()
