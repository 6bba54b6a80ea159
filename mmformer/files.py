"""Atomic file writes: a temp file in the same folder, fsync, then a rename, so a reader never
sees a half-written file and a killed writer leaves the old content in place."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

# temp names carry the writer's host and pid, so a later writer can tell a killed writer's
# leftovers (same host, process gone) from a live writer's files: ``.NAME.HOST-PID.XXXX.tmp``
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; once the block has written it, fsync it, give
    it ordinary permissions and rename it onto ``path``. On an error the temporary file is removed,
    so ``path`` is always either its old content or the complete new one, never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_readable(path: str | os.PathLike) -> None:
    """Give a ``mkstemp`` file (created 0600) the permissions a plain ``open`` would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove the temp files and folders that killed writers of ``folder/name`` (a glob) left:
    those named by :func:`atomic_path` / :func:`atomic_dir` on this host whose process is gone.
    Returns what was removed."""
    removed = []
    pattern = re.compile(rf"^\.(?P<name>.+)\.{re.escape(_HOST)}-(?P<pid>\d+)\.[^.]+\.(tmp|tmpdir)$")
    try:
        entries = list(Path(folder).glob(f".{name}.{_HOST}-*"))
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m is None or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; once the block has filled it, swap it in
    for ``path`` (an existing folder there is moved aside, then removed). On an error (or a kill)
    ``path`` keeps its old content; a kill between the two renames leaves the old folder at
    ``.NAME.old-HOST-PID``, which the next :func:`atomic_dir` of the same path puts back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_moved_aside(path)
    remove_stale_temps(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmpdir"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        swap_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def swap_dir(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the finished folder ``new`` at ``path``: what is there is moved aside
    (``.NAME.old-HOST-PID``), ``new`` renamed onto ``path``, then the old one removed."""
    new, path = Path(new), Path(path)
    old = path.parent / f".{path.name}.old-{_HOST}-{os.getpid()}"
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(new, path)
    if old.exists() or old.is_symlink():
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def restore_moved_aside(path: str | os.PathLike) -> None:
    """Undo the half of an :func:`atomic_dir` swap that a kill interrupted: put a folder that
    was moved aside back when ``path`` is missing, else remove it (the new one is in place)."""
    path = Path(path)
    for old in path.parent.glob(f".{path.name}.old-{_HOST}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        if not path.exists():
            os.replace(old, path)
        else:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def read_utf8_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); a byte that is not UTF-8 is a
    ``ValueError`` naming the file, the line and the byte offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: line {line} is not UTF-8 (byte {data[e.start : e.start + 1]!r} at offset "
            f"{e.start}); save the file as UTF-8"
        ) from None


def read_utf8_lines(path: str | os.PathLike) -> list[str]:
    """:func:`read_utf8_text` split into lines."""
    return read_utf8_text(path).splitlines()
