"""Encoding a video file: frames piped to ffmpeg, audio muxed in, the result moved into place atomically.

* **Encoding** (``VideoEncoder``): raw rgb24 frames are piped to ffmpeg, libx264 for .mp4/.m4v/.mov/.mkv
  and libvpx-vp9 for .webm (yuv420p, CRF, preset), first into a hidden temporary file next to the output.
  An odd width or height is **padded** by one black column/row on the right/bottom
  (``pad=ceil(iw/2)*2:ceil(ih/2)*2``): a 97x71 stream is stored as 98x72 with the picture in the top-left
  corner. The audio of ``audio_from`` (first audio stream, trimmed to the video's duration, never the other
  way round) is then muxed in a second, stream-copy pass: ``-c:a copy``, falling back to AAC (Opus for .webm,
  which takes only Opus/Vorbis) when the container refuses the codec; a silent or absent source just gives a
  silent output. The packet count of the result is checked against the frames written, then the file is
  fsynced and atomically renamed onto ``out_path``. On any failure (or ``abort``) the temporary files are
  removed and ``out_path`` is left untouched. mp4/mov/m4v get ``-movflags +faststart``.
* **Colour.** Encoding writes BT.709, limited range, and tags it so, so a decode of our own output
  round-trips.
* **Joins** (``join_segments``): finished video-only segments are joined by stream copy, then go through
  the same audio mux, check and atomic rename.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import subprocess
import threading
from fractions import Fraction

import numpy as np

from mpistyle.errors import MpistyleError
from mpistyle.io import children
from mpistyle.io.atomic import AtomicOutput
from mpistyle.io.ffmpeg import (
    _DISK_FULL,
    _drain,
    _exit_text,
    _ffmpeg,
    _ffmpeg_failure,
    _kill,
    _last_line,
    _passthrough,
    _run_ffmpeg,
    ffmpeg_encoders,
    ffmpeg_exe,
)
from mpistyle.io.probe import _framecrc, audio_codec, snap_fps

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


class VideoEncoder(AtomicOutput):
    """Write RGB frames to an H.264 video, optionally with the audio of another file; see module docstring.

    Use as a context manager (``close`` on success, ``abort`` on exception) or call ``close``/``abort``.
    """

    log_level = logging.INFO  # of the "wrote ..." line; a segment of the output logs it at DEBUG

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
        logger.log(self.log_level, "wrote %s (%d frames, %dx%d, %s fps%s)", self.out_path, self.frames_written,
                   self.width, self.height, self.fps, ", with audio" if self._audio_from else "")

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
