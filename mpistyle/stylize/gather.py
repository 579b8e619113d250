"""Gather without frames: rank 0 follows every rank's progress and commits; frames stay where they are.

Each rank writes its own frames into the buffer (``store.py``) and sends rank 0 small progress notes
(network frames, frames handed to the store, committed frames per run) at most every
``PROGRESS_EVERY_S``, and a final note with ``TAG_FIN``. Rank 0's :class:`Sink` thread merges them into
the done mask, drives the progress bar, answers the dynamic scheduler, and, only with ``--encode rank0``
(one encoder, in frame order), reads committed frames back from the ranks' part files and feeds them to
the encoder. No frame data is sent to rank 0 in either mode.
"""

from __future__ import annotations

import logging
import pickle
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MpistyleError
from ..partition import Plan
from .comm import TAG_FIN, TAG_PROG, Messenger, ReportingThread, mpi_any_source, mpi_status
from .options import Setup
from .scatter import Scheduler

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5


@dataclass
class Progress:
    """One rank's progress: network frames, frames fused and handed to the store, committed runs."""

    network: int = 0
    emitted: int = 0
    committed: dict[int, int] = field(default_factory=dict)  # run start -> committed up to

    def as_message(self) -> tuple[int, int, dict[int, int]]:
        return self.network, self.emitted, self.committed


class ProgressSender:
    """Ranks > 0: send a progress note to rank 0 when it changed, at most every ``PROGRESS_EVERY_S``."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.last = 0.0
        self.sent: tuple[int, int, dict[int, int]] | None = None
        self.reqs: list[Any] = []

    def maybe_send(self, progress: Callable[[], Progress], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_EVERY_S:
            return
        msg = progress().as_message()
        self.reqs = [r for r in self.reqs if not r.Test()]
        if msg != self.sent and len(self.reqs) < 4:  # never pile up notes behind a busy rank 0
            self.reqs.append(self.comm.isend(msg, dest=0, tag=TAG_PROG))
            self.sent = msg
        self.last = now

    def finish(self) -> None:
        from ..mpi import poll_until

        for req in self.reqs:
            poll_until(req.Test)
        self.reqs = []


class Sink(ReportingThread):
    """Rank 0: follow progress and commits, answer the scheduler, encode in order (``--encode rank0``)."""

    def __init__(self, comm: Any, buffer: Any, encoder: Any, setup: Setup, plan: Plan, msgr: Messenger,
                 progress: bool) -> None:
        super().__init__(name="mpistyle-sink", daemon=True)
        self.comm, self.buffer, self.encoder, self.setup, self.msgr = comm, buffer, encoder, setup, msgr
        self.plan = plan
        self.local: Callable[[], Progress] = Progress  # rank 0's own worker (set by run.py)
        self.local_done = threading.Event()
        self.done = np.array(setup.done, dtype=bool)  # committed frames, as reported
        self.encoded = 0
        self.n_todo = plan.n_todo
        self.show_progress = progress
        self.recv_bytes = 0
        self.encode_s = 0.0
        self.scheduler: Scheduler | None = None
        self.failed = False
        self.encode_error = ""
        self.encode_failure: MpistyleError | None = None  # its exit status too (74: the output disk)
        self.by_rank: dict[int, Progress] = {}

    def _run(self) -> None:
        size = self.comm.Get_size()
        fins: set[int] = set()
        last_update = 0.0
        bar = ProgressReporter(total=self.setup.n_frames, initial=int(self.setup.done.sum()),
                               n_todo=self.n_todo, enabled=self.show_progress)
        try:
            while True:
                busy = False
                while size > 1 and self.comm.iprobe(source=mpi_any_source(), tag=TAG_PROG):
                    self._receive(TAG_PROG)
                    busy = True
                while size > 1 and self.comm.iprobe(source=mpi_any_source(), tag=TAG_FIN):
                    fins.add(self._receive(TAG_FIN))
                    busy = True
                if self.scheduler is not None and size > 1:
                    busy = self.scheduler.serve(self.comm) or busy
                finished = self.local_done.is_set() and len(fins) == size - 1
                if finished or time.monotonic() - last_update > 0.25:
                    self.by_rank[0] = self.local()
                    self._merge()
                    self._encode_ready()
                    bar.update(self._network(), int(self.done.sum()) - bar.initial)
                    last_update = time.monotonic()
                if finished:
                    break
                if not busy:
                    time.sleep(0.002)
        finally:
            bar.close()

    def _receive(self, tag: int) -> int:
        status = mpi_status()
        msg = self.comm.recv(source=mpi_any_source(), tag=tag, status=status)
        self.recv_bytes += len(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        source = status.Get_source()
        network, emitted, committed = msg
        self.by_rank[source] = Progress(network, emitted, committed)
        return source

    def _merge(self) -> None:
        for progress in self.by_rank.values():
            for start, upto in progress.committed.items():
                self.done[start:upto] = True

    def _network(self) -> int:
        return sum(p.network for p in self.by_rank.values())

    def _encode_ready(self) -> None:
        """``--encode rank0``: feed the encoder every committed frame that is next in order."""
        if self.encoder is None or self.failed:
            return
        start = time.perf_counter()
        try:
            while self.encoded < len(self.done) and self.done[self.encoded]:
                self.encoder.write(self.buffer.read(self.encoded))
                self.encoded += 1
        except MpistyleError as exc:
            # The output failed (e.g. its disk is full) but the buffer is fine: keep stylizing into
            # the buffer and report at the end, so a rerun only has to encode.
            self.encode_error = str(exc)
            self.encode_failure = exc
            self.encoder.abort()
            self.encoder = None
        self.encode_s += time.perf_counter() - start

    def finish_encoding(self) -> None:
        """After the run: frames done before it (a resume) or committed last still need encoding."""
        self.done |= self.buffer.done
        self._encode_ready()


class ProgressReporter:
    """tqdm on a terminal; plain periodic log lines otherwise (SLURM logs).

    The bar counts committed frames (safe in the buffer); beside it, the frames the network has already
    stylized on every rank, so a run whose commits lag behind its work does not look stalled.
    """

    def __init__(self, total: int, initial: int, enabled: bool, n_todo: int | None = None,
                 every_s: float = 10.0) -> None:
        self.total, self.initial, self.enabled, self.every_s = total, initial, enabled, every_s
        self.n_todo = total - initial if n_todo is None else n_todo
        self.start = time.monotonic()
        self.last_line = self.start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="frame", desc="stylize", dynamic_ncols=True)

    def update(self, network: int, committed: int) -> None:
        """``network``: frames the network stylized in this run; ``committed``: frames committed in it."""
        if not self.enabled:
            return
        done = self.initial + committed
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(f"stylized {min(network, self.n_todo)}/{self.n_todo}", refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last_line >= self.every_s or done == self.total:
            # The rate and ETA follow whichever is further, commits or the network: commits can lag the
            # network for a whole fusion chain (its warm-up), and an ETA of "inf" then says nothing.
            progress = max(committed, min(network, self.n_todo))
            rate = progress / max(now - self.start, 1e-9)
            eta = (self.n_todo - progress) / rate if rate > 0 else float("inf")
            logger.info("stylized %d/%d frames of this run, %d/%d frames committed (%.0f%%), %.2f frames/s, "
                        "ETA %s", min(network, self.n_todo), self.n_todo, done, self.total,
                        100.0 * done / max(self.total, 1), rate, "unknown" if rate == 0 else f"{eta:.0f} s")
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
