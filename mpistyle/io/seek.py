"""Decode one contiguous range of frames with a real seek, frame-exact (``decode_range``).

``iter_frames(start=k)`` is exact but decodes everything before ``k``; an MPI rank far into a long video
would decode the whole beginning for nothing. ``decode_range(path, first, count)`` yields the same frames
(bit-identical: same scale filter, colour handling, rotation) but lets ffmpeg seek near ``first`` first.

How a constant-rate video is read (mp4/mov/mkv/webm, whose frame grid ``probe`` checked):

1. One cheap run decodes frame 0 with ``-copyts`` and ``showinfo``: its presentation timestamp ``pts0``
   and the stream's time base. Frame ``k`` is then the one at ``pts0 + k/fps`` (within a quarter frame:
   ``probe`` checked that every packet lies on that grid).
2. The range run seeks (``-noaccurate_seek -seek_timestamp 1 -ss``, keeping timestamps with ``-copyts``)
   to a few frames before ``first``; the demuxer lands on a keyframe at or before that time (by decode
   time in some muxers, hence the margin: B-frames shift decode times before presentation times).
   ``showinfo`` before ``select`` reports every decoded frame (pts, keyframe flag) on stderr; ``select``
   keeps those at or after ``first``'s slot, so skipped frames are never scaled or piped.
3. Every kept frame is checked before it is yielded: a keyframe (IDR, recovery point, CRA, VP9 keyframe)
   must have been decoded at or before frame ``first`` (else the seek landed too late, e.g. on the
   leading pictures of an open GOP: retried with a wider margin), and kept frame ``i`` must map to index
   ``first + i``. Anything unexpected (no time base, a gap, a missing pts, ffmpeg ending early) switches
   to the exact decode-and-drop path for the rest of the range: never a wrong frame, at worst a slow one.

Assumption: from a keyframe on, frames later in display order decode independently of what came before
it (what the codecs' random-access points guarantee; open-GOP leading pictures come before it in display
order and are dropped). A file damaged in the middle (a frame the decoder drops) is indexed by timestamp
here but shifted by one in ``iter_frames``; such files are out of scope.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import re
import resource
import subprocess
import threading
import time
from collections.abc import Generator, Iterator
from fractions import Fraction

import numpy as np

from mpistyle.errors import MpistyleError
from mpistyle.io import children
from mpistyle.io.decode import _read_exact, _scale_filter
from mpistyle.io.ffmpeg import _check_input_file, _ffmpeg, _kill, _passthrough
from mpistyle.io.media import iter_frames, probe
from mpistyle.io.probe import _COUNTABLE, VideoInfo, _null_decode

logger = logging.getLogger(__name__)

# Frames before ``first`` to seek to: covers the B-frame delay between decode and presentation times of
# the usual encoders (x264/x265 with pyramids: 2-4 frames). A wider margin is tried if that lands late.
SEEK_MARGINS = (4, 32)
# Below this ``first`` a seek saves nothing worth a second ffmpeg run: decode-and-drop from the start.
MIN_SEEK_FRAME = 32
_SHOWINFO = re.compile(r"^\[Parsed_showinfo_\d+ @ [^\]]*\] n:\s*\d+ pts:\s*(\S+) .*?\biskey:([01])")
_TIMEBASE = re.compile(r"^\[Parsed_showinfo_\d+ @ [^\]]*\] config in time_base: (\d+)/(\d+)")
_CONTAINER = re.compile(r"^Input #0, ([^\n]*?), from", flags=re.MULTILINE)
_WAIT_S = 60.0  # showinfo's line is written before the frame leaves ffmpeg: it is there, or ffmpeg hangs


def _whole(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MpistyleError(f"{name} must be an integer, got {value!r}")
    return int(value)


SEEKABLE_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm")  # the containers whose frame grid probe checks


def seeks(info: VideoInfo) -> bool:
    """Does :func:`decode_range` read a range without decoding the frames before it? Image sequences and
    constant-rate mp4/mov/mkv/webm videos: yes. Variable-rate videos and other containers take the exact
    decode-and-drop path, so a rank would decode everything before its frames (pure)."""
    if info.is_sequence:
        return True
    return info.frame_map is None and str(info.path).lower().endswith(SEEKABLE_SUFFIXES)


def decode_range(path: str, first: int, count: int, size: tuple[int, int] | None = None,
                 info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Frames ``first .. first+count-1`` of a video or image sequence, bit-identical to ``iter_frames``.

    RGB uint8 (h, w, 3) arrays, resampled to ``size`` = (w, h) like ``iter_frames``. Constant-rate videos
    in mp4/mov/mkv/webm are read with a keyframe seek near ``first`` and checked frame by frame (see the
    module docstring); image sequences are read from file ``first`` on (random access). Variable-rate
    videos (``info.frame_map``) and other containers (MPEG-TS, AVI...) use the exact decode-and-drop path
    of ``iter_frames(start=first)``, stopped after ``count`` frames. Arguments are checked on the call;
    ffmpeg starts on the first ``next`` and is killed once ``count`` frames are out or the iterator is
    closed.
    """
    first, count = _whole(first, "first frame"), _whole(count, "frame count")
    if first < 0:
        raise MpistyleError(f"first frame must be >= 0, got {first}")
    if count < 0:
        raise MpistyleError(f"frame count must be >= 0, got {count}")
    info = info or probe(path)
    if first + count > info.n_frames:
        raise MpistyleError(f"frames {first}..{first + count - 1} are past the end of {info.path} "
                            f"({info.n_frames} frames)")
    if count == 0:
        return iter(())
    if info.is_sequence or info.frame_map is not None or first < MIN_SEEK_FRAME:
        return _exact(path, first, count, size, info)
    path = _check_input_file(path)
    return _seek(path, first, count, size, info)


