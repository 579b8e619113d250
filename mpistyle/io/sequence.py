"""Image sequences as video: a printf pattern (``frames/%04d.png``) or a folder of PNG/JPEG frames.

Conventions (:mod:`mpistyle.io.media`'s ``probe``/``iter_frames``/``open_writer`` dispatch here, so the
stylize run treats a sequence like any video; this module never imports the video-file modules):

* **Input.** A pattern lists the files it matches (ffmpeg's printf semantics: ``%04d`` is the number printed
  with at least 4 digits); a folder takes its ``.png``/``.jpg``/``.jpeg`` files, ordered by the number at the
  end of their names (``shot_0001.png``), hidden files ignored. The numbers must run without gaps and all
  frames must have one size (read from the file headers, without decoding). The rate is ``--fps``
  (default 25); sequences are silent. JPEG EXIF orientation is ignored (renderers do not set it).
* **Decoding** is OpenCV's (greyscale, alpha and 16-bit frames become 8-bit RGB). A frame that cannot be
  decoded is a one-line ``MpistyleError`` naming the file.
* **Output** is PNG. A pattern writes its files into the pattern's folder; a folder (an existing directory,
  a path ending in ``/``, or a path without an extension) gets ``%04d.png`` files (more digits when needed).
  Numbering starts at the input's first number for a sequence input, else at 1.
* **Atomic.** Frames are written into a hidden temporary folder next to the result. ``close`` then renames
  that folder onto the output folder (a folder output) or renames each file into place (a pattern output),
  so no half-written frame is ever visible under a final name; ``abort`` removes the temporary folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from fractions import Fraction

import numpy as np

from mpistyle.errors import IOFailure, MpistyleError
from mpistyle.io.atomic import AtomicOutput

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_FPS = Fraction(25)
_SPEC = re.compile(r"%(0?)(\d*)d")
_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless...): C4, C8 and CC are other segments.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def is_pattern(path: str) -> bool:
    """True for a printf frame pattern: exactly one ``%d``/``%0Nd`` in the file name (``%%`` is a literal)."""
    name = os.path.basename(os.fspath(path)).replace("%%", "")
    return len(_SPEC.findall(name)) == 1 and name.count("%") == 1


def is_sequence_input(path: str) -> bool:
    return is_pattern(path) or os.path.isdir(os.fspath(path))


def is_sequence_output(path: str) -> bool:
    """A pattern, an existing folder, a path ending in a separator, or a path without an extension."""
    path = os.fspath(path)
    if is_pattern(path) or os.path.isdir(path) or path.endswith(("/", os.sep)):
        return True
    return not os.path.splitext(os.path.basename(path))[1]


# ----------------------------------------------------------------------------------------------- listing


def _pattern_regex(pattern_name: str) -> re.Pattern[str]:
    pre, post = pattern_name.replace("%%", "\0").split("%", 1)
    post = _SPEC.sub("", "%" + post, count=1)
    return re.compile(re.escape(pre.replace("\0", "%")) + r"(\d+)" + re.escape(post.replace("\0", "%")) + "$")


def _pattern_files(pattern: str) -> list[tuple[int, str]]:
    directory, name = os.path.split(pattern)
    if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
        raise MpistyleError(f"{pattern}: frame pattern must end in one of {', '.join(IMAGE_EXTENSIONS)}")
    directory = directory or "."
    if not os.path.isdir(directory):
        raise MpistyleError(f"{pattern}: matches no files (folder {directory} does not exist)")
    regex = _pattern_regex(name)
    spec = name.replace("%%", "\0")
    found = []
    for entry in os.listdir(directory):
        m = regex.match(entry)
        # Keep only names the pattern itself prints (``%04d``: 0007 yes, 007 or 00007 no).
        if m and (spec % int(m.group(1))).replace("\0", "%") == entry:
            found.append((int(m.group(1)), os.path.join(directory, entry)))
    if not found:
        raise MpistyleError(f"{pattern}: matches no files")
    return sorted(found)


def _folder_files(folder: str) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    prefixes: set[str] = set()
    for entry in os.listdir(folder):
        stem, ext = os.path.splitext(entry)
        if entry.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
            continue
        m = _TRAILING_NUMBER.match(stem)
        if not m:
            raise MpistyleError(f"{os.path.join(folder, entry)}: frame file name has no frame number at its end")
        prefixes.add(m.group(1))
        found.append((int(m.group(2)), os.path.join(folder, entry)))
    if not found:
        raise MpistyleError(f"{folder}: is a directory with no PNG/JPEG frames in it")
    if len(prefixes) > 1:
        raise MpistyleError(f"{folder}: holds frames of several sequences ({', '.join(sorted(prefixes))}...); "
                            f"give a pattern such as {folder}/name_%04d.png")
    return sorted(found)


def list_frames(path: str) -> list[tuple[int, str]]:
    """(number, file) of every frame of a pattern or folder, in order; gaps and duplicates are errors."""
    path = os.fspath(path)
    files = _folder_files(path) if os.path.isdir(path) else _pattern_files(path)
    for (a, fa), (b, fb) in zip(files, files[1:], strict=False):
        if b == a:
            raise MpistyleError(f"{path}: frame number {a} appears twice ({fa}, {fb})")
        if b != a + 1:
            missing = f"{a + 1}" if b == a + 2 else f"{a + 1}-{b - 1}"
            raise MpistyleError(f"{path}: frame numbering has a gap: {missing} missing between {fa} and {fb}")
    return files


def image_size(file: str) -> tuple[int, int]:
    """(width, height) from a PNG or JPEG header, without decoding; one-line error if unreadable."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(32)
            if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
                return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
            if head.startswith(b"\xff\xd8"):
                fh.seek(2)
                while True:
                    marker = fh.read(4)
                    if len(marker) < 4 or marker[0] != 0xFF:
                        break
                    length = int.from_bytes(marker[2:4], "big")
                    if marker[1] in _SOF_MARKERS:
                        sof = fh.read(5)
                        if len(sof) == 5:
                            return int.from_bytes(sof[3:5], "big"), int.from_bytes(sof[1:3], "big")
                        break
                    fh.seek(length - 2, os.SEEK_CUR)
    except PermissionError:
        raise MpistyleError(f"{file}: permission denied") from None
    except OSError as exc:
        raise MpistyleError(f"{file}: cannot read it: {exc.strerror}") from None
    raise MpistyleError(f"{file}: not a readable PNG/JPEG image (damaged or another format)")


