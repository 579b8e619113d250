"""Decoding a video file: its frames streamed out of ffmpeg, exactly as many as the probe counted.

* **Frames** are numpy uint8 arrays (H, W, 3), RGB, C-contiguous, writable.
* **Exact count.** ``iter_video_frames`` yields exactly ``n_frames`` frames (:mod:`mpistyle.io.probe`): every
  decode maps the first real video stream (``0:V:0``: cover pictures are skipped) with passthrough timing,
  and if a damaged file decodes to up to 1 % (at least 2) frames fewer than announced, the last frame is held
  in their place with a warning; more missing is a one-line error. ``start=k`` drops the first frames inside
  ffmpeg with ``select=gte(n,k)`` (decode-and-drop: exact, not a timestamp seek).
* **Colour.** Decoding converts with swscale (area filter when shrinking, bicubic otherwise, accurate
  rounding, full chroma interpolation), honouring the stream's colour tags (8 or 10 bit); untagged streams of
  720 lines or more are read as BT.709 (what players do), smaller untagged ones as BT.601.
"""

from __future__ import annotations

import collections
import logging
import subprocess
import threading
from collections.abc import Iterator

import numpy as np

from mpistyle.errors import MpistyleError
from mpistyle.io import children
from mpistyle.io.ffmpeg import _check_input_file, _drain, _ffmpeg, _kill, _passthrough
from mpistyle.io.probe import VideoInfo, _null_decode, probe_video

logger = logging.getLogger(__name__)


def _check_start(start: int) -> None:
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise MpistyleError(f"start frame must be a non-negative integer, got {start}")


def _scale_filter(w: int, h: int, src_w: int, src_h: int, untagged_hd: bool, extra: str = "") -> str:
    kernel = "area" if (w <= src_w and h <= src_h and (w, h) != (src_w, src_h)) else "bicubic"
    opts = f"scale={w}:{h}:flags={kernel}+accurate_rnd+full_chroma_int"
    if untagged_hd:
        opts += ":in_color_matrix=bt709"
    return opts + extra


def _read_exact(stream, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def iter_video_frames(path: str, size: tuple[int, int] | None = None, start: int = 0,
                      info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Stream the frames of a video file as RGB uint8 (h, w, 3) arrays, in constant memory.

    Yields exactly ``info.n_frames - start`` frames (``info`` defaults to ``probe_video(path)``): a variable-rate
    video is converted to its constant rate on the way (``info.frame_map``), and if a damaged file decodes to
    a few frames fewer than its container announced, the last frame is held in their place (a warning; more
    than 1 % missing is an error). ``size`` = (w, h) makes ffmpeg resample the frames (area when shrinking,
    bicubic otherwise). ``start`` skips the first frames exactly (decoded and dropped inside ffmpeg). The
    input is checked when this is called; ffmpeg starts on the first ``next`` and is killed when the iterator
    is closed or collected.
    """
    _check_start(start)
    info = info or probe_video(path)
    path = _check_input_file(path)
    header, n, _ = _null_decode(path, max_frames=1)
    if n <= 0:
        raise MpistyleError(f"{path}: contains no decodable video frames (truncated or corrupt?)")
    w, h = (header.width, header.height) if size is None else (int(size[0]), int(size[1]))
    if w <= 0 or h <= 0:
        raise MpistyleError(f"frame size must be positive, got {w}x{h}")
    start = int(start)
    mapping = None
    first = start
    if info.frame_map is not None and start < info.n_frames:
        first = info.frame_map[start]
        mapping = [m - first for m in info.frame_map[start:]]
    untagged_hd = not header.color_tagged and header.height >= 720
    filters = [f"select=gte(n\\,{first})"] if first else []
    filters.append(_scale_filter(w, h, header.width, header.height, untagged_hd))
    filters.append("format=rgb24")
    cmd = _ffmpeg("-loglevel", "error", "-i", path, "-map", "0:V:0", "-an", "-sn", "-dn",
                  "-vf", ",".join(filters), *_passthrough(), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1")
    return _frames(cmd, path, w, h, info.n_frames, start, mapping)


def _frames(cmd: list[str], path: str, w: int, h: int, total: int, start: int,
            mapping: list[int] | None) -> Iterator[np.ndarray]:
    """Yield frames ``start..total-1``: source frame ``mapping[k]`` (counted from the first decoded) for k."""
    count = total - start
    if count <= 0:
        return
    logger.debug("running %s", " ".join(cmd))
    nbytes = w * h * 3
    proc = children.popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          bufsize=max(nbytes, 1 << 16))
    errors: collections.deque[str] = collections.deque(maxlen=50)
    drain = threading.Thread(target=_drain, args=(proc.stderr, errors), daemon=True)
    drain.start()
    emitted, decoded, shown = 0, 0, -1
    frame: np.ndarray | None = None
    try:
        while emitted < count:
            want = mapping[emitted] if mapping is not None else emitted
            while decoded <= want:
                nxt = np.empty((h, w, 3), dtype=np.uint8)
                got = _read_exact(proc.stdout, memoryview(nxt).cast("B"))
                if got < nbytes:
                    if got:
                        logger.warning("%s: ffmpeg stopped in the middle of frame %d", path, start + decoded)
                    break
                frame, decoded = nxt, decoded + 1
            if decoded <= want:  # the decoder ended early
                break
            assert frame is not None
            yield frame if shown != decoded else frame.copy()  # a repeated frame is a copy of its own
            shown = decoded
            emitted += 1
        if emitted == count:
            return
        rc = proc.wait()
        drain.join()
        last = errors[-1] if errors else f"exit status {rc}"
        if emitted == 0 and frame is None:
            raise MpistyleError(f"{path}: ffmpeg failed to decode it: {last}" if rc else
                                f"{path}: the video ended before frame {start} (truncated or corrupt?)")
        missing = count - emitted
        if missing > max(2, total // 100):
            raise MpistyleError(f"{path}: only {start + emitted} of the {total} frames its container announces "
                                f"could be decoded (damaged file?): {last}")
        logger.warning("%s: the last %d of %d frames could not be decoded (damaged file?); holding the frame "
                       "before them in their place", path, missing, total)
        assert frame is not None
        for _ in range(missing):
            yield frame.copy()
    finally:
        _kill(proc)
        proc.stdout.close()
        drain.join(timeout=5)
