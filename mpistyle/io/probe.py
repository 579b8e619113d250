"""Probing a video file: size, exact frame rate, exact frame count and audio; the processing size.

* **Fast, exact frame accounting.** ``probe_video`` decodes only the first frame. In mp4/mov/mkv/webm it
  counts the stream's packets without decoding (``-c copy``; packets an edit list hides are flagged
  "discard" and left out): about 4 s for 10 minutes of 1080p. Other containers (MPEG-TS, AVI, raw streams)
  are decoded once to count. The decoder (:mod:`mpistyle.io.decode`) then yields exactly ``n_frames``.
* **Variable frame rate** (phones) is converted to a constant rate that keeps the duration, so the audio,
  copied as it is, stays in sync: the frames' timestamps decide. If every frame lies within a quarter frame
  of a 1/fps grid, the file is constant-rate (whatever the header's average rate says). Otherwise the rate
  is that of the quick stretches (ffmpeg's ``tbr``, e.g. 30 for a phone that drops to 10 in the dark), the
  frame count is duration x rate, and output frame k shows the source frame on screen at the middle of its
  slot (``VideoInfo.frame_map``): slow stretches repeat frames, and nothing is dropped unless the rate
  changes faster than the slots. ``probe_video`` logs what it did (range of rates, frames repeated/dropped).
* **Size.** ``VideoInfo.width``/``height`` are the size of the decoded frames *after* ffmpeg's automatic
  rotation (phone videos with a rotation matrix come out upright). Pixels are taken as stored: a non-square
  sample aspect ratio is not corrected, and the output is written with square pixels.
* **fps** is an exact ``Fraction``. ffmpeg prints the rate rounded to 2 decimals; NTSC-family rates
  (23.98, 29.97, 47.95, 59.94, 119.88, ...) are snapped to N*1000/1001, anything else goes through
  ``Fraction(text).limit_denominator(1001)`` (25 -> 25, 12.5 -> 25/2). ``duration`` is ``n_frames / fps``.
"""

from __future__ import annotations

import fractions
import logging
import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from mpistyle.errors import MpistyleError
from mpistyle.io.ffmpeg import _check_input_file, _last_line, _passthrough, _run_ffmpeg, ffmpeg_exe

logger = logging.getLogger(__name__)

# NTSC-family base rates: a printed rate close to N*1000/1001 for one of these N is snapped to it.
_NTSC_BASES = (15, 24, 30, 48, 60, 72, 96, 120, 144, 240)
_COLOR_MATRIX_TAGS = re.compile(
    r"\b(bt709|bt470bg|smpte170m|smpte240m|bt2020nc|bt2020c|fcc|ycgco|gbr|ictcp|chroma-derived-nc"
    r"|chroma-derived-c|smpte2085)\b")
_SIZE_RE = re.compile(r"(?:^|[\s,])(\d{1,6})x(\d{1,6})(?=[\s,]|$)")
_RATE_RE = r"(\d+(?:\.\d+)?k?) {unit}\b"
_STREAM_RE = re.compile(r"^\s*Stream #\d+:\d+\S*: (Video|Audio|Subtitle|Data|Attachment): (.*)$")


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` found out about a video file or image sequence (conventions: module docstring)."""

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


@dataclass(frozen=True)
class _Header:
    """The parts of ffmpeg's stream report we use."""

    width: int  # decoded (post-rotation) size when an output stream was reported, else the coded size
    height: int
    fps: Fraction | None
    has_audio: bool
    color_tagged: bool


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


def probe_video(path: str) -> VideoInfo:
    """Size, exact frame rate, exact frame count and audio presence of a video file.

    A video's frames are counted from its packets without decoding (mp4/mov/mkv/webm: one frame per packet,
    edit-list discards excluded); other containers are decoded once. Only the first frame is decoded to
    check the stream and its size after rotation. ``iter_video_frames`` then yields exactly ``n_frames``
    frames. Raises ``MpistyleError`` naming the path for anything that is not a usable video.
    """
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
