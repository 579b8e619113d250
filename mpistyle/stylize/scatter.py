"""Scatter: each rank's source frames into its spool. With ``--decode rank0`` rank 0 decodes the video
once and streams each rank the frames it needs; with ``each`` (what ``--decode auto`` picks on several
ranks with the static schedule, where the input seeks) every rank decodes its own.

- :class:`Decoder` (rank 0, a thread): decode in order, ``Isend`` bounded chunks per destination.
- :class:`Receiver` (ranks > 0, a thread): receive chunks into the rank's :class:`SourceSpool`.
- :class:`SourceSpool`: a rank's source frames in an unlinked scratch file (memory stays bounded).
- :class:`Scheduler` (dynamic schedule, rank 0): hands out contiguous chunks to whoever asks.
- :class:`LocalDecoder` (``--decode each``, every rank): decode only the rank's own frames, with a seek.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import MpistyleError
from ..mpi import poll_until
from ..partition import Plan, runs_of
from .comm import TAG_GIVE, TAG_REQ, TAG_SRC, Messenger, ReportingThread, Stopped, mpi_any_source, mpi_status
from .options import chunk_list
from .spool import spool_write


class SourceSpool:
    """A rank's source frames, in arrival order, in an unlinked scratch file (bounded memory)."""

    def __init__(self, frames: Sequence[int], shape: tuple[int, int, int], scratch: str | None,
                 interrupted: Any) -> None:
        self.slot = {t: i for i, t in enumerate(frames)}
        self.scratch = scratch
        self._next_slot = len(self.slot)
        self.shape = shape
        self.nbytes = int(np.prod(shape))
        self._file = tempfile.TemporaryFile(dir=scratch, prefix="mpistyle-spool-")
        self._count = 0
        self._cond = threading.Condition()
        self._interrupted = interrupted

    def extend(self, frames: Sequence[int]) -> None:
        """Expect more frames (dynamic schedule: the next chunk). A frame seen before (the halo
        overlap of consecutive chunks) maps to its new copy; both hold the same pixels."""
        with self._cond:
            base = self._next_slot
            for i, t in enumerate(frames):
                self.slot.setdefault(t, base + i)  # an earlier copy is already here: keep using it
            self._next_slot = base + len(frames)

    def append(self, frames: np.ndarray) -> None:
        data = np.ascontiguousarray(frames).tobytes()
        spool_write(self._file.fileno(), data, self._count * self.nbytes, self.scratch)
        with self._cond:
            self._count += len(data) // self.nbytes
            self._cond.notify_all()

    @property
    def arrived(self) -> int:
        """Frames in the spool so far."""
        return self._count

    def get(self, t: int) -> np.ndarray:
        slot = self.slot[t]
        if self._count <= slot:
            with self._cond:
                while self._count <= slot:
                    self._cond.wait(0.005)
                    if self._count <= slot and self._interrupted():
                        raise Stopped()
        data = os.pread(self._file.fileno(), self.nbytes, slot * self.nbytes)
        return np.frombuffer(data, dtype=np.uint8).reshape(self.shape)

    def close(self) -> None:
        self._file.close()


class Receiver(ReportingThread):
    """Ranks > 0: receive scatter chunks from rank 0 into the spool (two receives in flight)."""

    def __init__(self, comm: Any, chunks: list[list[int]], spool: SourceSpool, msgr: Messenger,
                 dynamic: bool = False, chunk: int = 8) -> None:
        super().__init__(name="mpistyle-receiver", daemon=True)
        self.comm, self.chunks, self.spool, self.msgr = comm, chunks, spool, msgr
        self.cancel = threading.Event()
        self.dynamic, self.chunk = dynamic, chunk
        self.assigned: queue.Queue[list[int]] = queue.Queue()  # dynamic: source frames of each new chunk
        self.recv_bytes = 0

    def _run(self) -> None:
        if not self.dynamic:
            self._receive(self.chunks)
            return
        while not self.cancel.is_set():  # dynamic: one assigned chunk after another
            try:
                frames = self.assigned.get(timeout=0.01)
            except queue.Empty:
                continue
            self._receive(chunk_list(frames, self.chunk))

    def _receive(self, chunks: list[list[int]]) -> None:
        self.chunks = chunks
        cap = max((len(c) for c in self.chunks), default=0) * self.spool.nbytes
        buffers = [np.empty(cap, dtype=np.uint8) for _ in range(2)]
        posted: list[tuple[Any, int, int]] = []  # (request, buffer index, chunk index)
        next_chunk = 0
        while next_chunk < len(self.chunks) or posted:
            while next_chunk < len(self.chunks) and len(posted) < 2:
                index = next_chunk % 2
                view = buffers[index][: len(self.chunks[next_chunk]) * self.spool.nbytes]
                posted.append((self.comm.Irecv(view, source=0, tag=TAG_SRC), index, next_chunk))
                next_chunk += 1
            req, index, ci = posted[0]
            if not poll_until(req.Test, self.cancel.is_set):
                for r, _, _ in posted:
                    r.Cancel()
                    r.Wait()
                return
            posted.pop(0)
            n = len(self.chunks[ci])
            self.recv_bytes += n * self.spool.nbytes
            self.spool.append(buffers[index][: n * self.spool.nbytes].reshape((n, *self.spool.shape)))


