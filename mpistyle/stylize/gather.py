"""Gather: rank 0's sink receives finished frames, writes the HDF5 buffer, commits, encodes in order."""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from typing import Any

import numpy as np

from ..errors import MpistyleError
from ..partition import Plan
from .comm import TAG_FIN, TAG_OUT, Messenger, ReportingThread, mpi_any_source, mpi_status
from .options import Setup
from .scatter import Scheduler

logger = logging.getLogger(__name__)


class Sink(ReportingThread):
    """Rank 0: receive finished frames, write the buffer, commit, encode in order, show progress."""

    def __init__(self, comm: Any, buffer: Any, encoder: Any, setup: Setup, plan: Plan, msgr: Messenger,
                 progress: bool) -> None:
        super().__init__(name="mpistyle-sink", daemon=True)
        self.comm, self.buffer, self.encoder, self.setup, self.msgr = comm, buffer, encoder, setup, msgr
        self.local: queue.Queue[tuple[int, np.ndarray]] = queue.Queue(maxsize=8)
        self.local_done = threading.Event()
        self.written = 0
        self.encoded = 0
        self.n_todo = plan.n_todo
        self.show_progress = progress
        self.write_s = 0.0
        self.encode_s = 0.0
        self.scheduler: Scheduler | None = None
        self.failed = False
        self.encode_error = ""

    def _run(self) -> None:
        size = self.comm.Get_size()
        fbytes = self.setup.width * self.setup.height * 3
        shape = (self.setup.height, self.setup.width, 3)
        posted = []
        if size > 1:
            for _ in range(4):
                buf = np.empty(8 + fbytes, dtype=np.uint8)
                posted.append([self.comm.Irecv(buf, source=mpi_any_source(), tag=TAG_OUT), buf])
        fins: dict[int, int] = {}
        received = 0
        last_commit = time.monotonic()
        bar = ProgressReporter(total=self.setup.n_frames, initial=int(self.setup.done.sum()),
                               enabled=self.show_progress)
        try:
            while True:
                busy = False
                for item in posted:
                    if item[0].Test():
                        buf = item[1]
                        index = int(buf[:8].view(np.int64)[0])
                        self._write(index, buf[8:].reshape(shape))
                        received += 1
                        item[0] = self.comm.Irecv(buf, source=mpi_any_source(), tag=TAG_OUT)
                        busy = True
                while True:
                    try:
                        index, frame = self.local.get_nowait()
                    except queue.Empty:
                        break
                    self._write(index, frame)
                    busy = True
                if self.scheduler is not None and size > 1:
                    busy = self.scheduler.serve(self.comm) or busy
                while size > 1 and self.comm.iprobe(source=mpi_any_source(), tag=TAG_FIN):
                    status = mpi_status()
                    count = self.comm.recv(source=mpi_any_source(), tag=TAG_FIN, status=status)
                    fins[status.Get_source()] = count
                finished = (self.local_done.is_set() and self.local.empty() and len(fins) == size - 1
                            and received == sum(fins.values()))
                if finished or time.monotonic() - last_commit > 0.25:
                    self._commit()
                    bar.update(self.written)
                    last_commit = time.monotonic()
                if finished:
                    break
                if not busy:
                    time.sleep(0.002)
        finally:
            for req, _ in posted:
                req.Cancel()
                req.Wait()
            bar.close()

    def _write(self, index: int, frame: np.ndarray) -> None:
        if self.failed:  # keep receiving so no sender blocks; the frame is recomputed on rerun
            return
        start = time.perf_counter()
        try:
            self.buffer.write(index, frame)
        except MpistyleError as exc:
            self._fail(exc)
            return
        self.written += 1
        self.write_s += time.perf_counter() - start

    def _fail(self, exc: MpistyleError) -> None:
        self.failed = True
        self.msgr.fail(str(exc), exc.exit_code)
        if self.encoder is not None:
            self.encoder.abort()
            self.encoder = None

    def _commit(self) -> None:
        if self.failed:
            return
        start = time.perf_counter()
        try:
            self.buffer.commit()
        except MpistyleError as exc:
            self._fail(exc)
            return
        self.write_s += time.perf_counter() - start
        if self.encoder is None:
            return
        start = time.perf_counter()
        done = self.buffer.done
        try:
            while self.encoded < len(done) and done[self.encoded]:
                self.encoder.write(self.buffer.read(self.encoded))
                self.encoded += 1
        except MpistyleError as exc:
            # The output failed (e.g. its disk is full) but the buffer is fine: keep stylizing into
            # the buffer and report at the end, so a rerun only has to encode.
            self.encode_error = str(exc)
            self.encoder.abort()
            self.encoder = None
        self.encode_s += time.perf_counter() - start


class ProgressReporter:
    """tqdm on a terminal; plain periodic log lines otherwise (SLURM logs)."""

    def __init__(self, total: int, initial: int, enabled: bool, every_s: float = 10.0) -> None:
        self.total, self.initial, self.enabled, self.every_s = total, initial, enabled, every_s
        self.start = time.monotonic()
        self.last_line = self.start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="frame", desc="stylize", dynamic_ncols=True)

    def update(self, written: int) -> None:
        if not self.enabled:
            return
        done = self.initial + written
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last_line >= self.every_s or done == self.total:
            rate = written / max(now - self.start, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            logger.info("stylized %d/%d frames (%.0f%%), %.2f frames/s, ETA %.0f s",
                        done, self.total, 100.0 * done / max(self.total, 1), rate, eta)
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
