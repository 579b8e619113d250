"""Store: every rank writes the frames it computes into its own part files of the HDF5 buffer.

A thread per rank (so HDF5 writes and fsyncs overlap the network and the fusion) takes finished frames
from a bounded queue, writes them into the part file of their run (``buffer.PartWriter``) and commits
done flags every ``COMMIT_EVERY_S`` after a flush and fsync. What is committed is reported as one
number per run: frames of a run are emitted and committed in order, so the committed frames of the run
starting at ``s`` are always ``[s, upto)``. Rank 0 learns these through small progress messages: no
frame data goes to rank 0.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np

from ..buffer import MpioWriter, PartWriter
from .comm import Messenger, ReportingThread, Stopped

COMMIT_EVERY_S = 0.25


class FrameStore(ReportingThread):
    """One rank's buffer writer. ``begin_run`` before a run's frames, ``put`` each frame in order."""

    def __init__(self, buffer_path: str, height: int, width: int, digest: str, msgr: Messenger,
                 parallel: Any = None) -> None:
        super().__init__(name="mpistyle-store", daemon=True)
        self.buffer_path, self.height, self.width, self.digest = buffer_path, height, width, digest
        self.parallel = parallel  # mpio layout: the job's collective h5py handle (else one part per run)
        self.msgr = msgr
        self._queue: queue.Queue[tuple[str, int, Any] | None] = queue.Queue(maxsize=8)
        self._lock = threading.Lock()
        self._committed: dict[int, int] = {}  # run start -> committed up to (exclusive)
        self.write_s = 0.0
        self.frames_written = 0
        self.closed = threading.Event()

    # -- the rank's main thread -------------------------------------------------------------------
    def begin_run(self, start: int, stop: int) -> None:
        self._put(("run", start, stop))

    def put(self, t: int, frame: np.ndarray) -> None:
        self._put(("frame", t, np.ascontiguousarray(frame)))

    def _put(self, item: tuple[str, int, Any]) -> None:
        while True:
            if not self.is_alive():
                raise Stopped()  # the store failed: its error is already on its way to every rank
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                if self.msgr.interrupted():
                    raise Stopped() from None

    def committed(self) -> dict[int, int]:
        """Run start -> committed up to, for every run begun (a copy; thread-safe)."""
        with self._lock:
            return dict(self._committed)

    def n_committed(self) -> int:
        with self._lock:
            return sum(upto - start for start, upto in self._committed.items())

    def close(self) -> None:
        """Commit everything queued and wait for the thread (also after a stop: nothing computed is lost)."""
        if self.is_alive():
            while self.is_alive():
                try:
                    self._queue.put(None, timeout=0.05)
                    break
                except queue.Full:
                    continue
            self.join()

    # -- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        writer: PartWriter | MpioWriter | None = None
        run_start = -1
        last_commit = time.monotonic()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=COMMIT_EVERY_S)
                except queue.Empty:
                    item = ("tick", 0, None)
                if item is None:
                    break
                kind, a, b = item
                start = time.perf_counter()
                if kind == "run":
                    if writer is not None:
                        self._commit(writer, run_start)
                    if self.parallel is not None:
                        writer = writer or MpioWriter(self.parallel, self.buffer_path)
                    else:
                        if writer is not None:
                            writer.close()
                        writer = PartWriter(self.buffer_path, a, b, self.height, self.width, self.digest)
                    run_start = a
                    with self._lock:
                        self._committed.setdefault(a, a)
                elif kind == "frame":
                    assert writer is not None, "frame before its run"
                    writer.write(a, b)
                    self.frames_written += 1
                if writer is not None and time.monotonic() - last_commit >= COMMIT_EVERY_S:
                    self._commit(writer, run_start)
                    last_commit = time.monotonic()
                self.write_s += time.perf_counter() - start
            if writer is not None:
                self._commit(writer, run_start)
        finally:
            if writer is not None:
                writer.close()
            self.closed.set()

    def _commit(self, writer: PartWriter | MpioWriter, run_start: int) -> None:
        new = writer.commit()
        if new:
            with self._lock:
                self._committed[run_start] = max(self._committed.get(run_start, run_start), max(new) + 1)
