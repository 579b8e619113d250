"""Video files and image sequences behind one interface: what the rest of mpistyle reads and writes through.

* **Inputs** (``probe``, ``iter_frames``, ``read_all``): any file ffmpeg reads, or an image sequence (a
  printf pattern ``frames/%04d.png`` or a folder of PNG/JPEG frames, rate from ``fps``, default 25; see
  :mod:`mpistyle.io.sequence`). A sequence's ``VideoInfo`` has ``first_number`` set (``is_sequence``).
* **Outputs** (``check_output``, ``open_writer``): a video file (:class:`~mpistyle.io.encode.VideoEncoder`)
  or a PNG sequence (:class:`~mpistyle.io.sequence.SequenceWriter`), chosen by the output path; both write
  atomically and have ``write``/``close``/``abort``.

This module only dispatches; it imports both kinds, and neither imports it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from fractions import Fraction

import numpy as np

from mpistyle.errors import MpistyleError, write_failure
from mpistyle.io import sequence
from mpistyle.io.decode import _check_start, iter_video_frames
from mpistyle.io.encode import VIDEO_EXTENSIONS, VideoEncoder
from mpistyle.io.ffmpeg import ffmpeg_encoders, ffmpeg_exe
from mpistyle.io.probe import VideoInfo, probe_video, snap_fps
from mpistyle.io.sequence import SequenceWriter

logger = logging.getLogger(__name__)


def probe(path: str, fps: Fraction | None = None) -> VideoInfo:
    """Size, exact frame rate, exact frame count and audio presence of a video file or image sequence.

    A video's frames are counted from its packets without decoding (mp4/mov/mkv/webm: one frame per packet,
    edit-list discards excluded); other containers are decoded once. Only the first frame is decoded to
    check the stream and its size after rotation. ``iter_frames`` then yields exactly ``n_frames`` frames.
    ``fps`` is the rate of an image sequence (default 25); it is ignored for videos. Raises
    ``MpistyleError`` naming the path for anything that is not a usable video.
    """
    if sequence.is_sequence_input(os.fspath(path)):
        rate = snap_fps(fps) if fps is not None else sequence.DEFAULT_FPS
        width, height, n, first = sequence.probe(os.fspath(path))
        return VideoInfo(path=os.fspath(path), width=width, height=height, fps=rate, n_frames=n,
                         has_audio=False, duration=float(n / rate), first_number=first)
    return probe_video(path)


def iter_frames(path: str, size: tuple[int, int] | None = None, start: int = 0,
                info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Stream the frames of a video or image sequence as RGB uint8 (h, w, 3) arrays, in constant memory:
    exactly ``info.n_frames - start`` of them (``info`` defaults to ``probe(path)``). Videos: see
    :func:`mpistyle.io.decode.iter_video_frames`; image sequences: :func:`mpistyle.io.sequence.iter_frames`.
    """
    _check_start(start)
    info = info or probe(path)
    if info.is_sequence:
        return sequence.iter_frames(info.path, size, int(start), expected=info.n_frames)
    return iter_video_frames(path, size, start, info)


def read_all(path: str, size: tuple[int, int] | None = None, info: VideoInfo | None = None) -> np.ndarray:
    """All frames as one (N, h, w, 3) uint8 array. For small clips only (tests, metrics)."""
    frames = list(iter_frames(path, size, info=info))
    if not frames:
        raise MpistyleError(f"{path}: contains no decodable video frames")
    return np.stack(frames)


def check_output(input_path: str, output: str) -> None:
    """One-line error if ``output`` cannot be written: kind (video or image sequence), folder, same as input."""
    if not output:
        raise MpistyleError("no output path given (-o OUTPUT)")
    if sequence.is_sequence_output(output):
        sequence.check_output(output)
        if os.path.isdir(input_path) and os.path.isdir(output) and os.path.samefile(input_path, output):
            raise MpistyleError(f"output is the same folder as the input: {output}")
        return
    if not output.lower().endswith(VIDEO_EXTENSIONS):
        raise MpistyleError(f"output must end in one of {', '.join(VIDEO_EXTENSIONS)}, or be a PNG frame "
                            f"pattern (frames/%04d.png) or folder: {output}")
    if os.path.exists(output) and os.path.exists(input_path) and os.path.samefile(input_path, output):
        raise MpistyleError(f"output is the same file as the input: {output}")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise MpistyleError(f"output directory does not exist: {directory}")
    try:  # really try: access() says yes to root on read-only mounts
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mpistyle-probe-"):
            pass
    except OSError as exc:
        raise write_failure(exc, f"to the output directory {directory}") from None
    if output.lower().endswith(".webm") and "libvpx-vp9" not in ffmpeg_encoders():
        raise MpistyleError(f"{output}: this ffmpeg ({ffmpeg_exe()}) has no VP9 encoder (libvpx-vp9) for .webm")


def open_writer(out_path: str, width: int, height: int, fps: Fraction, audio_from: str | None = None,
                crf: int = 18, preset: str = "medium", threads: int = 0, n_frames: int = 0,
                first_number: int | None = None) -> VideoEncoder | SequenceWriter:
    """The writer for ``out_path``: a ``VideoEncoder``, or a ``SequenceWriter`` for a PNG pattern or folder
    (silent; numbered from ``first_number``, default 1). Both have ``write``/``close``/``abort``."""
    if sequence.is_sequence_output(out_path):
        if audio_from is not None:
            logger.info("%s: an image sequence has no audio track; the input's audio is not kept", out_path)
        return SequenceWriter(out_path, width, height, n_frames=n_frames,
                              start_number=1 if first_number is None else first_number)
    return VideoEncoder(out_path, width, height, fps, audio_from=audio_from, crf=crf, preset=preset,
                        threads=threads)
