"""Outputs replaced whole: one writer per output (a lock), a staging directory swapped in when complete.

A stage writes each output directory that a later stage reads (prepared data, the CAM store, pseudo labels, model
directories) through :func:`replaced_dir`: the files go into a hidden staging directory beside the destination,
and only when the stage finishes is it exchanged with the destination in one ``rename`` (``renameat2`` with
``RENAME_EXCHANGE`` where the file system has it, else two renames that the next run completes). A killed run
therefore leaves either the old complete output or the new complete one, never a mix; its leftovers
(``.<name>.staging-<pid>-*``, ``.<name>.tmp-<pid>-*``) are removed by the next run once their process is dead.

:func:`output_lock` holds ``.<name>.lock`` (an ``flock`` the kernel releases when the holder dies, with the
holder's pid inside for the message), so a second run on the same output stops with one line instead of
interleaving its files.

Files and directories are ``fsync``-ed before they are renamed into place, so the guarantee holds after a power
loss too, as far as the file system honours ``fsync``.

``WSSS_FAULT_KILL_AT=N`` makes the process SIGKILL itself just before its N-th commit (a rename into place): the
fault-injection tests (tests/test_fault_injection.py) use it to stop a stage at chosen commits.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.errors import UserError

FAULT_ENV = "WSSS_FAULT_KILL_AT"
FAULT_LOG_ENV = "WSSS_FAULT_LOG"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>staging|old|tmp)-(?P<pid>\d+)-[0-9a-f]+(?:\..*)?")
_MAIN_PID = os.getpid()
_held: dict[Path, int] = {}
_commits = 0


class OutputBusyError(UserError, RuntimeError):
    """Another live run is writing the same output."""


def commit_point(target: Path) -> None:
    """Count one commit (a rename onto ``target``) for the fault-injection hooks.

    Only the process that imported this module counts (not its forked workers). ``WSSS_FAULT_KILL_AT=N``
    SIGKILLs it just before its N-th commit; ``WSSS_FAULT_LOG=<file>`` appends
    each commit's target to a file (how a test finds the commit it wants to interrupt).
    """
    global _commits
    if os.getpid() != _MAIN_PID:  # forked pool workers: only the stage's own process counts (and is killed)
        return
    _commits += 1
    if os.environ.get(FAULT_LOG_ENV):
        with open(os.environ[FAULT_LOG_ENV], "a") as log:
            log.write(f"{target}\n")
    if os.environ.get(FAULT_ENV) == str(_commits):
        os.kill(os.getpid(), signal.SIGKILL)


def sibling(dest: Path, kind: str, suffix: str = "") -> Path:
    """A hidden, unique path beside ``dest`` named after it, this process and ``kind`` (``staging``, ``tmp``...)."""
    return dest.parent / f".{dest.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def fsync_path(path: Path) -> None:
    """``fsync`` a file or a directory (its entries), so a rename that follows survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(dest: Path) -> None:
    """Remove what killed runs left beside ``dest`` (staging dirs, temporaries); finish an interrupted swap.

    Only entries named after ``dest`` whose process is dead are touched.
    """
    if not dest.parent.is_dir():
        return
    for entry in os.scandir(dest.parent):
        match = _LEFTOVER.fullmatch(entry.name)
        if not match or match["name"] != dest.name or _alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        if match["kind"] == "old" and not dest.exists():
            os.rename(path, dest)  # killed between the two renames of a swap: the old output comes back
        elif entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _acquire(lock_path: Path, dest: Path) -> int:
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusyError(
                f"{dest} is being written by another run (pid {holder}); wait for it to finish or stop it, "
                "then run again"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        os.close(fd)  # the previous holder removed this file while we waited for it: lock the new one


@contextlib.contextmanager
def output_lock(dest: Path | str) -> Iterator[None]:
    """Hold ``dest``'s lock for the block (re-entrant within a process).

    Args:
        dest: The output (file or directory) this run is about to write.

    Raises:
        OutputBusyError: If another live process holds it (one line with its pid).
    """
    key = Path(os.path.abspath(dest))
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    key.parent.mkdir(parents=True, exist_ok=True)
    lock_path = key.parent / f".{key.name}.lock"
    fd = _acquire(lock_path, Path(dest))
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        lock_path.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def claimed(outputs: Iterable[Path | str]) -> Iterator[None]:
    """Hold the lock of every output for the block; on the main process only under ``torchrun`` (``RANK``)."""
    with contextlib.ExitStack() as stack:
        if int(os.environ.get("RANK", "0")) == 0:
            for path in outputs:
                stack.enter_context(output_lock(path))
        yield


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with ``renameat2(RENAME_EXCHANGE)``; ``False`` where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, _files in os.walk(root):
        fsync_path(Path(folder))


def swap_in(staging: Path, dest: Path) -> None:
    """Put the complete directory ``staging`` at ``dest``; the old ``dest`` (if any) ends up at ``staging``."""
    commit_point(dest)
    if not dest.exists():
        os.rename(staging, dest)
    elif not _exchange(staging, dest):
        old = sibling(dest, "old")
        os.rename(dest, old)
        commit_point(dest)
        os.rename(staging, dest)
        os.rename(old, staging)
    fsync_path(dest.parent)


@contextlib.contextmanager
def replaced_dir(dest: Path | str) -> Iterator[Path]:
    """Yield an empty staging directory beside ``dest``; it replaces ``dest`` whole if the block succeeds.

    The lock on ``dest`` is held for the block; leftovers of killed runs are removed first. On an exception the
    staging directory is removed and ``dest`` keeps its old content.

    Args:
        dest: The output directory.

    Yields:
        The staging directory to write into (same parent as ``dest``, so relative paths stay valid).
    """
    dest = Path(dest)
    with output_lock(dest):
        remove_leftovers(dest)
        staging = sibling(dest, "staging")
        staging.mkdir()
        try:
            yield staging
            _fsync_tree(staging)
            swap_in(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
