"""Output that scales with ranks: the video is cut into segments at fixed frame indices.

Why: one x264 on rank 0 caps the whole job (about 740 frames/s at 640x360 with 16 threads), so at
GPU rates 64 ranks would wait on rank 0's encoder. Instead the video is cut into blocks of
``SEGMENT_FRAMES`` frames at fixed indices ([0, 64), [64, 128), ...: like the fusion anchors, never
where the partitions happen to fall), and each block becomes one video-only MP4 segment, encoded with
the same settings and a fixed x264 thread count whoever encodes it. Rank 0 only joins them (ffmpeg's
concat demuxer, stream copy: B-frames and timestamps stay exact) and copies the audio in. So the
output of N ranks is byte-identical to that of 1 rank with ``--encode segments``, and to a resumed run.

Who encodes a block:
- the rank that computes all of its frames in one run encodes it as they come out (a thread of its
  own, overlapped with the work; ``SegmentWriter``);
- blocks no single run covers (a partition boundary falls inside, or some frames were done before a
  resume) are encoded at the end from the HDF5 buffer by the rank owning their last frame
  (``leftover_share``), so each rank encodes about one and rank 0 none;
- anything still missing (a failed encoder) is encoded by rank 0 from the buffer before the join.

Segments are named by their block (``seg-FIRST-COUNT.mp4``) and appear only once complete (renamed).
They survive a stop or failure, so a rerun encodes only the blocks still missing; the folder is
cleared when the buffer starts afresh or the encoding settings change, and removed after the output is
written. ``--encode auto`` uses segments for H.264 outputs (.mp4/.m4v/.mov/.mkv) on more than one rank.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from ..errors import MpistyleError

logger = logging.getLogger(__name__)

ENCODE_MODES = ("auto", "rank0", "segments")
SEGMENT_CONTAINERS = (".mp4", ".m4v", ".mov", ".mkv")  # containers that take H.264 as it is
SEGMENT_FRAMES = 64  # frames per segment, at fixed indices (the fusion anchors' spacing: a keyframe there)
_NAME = re.compile(r"^seg-(\d{9})-(\d{9})\.mp4$")
_SETTINGS = "settings.json"


def segment_dir(output: str) -> str:
    """Hidden folder beside the output (same filesystem, so rank 0 reads what the ranks wrote)."""
    directory, name = os.path.split(os.path.abspath(output))
    return os.path.join(directory, f".{name}.segments")


def uses_segments(output: str, n_ranks: int, mode: str) -> bool:
    """Whether this run encodes segments (pure).

    ``auto`` picks segments for every H.264 output, whatever the rank count: the file is then the same,
    byte for byte, for 1 rank and N ranks (issue 20; one encoder without forced keyframes, ``rank0``,
    gives other bytes), and rank 0 encodes nothing on N ranks. ``n_ranks`` is kept for the callers'
    sake; it no longer changes the answer.
    """
    if mode not in ENCODE_MODES:
        raise MpistyleError(f"unknown encode mode {mode!r} (choose from {', '.join(ENCODE_MODES)})")
    if not output.lower().endswith(SEGMENT_CONTAINERS):
        if mode == "segments":
            raise MpistyleError(f"--encode segments needs an H.264 container output "
                                f"({', '.join(SEGMENT_CONTAINERS)}): {output}")
        return False
    return mode in ("segments", "auto")


def segment_threads(device_type: str) -> int:
    """x264 threads of every segment encoder: fixed per device type, because x264's output depends on
    its thread count, and a block must come out the same whichever rank encodes it."""
    return 4 if device_type == "cuda" else 1


# -- blocks ---------------------------------------------------------------------------------------
def block_bounds(k: int, n_frames: int) -> tuple[int, int]:
    """[first, stop) of block k."""
    return k * SEGMENT_FRAMES, min((k + 1) * SEGMENT_FRAMES, n_frames)


def n_blocks(n_frames: int) -> int:
    return -(-n_frames // SEGMENT_FRAMES)


def streamed_blocks(runs: Sequence[tuple[int, int]], n_frames: int) -> set[int]:
    """Blocks that lie wholly inside one run [start, stop): their rank encodes them as they come (pure)."""
    out = set()
    for start, stop in runs:
        for k in range(-(-start // SEGMENT_FRAMES), n_blocks(n_frames)):
            first, last = block_bounds(k, n_frames)
            if last > stop:
                break
            out.add(k)
    return out


def missing_blocks(directory: str, n_frames: int) -> list[int]:
    """Blocks that have no finished segment in ``directory``."""
    have = {(first, count) for first, count, _ in finished_segments(directory)}
    return [k for k in range(n_blocks(n_frames))
            if (block_bounds(k, n_frames)[0], block_bounds(k, n_frames)[1] - block_bounds(k, n_frames)[0])
            not in have]


def prepare_segment_dir(path: str, resume: bool, params: dict[str, Any]) -> None:
    """Rank 0, before any rank writes. A fresh run starts an empty folder; a resume keeps the finished
    segments made with the same encoding settings (so it encodes only what is missing)."""
    settings_file = os.path.join(path, _SETTINGS)
    keep = False
    if resume and os.path.isdir(path):
        try:
            with open(settings_file) as f:
                keep = json.load(f) == json.loads(json.dumps(params))
        except (OSError, ValueError):
            keep = False
    if keep:
        for name in os.listdir(path):
            if name != _SETTINGS and not _NAME.match(name):
                _remove(os.path.join(path, name))  # temporaries of a killed encoder
        return
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    with open(settings_file, "w") as f:
        json.dump(params, f, sort_keys=True)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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


class SegmentWriter(threading.Thread):
    """One rank's encoder of the blocks it computes whole, fed frame by frame as they come out.

    ``begin_run(start, stop)`` before a run's frames, then ``put`` them in order: a frame of a block the
    run covers whole goes to that block's encoder, others are left to the leftover pass. The queue is
    bounded (memory stays bounded; the worker waits only if x264 falls behind). An encoder failure is
    logged and that block left out: it is encoded again from the buffer at the end.
    """

    def __init__(self, directory: str, width: int, height: int, fps: Fraction, crf: int, threads: int,
                 n_frames: int, encoder_factory: Callable[..., Any] | None = None) -> None:
        super().__init__(name="mpistyle-segments", daemon=True)
        self.directory, self.width, self.height, self.fps = directory, width, height, fps
        self.crf, self.threads, self.n_frames = crf, threads, n_frames
        self._factory = encoder_factory
        self._queue: queue.Queue[tuple[int, Any] | None] = queue.Queue(maxsize=8)
        self._abort = threading.Event()
        self._run_bounds = (0, 0)
        self.finished: list[tuple[int, int]] = []  # (first, count) of the segments written
        self.failures = 0
        self.encode_s = 0.0

    def begin_run(self, start: int, stop: int) -> None:
        self._run_bounds = (start, stop)

    def put(self, t: int, frame: np.ndarray) -> None:
        k = t // SEGMENT_FRAMES
        first, stop = block_bounds(k, self.n_frames)
        if not (self._run_bounds[0] <= first and stop <= self._run_bounds[1]):
            return  # a block this run does not cover whole: the leftover pass encodes it
        while self.is_alive():
            try:
                self._queue.put((t, frame), timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self, abort: bool = False) -> None:
        """Finish the current block (or drop it with ``abort``) and wait for the thread."""
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
        current: Any = None
        first = stop = -1
        while True:
            item = self._queue.get()
            if item is None or self._abort.is_set():
                break
            t, frame = item
            start = time.perf_counter()
            if current is None and t % SEGMENT_FRAMES == 0:
                first, stop = block_bounds(t // SEGMENT_FRAMES, self.n_frames)
                current = self._open(first)
            if current is not None and first <= t < stop:
                try:
                    current.write(frame)
                    if t == stop - 1:
                        self._finish(current, first, stop - first)
                        current = None
                except MpistyleError as exc:
                    self._failed(current, exc)
                    current = None
            self.encode_s += time.perf_counter() - start
        if current is not None:
            current.abort()  # an unfinished block: the rerun (or the leftover pass) encodes it whole
        while not self._queue.empty():
            self._queue.get_nowait()

    def _open(self, first: int) -> Any:
        try:
            return open_segment(self.directory, first, self.width, self.height, self.fps, self.crf, self.threads,
                                self._factory)
        except MpistyleError as exc:
            self._failed(None, exc)
            return None

    def _finish(self, encoder: Any, first: int, count: int) -> None:
        try:
            finish_segment(self.directory, encoder, first, count)
        except (MpistyleError, OSError) as exc:
            self._failed(encoder, exc)
            return
        self.finished.append((first, count))

    def _failed(self, encoder: Any, exc: BaseException) -> None:
        self.failures += 1
        logger.warning("segment encoder failed (%s); that block will be encoded from the buffer", exc)
        if encoder is not None:
            encoder.abort()


def open_segment(directory: str, first: int, width: int, height: int, fps: Fraction, crf: int, threads: int,
                 factory: Callable[..., Any] | None = None) -> Any:
    """An encoder for the block starting at ``first``, under a temporary name (every block alike)."""
    from ..io.encode import VideoEncoder

    path = os.path.join(directory, f"seg-{first:09d}.partial.mp4")
    encoder = (factory or VideoEncoder)(path, width, height, fps, crf=crf, preset="veryfast", threads=threads)
    encoder.log_level = logging.DEBUG  # a part of the output, not the output: a detail (-v)
    return encoder


def finish_segment(directory: str, encoder: Any, first: int, count: int) -> None:
    encoder.close()
    os.replace(encoder.out_path, os.path.join(directory, segment_name(first, count)))


def encode_blocks(directory: str, blocks: Sequence[int], n_frames: int, width: int, height: int, fps: Fraction,
                  read_frame: Callable[[int], np.ndarray], crf: int, threads: int) -> int:
    """Encode whole blocks from the buffer (frames read with ``read_frame``). Returns the frames encoded."""
    frames = 0
    for k in blocks:
        first, stop = block_bounds(k, n_frames)
        enc = open_segment(directory, first, width, height, fps, crf, threads)
        try:
            for t in range(first, stop):
                enc.write(read_frame(t))
            finish_segment(directory, enc, first, stop - first)
        except BaseException:
            enc.abort()
            raise
        frames += stop - first
    return frames


def leftover_share(blocks: Sequence[int], rank: int, size: int, n_frames: int,
                   bounds: Sequence[tuple[int, int]] | None = None) -> list[int]:
    """The leftover blocks rank ``rank`` encodes (pure).

    Static partitions (``bounds``): the owner of the block's last frame, i.e. the rank after the
    partition boundary inside it: each rank gets at most about one block, and rank 0 (whose partition
    starts at 0) none on a fresh run, so it stays out of the data path. Dynamic chunks: shared out in
    turn over the ranks other than rank 0.
    """
    if bounds is not None:
        owners = {k: next(r for r, (a, b) in enumerate(bounds) if a <= block_bounds(k, n_frames)[1] - 1 < b)
                  for k in blocks}
        return sorted(k for k in blocks if owners[k] == rank)
    helpers = list(range(1, size)) or [0]
    return [k for i, k in enumerate(sorted(blocks)) if helpers[i % len(helpers)] == rank]


def join_output(directory: str, output: str, n_frames: int, width: int, height: int, fps: Fraction,
                read_frame: Callable[[int], np.ndarray], audio_from: str | None, crf: int,
                threads: int) -> dict[str, int]:
    """Rank 0: encode any block still missing from the buffer, join the segments into ``output``, remove
    the folder. Returns how many frames came from segments the ranks made and how many rank 0 encoded.
    Raises MpistyleError (the buffer is untouched, so a rerun only encodes).
    """
    from ..io.encode import join_segments

    missing = missing_blocks(directory, n_frames)
    filled = encode_blocks(directory, missing, n_frames, width, height, fps, read_frame, crf, threads)
    paths = [path for _, _, path in finished_segments(directory)]
    join_segments(output, paths, width, height, fps, n_frames, audio_from=audio_from)
    shutil.rmtree(directory, ignore_errors=True)
    return {"segments": len(paths), "frames_from_ranks": n_frames - filled, "frames_encoded_on_rank0": filled}
