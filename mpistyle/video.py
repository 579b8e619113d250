"""Video input/output through one ffmpeg binary (no ffprobe needed); image sequences via ``sequence.py``.

Choices made here (callers rely on them):

* **ffmpeg** is ``IMAGEIO_FFMPEG_EXE`` if set, else imageio-ffmpeg's bundled binary. Its version is checked
  once: older than 4.4 is a one-line error naming the version and the fix. Release builds 4.4 to 9.x and git
  builds work; the only version-dependent option is passthrough timing (``-vsync`` before 5.1, ``-fps_mode``
  from 5.1 on; 9.0 removed ``-vsync``). Frames and packets are counted from ``-f framecrc`` lines, which
  every version prints alike (``-progress``'s ``frame=`` of a stream copy reads 0 in ffmpeg 7.0).
* **Inputs** (``probe``, ``iter_frames``): any file ffmpeg reads, or an image sequence (a printf pattern
  ``frames/%04d.png`` or a folder of PNG/JPEG frames, rate from ``fps``, default 25; see ``sequence.py``).
* **Frames** are numpy uint8 arrays (H, W, 3), RGB, C-contiguous, writable.
* **Fast, exact frame accounting.** ``probe`` decodes only the first frame. In mp4/mov/mkv/webm it counts
  the stream's packets without decoding (``-c copy``; packets an edit list hides are flagged "discard" and
  left out): about 4 s for 10 minutes of 1080p. Other containers (MPEG-TS, AVI, raw streams) are decoded
  once to count. ``iter_frames`` then yields exactly ``n_frames`` frames: every decode maps the first real
  video stream (``0:V:0``: cover pictures are skipped) with passthrough timing, and if a damaged file decodes
  to up to 1 % (at least 2) frames fewer than announced, the last frame is held in their place with a
  warning; more missing is a one-line error. ``iter_frames(start=k)`` drops the first frames inside ffmpeg
  with ``select=gte(n,k)`` (decode-and-drop: exact, not a timestamp seek).
* **Variable frame rate** (phones) is converted to a constant rate that keeps the duration, so the audio,
  copied as it is, stays in sync: the frames' timestamps decide. If every frame lies within a quarter frame
  of a 1/fps grid, the file is constant-rate (whatever the header's average rate says). Otherwise the rate
  is that of the quick stretches (ffmpeg's ``tbr``, e.g. 30 for a phone that drops to 10 in the dark), the
  frame count is duration x rate, and output frame k shows the source frame on screen at the middle of its
  slot (``VideoInfo.frame_map``): slow stretches repeat frames, and nothing is dropped unless the rate
  changes faster than the slots. ``probe`` logs what it did (range of rates, frames repeated/dropped).
* **Size.** ``VideoInfo.width``/``height`` are the size of the decoded frames *after* ffmpeg's automatic
  rotation (phone videos with a rotation matrix come out upright). Pixels are taken as stored: a non-square
  sample aspect ratio is not corrected, and the output is written with square pixels.
* **fps** is an exact ``Fraction``. ffmpeg prints the rate rounded to 2 decimals; NTSC-family rates
  (23.98, 29.97, 47.95, 59.94, 119.88, ...) are snapped to N*1000/1001, anything else goes through
  ``Fraction(text).limit_denominator(1001)`` (25 -> 25, 12.5 -> 25/2). ``duration`` is ``n_frames / fps``.
* **Colour.** Decoding converts with swscale (area filter when shrinking, bicubic otherwise, accurate
  rounding, full chroma interpolation), honouring the stream's colour tags (8 or 10 bit); untagged streams of
  720 lines or more are read as BT.709 (what players do), smaller untagged ones as BT.601. Encoding writes
  BT.709, limited range, and tags it so, so a decode of our own output round-trips.
* **Encoding** (``VideoEncoder``; ``open_writer`` picks it or a PNG ``SequenceWriter`` by the output path):
  raw rgb24 frames are piped to ffmpeg, libx264 for .mp4/.m4v/.mov/.mkv and libvpx-vp9 for .webm (yuv420p,
  CRF, preset), first into a hidden temporary file next to the output. An odd width or height is **padded**
  by one black column/row on the right/bottom (``pad=ceil(iw/2)*2:ceil(ih/2)*2``): a 97x71 stream is stored
  as 98x72 with the picture in the top-left corner. The audio of ``audio_from`` (first audio stream, trimmed
  to the video's duration, never the other way round) is then muxed in a second, stream-copy pass:
  ``-c:a copy``, falling back to AAC (Opus for .webm, which takes only Opus/Vorbis) when the container
  refuses the codec; a silent or absent source just gives a silent output. The packet count of the result
  is checked against the frames written, then the file is fsynced and atomically renamed onto ``out_path``.
  On any failure (or ``abort``) the temporary files are removed and ``out_path`` is left untouched.
  mp4/mov/m4v get ``-movflags +faststart``.
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
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from types import TracebackType
from typing import Any

import numpy as np

from mpistyle import children
from mpistyle.errors import MpistyleError

logger = logging.getLogger(__name__)

# Output containers we know how to write, and whether they take "-movflags +faststart".
_CONTAINERS = {".mp4": True, ".m4v": True, ".mov": True, ".mkv": False, ".webm": False}
VIDEO_EXTENSIONS = tuple(_CONTAINERS)
# Audio codecs stream-copied into each container; others are re-encoded to AAC. ffmpeg accepts more in mp4
# (vorbis, pcm) but players do not. None: copy anything.
_MP4_AUDIO = frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"})
_COPY_AUDIO: dict[str, frozenset[str] | None] = {
    ".mp4": _MP4_AUDIO, ".m4v": _MP4_AUDIO, ".mkv": None, ".webm": frozenset({"opus", "vorbis"}),
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
    # Variable frame rate only: the source frame shown at each output frame (constant-rate conversion).
    frame_map: tuple[int, ...] | None = None
    # Image sequences only: the number of the first frame file (output numbering follows it).
    first_number: int | None = None

    @property
    def is_sequence(self) -> bool:
        return self.first_number is not None


MIN_FFMPEG = (4, 4)
_VERSION_RE = re.compile(r"ffmpeg version \D{0,2}(\d+)\.(\d+)(?:\.(\d+))?")


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: ``IMAGEIO_FFMPEG_EXE`` if set, else imageio-ffmpeg's bundled one."""
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError) as exc:  # pragma: no cover - depends on the installation
        raise MpistyleError(f"cannot find the ffmpeg binary of imageio-ffmpeg: {exc}") from exc