def _exact(path: str, first: int, count: int, size: tuple[int, int] | None,
           info: VideoInfo) -> Iterator[np.ndarray]:
    """The reference path: ``iter_frames(start=first)``, its ffmpeg (or file reader) closed after ``count``."""
    frames = iter_frames(path, size, start=first, info=info)
    try:
        yield from itertools.islice(frames, count)
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()


class _Stderr:
    """Reads a ffmpeg's stderr in a thread: the showinfo frames (pts, keyframe) and time base, last lines."""

    def __init__(self, stream) -> None:
        self.frames: list[tuple[int | None, bool]] = []
        self.time_base: Fraction | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self.done = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip()
                m = _SHOWINFO.match(line)
                with self._cond:
                    if m:
                        pts = None if m.group(1) == "NOPTS" else int(m.group(1))
                        self.frames.append((pts, m.group(2) == "1"))
                    elif (t := _TIMEBASE.match(line)) and self.time_base is None and int(t.group(2)):
                        self.time_base = Fraction(int(t.group(1)), int(t.group(2)))
                    elif not line.startswith("[Parsed_showinfo"):
                        self.tail.append(line)
                    self._cond.notify_all()
        finally:
            stream.close()
            with self._cond:
                self.done = True
                self._cond.notify_all()

    def wait_for(self, ready) -> bool:
        """Wait until ``ready()`` holds (under the lock) or stderr ends; whether it holds."""
        with self._cond:
            self._cond.wait_for(lambda: ready() or self.done, timeout=_WAIT_S)
            return bool(ready())

    def join(self) -> None:
        self._thread.join(timeout=5)


def _frame_zero(path: str) -> tuple[int, Fraction, str] | None:
    """(pts of frame 0 with ``-copyts``, stream time base, container) from a one-frame decode; None if unknown."""
    cmd = _ffmpeg("-loglevel", "info", "-nostats", "-copyts", "-i", path, "-map", "0:V:0", "-an", "-sn", "-dn",
                  "-vf", "showinfo", "-frames:v", "1", *_passthrough(), "-f", "null", "-")
    res = children.run(cmd, stdin=subprocess.DEVNULL)
    stderr = res.stderr.decode(errors="replace")
    pts = tb = None
    for line in stderr.splitlines():
        if tb is None and (t := _TIMEBASE.match(line)) and int(t.group(2)):
            tb = Fraction(int(t.group(1)), int(t.group(2)))
        elif (m := _SHOWINFO.match(line)) and m.group(1) != "NOPTS":
            pts = int(m.group(1))
            break
    container = _CONTAINER.search(stderr)
    if pts is None or tb is None or container is None:
        return None
    return pts, tb, container.group(1)


def _seek(path: str, first: int, count: int, size: tuple[int, int] | None,
          info: VideoInfo) -> Iterator[np.ndarray]:
    """Seek near ``first``, verify every frame's index; the exact path takes over on any surprise."""
    header, n, _ = _null_decode(path, max_frames=1)  # what iter_frames bases its size and colours on
    if n <= 0:
        raise MpistyleError(f"{path}: contains no decodable video frames (truncated or corrupt?)")
    w, h = (header.width, header.height) if size is None else (int(size[0]), int(size[1]))
    if w <= 0 or h <= 0:
        raise MpistyleError(f"frame size must be positive, got {w}x{h}")
    zero = _frame_zero(path)
    if zero is None or not any(name in zero[2].split(",") for name in _COUNTABLE):
        # No timestamps to index by, or a container whose frame grid probe did not check (MPEG-TS, AVI...)
        logger.debug("%s: no seek (frame 0: %s); decoding from the start", path, zero)
        yield from _exact(path, first, count, size, info)
        return
    pts0, tb, _ = zero
    scale = _scale_filter(w, h, header.width, header.height, not header.color_tagged and header.height >= 720)
    done = 0
    for margin in SEEK_MARGINS:
        if first - margin < MIN_SEEK_FRAME // 2:
            break  # too close to the start for a seek to pay
        done, late = yield from _attempt(path, first, count, w, h, scale, info.fps, pts0, tb, margin)
        if done or not late:
            break
    if done < count:
        if done == 0:
            logger.debug("%s: seek to frame %d not usable; decoding from the start", path, first)
        yield from _exact(path, first + done, count - done, size, info)


