"""Output that scales with ranks: every rank encodes the frames it computes into H.264 segments.

Why: one x264 on rank 0 caps the whole job (about 740 frames/s at 640x360 with 16 threads), so at
GPU rates 64 ranks would wait on rank 0's encoder. Instead each rank feeds its own x264 as its
frames come out (a thread of its own, overlapped with the work), writing one video-only MP4 per
contiguous run of frames. Rank 0 then only joins them (ffmpeg's concat demuxer, stream copy: B-frames
and timestamps stay exact, unlike a byte join of raw H.264) and copies the audio in: I/O-bound
work. The frames still go to rank 0's HDF5 buffer too: resume never depends on segments.

Segments are named by the frames they hold (``seg-FIRST-COUNT.mp4``) and appear only once
complete (renamed). At the end rank 0 tiles ``[0, n_frames)`` with them; any frame no segment
holds (frames done before a resume, or a rank whose encoder failed) is encoded by rank 0 from the
buffer into a segment of its own. The folder is cleared when a run starts and removed after the
output is written.

Used for H.264 outputs (.mp4/.m4v/.mov/.mkv) on more than one GPU rank (``--encode auto``, see
:func:`uses_segments`), or always (``--encode segments``); ``--encode rank0`` keeps the single
in-order encoder on rank 0.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import threading
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np

from ..errors import MpistyleError

logger = logging.getLogger(__name__)

ENCODE_MODES = ("auto", "rank0", "segments")
SEGMENT_CONTAINERS = (".mp4", ".m4v", ".mov", ".mkv")  # containers that take H.264 as it is
_NAME = re.compile(r"^seg-(\d{9})-(\d{9})\.mp4$")


def segment_dir(output: str) -> str:
    """Hidden folder beside the output (same filesystem, so rank 0 reads what the ranks wrote)."""
    directory, name = os.path.split(os.path.abspath(output))
    return os.path.join(directory, f".{name}.segments")


def uses_segments(output: str, n_ranks: int, mode: str, device_type: str = "cpu") -> bool:
    """Whether this run encodes per-rank segments (pure).

    ``auto`` picks segments only for several GPU ranks, where one encoder on rank 0 would be the wall.
    Elsewhere one in-order encoder is far from the limit (about 20 ms of rank 0's CPU per frame against
    seconds of network per frame and rank) and keeps a promise segments cannot: the encoded N-rank
    video is byte-identical to the 1-rank one. Each segment starts with a keyframe, so the partition
    boundaries become keyframes, which x264 codes a little differently from the 1-rank run.
    """
    if mode not in ENCODE_MODES:
        raise MpistyleError(f"unknown encode mode {mode!r} (choose from {', '.join(ENCODE_MODES)})")
    if not output.lower().endswith(SEGMENT_CONTAINERS):
        if mode == "segments":
            raise MpistyleError(f"--encode segments needs an H.264 container output "
                                f"({', '.join(SEGMENT_CONTAINERS)}): {output}")
        return False
    return mode == "segments" or (mode == "auto" and n_ranks > 1 and device_type == "cuda")


def reset_segment_dir(path: str) -> None:
    """Rank 0, before any rank writes: an empty folder (segments never outlive a run)."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def segment_name(first: int, count: int) -> str:
    return f"seg-{first:09d}-{count:09d}.mp4"


def finished_segments(path: str) -> list[tuple[int, int, str]]:
    """(first frame, frame count, file) of every complete segment in ``path``, by first frame."""
    found = []
    for name in os.listdir(path) if os.path.isdir(path) else []:
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), os.path.join(path, name)))
    return sorted(found)


def tile(segments: list[tuple[int, int, str]], n_frames: int) -> list[tuple[int, int, str | None]]:
    """Cover ``[0, n_frames)`` in order: segments where they fit, holes ``(first, count, None)`` elsewhere.

    Pure. Segments of one run never overlap; if they did (a bug), the later one is left out and its
    frames are covered by the earlier one or a hole, so the result is always an exact tiling.
    """
    pieces: list[tuple[int, int, str | None]] = []
    at = 0
    for first, count, path in sorted(segments):
        if first < at or count <= 0 or first + count > n_frames:
            logger.warning("ignoring segment %s (frames %d-%d do not fit the tiling)", path, first, first + count - 1)
            continue
        if first > at:
            pieces.append((at, first - at, None))
        pieces.append((first, count, path))
        at = first + count
    if at < n_frames:
        pieces.append((at, n_frames - at, None))
    return pieces


