"""Video input/output through the ffmpeg binary bundled with imageio-ffmpeg (no ffprobe needed).

Choices made here (callers rely on them):

* **Frames** are numpy uint8 arrays (H, W, 3), RGB, C-contiguous, writable.
* **Exact frame accounting.** Every decode maps the first real video stream (``0:V:0``: attached cover
  pictures are skipped) and uses ``-fps_mode passthrough``, so ffmpeg never duplicates or drops a frame.
  ``probe`` counts frames by decoding the whole stream the same way ``iter_frames`` does, so
  ``probe(p).n_frames == len(read_all(p))`` holds, also for files with damaged frames.
  ``iter_frames(start=k)`` drops the first k decoded frames inside ffmpeg with ``select=gte(n,k)``
  (decode-and-drop: exact, not a timestamp seek).
* **Size.** ``VideoInfo.width``/``height`` are the size of the decoded frames *after* ffmpeg's automatic
  rotation (phone videos with a rotation matrix come out upright). Pixels are taken as stored: a non-square
  sample aspect ratio is not corrected, and the output is written with square pixels.
* **fps** is an exact ``Fraction``. ffmpeg prints the rate rounded to 2 decimals; NTSC-family rates
  (23.98, 29.97, 47.95, 59.94, 119.88, ...) are snapped to N*1000/1001, anything else goes through
  ``Fraction(text).limit_denominator(1001)`` (25 -> 25, 12.5 -> 25/2). ``duration`` is ``n_frames / fps``.
* **Colour.** Decoding converts with swscale (area filter when shrinking, bicubic otherwise, accurate
  rounding, full chroma interpolation), honouring the stream's colour tags; untagged streams of 720 lines or
  more are read as BT.709 (what players do), smaller untagged ones as BT.601. Encoding writes BT.709,
  limited range, and tags it so, so a decode of our own output round-trips.
* **Encoding** (``VideoEncoder``): raw rgb24 frames are piped to ffmpeg/libx264 (yuv420p, CRF, preset),
  first into a hidden temporary file next to the output. An odd width or height is **padded** by one black
  column/row on the right/bottom (``pad=ceil(iw/2)*2:ceil(ih/2)*2``): a 97x71 stream is stored as 98x72 with
  the picture in the top-left corner. The audio of ``audio_from`` (first audio stream, trimmed to the video's
  duration, never the other way round) is then muxed in a second, stream-copy pass: ``-c:a copy``, falling
  back to AAC when the container refuses the codec; a silent or absent source just gives a silent output.
  The frame count of the result is checked against the frames written, then the file is fsynced and
  atomically renamed onto ``out_path``. On any failure (or ``abort``) the temporary files are removed and
  ``out_path`` is left untouched. mp4/mov/m4v get ``-movflags +faststart``.
* ffmpeg children run in their own session, so a Ctrl-C in the terminal reaches Python only and the caller
  decides (``abort`` kills the child). Errors the user can act on become one-line ``MpistyleError``s
  (missing/empty/corrupt input, no video stream, disk full, permission denied...).
"""

from __future__ import annotations

import collections
import contextlib
import fractions
import functools
import logging
import os
import re
import secrets
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from types import TracebackType

import numpy as np

from mpistyle import children
from mpistyle.errors import MpistyleError

logger = logging.getLogger(__name__)

# Output containers we know how to write, and whether they take "-movflags +faststart".
_CONTAINERS = {".mp4": True, ".m4v": True, ".mov": True, ".mkv": False}
# Audio codecs stream-copied into each container; others are re-encoded to AAC. ffmpeg accepts more in mp4
# (vorbis, pcm) but players do not. None: copy anything.
_MP4_AUDIO = frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"})
_COPY_AUDIO: dict[str, frozenset[str] | None] = {
    ".mp4": _MP4_AUDIO, ".m4v": _MP4_AUDIO, ".mkv": None,
    ".mov": _MP4_AUDIO | {"pcm_s16le", "pcm_s24le", "pcm_s16be", "pcm_s24be", "pcm_f32le"}}