def _attempt(path: str, first: int, count: int, w: int, h: int, scale: str, fps: Fraction, pts0: int,
             tb: Fraction, margin: int) -> Generator[np.ndarray, None, tuple[int, bool]]:
    """One seek run: yield verified frames from ``first`` on; return (frames yielded, landed too late)."""
    slot = Fraction(1) / (fps * tb)  # one frame in time-base units
    keep_from = pts0 + math.ceil((first - Fraction(1, 2)) * slot)  # first's slot starts half a frame early
    seek_to = (pts0 + (first - margin) * slot) * tb
    cmd = _ffmpeg("-loglevel", "info", "-nostats", "-noaccurate_seek", "-seek_timestamp", "1",
                  "-ss", f"{math.floor(seek_to * 1_000_000) / 1_000_000:.6f}", "-copyts", "-i", path,
                  "-map", "0:V:0", "-an", "-sn", "-dn",
                  "-vf", f"showinfo,select=gte(pts\\,{keep_from}),{scale},format=rgb24", *_passthrough(),
                  "-frames:v", str(count), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1")
    logger.debug("running %s", " ".join(cmd))
    nbytes = w * h * 3
    proc = children.popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          bufsize=max(nbytes, 1 << 16))
    err = _Stderr(proc.stderr)
    done, seen, key_seen = 0, 0, False  # frames yielded; showinfo entries looked at; a keyframe before first
    why = ""
    try:
        while done < count:
            frame = np.empty((h, w, 3), dtype=np.uint8)
            if _read_exact(proc.stdout, memoryview(frame).cast("B")) < nbytes:
                why = "ffmpeg ended early"
                break
            # The frame's showinfo entry: the next one at or after keep_from (select dropped the others).
            # It was written before the frame left ffmpeg, so it is there or on its way.
            entry: tuple[int | None, bool] | None = None
            while entry is None:
                if seen >= len(err.frames) and not err.wait_for(lambda n=seen: len(err.frames) > n):
                    break
                pts, key = err.frames[seen]
                seen += 1
                if pts is None or pts >= keep_from:
                    entry = pts, key
                elif key:
                    key_seen = True
            if entry is None:
                why = "no showinfo line for a frame"
                break
            pts, key = entry
            if err.time_base != tb or pts is None:
                why = f"time base {err.time_base} (frame 0: {tb}), pts {pts}"
                break
            index = (pts - pts0) / slot
            if done == 0 and (round(index) > first or not (key_seen or key)):
                # Decoding began after ``first`` (the demuxer found no keyframe early enough, or only
                # open-GOP leading pictures decoded from the next one): a wider margin may do.
                logger.debug("%s: seek with a margin of %d frames landed after frame %d", path, margin, first)
                return 0, True
            if round(index) != first + done or abs(index - round(index)) > Fraction(1, 4):
                why = f"frame at pts {pts} is index {float(index):.2f}, expected {first + done}"
                break
            yield frame
            done += 1
    finally:
        _kill(proc)
        proc.stdout.close()
        err.join()
    if why:
        logger.info("%s: seek to frame %d: %s after %d frames; decoding the rest exactly", path, first, why, done)
    return done, False


# ---------------------------------------------------------------------------------------------- measure


def _timed(frames: Iterator[np.ndarray]) -> tuple[int, float, float]:
    """(frames, wall seconds, CPU seconds of the finished children) to exhaust ``frames``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    n = sum(1 for _ in frames)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return n, wall, cpu


def measure_seek(path: str, parts: tuple[int, ...] = (2, 4, 8), size: tuple[int, int] | None = None) -> None:
    """Print wall and ffmpeg CPU time: the full decode vs ``decode_range`` of the last 1/N, for N in ``parts``.

    CPU time is that of finished child processes (``RUSAGE_CHILDREN``: ffmpeg, reaped when done), so it
    includes the small probe runs. The machine's load is printed too: the figures are noisy.
    """
    info = probe(path)
    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    print(f"{path}: {info.width}x{info.height}, {info.n_frames} frames at {info.fps} fps; load {load}")
    n, wall, cpu = _timed(iter_frames(path, size, info=info))
    print(f"  full decode        {n:6d} frames  wall {wall:6.2f} s  ffmpeg CPU {cpu:6.2f} s")
    for parts_n in parts:
        first = info.n_frames - info.n_frames // parts_n
        n, wall_r, cpu_r = _timed(decode_range(path, first, info.n_frames - first, size, info=info))
        print(f"  last 1/{parts_n:<2d} (seek)   {n:6d} frames  wall {wall_r:6.2f} s  ffmpeg CPU {cpu_r:6.2f} s"
              f"  ({wall_r / wall:.0%} / {cpu_r / max(cpu, 1e-9):.0%} of full)")
        n, wall_e, cpu_e = _timed(itertools.islice(iter_frames(path, size, start=first, info=info), n))
        print(f"  last 1/{parts_n:<2d} (drop)   {n:6d} frames  wall {wall_e:6.2f} s  ffmpeg CPU {cpu_e:6.2f} s")