class SegmentWriter(threading.Thread):
    """One rank's encoder: frames in increasing order; a gap (or a new chunk) starts a new segment.

    ``put`` hands a frame over (bounded queue: memory stays bounded, the worker waits only if x264
    falls behind). An encoder failure is logged and the rest of that segment dropped: rank 0
    re-encodes those frames from the buffer, so the run itself goes on.
    """

    def __init__(self, directory: str, width: int, height: int, fps: Fraction, crf: int, threads: int,
                 encoder_factory: Callable[..., Any] | None = None) -> None:
        super().__init__(name="mpistyle-segments", daemon=True)
        self.directory, self.width, self.height, self.fps = directory, width, height, fps
        self.crf, self.threads = crf, threads
        self._factory = encoder_factory
        self._queue: queue.Queue[tuple[int, np.ndarray] | None] = queue.Queue(maxsize=8)
        self._abort = threading.Event()
        self.finished: list[tuple[int, int]] = []  # (first, count) of the segments written
        self.failures = 0
        self.encode_s = 0.0

    def put(self, t: int, frame: np.ndarray) -> None:
        while self.is_alive():
            try:
                self._queue.put((t, frame), timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self, abort: bool = False) -> None:
        """Finish the current segment (or drop it with ``abort``) and wait for the thread."""
        if abort:
            self._abort.set()
        if self.is_alive():
            while True:
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    if not self.is_alive():
                        break
            self.join()

    # -- the thread ---------------------------------------------------------------------------------
    def run(self) -> None:
        import time

        current: Any = None
        first = last = -1
        while True:
            item = self._queue.get()
            if item is None or self._abort.is_set():
                break
            t, frame = item
            start = time.perf_counter()
            if current is not None and t != last + 1:
                self._finish(current, first, last)
                current = None
            if current is None and t > last:
                first = t
                current = self._open(first)
            if current is not None:
                try:
                    current.write(frame)
                    last = t
                except MpistyleError as exc:
                    self._failed(current, exc)
                    current = None
            self.encode_s += time.perf_counter() - start
        if current is not None:
            if self._abort.is_set():
                current.abort()
            else:
                self._finish(current, first, last)
        while not self._queue.empty():  # unblock nothing: put() gives up once we are gone
            self._queue.get_nowait()

    def _open(self, first: int) -> Any:
        from ..io.encode import VideoEncoder

        factory = self._factory or VideoEncoder
        path = os.path.join(self.directory, f"seg-{first:09d}.partial.mp4")
        try:
            return factory(path, self.width, self.height, self.fps, crf=self.crf, preset="veryfast",
                           threads=self.threads)
        except MpistyleError as exc:
            self._failed(None, exc)
            return None

    def _finish(self, encoder: Any, first: int, last: int) -> None:
        try:
            encoder.close()
            os.replace(encoder.out_path, os.path.join(self.directory, segment_name(first, last - first + 1)))
        except (MpistyleError, OSError) as exc:
            self._failed(encoder, exc)
            return
        self.finished.append((first, last - first + 1))

    def _failed(self, encoder: Any, exc: BaseException) -> None:
        self.failures += 1
        logger.warning("segment encoder failed (%s); rank 0 will encode those frames from the buffer", exc)
        if encoder is not None:
            encoder.abort()


def join_output(directory: str, output: str, n_frames: int, width: int, height: int, fps: Fraction,
                read_frame: Callable[[int], np.ndarray], audio_from: str | None, crf: int,
                threads: int) -> dict[str, int]:
    """Rank 0: fill the holes from the buffer, join the segments into ``output``, remove the folder.

    Returns how many frames came from the ranks' segments and how many rank 0 encoded itself.
    Raises MpistyleError (the buffer is untouched, so a rerun only encodes).
    """
    from ..io.encode import VideoEncoder, join_segments

    pieces = tile(finished_segments(directory), n_frames)
    paths = []
    filled = 0
    for first, count, path in pieces:
        if path is None:  # frames no rank encoded (resume, or a failed segment encoder)
            path = os.path.join(directory, segment_name(first, count))
            enc = VideoEncoder(path + ".partial.mp4", width, height, fps, crf=crf, preset="veryfast",
                               threads=threads)
            try:
                for t in range(first, first + count):
                    enc.write(read_frame(t))
                enc.close()
            except BaseException:
                enc.abort()
                raise
            os.replace(path + ".partial.mp4", path)
            filled += count
        paths.append(path)
    join_segments(output, paths, width, height, fps, n_frames, audio_from=audio_from)
    shutil.rmtree(directory, ignore_errors=True)
    return {"segments": len(paths), "frames_from_ranks": n_frames - filled, "frames_encoded_on_rank0": filled}
