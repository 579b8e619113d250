"""The stylize run across MPI ranks: setup, scatter, halo exchange, stylize+fuse, gather, encode.

Who does what (see README "Architecture"):
- rank 0 probes the input, opens (or resumes) the HDF5 buffer and decides the settings; every rank
  loads the model; errors in this phase are collective, so every rank exits with the same message.
- every rank derives the same :class:`~mpistyle.partition.Plan` (contiguous partitions, halos,
  frames already done).
- a decoder thread on rank 0 streams frames in bounded chunks (``Isend`` of NumPy buffers) to the
  ranks that need them; each rank's receiver thread spools them to an unlinked scratch file, so
  memory per rank does not grow with the video.
- each rank first stylizes the frames other ranks need as halo ("exports") and sends the raw
  network outputs, then walks its runs in order: warm up over the halo, then stylize (batched),
  fuse with the flow-warped previous output, and send each finished frame to rank 0.
- a sink thread on rank 0 writes frames into the buffer, commits done flags, feeds the encoder
  in frame order (encoding overlaps the computation) and drives the progress bar.
- stop (signal, peer failure) and normal completion share one shutdown path: finish the current
  frame, complete every pending send, tell rank 0 how many frames were sent, let rank 0 commit the
  buffer, meet in a non-blocking barrier, cancel what can no longer match. No rank waits forever:
  a watchdog aborts the job if the shutdown itself stalls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import __version__
from .errors import Interrupted, MpistyleError
from .mpi import StopFlag, configure_threads, local_rank_and_size, poll_until, select_device, threads_per_rank
from .partition import Plan, RankPlan, Run, boundaries, make_plan
from .temporal import TemporalSettings

logger = logging.getLogger(__name__)

TAG_SRC, TAG_OUT, TAG_HALO, TAG_STATE, TAG_STOP, TAG_FIN, TAG_REQ, TAG_GIVE = 101, 102, 103, 104, 105, 106, 107, 108
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".m4v")
SHUTDOWN_TIMEOUT_S = 120.0
MAX_EVENTS = 50_000


@dataclass
class StylizeOptions:
    input: str
    output: str
    model: str | None = None
    temporal: TemporalSettings = field(default_factory=TemporalSettings)
    halo: int = 10
    width: int | None = None
    height: int | None = None
    scale: float | None = None
    device: str = "auto"
    precision: str = "auto"
    batch: int = 0  # 0: 1 on CPU, 4 on CUDA
    buffer: str | None = None
    restart: bool = False
    keep_buffer: bool = False
    threads: int | None = None
    scratch: str | None = None
    chunk: int = 8
    schedule: str = "static"  # static: one contiguous partition per rank; dynamic: chunks on demand
    chunks: int = 0  # dynamic: number of contiguous chunks (0: 4 per rank)
    crf: int = 18
    report: str | None = None
    progress: bool = True


@dataclass
class Setup:
    """What rank 0 decides and broadcasts before the work starts."""

    n_frames: int
    width: int
    height: int
    fps_num: int
    fps_den: int
    has_audio: bool
    model_path: str
    buffer_path: str
    done: np.ndarray
    settings: dict[str, Any]


class _Stopped(Exception):
    """Unwinds a rank's work loop when a stop was requested."""


# --------------------------------------------------------------------------------------------
# small pure helpers


def chunk_list(frames: Sequence[int], chunk: int) -> list[list[int]]:
    """How a rank's source frames are grouped into scatter messages (both sides compute it)."""
    return [list(frames[i:i + chunk]) for i in range(0, len(frames), max(1, chunk))]


