"""Atomic file writes: the one implementation behind checkpoints, samples, configs and records,
and the one-line error a failed write (e.g. a full disk) ends a run with."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import sys
from pathlib import Path


class WriteError(OSError):
    """An output could not be written (e.g. no space left on device). ``str()`` is one line
    naming what, where and why; ``errno`` is the underlying error's."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the message alone, not "[Errno 28] ..."


def write_error(error: OSError, path: str | os.PathLike, what: str = "", *,
                kept: str | None = None, hint: str = "Free space and run again.") -> WriteError:
    """The :class:`WriteError` for ``error`` while writing ``what`` to ``path``.

    Args:
        error: the ``OSError`` raised by the write.
        what: what the file is (``the checkpoint of step 4``); default: just the path.
        kept: what is left on disk; default: the previous file at ``path`` if there is one.
        hint: what to do next.
    """
    reason = error.strerror or str(error)  # "No space left on device" for ENOSPC
    if kept is None:
        kept = f"the previous {path} is intact" if Path(path).is_file() else "nothing was written"
    target = f"{what} to {path}" if what else str(path)
    return WriteError(error.errno, f"cannot write {target}: {reason}; {kept}. {hint}".rstrip())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, what: str | None = None,
                       hint: str = "Free space and run again.") -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsync, ``os.replace``,
    then fsync of the directory so the rename is durable.

    Readers see the old file or the new one, never a partial write; a failure (e.g. a full disk)
    leaves the old file and no temporary file. The file is created with mode 0o666 minus the
    umask, like ``open(path, 'wb')`` (``tempfile.mkstemp`` would make it private).

    Args:
        what: what the file is, for the error message (default: just the path).
        hint: the error message's advice.
    Raises:
        WriteError: the file could not be written (``errno`` kept, e.g. ENOSPC), with the one-line
            message of :func:`write_error`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise write_error(e, path, what or "", hint=hint) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_error(e, path, what or "", hint=hint) from e
        raise
    try:  # make the rename durable; some file systems cannot fsync a directory (EINVAL)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise write_error(e, path, what or "", kept="the new file is in place",
                              hint=hint) from e


class LogFileHandler(logging.FileHandler):
    """A run's log file (``workdir/stdout.txt``), appended line by line.

    Where a line cannot be written (e.g. no space left on device), ``logging`` would print a
    traceback for it and for every later line; this handler instead says so once, in one line on
    stderr (naming the file and the reason, as :func:`write_error`), and stops writing the file.
    The run goes on, logging to the terminal: its outputs (checkpoints, samples, records) are
    written atomically and end it with their own one-line error if the disk is still full.
    """

    def __init__(self, filename: str | os.PathLike) -> None:
        super().__init__(filename)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self.failed = True
        message = write_error(error, self.baseFilename, "the log",
                              kept="later log lines go to the terminal only", hint="")
        sys.stderr.write(f"{message}\n")

