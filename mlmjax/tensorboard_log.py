"""TensorBoard scalars beside ``metrics.jsonl``: written with tensorboardX (no TensorFlow), read back
without TensorBoard.

Each session of a run (the first, and each resume) writes its own event file into
``WORKDIR/tensorboard/``. A resumed session re-runs the steps after its checkpoint, for which the
earlier files may already hold points (a run killed between two saves). Event files are append-only
and are never rewritten here; instead each session's file opens with a ``SessionLog.START`` at the
first step it runs (tensorboardX's ``purge_step``), and TensorBoard drops every point that earlier
files hold from that step on: the rows that ``metrics.jsonl`` drops on resume. RustBoard
(TensorBoard's fast loader) ignores START but drops a tag's points at or after a step when a point
for that step arrives, which gives the same series unless ``log_every`` changed on resume.
:func:`read_scalars` applies both rules.

TensorBoard reads a run's files in name order, so the names sort in the order the sessions started.
``metrics.jsonl``, flushed every row, stays the record: the event file is flushed every
:data:`FLUSH_SECONDS`, so a SIGKILL may cost TensorBoard the last few seconds of points.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Any, Iterator, Mapping

DIRECTORY = "tensorboard"
FLUSH_SECONDS = 5


class ScalarWriter:
    """Writes metrics rows as scalars (tag: the metric's name, step: the row's ``step``) into a new
    event file in ``WORKDIR/tensorboard/``, for a session whose first row can be ``first_step``.

    Raises ``ModuleNotFoundError`` without tensorboardX. Use as a context manager, or ``close()``.
    """

    def __init__(self, workdir: str, first_step: int):
        # Imported here: tensorboardX imports torch when torch is installed, seconds that only a
        # writer should pay.
        from tensorboardX import SummaryWriter

        # tensorboardX names the file events.out.tfevents.<seconds>.<host><suffix>: a nanosecond
        # suffix keeps two sessions started within one second apart, and in order.
        self._writer = SummaryWriter(os.path.join(workdir, DIRECTORY), purge_step=first_step,
                                     flush_secs=FLUSH_SECONDS, filename_suffix=f".{time.time_ns()}")

    def write(self, row: Mapping[str, float]) -> None:
        step = int(row["step"])
        for name, value in row.items():
            if name != "step":
                self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def event_files(logdir: str) -> list[str]:
    """The event files in ``logdir`` in the order TensorBoard reads them: by name."""
    if not os.path.isdir(logdir):
        return []
    return sorted(os.path.join(logdir, name) for name in os.listdir(logdir) if ".tfevents." in name)


def read_events(path: str) -> Iterator[Any]:
    """The ``Event`` protos of one event file.

    The file is TFRecord-framed: per record a little-endian uint64 length, the masked CRC32C of
    those 8 bytes, the data, and the data's masked CRC32C. Reading stops at the first incomplete
    or corrupt record, like TensorBoard's: the tail of a file still being written or cut off by a kill.
    """
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset + 12 <= len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        end = offset + 12 + length + 4
        if end > len(data) or struct.unpack_from("<I", data, offset + 8)[0] != masked_crc32c(header):
            return
        record = data[offset + 12:end - 4]
        if struct.unpack_from("<I", data, end - 4)[0] != masked_crc32c(record):
            return
        yield event_pb2.Event.FromString(record)
        offset = end


def _drop_from(points: list[tuple[int, float]], step: int) -> None:
    """Drops the points at ``step`` and after; ``points`` is in increasing step order."""
    while points and points[-1][0] >= step:
        points.pop()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``logdir`` as TensorBoard shows it: ``{tag: [(step, value), ...]}``.

    Files are read in name order. A ``SessionLog.START`` at step s drops every point at steps >= s
    (TensorBoard's rule, what ``purge_step`` writes); a point at step s drops the points of its tag
    at steps >= s (RustBoard's). Each series comes out in increasing step order, one point a step.
    """
    from tensorboardX.proto import event_pb2

    series: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(logdir):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for points in series.values():
                    _drop_from(points, event.step)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    points = series.setdefault(value.tag, [])
                    _drop_from(points, event.step)
                    points.append((event.step, value.simple_value))
    return series