def parse_ffmpeg_version(first_line: str) -> tuple[int, int, int] | None:
    """(major, minor, micro) from ``ffmpeg -version``'s first line; None for a git build ("N-112233-g...")."""
    m = _VERSION_RE.match(first_line)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


@functools.lru_cache(maxsize=1)
def ffmpeg_version() -> tuple[int, int, int] | None:
    """Version of ``ffmpeg_exe()``, checked once: older than 4.4 is a one-line error. None: a git build."""
    exe = ffmpeg_exe()
    try:
        res = children.run([exe, "-hide_banner", "-version"], stdin=subprocess.DEVNULL, text=True,
                           errors="replace")
    except OSError as exc:
        raise MpistyleError(f"cannot run ffmpeg {exe}: {exc.strerror or exc}") from None
    first = res.stdout.splitlines()[0] if res.stdout.strip() else ""
    if res.returncode != 0 or not first.startswith("ffmpeg version"):
        raise MpistyleError(f"{exe} does not run as ffmpeg: {_last_line(res.stderr or res.stdout)}")
    version = parse_ffmpeg_version(first)
    if version is None:
        logger.debug("ffmpeg %s: no release number, taken as recent", first)
        return None
    if version[:2] < MIN_FFMPEG:
        text = first.split()[2]
        raise MpistyleError(f"ffmpeg {text} ({exe}) is too old: mpistyle needs ffmpeg 4.4 or newer; "
                            "run `pip install -U imageio-ffmpeg` or set IMAGEIO_FFMPEG_EXE to a newer ffmpeg")
    logger.debug("using ffmpeg %s (%s)", ".".join(map(str, version)), exe)
    return version