class Decoder(ReportingThread):
    """Rank 0: decode once, in order, and send every rank the frames it needs in chunks.

    Dynamic schedule: the destinations of a chunk's frames are known only once a rank asked for
    that chunk; the decoder waits for the assignment, and keeps the last ``halo + 1`` frames so the
    next chunk's warm-up frames need no second decode.
    """

    def __init__(self, comm: Any, input_path: str, size: tuple[int, int], plan: Plan, chunk: int,
                 own_spool: SourceSpool, msgr: Messenger, scheduler: Scheduler | None = None,
                 info: Any = None) -> None:
        super().__init__(name="mpistyle-decoder", daemon=True)
        self.comm, self.input_path, self.size, self.msgr = comm, input_path, size, msgr
        self.info = info  # the setup's video.VideoInfo: exact count, VFR frame map, sequence (no second probe)
        self.own_spool = own_spool
        self.scheduler, self.chunk, self.keep = scheduler, chunk, max(plan.halo, plan.max_warmup) + 2
        if scheduler is not None:
            plan = Plan(plan.n_frames, plan.n_ranks, plan.halo, [])  # destinations come from the scheduler
        self.needs: dict[int, list[int]] = defaultdict(list)
        self.chunks: dict[int, list[list[int]]] = {}
        for rp in plan.ranks:
            frames = rp.source_frames()
            for t in frames:
                self.needs[t].append(rp.rank)
            if rp.rank != 0:
                self.chunks[rp.rank] = chunk_list(frames, chunk)
        self.last_needed = max(self.needs, default=-1)
        self.decode_s = 0.0
        self.frames_decoded = 0

    def _run_dynamic(self) -> None:
        from ..io.media import iter_frames

        scheduler = self.scheduler
        assert scheduler is not None
        w, h = self.size
        frames = iter_frames(self.input_path, size=self.size, info=self.info)
        recent: dict[int, np.ndarray] = {}
        decoded = -1
        reqs: list[tuple[Any, np.ndarray]] = []
        try:
            for c in scheduler.order:
                while c not in scheduler.assigned:  # wait until a rank asks for it
                    if self.msgr.stop or scheduler.exhausted():
                        return
                    time.sleep(0.002)
                dest = scheduler.assigned[c]
                wanted = scheduler.plan.ranks[c].source_frames()
                for group in chunk_list(wanted, self.chunk):
                    block = np.empty((len(group), h, w, 3), dtype=np.uint8)
                    for i, t in enumerate(group):
                        while decoded < t:
                            start = time.perf_counter()
                            frame = next(frames, None)
                            self.decode_s += time.perf_counter() - start
                            if frame is None:
                                raise MpistyleError(f"{self.input_path}: the video ended after {decoded + 1} frames "
                                                    "although more were expected (truncated or corrupt file)")
                            decoded += 1
                            recent[decoded] = frame
                            recent.pop(decoded - self.keep, None)
                        block[i] = recent[t]
                    if dest == 0:
                        self.own_spool.append(block)
                    else:
                        reqs = [(r, b) for r, b in reqs if not r.Test()]
                        while len(reqs) >= 4:
                            poll_until(reqs[0][0].Test)
                            reqs.pop(0)
                        reqs.append((self.comm.Isend(block.reshape(-1), dest=dest, tag=TAG_SRC), block))
                    if self.msgr.stop:
                        return
            self.frames_decoded = decoded + 1
        finally:
            frames.close()
            for r, _ in reqs:
                poll_until(r.Test)

    def _run(self) -> None:
        if self.scheduler is not None:
            self._run_dynamic()
        else:
            self._run_static()

    def _run_static(self) -> None:
        from ..io.media import iter_frames

        if self.last_needed < 0:
            return
        w, h = self.size
        fbytes = w * h * 3
        # per destination: which chunk we fill, how full it is, two buffers and their send requests
        state = {r: {"ci": 0, "fill": 0, "bufs": [None, None], "reqs": [None, None]} for r in self.chunks}
        frames = iter_frames(self.input_path, size=self.size, info=self.info)
        t = -1
        start = time.perf_counter()
        try:
            for t, frame in enumerate(frames):
                self.decode_s += time.perf_counter() - start
                for r in self.needs.get(t, ()):
                    if r == 0:
                        self.own_spool.append(frame[None])
                    else:
                        self._put(r, state[r], frame, fbytes)
                if t >= self.last_needed or self.msgr.stop:
                    break
                start = time.perf_counter()
        finally:
            frames.close()
            # Sends already started must complete (receivers keep listening until the barrier).
            for st in state.values():
                for req in st["reqs"]:
                    if req is not None:
                        poll_until(req.Test)
        self.frames_decoded = t + 1
        if not self.msgr.stop and t < self.last_needed:
            raise MpistyleError(f"{self.input_path}: the video ended after {t + 1} frames although "
                                f"{self.last_needed + 1} were expected (truncated or corrupt file)")

    def _put(self, r: int, st: dict[str, Any], frame: np.ndarray, fbytes: int) -> None:
        chunk = self.chunks[r][st["ci"]]
        slot = st["ci"] % 2
        if st["fill"] == 0:
            if st["reqs"][slot] is not None:  # reuse a buffer only once its send completed
                poll_until(st["reqs"][slot].Test)
            if st["bufs"][slot] is None:
                st["bufs"][slot] = np.empty(len(self.chunks[r][0]) * fbytes, dtype=np.uint8)
        buf = st["bufs"][slot]
        buf[st["fill"] * fbytes:(st["fill"] + 1) * fbytes] = frame.reshape(-1)
        st["fill"] += 1
        if st["fill"] == len(chunk):
            st["reqs"][slot] = self.comm.Isend(buf[: len(chunk) * fbytes], dest=r, tag=TAG_SRC)
            st["ci"] += 1
            st["fill"] = 0
            if st["ci"] == len(self.chunks[r]):  # rank r has everything: free its buffers once sent
                for req in st["reqs"]:
                    if req is not None:
                        poll_until(req.Test)
                st["reqs"], st["bufs"] = [None, None], [None, None]


