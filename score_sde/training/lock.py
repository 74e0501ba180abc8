"""One training run per workdir: an exclusive ``fcntl.flock`` on ``workdir/train.lock`` held for
the run's life.

The lock belongs to the open file, so the operating system releases it when the process ends in
any way, SIGKILL included: a killed run leaves no stale lock. The file itself stays and holds the
last holder's PID and host, which the refusal names. Under ``torchrun`` global rank 0 holds it.
Where the file system has no locks (some network or FUSE mounts), a warning is logged once and the
run goes on unlocked. Readers (``sample``, ``likelihood``, ``eval``) never take it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
#: errors meaning "this file system does not do locks", not "someone holds it"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_warned = False


class WorkdirLockedError(RuntimeError):
    """Another process is training into the workdir."""


class WorkdirLock:
    """The exclusive training lock of ``workdir``: ``acquire()`` / ``release()`` or a context.

    Args:
        workdir: the training workdir (created if missing).
    """

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.path = Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        """Take the lock, or go on unlocked (one warning) where the file system has none.

        Raises:
            WorkdirLockedError: another live process holds it, naming its PID and host.
        """
        if fcntl is None:
            _warn_once(self.path, "fcntl is not available on this system")
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLockedError(
                    f"{self.path.parent} is in use by another training run ({holder}, lock "
                    f"{self.path}); wait for it to end or stop it, or use another --workdir"
                ) from None
            if e.errno in _UNSUPPORTED:
                _warn_once(self.path, e.strerror or str(e))
                return self
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError:  # e.g. a full disk: the lock holds all the same, the refusal says less
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays; closing it releases the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
        return f"PID {int(record['pid'])} on host {record['host']}"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment after the lock
        return "PID and host not yet recorded"


def _warn_once(path: Path, reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("cannot lock %s (%s): the file system does not support locks; going on "
                    "without one, so make sure no other run trains into this workdir",
                    path, reason)