def _ffmpeg(*args: str) -> list[str]:
    """The start of every ffmpeg command line (the version is checked on first use)."""
    ffmpeg_version()
    return [ffmpeg_exe(), "-hide_banner", "-nostdin", *args]


def _passthrough() -> list[str]:
    """Never duplicate or drop frames: ``-fps_mode`` since ffmpeg 5.1, ``-vsync`` before (removed in 9)."""
    version = ffmpeg_version()
    return ["-vsync", "passthrough"] if version is not None and version[:2] < (5, 1) else \
        ["-fps_mode", "passthrough"]


@functools.lru_cache(maxsize=1)
def ffmpeg_encoders() -> frozenset[str]:
    """Names of the encoders this ffmpeg was built with."""
    res = children.run(_ffmpeg("-encoders"), stdin=subprocess.DEVNULL, text=True, errors="replace")
    return frozenset(m.group(1) for m in re.finditer(r"^ [VAS][\w.]{5} (\S+)", res.stdout, flags=re.MULTILINE))


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


def _parse_rate(desc: str, unit: str) -> Fraction | None:
    m = re.search(_RATE_RE.format(unit=unit), desc)
    rate = _parse_rate_text(m.group(1)) if m else Fraction(0)
    return snap_fps(rate) if rate > 0 else None


def _video_desc(stderr: str) -> str:
    """The input's first video stream line (after ``Video:``), or "" if none."""
    section = _section(stderr, "Input #0", ("Stream mapping:", "Output #", "Press [q]"))
    return next((d for kind, d in _streams(section) if kind == "Video" and "(attached pic)" not in d), "")


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
    cmd = _ffmpeg(*args)
    logger.debug("running %s", " ".join(cmd))
    return children.run(cmd, stdin=subprocess.DEVNULL, text=True, errors="replace")


@dataclass(frozen=True)
class _Packets:
    """Frame list of a stream read by ``-f framecrc``: one line per packet (copied) or frame (decoded)."""

    times: np.ndarray  # presentation times in seconds from the first, sorted; empty when a time was missing
    count: int  # packets/frames, those the demuxer marks to be discarded (edit lists) left out
    last_duration: float
    container: str
    stderr: str
    returncode: int


_NOPTS = -(1 << 63)
# Containers whose packet count is the decoded frame count (one frame per packet, timestamps on every
# packet, edit-list discards flagged). Others (MPEG-TS, AVI, raw streams...) are counted by decoding.
_COUNTABLE = ("mov", "mp4", "matroska", "webm")


def _framecrc(path: str, copy: bool, max_frames: int | None = None) -> _Packets:
    args = ["-i", path, "-map", "0:V:0?", "-an", "-sn", "-dn"]
    if max_frames is not None:
        args += ["-frames:v", str(max_frames)]
    args += ["-c:v", "copy"] if copy else _passthrough()
    res = _run_ffmpeg(args + ["-f", "framecrc", "-"])
    pts: list[int] = []
    tb, last = Fraction(1), 0
    for line in res.stdout.splitlines():
        if not line or line[0] == "#":
            if line.startswith("#tb 0:"):
                tb = Fraction(line.split(":", 1)[1].strip())
            continue
        fields = line.split(",")
        # F=: AV_PKT_FLAG_DISCARD (0x4) marks packets before an edit list's start, never shown
        if "F=" in line and int(next(f for f in fields[6:] if "F=" in f).split("=")[1], 16) & 0x4:
            continue
        pts.append(int(fields[2]))
        last = int(fields[3])
    m = re.search(r"^Input #0, ([^\n]*?), from", res.stderr, flags=re.MULTILINE)
    if res.returncode != 0 and pts:
        logger.warning("%s: ffmpeg reported an error after %d frames: %s", path, len(pts), _last_line(res.stderr))
    times = np.sort(np.asarray(pts, dtype=np.int64))
    times = (times - times[0]).astype(np.float64) * float(tb) if len(times) and _NOPTS not in pts else np.empty(0)
    return _Packets(times=times, count=len(pts), last_duration=float(last * tb),
                    container=m.group(1) if m else "", stderr=res.stderr, returncode=res.returncode)


