"""Output locks: two runs writing one output at once would interleave or overwrite each
other's work without a word, so every command that writes holds an exclusive lock on its
output and a second run is refused in one line naming the owner.

The lock of an output ``X`` (a file or a folder) is the file ``X.lock`` beside it: beside, not
inside, because a folder output may be replaced whole (a checkpoint is swapped in by rename,
an empty feature store is removed) and would take a lock inside it along. The file holds its
owner as JSON (pid, host, start time, command line) for the refusal message, and the owner
holds an ``flock`` on it, which the kernel drops however the owner dies. So on the same host
a lock file that nobody holds is stale: it is taken over, with a warning. A lock from another
host is never taken over (an flock taken there says nothing here): the message says to delete
it once that run is over.

Under ``torchrun`` / ``accelerate launch`` the processes of one launch write one output
together: process 0 takes the lock for the launch, the others wait until the lock names their
launch and never take or remove it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; liveness is judged by the pid alone
    fcntl = None  # type: ignore[assignment]

from pairfree.errors import PairfreeError

logger = logging.getLogger(__name__)

JOIN_TIMEOUT = 300.0  # seconds the other processes of a launch wait for process 0's lock
_SETTLE = 5.0  # seconds to look again while a lock changes hands under our eyes
_STARTING = 2.0  # an ownerless lock file younger than this may be one being written


def lock_path(path: str | Path) -> Path:
    """Where the lock of the output ``path`` lives: ``<path>.lock`` beside it, links resolved
    so that two names of one output share one lock."""
    target = Path(path).resolve()
    if not target.name:
        raise PairfreeError(f"cannot lock {path}: give an output below the file system root")
    return target.with_name(target.name + ".lock")


@contextmanager
def output_lock(path: str | Path, *, join_timeout: float = JOIN_TIMEOUT) -> Iterator[Path]:
    """Hold the exclusive lock of the output ``path`` (a file or a folder) for the ``with``
    block, so that no other run writes it meanwhile; yields the lock file's path.

    Another live run's lock is a :class:`PairfreeError` naming ``path``, the owner's pid and
    host; a stale one (its owner died on this host) is taken over with a warning. The lock is
    removed when the block ends, by an exception or an interrupt too.
    """
    lock = lock_path(path)
    launch, rank = _launch()
    if launch is not None and rank != 0:
        _join(path, lock, launch, join_timeout)
        yield lock
        return
    created = _make_folders(lock.parent)
    fd = None
    try:
        fd = _acquire(path, lock, _record(launch))
        yield lock
    finally:
        if fd is not None:
            _release(lock, fd)
        for folder in created:  # a refused or failed run leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break


def _launch() -> tuple[str | None, int]:
    """(id, rank) of this process' multi-process launch; (None, 0) when it runs alone. The
    processes of one launch share the id (their rendezvous address and restart count)."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None, 0
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return None, 0
    keys = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
    return ":".join(os.environ.get(key, "") for key in keys), rank


def _record(launch: str | None) -> bytes:
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:500],
        "launch": launch,
    }
    return (json.dumps(owner) + "\n").encode("utf-8")


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and the folders above it that are missing; returns those it made,
    deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if missing:
        missing[0].mkdir(parents=True, exist_ok=True)
    return missing


def _acquire(output: str | Path, lock: Path, record: bytes) -> int:
    """An open descriptor of ``lock``, created or taken over, holding its flock."""
    deadline = time.monotonic() + _SETTLE
    while True:
        try:
            fd = _create(lock, record)
        except FileNotFoundError:  # another run removed the empty folder it had made
            lock.parent.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as err:
            raise PairfreeError(
                f"cannot lock {output}: cannot create {lock} ({err.strerror})"
            ) from None
        if fd is None:
            fd = _take_over_if_stale(output, lock, record, final=time.monotonic() > deadline)
        if fd is not None:
            return fd
        time.sleep(0.02)  # it changed hands while we looked: look again


def _create(lock: Path, record: bytes) -> int | None:
    """A new lock file, written and locked before it appears under its name (so nobody sees
    it empty); None when there is one already."""
    tmp = lock.with_name(f".{lock.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _try_flock(fd)
        _write(fd, record)
        os.link(tmp, lock)
        return fd
    except FileExistsError:
        os.close(fd)
        return None
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK,
                             errno.EXDEV, errno.ENOSYS):  # fmt: skip
            raise
        return _create_in_place(lock, record)  # a file system without hard links
    finally:
        tmp.unlink(missing_ok=True)


def _create_in_place(lock: Path, record: bytes) -> int | None:
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    _try_flock(fd)
    _write(fd, record)
    return fd