def file_fingerprint(path: str, block: int = 1 << 20) -> str:
    """Cheap identity of a possibly huge file: size + SHA-256 of its first and last MiB."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(block))
        if size > block:
            f.seek(max(block, size - block))
            digest.update(f.read(block))
    return digest.hexdigest()[:32]


def default_buffer_path(output: str) -> str:
    return output + ".mpistyle.h5"


def validate_output(input_path: str, output: str) -> None:
    if not output:
        raise MpistyleError("no output path given (-o OUTPUT)")
    if os.path.isdir(output):
        raise MpistyleError(f"output path is a directory: {output}")
    if not output.lower().endswith(VIDEO_EXTENSIONS):
        raise MpistyleError(f"output must end in one of {', '.join(VIDEO_EXTENSIONS)}: {output}")
    if os.path.exists(output) and os.path.exists(input_path) and os.path.samefile(input_path, output):
        raise MpistyleError(f"output is the same file as the input: {output}")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise MpistyleError(f"output directory does not exist: {directory}")
    try:  # really try: access() says yes to root on read-only mounts
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mpistyle-probe-"):
            pass
    except OSError as exc:
        raise MpistyleError(f"cannot write to the output directory {directory}: {exc.strerror}") from None


# --------------------------------------------------------------------------------------------
# communication helpers


class Messenger:
    """Stop propagation and request bookkeeping for one rank."""

    def __init__(self, comm: Any, stop: StopFlag) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.stop = stop
        self.error: tuple[str, int] | None = None  # (message, exit code) of a failure on this rank
        self.peer_failure: str = ""
        self._stop_sent = False
        self._stop_reqs: list[Any] = []

    def fail(self, message: str, code: int = 1) -> None:
        if self.error is None:
            self.error = (message, code)
        self.stop.set("error")

    def poll_stop_messages(self) -> None:
        """Receive stop notices from peers (main thread only)."""
        while self.comm.iprobe(source=mpi_any_source(), tag=TAG_STOP):
            src, reason = self.comm.recv(source=mpi_any_source(), tag=TAG_STOP)
            if reason.startswith("error:") and not self.peer_failure:
                self.peer_failure = f"rank {src} failed: {reason[6:].strip()}"
            self.stop.set(f"rank {src}: {reason}")

    def broadcast_stop(self) -> None:
        """Tell every other rank to stop, once."""
        if self._stop_sent or self.size == 1:
            return
        self._stop_sent = True
        reason = f"error: {self.error[0]}" if self.error else self.stop.reason or "stop"
        for dest in range(self.size):
            if dest != self.rank:
                self._stop_reqs.append(self.comm.isend((self.rank, reason), dest=dest, tag=TAG_STOP))

    def interrupted(self) -> bool:
        self.poll_stop_messages()
        if self.stop:
            self.broadcast_stop()
            return True
        return False

    def wait(self, req: Any, interruptible: bool = True) -> None:
        if not poll_until(req.Test, self.interrupted if interruptible else None):
            raise _Stopped()

    def finish_stop_messages(self) -> None:
        poll_until(lambda: all(r.Test() for r in self._stop_reqs), timeout=10.0)


def mpi_any_source() -> int:
    from .mpi import mpi

    return mpi().ANY_SOURCE


# --------------------------------------------------------------------------------------------
# scatter: decoder (rank 0) -> spools (every rank)


class SourceSpool:
    """A rank's source frames, in arrival order, in an unlinked scratch file (bounded memory)."""

    def __init__(self, frames: Sequence[int], shape: tuple[int, int, int], scratch: str | None,
                 interrupted: Any) -> None:
        self.slot = {t: i for i, t in enumerate(frames)}
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
        os.pwrite(self._file.fileno(), data, self._count * self.nbytes)
        with self._cond:
            self._count += len(data) // self.nbytes
            self._cond.notify_all()

    def get(self, t: int) -> np.ndarray:
        slot = self.slot[t]
        if self._count <= slot:
            with self._cond:
                while self._count <= slot:
                    self._cond.wait(0.005)
                    if self._count <= slot and self._interrupted():
                        raise _Stopped()
        data = os.pread(self._file.fileno(), self.nbytes, slot * self.nbytes)
        return np.frombuffer(data, dtype=np.uint8).reshape(self.shape)

    def close(self) -> None:
        self._file.close()


class _Worker(threading.Thread):
    """A helper thread whose failure is reported to the rank's main thread (which stops the job)."""

    msgr: Messenger

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - reported to the main thread
            self.msgr.fail(describe(exc))

    def _run(self) -> None:
        raise NotImplementedError


class Receiver(_Worker):
    """Ranks > 0: receive scatter chunks from rank 0 into the spool (two receives in flight)."""

    def __init__(self, comm: Any, chunks: list[list[int]], spool: SourceSpool, msgr: Messenger,
                 dynamic: bool = False, chunk: int = 8) -> None:
        super().__init__(name="mpistyle-receiver", daemon=True)
        self.comm, self.chunks, self.spool, self.msgr = comm, chunks, spool, msgr
        self.cancel = threading.Event()
        self.dynamic, self.chunk = dynamic, chunk
        self.assigned: queue.Queue[list[int]] = queue.Queue()  # dynamic: source frames of each new chunk

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
            self.spool.append(buffers[index][: n * self.spool.nbytes].reshape((n, *self.spool.shape)))