def _null_decode(path: str, max_frames: int | None = None, copy: bool = False) -> tuple[_Header, int, str]:
    """Decode (or packet-copy) the first video stream: (header, frame count, stderr)."""
    packets = _framecrc(path, copy, max_frames)
    if packets.returncode < 0 and not packets.count:  # e.g. the static ffmpeg 7.0.2 segfaults on MPEG-TS
        raise MpistyleError(f"{path}: ffmpeg crashed (signal {-packets.returncode}) reading it; try another "
                            f"ffmpeg build (IMAGEIO_FFMPEG_EXE), this one is {ffmpeg_exe()}")
    return _parse_header(path, packets.stderr), packets.count, packets.stderr


def packet_count(path: str) -> int:
    """Video packets of a file without decoding (what our own encoder wrote: one per frame)."""
    return _framecrc(_check_input_file(path), copy=True).count


# ----------------------------------------------------------------------------------------------- probe


def _nice_rate(rate: float) -> Fraction:
    """A measured rate as users know it: NTSC rates exact, near-integers (30.3 from 33 ms steps) whole."""
    snapped = snap_fps(round(rate, 3))
    if snapped.denominator != 1001 and round(rate) and abs(rate - round(rate)) <= 0.02 * rate:
        return Fraction(round(rate))
    return snapped