_X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                 "veryslow", "placebo")
# NTSC-family base rates: a printed rate close to N*1000/1001 for one of these N is snapped to it.
_NTSC_BASES = (15, 24, 30, 48, 60, 72, 96, 120, 144, 240)
_COLOR_MATRIX_TAGS = re.compile(
    r"\b(bt709|bt470bg|smpte170m|smpte240m|bt2020nc|bt2020c|fcc|ycgco|gbr|ictcp|chroma-derived-nc"
    r"|chroma-derived-c|smpte2085)\b")
_SIZE_RE = re.compile(r"(?:^|[\s,])(\d{1,6})x(\d{1,6})(?=[\s,]|$)")
_RATE_RE = r"(\d+(?:\.\d+)?k?) {unit}\b"
_STREAM_RE = re.compile(r"^\s*Stream #\d+:\d+\S*: (Video|Audio|Subtitle|Data|Attachment): (.*)$")
_DISK_FULL = ("No space left on device", "Disk quota exceeded", "File too large")


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` found out about a video file (see the module docstring for the conventions)."""

    path: str
    width: int
    height: int
    fps: fractions.Fraction
    n_frames: int
    has_audio: bool
    duration: float


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of imageio-ffmpeg's bundled ffmpeg binary."""
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError) as exc:  # pragma: no cover - depends on the installation
        raise MpistyleError(f"cannot find the ffmpeg binary of imageio-ffmpeg: {exc}") from exc


# --------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class _Header:
    """The parts of ffmpeg's stream report we use."""

    width: int  # decoded (post-rotation) size when an output stream was reported, else the coded size
    height: int
    fps: Fraction | None
    has_audio: bool
    color_tagged: bool


def _last_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message from ffmpeg"


def _section(stderr: str, start: str, stops: tuple[str, ...]) -> list[str]:
    """Lines of ffmpeg's report from the one starting with ``start`` up to the first starting with a stop."""
    out: list[str] = []
    inside = False
    for line in stderr.splitlines():
        if line.startswith(start):
            inside = True
        elif inside and line.startswith(stops):
            break
        if inside:
            out.append(line)
    return out


def _streams(lines: list[str]) -> list[tuple[str, str]]:
    found = []
    for line in lines:
        m = _STREAM_RE.match(line)
        if m:
            found.append((m.group(1), m.group(2)))
    return found


def _parse_size(desc: str) -> tuple[int, int] | None:
    m = _SIZE_RE.search(desc)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _parse_rate_text(text: str) -> Fraction:
    return Fraction(text[:-1]) * 1000 if text.endswith("k") else Fraction(text)


def snap_fps(value: float | Fraction | str) -> Fraction:
    """Exact frame rate from a (possibly rounded) printed one: 29.97 -> 30000/1001, 25 -> 25, 12.5 -> 25/2."""
    exact = value if isinstance(value, Fraction) else Fraction(str(value))
    if exact <= 0:
        raise MpistyleError(f"frame rate must be positive, got {value}")
    for base in _NTSC_BASES:
        ntsc = Fraction(base * 1000, 1001)
        if exact != base and abs(exact - ntsc) < Fraction(6, 1000):
            return ntsc
    return exact.limit_denominator(1001)


def _parse_fps(desc: str) -> Fraction | None:
    for unit in ("fps", "tbr"):
        m = re.search(_RATE_RE.format(unit=unit), desc)
        if m:
            rate = _parse_rate_text(m.group(1))
            if rate > 0:
                return snap_fps(rate)
    return None


def _parse_header(path: str, stderr: str) -> _Header:
    """Parse the input (and, if any, output) stream report; raise a one-line error if there is no video."""
    in_section = _section(stderr, "Input #0", ("Stream mapping:", "Output #", "Press [q]"))
    if not in_section:
        raise _open_error(path, stderr)
    in_streams = _streams(in_section)
    videos = [d for kind, d in in_streams if kind == "Video" and "(attached pic)" not in d]
    has_audio = any(kind == "Audio" for kind, _ in in_streams)
    if not videos:
        raise MpistyleError(f"{path}: has no video stream" + (" (audio only)" if has_audio else ""))
    desc = videos[0]
    size = None
    for kind, out_desc in _streams(_section(stderr, "Output #0", ("[out#", "frame=", "Press [q]"))):
        if kind == "Video":
            size = _parse_size(out_desc)
            break
    size = size or _parse_size(desc)
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise MpistyleError(f"{path}: cannot read the video frame size")
    pix = re.search(r"\(([^)]*)\)", desc.split(",", 1)[1] if "," in desc else "")
    tagged = bool(pix and _COLOR_MATRIX_TAGS.search(pix.group(1)))
    return _Header(size[0], size[1], _parse_fps(desc), has_audio, tagged)


def _open_error(path: str, stderr: str) -> MpistyleError:
    if "Invalid data found when processing input" in stderr or "moov atom not found" in stderr:
        return MpistyleError(f"{path}: not a readable video file (unknown format, truncated or corrupt)")
    if "Permission denied" in stderr:
        return MpistyleError(f"{path}: permission denied")
    return MpistyleError(f"{path}: ffmpeg cannot open it: {_last_line(stderr)}")


def _check_input_file(path: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MpistyleError(f"{path}: no such file")
    if os.path.isdir(path):
        raise MpistyleError(f"{path}: is a directory, not a video file")
    if not os.path.isfile(path):
        raise MpistyleError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise MpistyleError(f"{path}: permission denied")
    if os.path.getsize(path) == 0:
        raise MpistyleError(f"{path}: empty file")
    return path


def _run_ffmpeg(args: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", *args]
    logger.debug("running %s", " ".join(cmd))
    return children.run(cmd, stdin=subprocess.DEVNULL, text=True, errors="replace")


def _null_decode(path: str, max_frames: int | None = None, copy: bool = False) -> tuple[_Header, int, str]:
    """Decode (or packet-copy) the first video stream into the null muxer: (header, frame count, stderr)."""
    args = ["-i", path, "-map", "0:V:0?", "-an", "-sn", "-dn"]
    if max_frames is not None:
        args += ["-frames:v", str(max_frames)]
    if copy:
        args += ["-c", "copy"]
    args += ["-fps_mode", "passthrough", "-f", "null", "-progress", "pipe:1", "-nostats", "-"]
    res = _run_ffmpeg(args)
    header = _parse_header(path, res.stderr)
    frames = [int(m) for m in re.findall(r"^frame=(\d+)\s*$", res.stdout, flags=re.MULTILINE)]
    n = frames[-1] if frames else 0
    if res.returncode != 0 and n > 0:
        logger.warning("%s: ffmpeg reported an error after %d frames: %s", path, n, _last_line(res.stderr))
    return header, n, res.stderr


# ----------------------------------------------------------------------------------------------- probe


def probe(path: str) -> VideoInfo:
    """Size, exact frame rate, exact decodable frame count and audio presence of a video file.

    Decodes the whole video stream once (ffmpeg, multi-threaded, no pixel conversion), which is far cheaper
    than stylizing it. Raises ``MpistyleError`` naming the path for anything that is not a usable video.
    """
    path = _check_input_file(path)
    header, n_frames, stderr = _null_decode(path)
    if n_frames <= 0:
        raise MpistyleError(f"{path}: contains no decodable video frames (truncated or corrupt?)")
    fps = header.fps
    if fps is None:  # no rate in the report (rare, e.g. raw streams): fall back to the container's duration
        m = re.search(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", stderr)
        secs = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3)) if m else 0.0
        if secs <= 0:
            raise MpistyleError(f"{path}: cannot determine the frame rate")
        fps = snap_fps(round(n_frames / secs, 3))
    info = VideoInfo(path=path, width=header.width, height=header.height, fps=fps, n_frames=n_frames,
                     has_audio=header.has_audio, duration=float(n_frames / fps))
    logger.debug("probed %s", info)
    return info


def audio_codec(path: str) -> str | None:
    """Codec name of the first audio stream (e.g. ``"aac"``), ``None`` if silent; reads the header only."""
    path = _check_input_file(path)
    res = _run_ffmpeg(["-i", path])  # no output: ffmpeg reports the streams and exits non-zero, that's fine
    section = _section(res.stderr, "Input #0", ("Stream mapping:", "Output #", "At least one"))
    if not section:
        raise _open_error(path, res.stderr)
    for kind, desc in _streams(section):
        if kind == "Audio":
            return re.split(r"[\s,(]", desc.strip(), maxsplit=1)[0]
    return None


def _even(x: float) -> int:
    return int(np.floor(x / 2 + 0.5)) * 2  # nearest even integer, halves rounded up


def output_size(info: VideoInfo, width: int | None = None, height: int | None = None,
                scale: float | None = None, max_side: int = 8192) -> tuple[int, int]:
    """The processing size (w, h), both even.

    ``width`` and ``height``: exactly that (rounded to even). Only one of them: the other follows the
    source aspect ratio. ``scale``: the source size times ``scale``. Nothing: the source size. Every result is
    rounded to the nearest even number (yuv420p needs even sides). Values that are zero, negative, larger
    than ``max_side`` or that would give a side under 2 pixels raise ``MpistyleError``.
    """
    if scale is not None and (width is not None or height is not None):
        raise MpistyleError("give either a scale factor or a width/height, not both")
    for name, value in (("width", width), ("height", height)):
        if value is not None and (isinstance(value, bool) or not float(value).is_integer()):
            raise MpistyleError(f"{name} must be a whole number of pixels, got {value}")
        if value is not None and not 0 < value <= max_side:
            raise MpistyleError(f"{name} must be between 1 and {max_side} pixels, got {value}")
    if scale is not None and not (np.isfinite(scale) and scale > 0):
        raise MpistyleError(f"scale must be a positive number, got {scale}")
    aspect = info.width / info.height
    if width is not None and height is not None:
        w, h = float(width), float(height)
    elif width is not None:
        w, h = float(width), width / aspect
    elif height is not None:
        w, h = height * aspect, float(height)
    else:
        factor = 1.0 if scale is None else float(scale)
        w, h = info.width * factor, info.height * factor
    size = (max(_even(w), 2) if w >= 1 else 0, max(_even(h), 2) if h >= 1 else 0)
    if min(size) < 2:
        raise MpistyleError(f"processing size {w:.1f}x{h:.1f} for {info.path} is too small")
    if max(size) > max_side:
        raise MpistyleError(f"processing size {size[0]}x{size[1]} for {info.path} exceeds the maximum side "
                            f"of {max_side} pixels")
    return size


# -------------------------------------------------------------------------------------------- decoding


def _scale_filter(w: int, h: int, src_w: int, src_h: int, untagged_hd: bool, extra: str = "") -> str:
    kernel = "area" if (w <= src_w and h <= src_h and (w, h) != (src_w, src_h)) else "bicubic"
    opts = f"scale={w}:{h}:flags={kernel}+accurate_rnd+full_chroma_int"
    if untagged_hd:
        opts += ":in_color_matrix=bt709"
    return opts + extra


def _drain(stream, sink: collections.deque[str]) -> None:
    """Keep reading a child's stderr so it can never block on a full pipe; keep the last lines."""
    for raw in iter(stream.readline, b""):
        sink.append(raw.decode(errors="replace").rstrip())
    stream.close()


def _read_exact(stream, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def iter_frames(path: str, size: tuple[int, int] | None = None, start: int = 0) -> Iterator[np.ndarray]:
    """Stream the frames of ``path`` as RGB uint8 (h, w, 3) arrays, in constant memory.

    ``size`` = (w, h) makes ffmpeg resample them (area when shrinking, bicubic otherwise). ``start`` skips
    the first frames exactly (decoded and dropped inside ffmpeg). The file is checked when this is called;
    the ffmpeg process starts on the first ``next`` and is killed when the iterator is closed or collected.
    """
    path = _check_input_file(path)
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise MpistyleError(f"start frame must be a non-negative integer, got {start}")
    header, n, _ = _null_decode(path, max_frames=1)
    if n <= 0:
        raise MpistyleError(f"{path}: contains no decodable video frames (truncated or corrupt?)")
    w, h = (header.width, header.height) if size is None else (int(size[0]), int(size[1]))
    if w <= 0 or h <= 0:
        raise MpistyleError(f"frame size must be positive, got {w}x{h}")
    untagged_hd = not header.color_tagged and header.height >= 720
    filters = [f"select=gte(n\\,{int(start)})"] if start else []
    filters.append(_scale_filter(w, h, header.width, header.height, untagged_hd))
    filters.append("format=rgb24")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", path, "-map", "0:V:0",
           "-an", "-sn", "-dn", "-vf", ",".join(filters), "-fps_mode", "passthrough", "-f", "rawvideo",
           "-pix_fmt", "rgb24", "pipe:1"]
    return _frames(cmd, path, w, h)


def _frames(cmd: list[str], path: str, w: int, h: int) -> Iterator[np.ndarray]:
    logger.debug("running %s", " ".join(cmd))
    nbytes = w * h * 3
    proc = children.popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          bufsize=max(nbytes, 1 << 16))
    errors: collections.deque[str] = collections.deque(maxlen=50)
    drain = threading.Thread(target=_drain, args=(proc.stderr, errors), daemon=True)
    drain.start()
    count = 0
    try:
        while True:
            frame = np.empty((h, w, 3), dtype=np.uint8)
            got = _read_exact(proc.stdout, memoryview(frame).cast("B"))
            if got == 0:
                break
            if got < nbytes:
                logger.warning("%s: ffmpeg stopped in the middle of frame %d", path, count)
                break
            count += 1
            yield frame
        rc = proc.wait()
        drain.join()
        if rc != 0:
            last = errors[-1] if errors else f"exit status {rc}"
            if count == 0:
                raise MpistyleError(f"{path}: ffmpeg failed to decode it: {last}")
            logger.warning("%s: ffmpeg reported an error after %d frames: %s", path, count, last)
    finally:
        _kill(proc)
        proc.stdout.close()
        drain.join(timeout=5)


def read_all(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """All frames as one (N, h, w, 3) uint8 array. For small clips only (tests, metrics)."""
    frames = list(iter_frames(path, size))
    if not frames:
        raise MpistyleError(f"{path}: contains no decodable video frames")
    return np.stack(frames)


# -------------------------------------------------------------------------------------------- encoding


def _ffmpeg_failure(out_path: str, what: str, lines: list[str] | str) -> MpistyleError:
    """One-line error for a failed ffmpeg write: recognise a full disk / permissions, else quote ffmpeg."""
    text = lines if isinstance(lines, str) else "\n".join(lines)
    if any(marker in text for marker in _DISK_FULL):
        return MpistyleError(f"disk full while writing {out_path}")
    if "Permission denied" in text:
        return MpistyleError(f"permission denied while writing {out_path}")
    return MpistyleError(f"{what} {out_path}: {_last_line(text)}")


def _exit_text(rc: int) -> str:
    return f"ffmpeg was killed by signal {-rc}" if rc < 0 else f"ffmpeg exited with status {rc}"


class VideoEncoder:
    """Write RGB frames to an H.264 video, optionally with the audio of another file; see module docstring.

    Use as a context manager (``close`` on success, ``abort`` on exception) or call ``close``/``abort``.
    """

    def __init__(self, out_path: str, width: int, height: int, fps: Fraction, audio_from: str | None = None,
                 crf: int = 18, preset: str = "medium", threads: int = 0) -> None:
        self.out_path = os.fspath(out_path)
        self.width, self.height = int(width), int(height)
        self.fps = snap_fps(fps) if not isinstance(fps, Fraction) else fps
        self.frames_written = 0
        self._proc: subprocess.Popen | None = None
        self._done = False
        self._errors: collections.deque[str] = collections.deque(maxlen=100)
        if self.width <= 0 or self.height <= 0:
            raise MpistyleError(f"video size must be positive, got {width}x{height}")
        if self.fps <= 0:
            raise MpistyleError(f"frame rate must be positive, got {fps}")
        if not 0 <= int(crf) <= 51:
            raise MpistyleError(f"crf must be between 0 and 51, got {crf}")
        if preset not in _X264_PRESETS:
            raise MpistyleError(f"unknown x264 preset {preset!r} (one of {', '.join(_X264_PRESETS)})")
        if int(threads) < 0:
            raise MpistyleError(f"threads must be >= 0, got {threads}")
        directory, name = os.path.split(os.path.abspath(self.out_path))
        stem, ext = os.path.splitext(name)
        if ext.lower() not in _CONTAINERS:
            raise MpistyleError(f"{self.out_path}: unsupported output format {ext or '(no extension)'!r}; "
                                f"use one of {', '.join(_CONTAINERS)}")
        if os.path.isdir(self.out_path):
            raise MpistyleError(f"{self.out_path}: is a directory")
        if not os.path.isdir(directory):
            raise MpistyleError(f"{self.out_path}: output directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise MpistyleError(f"{self.out_path}: output directory {directory} is not writable")
        self._faststart = _CONTAINERS[ext.lower()]
        self._audio_from: str | None = None
        self._copy_audio = True
        if audio_from is not None:
            codec = audio_codec(audio_from)
            if codec is not None:
                self._audio_from = os.fspath(audio_from)
                allowed = _COPY_AUDIO[ext.lower()]
                self._copy_audio = allowed is None or codec in allowed
        # Hidden temporaries in the output directory so the final rename is atomic (same filesystem).
        token = secrets.token_hex(4)
        self._tmp_video = os.path.join(directory, f".{stem}.{token}.video{ext}")
        self._tmp_final = os.path.join(directory, f".{stem}.{token}.part{ext}")
        self._start(int(crf), preset, int(threads))

    # -- stage 1: frames -> H.264 -------------------------------------------------------------------
    def _start(self, crf: int, preset: str, threads: int) -> None:
        filters = []
        if self.width % 2 or self.height % 2:
            filters.append("pad=ceil(iw/2)*2:ceil(ih/2)*2")
        filters.append("scale=out_color_matrix=bt709:out_range=tv:flags=bicubic+accurate_rnd")
        filters.append("format=yuv420p")
        # Tag the frames themselves: ffmpeg >= 7 takes colour properties from frames over encoder options.
        filters.append("setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv")
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}",
               "-framerate", str(self.fps), "-i", "pipe:0",
               "-map", "0:v:0", "-vf", ",".join(filters), "-fps_mode", "passthrough",
               "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-threads", str(threads),
               "-pix_fmt", "yuv420p", "-colorspace", "bt709", "-color_primaries", "bt709",
               "-color_trc", "bt709", "-color_range", "tv"]
        if self._faststart and self._audio_from is None:  # no second pass: this file becomes the output
            cmd += ["-movflags", "+faststart"]
        cmd.append(self._tmp_video)
        logger.debug("running %s", " ".join(cmd))
        try:
            self._proc = children.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        except OSError as exc:
            raise MpistyleError(f"cannot start ffmpeg to write {self.out_path}: {exc}") from exc
        self._drain = threading.Thread(target=_drain, args=(self._proc.stderr, self._errors), daemon=True)
        self._drain.start()

    def write(self, frame: np.ndarray) -> None:
        """Append one (height, width, 3) uint8 RGB frame."""
        if self._done or self._proc is None:
            raise MpistyleError(f"{self.out_path}: write after the encoder was closed")
        frame = np.asarray(frame)
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"expected a ({self.height}, {self.width}, 3) uint8 frame, "
                             f"got {frame.shape} {frame.dtype}")
        try:
            self._proc.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
        except (BrokenPipeError, ValueError, OSError) as exc:
            rc = self._proc.wait()
            self._drain.join(timeout=5)
            err = _ffmpeg_failure(self.out_path, "ffmpeg stopped while encoding",
                                  list(self._errors) or [f"{exc.__class__.__name__}; {_exit_text(rc)}"])
            self.abort()
            raise err from exc
        self.frames_written += 1

    # -- stage 2: audio mux, check, atomic rename ------------------------------------------------------
    def close(self) -> None:
        """Finish the file and move it onto ``out_path``; on failure remove everything and raise."""
        if self._done:
            return
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._done = True

    def _finish(self) -> None:
        assert self._proc is not None
        try:
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # ffmpeg died: reported from its exit status below
        rc = self._proc.wait()
        self._drain.join(timeout=5)
        if rc != 0:
            raise _ffmpeg_failure(self.out_path, "ffmpeg failed while encoding",
                                  list(self._errors) or [_exit_text(rc)])
        if self.frames_written == 0:
            raise MpistyleError(f"{self.out_path}: no frames were written, nothing to encode")
        result = self._tmp_video
        if self._audio_from is not None:
            self._mux_audio(self._audio_from)
            os.remove(self._tmp_video)
            result = self._tmp_final
        _, packets, stderr = _null_decode(result, copy=True)
        if packets != self.frames_written:
            raise MpistyleError(f"{self.out_path}: wrote {self.frames_written} frames but the encoded file "
                                f"holds {packets} ({_last_line(stderr)})")
        try:
            with open(result, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(result, self.out_path)
        except OSError as exc:
            raise _ffmpeg_failure(self.out_path, "cannot save", str(exc)) from exc
        logger.info("wrote %s (%d frames, %dx%d, %s fps%s)", self.out_path, self.frames_written, self.width,
                    self.height, self.fps, ", with audio" if self._audio_from else "")

    def _mux_audio(self, source: str) -> None:
        duration = f"{float(self.frames_written / self.fps):.6f}"
        # -t on the audio input only: the audio is trimmed to the video, video frames are never cut.
        base = ["-loglevel", "error", "-y", "-i", self._tmp_video, "-t", duration, "-i", source,
                "-map", "0:v:0", "-map", "1:a:0?", "-map_metadata", "-1", "-map_chapters", "-1",
                "-c:v", "copy"]
        tail = (["-movflags", "+faststart"] if self._faststart else []) + [self._tmp_final]
        aac = ["-c:a", "aac", "-b:a", "192k"]
        res = _run_ffmpeg(base + (["-c:a", "copy"] if self._copy_audio else aac) + tail)
        if res.returncode != 0 and self._copy_audio:
            if any(marker in res.stderr for marker in _DISK_FULL):
                raise _ffmpeg_failure(self.out_path, "ffmpeg failed to add the audio to", res.stderr)
            logger.info("%s: audio stream copy refused (%s); re-encoding the audio to AAC", self.out_path,
                        _last_line(res.stderr))
            res = _run_ffmpeg(base + aac + tail)
        if res.returncode != 0:
            raise _ffmpeg_failure(self.out_path, "ffmpeg failed to add the audio to", res.stderr)

    def abort(self) -> None:
        """Stop ffmpeg and remove the temporary files; ``out_path`` is left as it was."""
        self._done = True
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill(proc)
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            self._drain.join(timeout=5)
        for tmp in (self._tmp_video, self._tmp_final):
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
            except OSError as exc:  # pragma: no cover - e.g. the directory vanished
                logger.warning("could not remove temporary file %s: %s", tmp, exc)

    def __enter__(self) -> VideoEncoder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # Safety net for an encoder dropped without close/abort: never leave ffmpeg or temporaries behind.
        with contextlib.suppress(Exception):  # nothing sensible to do about errors during collection
            if not self._done and getattr(self, "_proc", None) is not None:
                self.abort()