def _take_over_if_stale(
    output: str | Path, lock: Path, record: bytes, *, final: bool
) -> int | None:
    """The descriptor of ``lock`` taken over from an owner that is gone; None to look again
    (it was removed or changed hands meanwhile); a refusal when its owner lives."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    except PermissionError:  # another user's lock: it can be read, not taken over
        fd = os.open(lock, os.O_RDONLY)
    taken = False
    try:
        held = _try_flock(fd)
        owner = _read_owner(fd)
        try:
            if not os.path.samestat(os.fstat(fd), os.stat(lock)):
                return None
        except FileNotFoundError:
            return None
        here = socket.gethostname()
        age = time.time() - os.fstat(fd).st_mtime
        if owner is None:
            # held (its owner is writing its record as it takes it over), or just created:
            # look again until the record is there, and refuse without it at the deadline
            if held is False or age < _STARTING:
                if final:
                    raise _refusal(output, lock, owner)
                return None
            reason = "holds no owner (a crash while it was written)"
        elif owner["host"] != here:
            raise _refusal(output, lock, owner)
        elif held is False:
            if _alive(owner["pid"]) or final:
                raise _refusal(output, lock, owner)
            return None  # its owner is gone and another run is taking it over: look again
        elif held is None and _alive(owner["pid"]):  # no flock here: the pid must tell
            raise _refusal(output, lock, owner)
        else:
            running = _alive(owner["pid"]) and owner["pid"] != os.getpid()
            reason = "no longer holds it" if running else "is no longer running"
        try:
            os.ftruncate(fd, 0)
            _write(fd, record)
        except OSError as err:
            raise PairfreeError(f"{output}: cannot take over the stale lock {lock} "
                                f"({err.strerror}); delete it and rerun") from None  # fmt: skip
        who = "its last owner" if owner is None else _who(owner)
        logger.warning(f"{output}: took over the stale lock {lock} of {who}, which {reason}")
        taken = True
        return fd
    finally:
        if not taken:
            os.close(fd)


def _release(lock: Path, fd: int) -> None:
    """Remove ``lock`` (if it is still ours) while holding it, then let go."""
    try:
        with contextlib.suppress(OSError):  # deleted by hand meanwhile: nothing to remove
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                os.unlink(lock)
    finally:
        os.close(fd)


def _join(output: str | Path, lock: Path, launch: str, timeout: float) -> None:
    """Wait until process 0 of this launch holds ``lock``."""
    deadline = time.monotonic() + timeout
    while True:
        owner = None
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            pass
        else:
            try:
                owner = _read_owner(fd)
            finally:
                os.close(fd)
        if owner is not None and owner.get("launch") == launch:
            return
        if time.monotonic() > deadline:
            held = f"; it is held by {_who(owner)}" if owner else ""
            raise PairfreeError(f"{output}: process 0 of this launch did not take the lock "
                                f"{lock} within {timeout:g} s{held}")  # fmt: skip
        time.sleep(0.05)


def _try_flock(fd: int) -> bool | None:
    """Take the flock of ``fd`` without waiting: True taken, False another holds it, None
    where the file system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP: some network file systems


def _write(fd: int, record: bytes) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, record)
    os.fsync(fd)


def _read_owner(fd: int) -> dict[str, Any] | None:
    """The owner a lock file names; None when it is empty or not one."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        owner = json.loads(os.read(fd, 65536).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (
        not isinstance(owner, dict)
        or not isinstance(owner.get("pid"), int)
        or not isinstance(owner.get("host"), str)
    ):
        return None
    return owner


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (another user's counts)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: cannot tell
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as someone else
        return True
    return True


def _who(owner: dict[str, Any]) -> str:
    since = f" since {owner['started']}" if owner.get("started") else ""
    return f"pid {owner['pid']} on {owner['host']}{since}"


def _refusal(output: str | Path, lock: Path, owner: dict[str, Any] | None) -> PairfreeError:
    """The one line a second run ends with."""
    if owner is None:
        return PairfreeError(f"{output} is being written by another run (its lock {lock} "
                             "names no owner yet); wait for it, or choose another output")  # fmt: skip
    here = socket.gethostname()
    if owner["host"] != here:
        return PairfreeError(
            f"{output} is locked by {_who(owner)} ({lock}); from {here} pairfree cannot tell "
            f"whether that run goes on: if it has ended, delete {lock} and rerun"
        )
    return PairfreeError(f"{output} is being written by another run, {_who(owner)}; wait for "
                         f"it to finish or choose another output (lock: {lock})")  # fmt: skip