class Decoder(_Worker):
    """Rank 0: decode once, in order, and send every rank the frames it needs in chunks.

    Dynamic schedule: the destinations of a chunk's frames are known only once a rank asked for
    that chunk; the decoder waits for the assignment, and keeps the last ``halo + 1`` frames so the
    next chunk's warm-up frames need no second decode.
    """

    def __init__(self, comm: Any, input_path: str, size: tuple[int, int], plan: Plan, chunk: int,
                 own_spool: SourceSpool, msgr: Messenger, scheduler: Scheduler | None = None) -> None:
        super().__init__(name="mpistyle-decoder", daemon=True)
        self.comm, self.input_path, self.size, self.msgr = comm, input_path, size, msgr
        self.own_spool = own_spool
        self.scheduler, self.chunk, self.keep = scheduler, chunk, plan.halo + 2
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
        from .video import iter_frames

        scheduler = self.scheduler
        assert scheduler is not None
        w, h = self.size
        frames = iter_frames(self.input_path, size=self.size)
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
        from .video import iter_frames

        if self.last_needed < 0:
            return
        w, h = self.size
        fbytes = w * h * 3
        # per destination: which chunk we fill, how full it is, two buffers and their send requests
        state = {r: {"ci": 0, "fill": 0, "bufs": [None, None], "reqs": [None, None]} for r in self.chunks}
        frames = iter_frames(self.input_path, size=self.size)
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
            status = _status()
            comm.recv(source=mpi_any_source(), tag=TAG_REQ, status=status)
            source = status.Get_source()
            # isend: never block the sink on a rank that is busy (it always collects its answer)
            self._replies.append(comm.isend(self.take(source), dest=source, tag=TAG_GIVE))
            served = True
        self._replies = [r for r in self._replies if not r.Test()]
        return served


# --------------------------------------------------------------------------------------------
# gather: ranks -> sink (rank 0) -> buffer + encoder


class Sink(_Worker):
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
                    status = _status()
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


def _status() -> Any:
    from .mpi import mpi

    return mpi().Status()


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


# --------------------------------------------------------------------------------------------
# the per-rank work