def probe(path: str, fps: Fraction | None = None) -> tuple[int, int, int, int]:
    """(width, height, frame count, first number) of a sequence; every frame's header is checked."""
    files = list_frames(path)
    width, height = image_size(files[0][1])
    for _, file in files[1:]:
        size = image_size(file)
        if size != (width, height):
            raise MpistyleError(f"{file} is {size[0]}x{size[1]} but {files[0][1]} is {width}x{height}: "
                                "all frames of a sequence must have the same size")
    if width <= 0 or height <= 0:
        raise MpistyleError(f"{files[0][1]}: cannot read the image size")
    return width, height, len(files), files[0][0]


def fingerprint(path: str) -> str:
    """Identity of a sequence for resuming: the frames' names, the bytes of the first and last frame.

    Like a video's, it is cheap and not a full hash: a re-rendered (e.g. once damaged) middle frame keeps it.
    """
    files = list_frames(path)
    digest = hashlib.sha256()
    for number, file in files:
        digest.update(f"{number}:{os.path.basename(file)};".encode())
    for _, file in (files[0], files[-1]):
        with open(file, "rb") as fh:
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:32]


# --------------------------------------------------------------------------------------------- decoding


def _decode(file: str, width: int, height: int) -> np.ndarray:
    import cv2

    # IGNORE_ORIENTATION: the decoded size must be the header size the probe checked.
    bgr = cv2.imread(file, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        if not os.access(file, os.R_OK):
            raise MpistyleError(f"{file}: permission denied")
        raise MpistyleError(f"{file}: cannot decode this frame (damaged image?)")
    if bgr.shape[:2] != (height, width):
        raise MpistyleError(f"{file} is {bgr.shape[1]}x{bgr.shape[0]} but the sequence is {width}x{height}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def iter_frames(path: str, size: tuple[int, int] | None = None, start: int = 0,
                expected: int | None = None) -> Iterator[np.ndarray]:
    """Frames of a sequence as RGB uint8 (h, w, 3), resampled to ``size`` = (w, h) (area when shrinking)."""
    import cv2

    width, height, n, _ = probe(path)
    if expected is not None and n != expected:
        raise MpistyleError(f"{path}: now holds {n} frames, {expected} when the run started")
    files = [f for _, f in list_frames(path)][start:]
    w, h = (width, height) if size is None else (int(size[0]), int(size[1]))
    if w <= 0 or h <= 0:
        raise MpistyleError(f"frame size must be positive, got {w}x{h}")
    shrink = w <= width and h <= height
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC

    def frames() -> Iterator[np.ndarray]:
        for file in files:
            rgb = _decode(file, width, height)
            if (w, h) != (width, height):
                rgb = cv2.resize(rgb, (w, h), interpolation=interpolation)
            yield np.ascontiguousarray(rgb)

    return frames()


# ---------------------------------------------------------------------------------------------- writing


def _output_layout(out_path: str, count_hint: int, start_number: int) -> tuple[str, str, bool]:
    """(final folder, file-name pattern, whether the whole folder is ours) of a sequence output."""
    out_path = os.fspath(out_path)
    if is_pattern(out_path):
        directory, name = os.path.split(out_path)
        if os.path.splitext(name)[1].lower() != ".png":
            raise MpistyleError(f"{out_path}: image sequence output is PNG: the pattern must end in .png")
        return directory or ".", name, False
    digits = max(4, len(str(start_number + max(count_hint, 1) - 1)))
    return out_path.rstrip("/" + os.sep) or out_path, f"%0{digits}d.png", True


def check_output(out_path: str) -> None:
    """Fail early (before any work) if a sequence cannot be written to ``out_path``."""
    folder, name, whole = _output_layout(out_path, 1, 1)
    parent = os.path.dirname(os.path.abspath(folder)) if whole else os.path.abspath(folder)
    if not os.path.isdir(parent):
        raise MpistyleError(f"{out_path}: output folder {parent} does not exist")
    if whole and os.path.exists(folder):
        if not os.path.isdir(folder):
            raise MpistyleError(f"{out_path}: exists and is not a folder")
        stray = [e for e in os.listdir(folder) if not re.fullmatch(r"\d+\.png", e)]
        if stray:
            raise MpistyleError(f"{out_path}: directory exists and holds other files ({stray[0]}...); "
                                "give an empty or new folder for PNG frames, or a video file name")


def buffer_path_for(out_path: str) -> str | None:
    """Default HDF5 buffer of a sequence output, beside (never inside) its frames; None for a video."""
    if not is_sequence_output(out_path):
        return None
    if is_pattern(out_path):
        directory, name = os.path.split(out_path)
        return os.path.join(directory, _SPEC.sub("frames", name, count=1).replace("%%", "%") + ".mpistyle.h5")
    return os.fspath(out_path).rstrip("/" + os.sep) + ".mpistyle.h5"


class SequenceWriter(AtomicOutput):
    """Write RGB frames as numbered PNG files, atomically; same interface as ``encode.VideoEncoder``."""

    def __init__(self, out_path: str, width: int, height: int, n_frames: int = 0, start_number: int = 1) -> None:
        self.out_path = os.fspath(out_path)
        self.width, self.height = int(width), int(height)
        self.frames_written = 0
        self.start_number = int(start_number)
        if self.width <= 0 or self.height <= 0:
            raise MpistyleError(f"frame size must be positive, got {width}x{height}")
        check_output(self.out_path)
        self._folder, self._name, self._whole = _output_layout(self.out_path, n_frames, self.start_number)
        parent = os.path.dirname(os.path.abspath(self._folder)) if self._whole else os.path.abspath(self._folder)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise MpistyleError(f"{self.out_path}: output folder {parent} is not writable")
        # Hidden, on the result's file system (renames are atomic): beside a folder, inside a pattern's folder.
        base = os.path.basename(self._folder) if self._whole else "mpistyle-frames"
        self._tmp = os.path.join(parent, f".{base}.{secrets.token_hex(4)}.part")
        os.mkdir(self._tmp)
        self._done = False

    def _file(self, index: int) -> str:
        return self._name % (self.start_number + index)

    def write(self, frame: np.ndarray) -> None:
        """Append one (height, width, 3) uint8 RGB frame."""
        import cv2

        if self._done:
            raise MpistyleError(f"{self.out_path}: write after the writer was closed")
        frame = np.asarray(frame)
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"expected a ({self.height}, {self.width}, 3) uint8 frame, "
                             f"got {frame.shape} {frame.dtype}")
        ok, data = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
            raise MpistyleError(f"{self.out_path}: cannot encode frame {self.frames_written} as PNG")
        target = os.path.join(self._tmp, self._file(self.frames_written))
        try:
            with open(target, "wb") as fh:
                fh.write(data.tobytes())
        except OSError as exc:
            self.abort()
            raise _write_error(self.out_path, exc) from None
        self.frames_written += 1

    def _finish(self) -> None:
        if self.frames_written == 0:
            raise MpistyleError(f"{self.out_path}: no frames were written, nothing to save")
        try:
            fd = os.open(self._tmp, os.O_RDONLY)
            try:  # the files' data is already flushed by close(); make their directory entries durable
                for entry in os.listdir(self._tmp):
                    with open(os.path.join(self._tmp, entry), "rb") as fh:
                        os.fsync(fh.fileno())
                os.fsync(fd)
            finally:
                os.close(fd)
            if self._whole:
                self._replace_folder()
            else:
                self._move_files()
        except OSError as exc:
            raise _write_error(self.out_path, exc) from None
        logger.info("wrote %s (%d PNG frames, %dx%d)", self.out_path, self.frames_written, self.width, self.height)

    def _replace_folder(self) -> None:
        check_output(self.out_path)  # still only old frames of ours in it
        old = None
        if os.path.exists(self._folder):
            old = self._tmp[:-5] + ".old"
            os.rename(self._folder, old)
        os.rename(self._tmp, self._folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _move_files(self) -> None:
        keep = {self._file(i) for i in range(self.frames_written)}
        for name in sorted(keep):
            os.replace(os.path.join(self._tmp, name), os.path.join(self._folder, name))
        os.rmdir(self._tmp)
        # Frames of an older, longer result under the same pattern would read as part of this one.
        regex = _pattern_regex(self._name)
        for entry in os.listdir(self._folder):
            if regex.match(entry) and entry not in keep:
                os.remove(os.path.join(self._folder, entry))

    def abort(self) -> None:
        """Remove the temporary folder; an existing result is left as it was."""
        self._done = True
        shutil.rmtree(self._tmp, ignore_errors=True)



def _write_error(out_path: str, exc: OSError) -> MpistyleError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return IOFailure(f"disk full while writing {out_path}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return MpistyleError(f"permission denied while writing {out_path}")
    return IOFailure(f"cannot write {out_path}: {exc.strerror or exc}")
