"""TensorBoard scalars, appended synchronously so that a write error ends the run with one line.

``torch.utils.tensorboard.SummaryWriter`` appends from a background thread; an ``OSError`` there
(a full disk) is printed as a thread traceback and re-raised, raw, at some later call.
:class:`EventLog` appends the same records (TensorBoard's ``RecordWriter`` framing of ``Event``
protos) from the training thread and turns a failed write into a :class:`utils.WriteError` with
the one-line message of a failed checkpoint. A few scalars every ``log_freq`` steps make the
synchronous flush cheap.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

from score_sde.utils import WriteError, write_error

_COUNTER = itertools.count()


class EventLog:
    """Scalars for TensorBoard, appended to a new event file in ``folder``.

    Raises (from any method):
        utils.WriteError: the event file could not be written, naming it and the reason.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event = Event
        self.path = Path(folder) / (f"events.out.tfevents.{int(time.time()):010d}."
                                    f"{socket.gethostname()}.{os.getpid()}.{next(_COUNTER)}")
        self._file = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
        except OSError as e:
            raise self._error(e) from e
        self._records = RecordWriter(self._file)
        self._append(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _error(self, error: OSError) -> WriteError:
        return write_error(error, self.path, "the TensorBoard events",
                           kept="the checkpoints are intact",
                           hint="Free space and run again to resume.")

    def _append(self, event) -> None:
        try:
            self._records.write(event.SerializeToString())
            self._file.flush()
        except OSError as e:
            raise self._error(e) from e

    def add_scalar(self, name: str, value: float, step: int) -> None:
        """Append scalar ``name`` = ``value`` at ``step``."""
        from torch.utils.tensorboard.summary import scalar

        self._append(self._event(wall_time=time.time(), step=int(step),
                                 summary=scalar(name, float(value))))

    def close(self) -> None:
        """Close the event file (everything was flushed when written)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # nothing is buffered: every event was flushed
            self._file = None
