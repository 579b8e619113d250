"""The one ffmpeg binary (no ffprobe needed): where it is, its version, command lines, children, errors.

* **ffmpeg** is ``IMAGEIO_FFMPEG_EXE`` if set, else imageio-ffmpeg's bundled binary. Its version is checked
  once: older than 4.4 is a one-line error naming the version and the fix. Release builds 4.4 to 9.x and git
  builds work; the only version-dependent option is passthrough timing (``-vsync`` before 5.1, ``-fps_mode``
  from 5.1 on; 9.0 removed ``-vsync``). Frames and packets are counted from ``-f framecrc`` lines, which
  every version prints alike (``-progress``'s ``frame=`` of a stream copy reads 0 in ffmpeg 7.0).
* ffmpeg children run in their own session (:mod:`mpistyle.io.children`), so a Ctrl-C in the terminal
  reaches Python only and the caller decides (``abort`` kills the child). Errors the user can act on become
  one-line ``MpistyleError``s (missing/empty/corrupt input, no video stream, disk full, permission denied...).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import re
import subprocess

from mpistyle.errors import IOFailure, MpistyleError
from mpistyle.io import children

logger = logging.getLogger(__name__)

_DISK_FULL = ("No space left on device", "Disk quota exceeded", "File too large")
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


def _last_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message from ffmpeg"


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


def _drain(stream, sink: collections.deque[str]) -> None:
    """Keep reading a child's stderr so it can never block on a full pipe; keep the last lines."""
    for raw in iter(stream.readline, b""):
        sink.append(raw.decode(errors="replace").rstrip())
    stream.close()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _ffmpeg_failure(out_path: str, what: str, lines: list[str] | str) -> MpistyleError:
    """One-line error for a failed ffmpeg write: recognise a full disk / permissions, else quote ffmpeg."""
    text = lines if isinstance(lines, str) else "\n".join(lines)
    if any(marker in text for marker in _DISK_FULL):
        return IOFailure(f"disk full while writing {out_path}")
    if "Input/output error" in text:
        return IOFailure(f"I/O error while writing {out_path}")
    if "Permission denied" in text:
        return MpistyleError(f"permission denied while writing {out_path}")
    return MpistyleError(f"{what} {out_path}: {_last_line(text)}")


def _exit_text(rc: int) -> str:
    return f"ffmpeg was killed by signal {-rc}" if rc < 0 else f"ffmpeg exited with status {rc}"