class LocalDecoder(ReportingThread):
    """``--decode each``: this rank decodes its own source frames (warm-up and runs) into its spool.

    Each contiguous range is read with a frame-exact seek (``decode_range``), so no frame crosses MPI
    and no rank decodes the frames before its partition.
    """

    def __init__(self, input_path: str, size: tuple[int, int], frames: Sequence[int], spool: SourceSpool,
                 msgr: Messenger, info: Any) -> None:
        super().__init__(name="mpistyle-decoder", daemon=True)
        self.input_path, self.size, self.frames, self.spool, self.msgr, self.info = \
            input_path, size, list(frames), spool, msgr, info
        self.decode_s = 0.0
        self.frames_decoded = 0

    def _run(self) -> None:
        from ..io.seek import decode_range

        for first, count in contiguous_ranges(self.frames):
            frames = decode_range(self.input_path, first, count, size=self.size, info=self.info)
            try:
                start = time.perf_counter()
                for frame in frames:
                    self.decode_s += time.perf_counter() - start
                    self.spool.append(frame[None])
                    self.frames_decoded += 1
                    if self.msgr.stop:
                        return
                    start = time.perf_counter()
            finally:
                close = getattr(frames, "close", None)
                if close is not None:
                    close()


def contiguous_ranges(frames: Sequence[int]) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive frame numbers, in order (pure)."""
    return [(start, stop - start) for start, stop in runs_of(frames)]


class Scheduler:
    """Rank 0: hands out contiguous chunks in order to whichever rank asks (dynamic schedule).

    Remote requests are answered from the sink thread's loop (it runs until every rank has said
    it is finished, so no request goes unanswered); rank 0's own worker calls :meth:`take`.
    The answer carries the stored output frames a chunk needs to resume exactly.
    """

    def __init__(self, plan: Plan, buffer: Any) -> None:
        self.plan = plan  # one RankPlan per chunk
        self.order = [rp.rank for rp in plan.ranks if rp.runs]
        self.assigned: dict[int, int] = {}
        self.by_rank: dict[int, list[int]] = defaultdict(list)
        self.buffer = buffer
        self._next = 0
        self._lock = threading.Lock()
        self._replies: list[Any] = []

    def take(self, rank: int) -> tuple[int, dict[int, np.ndarray]]:
        with self._lock:
            if self._next >= len(self.order):
                return -1, {}
            chunk = self.order[self._next]
            self._next += 1
            self.assigned[chunk] = rank
            self.by_rank[rank].append(chunk)
        states = {t: np.asarray(self.buffer.read(t)) for t in self.plan.ranks[chunk].buffer_frames()}
        return chunk, states

    def exhausted(self) -> bool:
        return self._next >= len(self.order)

    def serve(self, comm: Any) -> bool:
        """Answer pending remote requests; True when something was answered."""
        served = False
        while comm.iprobe(source=mpi_any_source(), tag=TAG_REQ):
            status = mpi_status()
            comm.recv(source=mpi_any_source(), tag=TAG_REQ, status=status)
            source = status.Get_source()
            # isend: never block the sink on a rank that is busy (it always collects its answer)
            self._replies.append(comm.isend(self.take(source), dest=source, tag=TAG_GIVE))
            served = True
        self._replies = [r for r in self._replies if not r.Test()]
        return served