def _constant_rate(path: str, packets: _Packets, header_fps: Fraction, guess: Fraction | None
                   ) -> tuple[Fraction, tuple[int, ...] | None]:
    """Rate and (for variable-rate input) the source frame of each output frame; see module docstring.

    The timestamps decide, not the header: a file whose frames sit on a 1/fps grid (within a quarter frame)
    is constant-rate even when its header's average rate is off (e.g. a wrong container duration).
    """
    times = packets.times
    n = len(times)
    if n < 2 or times[-1] <= 0:
        return header_fps, None
    mean = (n - 1) / float(times[-1])
    deltas = np.sort(np.diff(times))
    # Candidates: the printed rates (rounded to 2 decimals), the mean step (right for 1 ms time bases, which
    # alternate 33/34 ms at 29.97) and the median step (right when one step is off, e.g. at a joint).
    candidates = {header_fps, _nice_rate(mean), _nice_rate(1 / max(float(deltas[len(deltas) // 2]), 1e-6))}
    if guess is not None:
        candidates.add(guess)
    index = np.arange(n, dtype=np.float64)
    on_grid = [c for c in candidates if np.all(np.abs(times - index / float(c)) <= 0.25 / float(c))]
    if on_grid:
        standard = [c for c in on_grid if c.denominator in (1, 2, 1001)]  # 25, 12.5, 30000/1001...
        fps = min(standard or on_grid, key=lambda c: (abs(float(c) - mean), c != header_fps))
        if fps != header_fps:
            logger.info("%s: the header says %s fps, the frames' timestamps %s fps: using %s", path,
                        header_fps, fps, fps)
        return fps, None
    fast = 1 / max(float(deltas[len(deltas) // 10]), 1e-3)  # the rate of the quick stretches (phone's nominal)
    rate = guess if guess is not None and abs(float(guess) - fast) <= 0.1 * fast else _nice_rate(fast)
    last = packets.last_duration if packets.last_duration > 0 else float(deltas[len(deltas) // 2])
    duration = float(times[-1]) + last
    n_out = max(1, round(duration * rate))
    # Output frame k shows the source frame on screen at the middle of its slot, k/rate .. (k+1)/rate.
    slots = (np.arange(n_out, dtype=np.float64) + 0.5) / float(rate)
    frame_map = tuple(int(i) for i in np.maximum(np.searchsorted(times, slots, side="right") - 1, 0))
    shown = len(set(frame_map))
    logger.info("%s: variable frame rate (%.2f-%.2f fps, %.3f s, %d frames): converted to a constant %s fps "
                "with the same duration: %d frames, %d repeated, %d dropped", path, 1 / deltas[-1],
                1 / max(deltas[0], 1e-6), duration, n, rate, n_out, n_out - shown, n - shown)
    return rate, frame_map


def probe(path: str, fps: Fraction | None = None) -> VideoInfo:
    """Size, exact frame rate, exact frame count and audio presence of a video file or image sequence.

    A video's frames are counted from its packets without decoding (mp4/mov/mkv/webm: one frame per packet,
    edit-list discards excluded); other containers are decoded once. Only the first frame is decoded to
    check the stream and its size after rotation. ``iter_frames`` then yields exactly ``n_frames`` frames.
    ``fps`` is the rate of an image sequence (default 25); it is ignored for videos. Raises
    ``MpistyleError`` naming the path for anything that is not a usable video.
    """
    from mpistyle import sequence

    if sequence.is_sequence_input(os.fspath(path)):
        rate = snap_fps(fps) if fps is not None else sequence.DEFAULT_FPS
        width, height, n, first = sequence.probe(os.fspath(path))
        return VideoInfo(path=os.fspath(path), width=width, height=height, fps=rate, n_frames=n,
                         has_audio=False, duration=float(n / rate), first_number=first)
    path = _check_input_file(path)
    header, decodable, stderr = _null_decode(path, max_frames=1)
    if decodable <= 0:
        raise MpistyleError(f"{path}: contains no decodable video frames (truncated or corrupt?)")
    desc = _video_desc(stderr)
    avg, guess = _parse_rate(desc, "fps"), _parse_rate(desc, "tbr")
    packets = _framecrc(path, copy=True)
    frame_map = None
    if any(name in packets.container.split(",") for name in _COUNTABLE) and len(packets.times):
        n_frames = packets.count
        rate = avg or guess
        if rate is not None:
            rate, frame_map = _constant_rate(path, packets, rate, guess)
            n_frames = len(frame_map) if frame_map is not None else n_frames
    else:
        logger.info("%s: %s container: counting frames by decoding", path, packets.container or "unknown")
        n_frames = _framecrc(path, copy=False).count
        rate = avg or guess
    if n_frames <= 0:
        raise MpistyleError(f"{path}: contains no decodable video frames (truncated or corrupt?)")
    if rate is None:  # no rate in the report (rare, e.g. raw streams): fall back to the container's duration
        m = re.search(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", stderr)
        secs = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3)) if m else 0.0
        if secs <= 0:
            raise MpistyleError(f"{path}: cannot determine the frame rate")
        rate = snap_fps(round(n_frames / secs, 3))
    info = VideoInfo(path=path, width=header.width, height=header.height, fps=rate, n_frames=n_frames,
                     has_audio=header.has_audio, duration=float(n_frames / rate), frame_map=frame_map)
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


def iter_frames(path: str, size: tuple[int, int] | None = None, start: int = 0,
                info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Stream the frames of a video or image sequence as RGB uint8 (h, w, 3) arrays, in constant memory.

    Yields exactly ``info.n_frames - start`` frames (``info`` defaults to ``probe(path)``): a variable-rate
    video is converted to its constant rate on the way (``info.frame_map``), and if a damaged file decodes to
    a few frames fewer than its container announced, the last frame is held in their place (a warning; more
    than 1 % missing is an error). ``size`` = (w, h) makes ffmpeg resample the frames (area when shrinking,
    bicubic otherwise). ``start`` skips the first frames exactly (decoded and dropped inside ffmpeg). The
    input is checked when this is called; ffmpeg starts on the first ``next`` and is killed when the iterator
    is closed or collected.
    """
    from mpistyle import sequence

    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise MpistyleError(f"start frame must be a non-negative integer, got {start}")
    info = info or probe(path)
    if info.is_sequence:
        return sequence.iter_frames(info.path, size, int(start), expected=info.n_frames)
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


def read_all(path: str, size: tuple[int, int] | None = None, info: VideoInfo | None = None) -> np.ndarray:
    """All frames as one (N, h, w, 3) uint8 array. For small clips only (tests, metrics)."""
    frames = list(iter_frames(path, size, info=info))
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


class AtomicOutput:
    """An output written under temporary names and moved into place only when complete.

    Subclasses write, then implement ``_finish`` (complete and rename; raise on failure) and ``abort``
    (remove the temporaries, leave an earlier result as it was). Use as a context manager, or call
    ``close``/``abort``.
    """

    _done: bool = False

    def close(self) -> None:
        """Finish and move the result into place; on failure remove everything and raise."""
        if self._done:
            return
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._done = True

    def _finish(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class VideoEncoder(AtomicOutput):
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
        self._webm = ext.lower() == ".webm"  # WebM holds only VP8/VP9/AV1 video and Opus/Vorbis audio
        encoder = "libvpx-vp9" if self._webm else "libx264"
        if encoder not in ffmpeg_encoders():
            raise MpistyleError(f"{self.out_path}: this ffmpeg ({ffmpeg_exe()}) has no {encoder} encoder for "
                                f"{ext} output")
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
        if self._webm:  # VP9 CRF runs ~13 above x264's for a similar quality; speed from the x264 preset
            fast = _X264_PRESETS.index(preset) <= _X264_PRESETS.index("faster")
            codec = ["-c:v", "libvpx-vp9", "-crf", str(min(63, crf + 13)), "-b:v", "0", "-row-mt", "1",
                     "-deadline", "realtime" if fast else "good", "-cpu-used", "8" if fast else "4"]
        else:
            codec = ["-c:v", "libx264", "-preset", preset, "-crf", str(crf)]
        cmd = [*_ffmpeg("-loglevel", "error", "-y"),
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}",
               "-framerate", str(self.fps), "-i", "pipe:0",
               "-map", "0:v:0", "-vf", ",".join(filters), *_passthrough(), *codec, "-threads", str(threads),
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
    def _finish(self) -> None:
        self._end_stage1()
        self._finalize()

    def _end_stage1(self) -> None:
        """Wait for the encoder: ``self._tmp_video`` then holds ``frames_written`` frames."""
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

    def _finalize(self) -> None:
        """Stage 2 on ``self._tmp_video``: add the audio, check the frame count, move onto ``out_path``."""
        result = self._tmp_video
        if self._audio_from is not None:
            self._mux_audio(self._audio_from)
            os.remove(self._tmp_video)
            result = self._tmp_final
        packets = _framecrc(result, copy=True)
        if packets.count != self.frames_written:
            raise MpistyleError(f"{self.out_path}: wrote {self.frames_written} frames but the encoded file "
                                f"holds {packets.count} ({_last_line(packets.stderr)})")
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
        webm_audio = "libopus" if "libopus" in ffmpeg_encoders() else "libvorbis"
        aac = ["-c:a", webm_audio, "-b:a", "128k"] if self._webm else ["-c:a", "aac", "-b:a", "192k"]
        res = _run_ffmpeg(base + (["-c:a", "copy"] if self._copy_audio else aac) + tail)
        if res.returncode != 0 and self._copy_audio:
            if any(marker in res.stderr for marker in _DISK_FULL):
                raise _ffmpeg_failure(self.out_path, "ffmpeg failed to add the audio to", res.stderr)
            logger.info("%s: audio stream copy refused (%s); re-encoding the audio", self.out_path,
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

    def __del__(self) -> None:
        # Safety net for an encoder dropped without close/abort: never leave ffmpeg or temporaries behind.
        with contextlib.suppress(Exception):  # nothing sensible to do about errors during collection
            if not self._done and getattr(self, "_proc", None) is not None:
                self.abort()


class _SegmentJoin(VideoEncoder):
    """A ``VideoEncoder`` whose stage 1 joins finished video-only segments instead of running x264."""

    def __init__(self, out_path: str, segments: list[str], width: int, height: int, fps: Fraction,
                 n_frames: int, audio_from: str | None) -> None:
        self._segments = list(segments)
        super().__init__(out_path, width, height, fps, audio_from=audio_from)
        self.frames_written = n_frames  # checked against the joined file's packet count in stage 2

    def _start(self, crf: int, preset: str, threads: int) -> None:
        self._proc = None  # nothing runs until close()

    def write(self, frame: np.ndarray) -> None:
        raise MpistyleError(f"{self.out_path}: frames go to the segments, not to the join")

    def _end_stage1(self) -> None:
        listing = self._tmp_video + ".txt"
        with open(listing, "w") as fh:  # the concat demuxer's list; quotes escaped as it wants them
            for path in self._segments:
                fh.write("file '" + os.path.abspath(path).replace("'", "'\\''") + "'\n")
        try:
            faststart = ["-movflags", "+faststart"] if self._faststart and self._audio_from is None else []
            # igndts: x264 gives a segment of 1-2 frames no B-frame delay, the others 2 frames; the joined
            # DTS then step back at such a join and the MP4 muxer shortens the file's duration (edit list).
            # Decode times recomputed from the (exact) presentation times give a consistent stream.
            res = _run_ffmpeg(["-loglevel", "error", "-y", "-fflags", "+igndts", "-f", "concat", "-safe", "0",
                               "-i", listing,
                               "-map", "0:v:0", "-c", "copy", *faststart, self._tmp_video])
        finally:
            os.remove(listing)
        if res.returncode != 0:
            raise _ffmpeg_failure(self.out_path, "ffmpeg failed to join the segments of", res.stderr)


def join_segments(out_path: str, segments: list[str], width: int, height: int, fps: Fraction, n_frames: int,
                  audio_from: str | None = None) -> None:
    """Join video-only segments (same size, rate and codec settings) into ``out_path`` by stream copy, with
    the audio of ``audio_from``; the result must hold ``n_frames`` frames. Atomic like ``VideoEncoder``."""
    joiner = _SegmentJoin(out_path, segments, width, height, fps, n_frames, audio_from)
    joiner.close()


# ----------------------------------------------------------------------------------------- output kinds


def check_output(input_path: str, output: str) -> None:
    """One-line error if ``output`` cannot be written: kind (video or image sequence), folder, same as input."""
    from mpistyle import sequence

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
        raise MpistyleError(f"cannot write to the output directory {directory}: {exc.strerror}") from None
    if output.lower().endswith(".webm") and "libvpx-vp9" not in ffmpeg_encoders():
        raise MpistyleError(f"{output}: this ffmpeg ({ffmpeg_exe()}) has no VP9 encoder (libvpx-vp9) for .webm")


def open_writer(out_path: str, width: int, height: int, fps: Fraction, audio_from: str | None = None,
                crf: int = 18, preset: str = "medium", threads: int = 0, n_frames: int = 0,
                first_number: int | None = None) -> VideoEncoder | Any:
    """The writer for ``out_path``: a ``VideoEncoder``, or a ``sequence.SequenceWriter`` for a PNG pattern or
    folder (silent; numbered from ``first_number``, default 1). Both have ``write``/``close``/``abort``."""
    from mpistyle import sequence

    if sequence.is_sequence_output(out_path):
        if audio_from is not None:
            logger.info("%s: an image sequence has no audio track; the input's audio is not kept", out_path)
        return sequence.SequenceWriter(out_path, width, height, n_frames=n_frames,
                                       start_number=1 if first_number is None else first_number)
    return VideoEncoder(out_path, width, height, fps, audio_from=audio_from, crf=crf, preset=preset,
                        threads=threads)