class RankWorker:
    """Stylize and fuse one rank's runs; send halo exports and finished frames."""

    def __init__(self, comm: Any, rp: RankPlan, plan: Plan, setup: Setup, stylizer: Any,
                 temporal: TemporalSettings, spool: SourceSpool, msgr: Messenger, sink: Sink | None,
                 batch: int, state_frames: dict[int, np.ndarray], t0: float) -> None:
        from .flow import FlowEstimator
        from .temporal import TemporalFuser

        self.comm, self.rp, self.plan, self.setup, self.stylizer = comm, rp, plan, setup, stylizer
        self.temporal, self.spool, self.msgr, self.sink, self.batch = temporal, spool, msgr, sink, batch
        self.state_frames = state_frames
        self.shape = (setup.height, setup.width, 3)
        self.fbytes = int(np.prod(self.shape))
        self.fuser = TemporalFuser(temporal)
        self.flow_mode = temporal.mode != "none"
        self.flow_est = FlowEstimator(temporal.flow_method, temporal.flow_preset) if self.flow_mode else None
        self.flow_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpistyle-flow")
        self.cache: dict[int, np.ndarray] = {}  # raw network outputs of exported frames
        self.local_halo = False
        self.awaiting_chunk = False
        self.emitted = 0
        self.pending: list[tuple[Any, np.ndarray]] = []  # in-flight sends and their buffers
        self.sent = 0
        self.times: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, float, float]] = []
        self.t0 = t0
        self.counts: dict[str, int] = defaultdict(int)
        # Pre-post every halo receive now, so an owner's send always finds a match (no stuck sends).
        self.halo_reqs: dict[int, tuple[Any, np.ndarray]] = {}
        for t in sorted(rp.imports):
            buf = np.empty(self.shape, dtype=np.uint8)
            self.halo_reqs[t] = (comm.Irecv(buf, source=rp.imports[t], tag=TAG_HALO), buf)

    # -- driving ------------------------------------------------------------------------------
    def run(self) -> None:
        self._stylize_exports()
        for run in self.rp.runs:
            self._process_run(run)

    def run_dynamic(self, scheduler: Scheduler | None, receiver: Receiver | None) -> None:
        """Dynamic schedule: ask rank 0 for chunks until none are left. The next chunk is asked for
        when the current one starts, so its frames stream in while this one is stylized."""
        self.local_halo = True
        self._scheduler, self._receiver = scheduler, receiver
        current = self._take()
        while current >= 0:
            following = self._take()
            self.counts["chunks"] += 1
            for run in self.plan.ranks[current].runs:
                self._process_run(run)
            current = following

    def _take(self) -> int:
        if self._scheduler is not None:  # rank 0 asks its own scheduler directly
            chunk, states = self._scheduler.take(0)
        else:
            self.comm.send(None, dest=0, tag=TAG_REQ)
            self.awaiting_chunk = True
            if not poll_until(lambda: self.comm.iprobe(source=0, tag=TAG_GIVE), self.msgr.interrupted):
                raise _Stopped()
            chunk, states = self.comm.recv(source=0, tag=TAG_GIVE)
            self.awaiting_chunk = False
        if chunk >= 0:
            frames = self.plan.ranks[chunk].source_frames()
            self.spool.extend(frames)
            if self._receiver is not None:
                self._receiver.assigned.put(frames)
            self.state_frames.update(states)
        return chunk

    def _stylize_exports(self) -> None:
        frames = sorted(self.rp.exports)
        for i in range(0, len(frames), self.batch):
            group = frames[i:i + self.batch]
            outs = self._network([self._source(t) for t in group])
            for t, out in zip(group, outs, strict=True):
                self.cache[t] = out
                for consumer in self.rp.exports[t]:
                    self._send(out, consumer, TAG_HALO)
            self._check_stop()

    def _process_run(self, run: Run) -> None:
        self.fuser.reset()
        if run.state_frame is not None:
            self.fuser.reset(prev_source=self._source(run.state_frame),
                             prev_output=self.state_frames[run.state_frame])
        has_prev = run.state_frame is not None
        # Queue the halo's flows first: the flow thread computes them while the network runs.
        halo_pairs = {t: self._pair_future(t) for t in run.halo_frames
                      if self.flow_mode and (has_prev or t != run.warm_start)}
        if self.local_halo:  # dynamic schedule: the halo's network outputs are computed here
            halo = list(run.halo_frames)
            raw = {}
            for i in range(0, len(halo), self.batch):
                group = halo[i:i + self.batch]
                raw.update(zip(group, self._network([self._source(t) for t in group]), strict=True))
                self.counts["halo_network_frames"] += len(group)
        else:
            self._stylize_ahead_while_halo_arrives(run)
        # Warm-up over the halo: raw network outputs come from their owners.
        for t in run.halo_frames:
            pair = self._wait_pair(halo_pairs.get(t))
            if self.local_halo:
                buf = raw.pop(t)
            else:
                start = time.perf_counter()
                req, buf = self.halo_reqs[t]
                self.msgr.wait(req)
                self._record("wait_halo", start)
            self._fuse(t, buf, pair)
            self.counts["halo_frames"] += 1
            has_prev = True
        frames = list(range(run.start, run.stop))
        for i in range(0, len(frames), self.batch):
            group = frames[i:i + self.batch]
            pairs: dict[int, Future | None] = {}
            for t in group:  # flows run in a helper thread while the network runs
                pairs[t] = self._pair_future(t) if (has_prev or t != group[0]) and self.flow_mode else None
            todo = [t for t in group if t not in self.cache]
            outs = dict(zip(todo, self._network([self._source(t) for t in todo]), strict=True)) if todo else {}
            for t in group:
                stylized = self.cache.pop(t) if t in self.cache else outs[t]
                pair = self._wait_pair(pairs[t])
                out = self._fuse(t, stylized, pair)
                self._emit(t, out)
                has_prev = True
            self._check_stop()

    def _stylize_ahead_while_halo_arrives(self, run: Run) -> None:
        """Don't idle while the previous rank stylizes our halo: run the network on our own next
        frames (fusion must wait for the halo; the network need not). Bounded by 2 x halo frames."""
        reqs = [self.halo_reqs[t][0] for t in run.halo_frames]
        if not reqs:
            return
        ahead = [t for t in range(run.start, run.stop) if t not in self.cache][: 2 * len(reqs)]
        for i in range(0, len(ahead), self.batch):
            if all(req.Test() for req in reqs):
                return
            group = ahead[i:i + self.batch]
            for t, out in zip(group, self._network([self._source(t) for t in group]), strict=True):
                self.cache[t] = out
            self._check_stop()

    # -- steps --------------------------------------------------------------------------------
    def _source(self, t: int) -> np.ndarray:
        start = time.perf_counter()
        frame = self.spool.get(t)
        self._record("wait_source", start, min_s=1e-3)
        return frame

    def _record(self, phase: str, start: float, min_s: float = 0.0) -> None:
        """Accumulate a phase's time and keep a bounded timeline of events for the report."""
        end = time.perf_counter()
        self.times[phase] += end - start
        if end - start >= min_s and len(self.events) < MAX_EVENTS:
            self.events.append((phase, round(start - self.t0, 5), round(end - self.t0, 5)))

    def _network(self, sources: list[np.ndarray]) -> np.ndarray:
        start = time.perf_counter()
        out = self.stylizer(np.stack(sources))
        self._record("network", start)
        self.counts["network_frames"] += len(sources)
        return out

    def _pair_future(self, t: int) -> Future:
        from .flow import pair_flow, to_gray

        prev, cur = self._source(t - 1), self._source(t)

        def job() -> Any:
            start = time.perf_counter()
            result = pair_flow(self.flow_est, to_gray(prev), to_gray(cur))
            self._record("flow", start)
            return result

        return self.flow_pool.submit(job)

    def _wait_pair(self, fut: Future | None) -> Any:
        if fut is None:
            return None
        start = time.perf_counter()
        result = fut.result()
        self._record("wait_flow", start, min_s=1e-3)
        return result

    def _fuse(self, t: int, stylized: np.ndarray, pair: Any) -> np.ndarray:
        source = self._source(t)
        start = time.perf_counter()
        out = self.fuser.step(source, stylized, pair=pair)
        self._record("fuse", start)
        if self.fuser.last_was_cut:
            self.counts["scene_cuts"] += 1
        return out

    def _emit(self, t: int, out: np.ndarray) -> None:
        _inject_fault(self.comm.Get_rank(), t)
        self.emitted += 1
        start = time.perf_counter()
        if self.sink is not None:  # rank 0 hands frames to its own sink thread
            while True:
                try:
                    self.sink.local.put((t, np.ascontiguousarray(out)), timeout=0.05)
                    break
                except queue.Full:
                    if self.msgr.interrupted() and not self.sink.is_alive():
                        raise _Stopped() from None
        else:
            msg = np.empty(8 + self.fbytes, dtype=np.uint8)
            msg[:8].view(np.int64)[0] = t
            msg[8:] = out.reshape(-1)
            self._send_raw(msg, 0, TAG_OUT)
            self.sent += 1
        self._record("send", start, min_s=1e-3)

    def _send(self, frame: np.ndarray, dest: int, tag: int) -> None:
        self._send_raw(np.ascontiguousarray(frame).reshape(-1), dest, tag)

    def _send_raw(self, buf: np.ndarray, dest: int, tag: int) -> None:
        self.pending = [(r, b) for r, b in self.pending if not r.Test()]
        while len(self.pending) >= 8:  # bound the memory held by in-flight sends
            req, _ = self.pending.pop(0)
            self.msgr.wait(req, interruptible=False)
        self.pending.append((self.comm.Isend(buf, dest=dest, tag=tag), buf))

    def _check_stop(self) -> None:
        if self.msgr.interrupted():
            raise _Stopped()

    # -- shutdown -----------------------------------------------------------------------------
    def finish_sends(self) -> None:
        for req, _ in self.pending:
            poll_until(req.Test)
        self.pending = []

    def cancel_unmatched(self) -> None:
        for req, _ in self.halo_reqs.values():
            if not req.Test():
                req.Cancel()
                req.Wait()
        self.flow_pool.shutdown(wait=True, cancel_futures=True)


