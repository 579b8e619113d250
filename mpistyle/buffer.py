"""The HDF5 frame buffer: stylized frames as they complete, which are done, and the run's settings.

Layout: ``frames`` (N, H, W, 3) uint8 chunked one frame per chunk, ``done`` (N,) bool, and the
settings that determine the output as attributes (``settings/<key>``).

Crash safety without SWMR or fsync-per-frame:
- every chunk is allocated when the file is created (``ALLOC_TIME_EARLY``) and the space is
  reserved with ``posix_fallocate``, so writing a frame never changes HDF5 metadata (a kill
  mid-write cannot corrupt the file) and a disk too small fails at once, not hours later;
- ``done`` flags are committed in batches *after* the frames they cover are flushed and
  fsync'ed, so a frame marked done is on disk.
Only rank 0 opens the file (serial h5py); ranks send their frames to it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from typing import Any

import h5py
import numpy as np

from .errors import MpistyleError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _disk_error(exc: OSError, path: str) -> MpistyleError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space" in str(exc) or "quota" in str(exc).lower():
        return MpistyleError(f"disk full: cannot write buffer {path} ({exc.strerror or exc})")
    return MpistyleError(f"cannot write buffer {path}: {exc}")


class FrameBuffer:
    """Rank 0's handle on the buffer file. Thread-safe (one lock around every h5py call)."""

    def __init__(self, path: str, handle: h5py.File) -> None:
        self.path = path
        self._f = handle
        self._frames = handle["frames"]
        self._done_ds = handle["done"]
        self.done = np.asarray(self._done_ds[...], dtype=bool)
        self._pending: list[int] = []
        self._lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, n_frames: int, height: int, width: int, settings: dict[str, Any],
             restart: bool = False) -> FrameBuffer:
        """Resume from ``path`` if it was made with the same settings, else create it.

        A buffer made with other settings (other input, model, size...) is never silently reused:
        that is an error unless ``restart`` is given.
        """
        if os.path.isdir(path):
            raise MpistyleError(f"buffer path is a directory: {path}")
        if os.path.exists(path) and not restart:
            handle = _open_existing(path)
            mismatch = _settings_mismatch(handle, n_frames, height, width, settings)
            if mismatch:
                handle.close()
                raise MpistyleError(
                    f"buffer {path} was made for a different run ({mismatch}); "
                    "pass --restart to discard it or --buffer to use another file")
            return cls(path, handle)
        return cls.create(path, n_frames, height, width, settings)

    @classmethod
    def create(cls, path: str, n_frames: int, height: int, width: int,
               settings: dict[str, Any]) -> FrameBuffer:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise MpistyleError(f"buffer directory does not exist: {directory}")
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with h5py.File(tmp, "w") as f:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                f.create_dataset("frames", shape=(n_frames, height, width, 3), dtype="u1",
                                 chunks=(1, height, width, 3), dcpl=dcpl)
                f.create_dataset("done", data=np.zeros(n_frames, dtype=bool))
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["settings"] = json.dumps(settings, sort_keys=True)
                f.attrs["n_frames"] = n_frames
                f.attrs["height"] = height
                f.attrs["width"] = width
            _reserve(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            _unlink(tmp)
            raise _disk_error(exc, path) from None
        except BaseException:
            _unlink(tmp)
            raise
        return cls(path, _open_existing(path))

    # -- writing -------------------------------------------------------------------------------
    def write(self, index: int, frame: np.ndarray) -> None:
        """Store one frame; it counts as done after the next :meth:`commit`."""
        try:
            with self._lock:
                self._frames[index] = frame
                self._pending.append(index)
        except OSError as exc:
            raise _disk_error(exc, self.path) from None

    def commit(self) -> list[int]:
        """Flush and fsync the frames written so far, then mark them done. Returns the new indices."""
        with self._lock:
            if not self._pending:
                return []
            pending, self._pending = self._pending, []
            try:
                self._f.flush()
                os.fsync(self._f.id.get_vfd_handle())
                self.done[pending] = True
                for index in pending:
                    self._done_ds[index] = True
                self._f.flush()
            except OSError as exc:
                raise _disk_error(exc, self.path) from None
        return pending

    def read(self, index: int) -> np.ndarray:
        with self._lock:
            return self._frames[index]

    @property
    def n_frames(self) -> int:
        return int(self._frames.shape[0])

    def complete(self) -> bool:
        return bool(self.done.all())

    def close(self) -> None:
        with self._lock:
            if self._f.id.valid:
                self._f.close()


def _open_existing(path: str) -> h5py.File:
    try:
        handle = h5py.File(path, "r+")
    except OSError as exc:
        raise MpistyleError(f"buffer {path} is not a readable mpistyle HDF5 buffer ({exc}); "
                            "pass --restart to discard it") from None
    if "frames" not in handle or "done" not in handle or handle.attrs.get("format_version") != FORMAT_VERSION:
        handle.close()
        raise MpistyleError(f"buffer {path} is not an mpistyle buffer of this version; "
                            "pass --restart to discard it")
    return handle


def _settings_mismatch(handle: h5py.File, n_frames: int, height: int, width: int,
                       settings: dict[str, Any]) -> str:
    shape = tuple(handle["frames"].shape)
    if shape != (n_frames, height, width, 3):
        return f"frames {shape[:3]} vs {(n_frames, height, width)}"
    stored = json.loads(handle.attrs.get("settings", "{}"))
    diffs = [key for key in sorted(set(stored) | set(settings)) if stored.get(key) != settings.get(key)]
    if diffs:
        return "different " + ", ".join(diffs)
    return ""


def _reserve(path: str) -> None:
    """Make sure the whole file has real blocks behind it (ENOSPC now, not mid-run)."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return  # file system without fallocate (some network FS): best effort
            raise
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_done(path: str) -> np.ndarray:
    """Done mask of a buffer file (for tests and tools)."""
    with h5py.File(path, "r") as f:
        return np.asarray(f["done"][...], dtype=bool)