def _inject_fault(rank: int, frame: int) -> None:
    """Test hook: MPISTYLE_FAULT="RANK:FRAME:raise|kill|hang" makes that rank fail at that frame.

    The failure tests use it to prove that one rank's exception, death or stall ends the whole job.
    """
    spec = os.environ.get("MPISTYLE_FAULT")
    if not spec:
        return
    want_rank, want_frame, kind = spec.split(":")
    if int(want_rank) != rank or int(want_frame) != frame:
        return
    if kind == "kill":
        os.kill(os.getpid(), 9)
    if kind == "hang":
        time.sleep(3600)
    raise RuntimeError(f"injected fault at frame {frame}")


# --------------------------------------------------------------------------------------------
# setup (collective)


def describe(exc: BaseException) -> str:
    if isinstance(exc, MpistyleError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == 28:
        return f"disk full: {exc.filename or ''} ({exc.strerror})"
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller --batch or --scale)"
    logger.debug("internal error", exc_info=exc)
    return f"internal error: {type(exc).__name__}: {exc}"


def _collective(comm: Any, fn: Any, root_only: bool = True) -> Any:
    """Run ``fn`` on rank 0 (or every rank) and raise the same MpistyleError everywhere on failure."""
    rank = comm.Get_rank()
    result, error = None, None
    if rank == 0 or not root_only:
        try:
            result = fn()
        except MpistyleError as exc:
            error = (str(exc), exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - turned into one clear line on every rank
            logger.debug("setup failed", exc_info=True)
            error = (describe(exc), 1)
    if root_only:
        result, error = comm.bcast((result, error), root=0)
    else:
        errors = comm.allgather(error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank_failed, error = failed[0]
            if len({e[0] for _, e in failed}) > 1 or len(failed) < comm.Get_size():
                error = (f"rank {rank_failed}: {error[0]}", error[1])
    if error is not None:
        exc = MpistyleError(error[0])
        exc.exit_code = error[1]
        raise exc
    return result


@dataclass
class _Validated:
    info: Any
    width: int
    height: int
    model_path: str


def _validate_on_root(opts: StylizeOptions) -> _Validated:
    """Cheap checks first (input, output, size, model name), before any rank loads a model."""
    from .models import resolve_model
    from .video import output_size, probe

    info = probe(opts.input)
    validate_output(opts.input, opts.output)
    width, height = output_size(info, width=opts.width, height=opts.height, scale=opts.scale)
    return _Validated(info=info, width=width, height=height, model_path=resolve_model(opts.model))


def _open_buffer_on_root(opts: StylizeOptions, checked: _Validated, precision_name: str, device_type: str) -> Setup:
    from .buffer import FrameBuffer

    info, width, height, model_path = checked.info, checked.width, checked.height, checked.model_path
    buffer_path = opts.buffer or default_buffer_path(opts.output)
    if os.path.abspath(buffer_path) in (os.path.abspath(opts.input), os.path.abspath(opts.output)):
        raise MpistyleError(f"buffer path must differ from input and output: {buffer_path}")
    t = opts.temporal
    settings = {
        "input": file_fingerprint(opts.input),
        "model": file_fingerprint(model_path),
        "temporal": t.mode,
        "strength": t.strength if t.mode != "none" else None,
        "scene_cut": t.scene_cut if t.mode != "none" else None,
        "flow": f"{t.flow_method}/{t.flow_preset}" if t.mode != "none" else None,
        "halo": opts.halo if t.mode != "none" else None,
        "precision": precision_name,
        "device_type": device_type,
        "mpistyle": __version__,
    }
    buf = FrameBuffer.open(buffer_path, info.n_frames, height, width, settings, restart=opts.restart)
    done = buf.done.copy()
    buf.close()
    if done.any():
        logger.info("resuming from %s: %d of %d frames already done", buffer_path, int(done.sum()), len(done))
    return Setup(n_frames=info.n_frames, width=width, height=height, fps_num=info.fps.numerator,
                 fps_den=info.fps.denominator, has_audio=info.has_audio, model_path=model_path,
                 buffer_path=buffer_path, done=done, settings=settings)


# --------------------------------------------------------------------------------------------
# the run


def run_stylize(opts: StylizeOptions, comm: Any | None = None) -> dict[str, Any]:
    """Stylize ``opts.input`` into ``opts.output`` on every rank of ``comm``. Returns rank 0's report.

    Raises MpistyleError (same message on every rank for setup problems), Interrupted after a
    signal (buffer consistent; rerun to resume).
    """
    from .mpi import world

    comm = comm or world()
    rank, size = comm.Get_rank(), comm.Get_size()
    stop = StopFlag()
    stop.install_signal_handlers()
    msgr = Messenger(comm, stop)
    t_start = time.perf_counter()

    local_rank, local_size = local_rank_and_size(comm)
    threads = threads_per_rank(local_size, opts.threads)
    configure_threads(threads)

    checked: _Validated = _collective(comm, lambda: _validate_on_root(opts))

    def load() -> Any:
        import torch

        from .models import Stylizer, load_model, resolve_precision

        device = select_device(opts.device, local_rank)
        model = load_model(checked.model_path, device)
        dtype = resolve_precision(opts.precision, torch.device(device))
        return Stylizer(model, device=torch.device(device), precision=opts.precision), device, dtype

    stylizer, device, dtype = _collective(comm, load, root_only=False)
    precision_name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    device_type = device.split(":")[0]
    setup: Setup = _collective(comm, lambda: _open_buffer_on_root(opts, checked, precision_name, device_type))
    t_work = time.perf_counter()  # all ranks leave the setup collective together: a shared time origin
    batch = opts.batch or (4 if device_type == "cuda" else 1)
    temporal_on = opts.temporal.mode != "none"
    dynamic = opts.schedule == "dynamic"
    n_parts = (opts.chunks or 4 * size) if dynamic else size
    plan = make_plan(setup.n_frames, n_parts, opts.halo, done=list(setup.done), temporal=temporal_on)
    # Static: this rank's partition. Dynamic: chunks arrive one by one; start with nothing.
    rp = plan.ranks[rank] if not dynamic else RankPlan(rank=rank, bounds=(0, 0))
    logger.debug("rank %d/%d (local %d/%d): device %s, %d threads, partition %s, %d runs, %d to do",
                 rank, size, local_rank, local_size, device, threads, rp.bounds, len(rp.runs), len(rp.todo))
    if rank == 0:
        logger.info("stylizing %d frames (%d to do) at %dx%d on %d rank(s), %d thread(s) each, device %s, %s",
                    setup.n_frames, plan.n_todo, setup.width, setup.height, size, threads, device, precision_name)

    shape = (setup.height, setup.width, 3)
    spool = SourceSpool(rp.source_frames(), shape, opts.scratch, msgr.interrupted)
    threads_started: list[threading.Thread] = []
    receiver = decoder = sink = None
    buffer = encoder = scheduler = None
    worker = None
    outcome = "done"
    try:
        state_frames = _distribute_state_frames(comm, plan, setup, rp) if not dynamic else {}
        if rank == 0:
            from .buffer import FrameBuffer
            from .video import VideoEncoder

            buffer = FrameBuffer.open(setup.buffer_path, setup.n_frames, setup.height, setup.width,
                                      setup.settings)
            from fractions import Fraction

            encoder = VideoEncoder(opts.output, setup.width, setup.height, Fraction(setup.fps_num, setup.fps_den),
                                   audio_from=opts.input if setup.has_audio else None, crf=opts.crf,
                                   preset="veryfast", threads=1)  # medium costs ~2x CPU on rank 0 for no gain here
            sink = Sink(comm, buffer, encoder, setup, plan, msgr, opts.progress)
            if dynamic:
                scheduler = sink.scheduler = Scheduler(plan, buffer)
            decoder = Decoder(comm, opts.input, (setup.width, setup.height), plan, opts.chunk, spool, msgr,
                              scheduler=scheduler)
            threads_started += [sink, decoder]
        else:
            receiver = Receiver(comm, chunk_list(rp.source_frames(), opts.chunk), spool, msgr, dynamic=dynamic,
                                chunk=opts.chunk)
            threads_started.append(receiver)
        for th in threads_started:
            th.start()
        worker = RankWorker(comm, rp, plan, setup, stylizer, opts.temporal, spool, msgr, sink, batch, state_frames,
                            t0=t_work)
        if dynamic:
            worker.run_dynamic(scheduler, receiver)
        else:
            worker.run()
    except _Stopped:
        outcome = "stopped"
    except Exception as exc:  # noqa: BLE001 - every failure goes through the same shutdown
        msgr.fail(describe(exc), getattr(exc, "exit_code", 1))
        outcome = "failed"
    watchdog = _Watchdog(comm, rank)
    try:
        report = _shutdown(comm, msgr, worker, receiver, decoder, sink, buffer, encoder, setup, plan, opts,
                           threads, device, precision_name, (t_start, t_work))
    finally:
        watchdog.cancel()
        spool.close()
    logger.debug("rank %d: work ended: %s", rank, outcome)
    return report


class _Watchdog:
    """If the orderly shutdown stalls (a peer vanished), abort the whole job instead of hanging."""

    def __init__(self, comm: Any, rank: int, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        def fire() -> None:
            sys.stderr.write(f"mpistyle: error: rank {rank}: shutdown timed out after {timeout:.0f} s; "
                             "aborting the job\n")
            sys.stderr.flush()
            comm.Abort(1)

        self.timer = threading.Timer(timeout, fire)
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        self.timer.cancel()


def _distribute_state_frames(comm: Any, plan: Plan, setup: Setup, rp: RankPlan) -> dict[int, np.ndarray]:
    """Stored outputs that start 'buffer' runs exactly: rank 0 reads them and sends them over."""
    shape = (setup.height, setup.width, 3)
    rank = comm.Get_rank()
    mine: dict[int, np.ndarray] = {}
    reqs = []
    keep_alive = []  # send buffers must outlive their requests
    for t in rp.buffer_frames():
        if rank != 0:
            buf = np.empty(shape, dtype=np.uint8)
            reqs.append(comm.Irecv(buf, source=0, tag=TAG_STATE))
            mine[t] = buf
    if rank == 0 and any(p.buffer_frames() for p in plan.ranks):
        from .buffer import FrameBuffer

        buffer = FrameBuffer.open(setup.buffer_path, setup.n_frames, setup.height, setup.width, setup.settings)
        try:
            for p in plan.ranks:
                for t in p.buffer_frames():
                    frame = np.ascontiguousarray(buffer.read(t))
                    if p.rank == 0:
                        mine[t] = frame
                    else:
                        reqs.append(comm.Isend(frame, dest=p.rank, tag=TAG_STATE))
                        keep_alive.append(frame)
        finally:
            buffer.close()
    for req in reqs:
        poll_until(req.Test)
    return mine


def _shutdown(comm: Any, msgr: Messenger, worker: RankWorker | None, receiver: Receiver | None,
              decoder: Decoder | None, sink: Sink | None, buffer: Any, encoder: Any, setup: Setup, plan: Plan,
              opts: StylizeOptions, threads: int, device: str, precision: str,
              clock: tuple[float, float]) -> dict[str, Any]:
    rank, size = comm.Get_rank(), comm.Get_size()
    if msgr.stop:
        msgr.broadcast_stop()
    if worker is not None:
        worker.finish_sends()
        if worker.awaiting_chunk:  # collect rank 0's answer so its send completes
            if poll_until(lambda: comm.iprobe(source=0, tag=TAG_GIVE), timeout=60):
                comm.recv(source=0, tag=TAG_GIVE)
    if rank != 0:
        comm.send(worker.sent if worker is not None else 0, dest=0, tag=TAG_FIN)
    else:
        if decoder is not None and decoder.is_alive():
            decoder.join()
        if sink is not None:
            sink.local_done.set()
            if sink.is_alive():
                while sink.is_alive():
                    sink.join(0.05)
                    msgr.poll_stop_messages()
    # Everyone is here only after their sends completed: meet, then cancel what can't match.
    barrier = comm.Ibarrier()
    poll_until(barrier.Test)
    msgr.poll_stop_messages()
    if receiver is not None:
        receiver.cancel.set()
        receiver.join()
    if worker is not None:
        worker.cancel_unmatched()
    msgr.finish_stop_messages()

    times = dict(worker.times) if worker is not None else {}
    counts = dict(worker.counts) if worker is not None else {}
    if decoder is not None:
        times["decode"] = decoder.decode_s
    if sink is not None:
        times["write"] = sink.write_s
        times["encode"] = sink.encode_s
    failure = msgr.error[0] if msgr.error else ""
    code = msgr.error[1] if msgr.error else 0
    events = worker.events if worker is not None else []
    per_rank = comm.gather({"rank": rank, "times": times, "counts": counts, "events": events, "failure": failure,
                            "code": code, "peer_failure": msgr.peer_failure, "stopped": bool(msgr.stop),
                            "reason": msgr.stop.reason, "signal": msgr.stop.signal_name,
                            "frames": worker.emitted if worker is not None else 0}, root=0)
    verdict = None
    report: dict[str, Any] = {}
    if rank == 0:
        verdict, report = _finish_on_root(per_rank, buffer, encoder, sink, setup, plan, opts, threads, device,
                                          precision, clock, size)
    verdict = comm.bcast(verdict, root=0)
    kind, message, exit_code = verdict
    if kind == "failed":
        if msgr.error:  # the failing rank says why, once
            where = f"rank {rank}: " if size > 1 else ""
            sys.stderr.write(f"mpistyle: error: {where}{msgr.error[0]}\n")
        exc = MpistyleError(message)
        exc.exit_code = exit_code
        exc.already_reported = True  # type: ignore[attr-defined]
        raise exc
    if kind == "stopped":
        raise Interrupted(message)
    return report


def _finish_on_root(per_rank: list[dict[str, Any]], buffer: Any, encoder: Any, sink: Sink | None, setup: Setup,
                    plan: Plan, opts: StylizeOptions, threads: int, device: str, precision: str,
                    clock: tuple[float, float],
                    size: int) -> tuple[tuple[str, str, int], dict[str, Any]]:
    failures = [p for p in per_rank if p["failure"]]
    complete = buffer is not None and buffer.complete()
    verdict: tuple[str, str, int]
    try:
        if failures:
            first = failures[0]
            verdict = ("failed", f"rank {first['rank']}: {first['failure']}" if size > 1 else first["failure"],
                       first["code"] or 1)
        elif complete and sink is not None and sink.encoder is not None:
            if sink.encoded < setup.n_frames:
                sink._commit()  # frames done before this run (resume) still need encoding
            if sink.encoder is not None:
                sink.encoder.close()
                sink.encoder = encoder = None
                verdict = ("done", "", 0)
            else:
                raise MpistyleError(sink.encode_error)
        elif complete:
            raise MpistyleError(sink.encode_error if sink is not None else "nothing was encoded")
        else:
            signal_name = next((p["signal"] for p in per_rank if p["signal"]), "")
            why = f"received {signal_name}" if signal_name else "stopped"
            done = int(buffer.done.sum()) if buffer is not None else 0
            verdict = ("stopped", f"{why}: {done}/{setup.n_frames} frames are safe in {setup.buffer_path}; "
                                  "rerun the same command to resume", Interrupted.exit_code)
    except MpistyleError as exc:
        message = f"{exc}; all {setup.n_frames} frames are safe in {setup.buffer_path}: rerun to encode"
        verdict = ("failed", message, exc.exit_code)
        sys.stderr.write(f"mpistyle: error: {message}\n")
    finally:
        if sink is not None and sink.encoder is not None:
            sink.encoder.abort()
        elif encoder is not None and sink is None:
            encoder.abort()
        if buffer is not None:
            buffer.close()
    t_start, t_work = clock
    elapsed = time.perf_counter() - t_start
    setup_s = t_work - t_start
    report = {
        "mpistyle": __version__,
        "input": opts.input,
        "output": opts.output,
        "frames": setup.n_frames,
        "frames_computed": sum(p["frames"] for p in per_rank),
        "width": setup.width,
        "height": setup.height,
        "ranks": size,
        "threads_per_rank": threads,
        "device": device,
        "precision": precision,
        "temporal": asdict(opts.temporal),
        "halo": plan.halo,
        "halo_fusion_steps": plan.halo_cost(),
        "boundaries": boundaries(setup.n_frames, plan.n_ranks),
        "schedule": opts.schedule,
        "parts": plan.n_ranks,
        "wall_s": elapsed,
        "work_s": elapsed - setup_s,
        "frames_per_s": sum(p["frames"] for p in per_rank) / max(elapsed, 1e-9),
        "setup_s": setup_s,
        "per_rank": [{"rank": p["rank"], "frames": p["frames"], "times_s": p["times"], "counts": p["counts"],
                      "events": p["events"]} for p in per_rank],
        "outcome": verdict[0],
    }
    if verdict[0] == "done":
        if not opts.keep_buffer:
            try:
                os.unlink(setup.buffer_path)
            except OSError:
                pass
    return verdict, report


def write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)
