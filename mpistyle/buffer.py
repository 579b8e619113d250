"""The HDF5 frame buffer: stylized frames as they complete, which are done, and the run's settings.

Every rank writes its own frames, so no frame has to pass through rank 0 (issue 16). The buffer is
still one logical HDF5 dataset, laid out as detector systems at light sources do:

- ``BUF`` (the main file, what a user opens with h5py): ``frames`` (N, H, W, 3) uint8 and ``done`` (N,)
  bool as *virtual datasets* (h5py ``VirtualLayout``), and the settings as attributes;
- ``BUF.parts/frames-FIRST-STOP.h5``: one part file per run of frames a rank computes ([FIRST, STOP)),
  written by that rank alone with serial h5py, with its own ``frames`` and ``done``.

The part files are the truth; the main file is a view rank 0 rewrites (atomically) whenever the set of
parts changes: each frame maps to the part that holds it done, else to the part planned for it in this
run (a part not created yet reads as fill: zeros, not done). Source paths are relative, so the folder
can be moved. Every open uses ``locking=False``: a writer holds its part open while others read it
(our own protocol says what is safe to read: committed frames), and HDF5 refuses to mix locking
flags on one file within a process.

Crash safety without SWMR or fsync-per-frame, per part as before per file:
- every chunk of a part is allocated when the part is created (``ALLOC_TIME_EARLY``) and the space is
  reserved with ``posix_fallocate``, so writing a frame never changes HDF5 metadata (a kill mid-write
  cannot corrupt the file) and a disk too small fails at once, not hours later;
- ``done`` flags are committed in batches *after* the frames they cover are flushed and fsync'ed, so a
  frame marked done is on disk;
- part files are created under a temporary name and renamed, and parts whose settings digest differs
  from the main file's (left over from another run) are ignored.

**Parallel HDF5** (``layout="mpio"``, where h5py is built with MPI and ``--buffer-layout`` allows it):
the main file itself holds real ``frames`` and ``done`` datasets, created (and flushed) by rank 0
alone with every chunk allocated, then opened by all ranks together with ``driver="mpio"``; each rank
writes its frames and done flags with independent I/O (no collective call per frame: metadata never
changes) and makes them durable with an fsync of its own file descriptor before marking them done.
Only the open and the close are collective (HDF5's rule for these), both at fixed points of the run.

Resume with any rank count: rank 0 scans the parts' ``done`` flags; the new run's parts cover only the
frames still to do (the plan never gives a done frame to anyone), so a frame is done in at most one part.

Network outputs that wait for their fusion live beside the buffer too, in ``BUF.raw/`` (one serial file
per rank with either layout; ``rawbuffer.py``), so a resume fuses them instead of stylizing them again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from .errors import IOFailure, MpistyleError, io_failure
from .partition import runs_of

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
LAYOUTS = ("auto", "parts", "mpio")
_PART = re.compile(r"^frames-(\d{9})-(\d{9})\.h5$")


def parts_dir(path: str) -> str:
    """Folder of a buffer's part files, beside the main file (same file system)."""
    return f"{path}.parts"


def raw_dir(path: str) -> str:
    """Folder of a buffer's raw-output files (``rawbuffer.py``), beside the main file (same file system)."""
    return f"{path}.raw"


def part_name(first: int, stop: int) -> str:
    return f"frames-{first:09d}-{stop:09d}.h5"


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _disk_error(exc: OSError, path: str) -> MpistyleError:
    """A failed buffer write: the path's fault (permissions: exit 2), else the disk's (exit 74)."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in str(exc):
        return MpistyleError(f"cannot write buffer {path}: {exc.strerror or exc}")
    return io_failure(exc, f"buffer {path}")


@dataclass(frozen=True)
class Part:
    """One part file: frames [first, stop) of the video, and which of them are done."""

    first: int
    stop: int
    path: str
    done: np.ndarray  # (stop - first,) bool, as read when scanned

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


# ------------------------------------------------------------------------------------------ main file (rank 0)
class FrameBuffer:
    """Rank 0's handle on the buffer: settings, the done mask (from the parts), the virtual main file.

    Frames are written by the ranks through :class:`PartWriter`; this class only reads them.
    """

    def __init__(self, path: str, n_frames: int, height: int, width: int, settings: dict[str, Any],
                 layout: str = "parts") -> None:
        self.path = path
        self.layout = layout
        self._parallel: h5py.File | None = None  # mpio: the job's collective handle, while it is open
        self._serial: h5py.File | None = None
        self.n_frames, self.height, self.width = n_frames, height, width
        self.settings = settings
        self.digest = settings_digest(settings)
        self.parts: list[Part] = []
        self.done = np.zeros(n_frames, dtype=bool)
        self.reader = FrameReader(path, n_frames)
        self.rescan()

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, n_frames: int, height: int, width: int, settings: dict[str, Any],
             restart: bool = False, layout: str = "parts") -> FrameBuffer:
        """Resume from ``path`` if it was made with the same settings, else create it.

        A buffer made with other settings (other input, model, size...) is never silently reused:
        that is an error unless ``restart`` is given.
        """
        if os.path.isdir(path):
            raise MpistyleError(f"buffer path is a directory: {path}")
        if os.path.exists(path) and not restart:
            stored = _read_header(path)
            mismatch = _settings_mismatch(stored, n_frames, height, width, settings)
            if mismatch:
                raise MpistyleError(
                    f"buffer {path} was made for a different run ({mismatch}); "
                    "pass --restart to discard it or --buffer to use another file")
            stored_layout = str(stored.get("layout", "vds"))
            if stored_layout == "mpio" and not parallel_hdf5():
                raise MpistyleError(f"buffer {path} was written with parallel HDF5 and this h5py has no MPI; "
                                    "resume with an MPI-enabled h5py, or pass --restart")
            return cls(path, n_frames, height, width, settings, layout="mpio" if stored_layout == "mpio" else "parts")
        return cls.create(path, n_frames, height, width, settings, layout=layout)

    @classmethod
    def create(cls, path: str, n_frames: int, height: int, width: int,
               settings: dict[str, Any], layout: str = "parts") -> FrameBuffer:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise MpistyleError(f"buffer directory does not exist: {directory}")
        remove_buffer(path)  # a restart: the old parts go with the old main file
        if layout == "mpio":
            _create_single_file(path, n_frames, height, width, settings)
            return cls(path, n_frames, height, width, settings, layout="mpio")
        try:
            os.makedirs(parts_dir(path))
        except OSError as exc:
            raise _disk_error(exc, path) from None
        buf = cls(path, n_frames, height, width, settings)
        buf.write_index()
        return buf

    # -- the view ------------------------------------------------------------------------------
    def rescan(self) -> None:
        """Read every part's done flags (the truth) into ``self.done``."""
        if self.layout == "mpio":
            with h5py.File(self.path, "r", locking=False) as f:
                self.done[:] = np.asarray(f["done"][...], dtype=bool)
            return
        self.parts = scan_parts(self.path, self.digest, self.n_frames, (self.height, self.width, 3))
        self.done[:] = False
        for part in self.parts:
            self.done[part.first:part.stop] |= part.done
        self.reader.set_map(frame_map(self.parts, self.n_frames, []))

    def write_index(self, planned: Sequence[tuple[int, int]] = ()) -> None:
        """Rewrite the main file (atomically): settings, and virtual ``frames``/``done`` over the parts.

        ``planned``: the [first, stop) runs this run's ranks will write (their parts may not exist yet).
        Nothing to do for the mpio layout: its main file holds the data itself.
        """
        if self.layout == "mpio":
            return
        mapping = frame_map(self.parts, self.n_frames, planned)
        self.reader.set_map(mapping)
        shape = (self.n_frames, self.height, self.width, 3)
        frames = h5py.VirtualLayout(shape=shape, dtype="u1")
        done = h5py.VirtualLayout(shape=(self.n_frames,), dtype=bool)
        rel = os.path.basename(parts_dir(self.path))
        for first, stop, part_first, part_stop in _mapped_runs(mapping):
            source = os.path.join(rel, part_name(part_first, part_stop))
            count = part_stop - part_first
            lo, hi = first - part_first, stop - part_first
            frames[first:stop] = h5py.VirtualSource(source, "frames", shape=(count, *shape[1:]))[lo:hi]
            done[first:stop] = h5py.VirtualSource(source, "done", shape=(count,))[lo:hi]
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with h5py.File(tmp, "w") as f:
                f.create_virtual_dataset("frames", frames, fillvalue=0)
                f.create_virtual_dataset("done", done, fillvalue=False)
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["layout"] = "vds"
                f.attrs["settings"] = json.dumps(self.settings, sort_keys=True)
                f.attrs["settings_digest"] = self.digest
                f.attrs["n_frames"] = self.n_frames
                f.attrs["height"] = self.height
                f.attrs["width"] = self.width
            os.replace(tmp, self.path)
        except OSError as exc:
            unlink_if_present(tmp)
            raise _disk_error(exc, self.path) from None
        except BaseException:
            unlink_if_present(tmp)
            raise

    def read(self, index: int) -> np.ndarray:
        if self.layout != "mpio":
            return self.reader.read(index)
        if self._parallel is not None:  # HDF5 refuses a second, serial open of a file open with mpio
            return np.asarray(self._parallel["frames"][index])
        if self._serial is None:
            self._serial = h5py.File(self.path, "r", locking=False, rdcc_nbytes=0)
        return np.asarray(self._serial["frames"][index])

    def attach(self, handle: h5py.File | None) -> None:
        """mpio: read through the job's collective handle while it is open (None: detach)."""
        self._parallel = handle

    def complete(self) -> bool:
        return bool(self.done.all())

    def close(self) -> None:
        self.reader.close()
        if self._serial is not None and self._serial.id.valid:
            self._serial.close()
        self._serial = None


def parallel_hdf5() -> bool:
    """Whether this h5py is built with MPI (``driver="mpio"`` available)."""
    return bool(h5py.get_config().mpi)


def resolve_layout(requested: str, n_ranks: int) -> str:
    """``auto``: parallel HDF5 where h5py has MPI and there is more than one rank, else per-rank parts."""
    if requested not in LAYOUTS:
        raise MpistyleError(f"unknown buffer layout {requested!r} (choose from {', '.join(LAYOUTS)})")
    if requested == "mpio" and not parallel_hdf5():
        raise MpistyleError("--buffer-layout mpio needs h5py built with MPI (h5py.get_config().mpi is False); "
                            "use --buffer-layout parts")
    if requested == "auto":
        return "mpio" if parallel_hdf5() and n_ranks > 1 else "parts"
    return requested


def _create_single_file(path: str, n_frames: int, height: int, width: int, settings: dict[str, Any]) -> None:
    """mpio layout: the whole buffer in one file, every chunk allocated and the metadata flushed before any
    rank opens it (a kill later cannot corrupt it; a file whose metadata was never flushed would not open)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with h5py.File(tmp, "w", locking=False) as f:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            f.create_dataset("frames", shape=(n_frames, height, width, 3), dtype="u1",
                             chunks=(1, height, width, 3), dcpl=dcpl)
            f.create_dataset("done", data=np.zeros(n_frames, dtype=np.uint8))
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["layout"] = "mpio"
            f.attrs["settings"] = json.dumps(settings, sort_keys=True)
            f.attrs["settings_digest"] = settings_digest(settings)
            f.attrs["n_frames"] = n_frames
            f.attrs["height"] = height
            f.attrs["width"] = width
        reserve_blocks(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        unlink_if_present(tmp)
        raise _disk_error(exc, path) from None
    except BaseException:
        unlink_if_present(tmp)
        raise


def open_parallel(path: str, comm: Any) -> h5py.File:
    """mpio layout: open the buffer on every rank of ``comm`` together (collective)."""
    try:
        return h5py.File(path, "r+", driver="mpio", comm=comm)
    except OSError as exc:
        raise MpistyleError(f"cannot open buffer {path} with parallel HDF5: {exc}") from None


class _FrameWriter:
    """Write frames, then ``commit``: make them durable, then mark them done. One owner thread.

    Subclasses say where frame ``index`` goes (``_offset``), how the data is made durable (``_sync``)
    and how done flags are set (``_mark``).
    """

    _offset = 0
    error_path = ""

    def __init__(self) -> None:
        self._pending: list[int] = []

    def write(self, index: int, frame: np.ndarray) -> None:
        """Store one frame; it counts as done after the next :meth:`commit`."""
        try:
            self._frames[index - self._offset] = frame
        except OSError as exc:
            raise _disk_error(exc, self.error_path) from None
        self._pending.append(index)

    def commit(self) -> list[int]:
        """Make the frames written so far durable, then mark them done. Returns the new indices."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        try:
            self._sync()
            for lo, hi in runs_of(sorted(pending)):
                self._done[lo - self._offset:hi - self._offset] = np.ones(hi - lo, dtype=self._done.dtype)
            self._sync()
        except OSError as exc:
            raise _disk_error(exc, self.error_path) from None
        return pending

    def _sync(self) -> None:
        raise NotImplementedError


class MpioWriter(_FrameWriter):
    """mpio layout: one rank's writes into the shared file, independent I/O only.

    HDF5 does not cache raw data in parallel mode, so an fsync of our own descriptor makes it durable
    without the collective ``H5Fflush``.
    """

    def __init__(self, handle: h5py.File, path: str) -> None:
        super().__init__()
        self.path = self.error_path = path
        self._frames, self._done = handle["frames"], handle["done"]
        self._fd = os.open(path, os.O_RDONLY)

    def _sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def remove_buffer(path: str) -> None:
    """Delete a buffer: its main file, its parts and its stored network outputs (``rawbuffer``)."""
    unlink_if_present(path)
    shutil.rmtree(parts_dir(path), ignore_errors=True)
    shutil.rmtree(raw_dir(path), ignore_errors=True)


def _read_header(path: str) -> dict[str, Any]:
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = dict(f.attrs)
    except OSError as exc:
        raise MpistyleError(f"buffer {path} is not a readable mpistyle HDF5 buffer ({exc}); "
                            "pass --restart to discard it") from None
    if attrs.get("format_version") != FORMAT_VERSION:
        raise MpistyleError(f"buffer {path} is not an mpistyle buffer of this version; pass --restart to discard it")
    return attrs


def _settings_mismatch(attrs: dict[str, Any], n_frames: int, height: int, width: int,
                       settings: dict[str, Any]) -> str:
    shape = (int(attrs.get("n_frames", -1)), int(attrs.get("height", -1)), int(attrs.get("width", -1)))
    if shape != (n_frames, height, width):
        return f"frames {shape} vs {(n_frames, height, width)}"
    stored = json.loads(attrs.get("settings", "{}"))
    diffs = [key for key in sorted(set(stored) | set(settings)) if stored.get(key) != settings.get(key)]
    if diffs:
        return "different " + ", ".join(diffs)
    return ""


def check_free_space(path: str, n_frames: int, frame_bytes: int) -> None:
    """Fail at once, before any work, when the buffer's disk cannot hold the frames still to do."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    need = n_frames * frame_bytes + (1 << 20)  # frames + HDF5 metadata of the parts
    if need > free:
        raise IOFailure(f"disk full: buffer {path} needs {need / 1e6:.0f} MB for {n_frames} frames, "
                            f"{free / 1e6:.0f} MB are free on {directory}")


# ------------------------------------------------------------------------------------------ parts
def scan_parts(path: str, digest: str, n_frames: int, frame_shape: tuple[int, int, int]) -> list[Part]:
    """Every usable part file of a buffer, by first frame (others are logged and left alone)."""
    found = []
    directory = parts_dir(path)
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    for name in names:
        m = _PART.match(name)
        if not m:
            continue  # temporaries of a part being created when a rank was killed
        first, stop = int(m.group(1)), int(m.group(2))
        file = os.path.join(directory, name)
        try:
            with h5py.File(file, "r", locking=False) as f:
                ok = (f.attrs.get("settings_digest") == digest and f["frames"].shape == (stop - first, *frame_shape)
                      and 0 <= first < stop <= n_frames)
                done = np.asarray(f["done"][...], dtype=bool) if ok else None
        except (OSError, KeyError) as exc:
            logger.warning("ignoring unreadable buffer part %s (%s)", file, exc)
            continue
        if done is None:
            logger.warning("ignoring buffer part %s: made for another run", file)
            continue
        found.append(Part(first, stop, file, done))
    return found


def frame_map(parts: Iterable[Part], n_frames: int, planned: Sequence[tuple[int, int]]) -> np.ndarray:
    """(n_frames, 2) [first, stop) of the part that holds each frame: done there, else planned; -1: none.

    Pure. Planned runs never contain a done frame (the plan skips them), so the two never disagree.
    """
    mapping = np.full((n_frames, 2), -1, dtype=np.int64)
    for first, stop in planned:
        mapping[first:stop] = (first, stop)
    for part in parts:
        idx = np.flatnonzero(part.done) + part.first
        mapping[idx] = (part.first, part.stop)
    return mapping


def _mapped_runs(mapping: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive frames mapped to the same part: (first, stop, part first, part stop)."""
    runs = []
    t, n = 0, len(mapping)
    while t < n:
        key = tuple(mapping[t])
        end = t + 1
        while end < n and tuple(mapping[end]) == key:
            end += 1
        if key[0] >= 0:
            runs.append((t, end, int(key[0]), int(key[1])))
        t = end
    return runs


class FrameReader:
    """Reads frames of a buffer from its part files, read-only and unlocked (writers may be at work).

    Only frames known to be committed should be read: no chunk cache, so nothing stale is kept.
    """

    def __init__(self, path: str, n_frames: int) -> None:
        self.path = path
        self.mapping = np.full((n_frames, 2), -1, dtype=np.int64)
        self._open: dict[tuple[int, int], h5py.File] = {}
        self._lock = threading.Lock()

    def set_map(self, mapping: np.ndarray) -> None:
        self.mapping = mapping

    def read(self, index: int) -> np.ndarray:
        first, stop = (int(x) for x in self.mapping[index])
        if first < 0:
            raise MpistyleError(f"buffer {self.path}: frame {index} is in no part file")
        with self._lock:
            handle = self._open.get((first, stop))
            if handle is None:
                file = os.path.join(parts_dir(self.path), part_name(first, stop))
                try:
                    handle = h5py.File(file, "r", locking=False, rdcc_nbytes=0)
                except OSError as exc:
                    raise MpistyleError(f"buffer {self.path}: cannot read part {file}: {exc}") from None
                self._open[(first, stop)] = handle
            return np.asarray(handle["frames"][index - first])

    def close(self) -> None:
        with self._lock:
            for handle in self._open.values():
                if handle.id.valid:
                    handle.close()
            self._open.clear()


class PartWriter(_FrameWriter):
    """One rank's part file for frames [first, stop): write frames, commit them as done (flush + fsync).

    Not thread-safe: one writer thread per rank (``stylize.store``) owns it.
    """

    def __init__(self, buffer_path: str, first: int, stop: int, height: int, width: int, digest: str) -> None:
        super().__init__()
        self.buffer_path = self.error_path = buffer_path
        self.first, self.stop = first, stop
        self._offset = first
        self.path = os.path.join(parts_dir(buffer_path), part_name(first, stop))
        if os.path.exists(self.path):  # this run was planned before and never committed a frame
            self._f = self._reopen(height, width, digest)
        else:
            self._f = self._create(height, width, digest)
        self._frames = self._f["frames"]
        self._done = self._f["done"]

    def _reopen(self, height: int, width: int, digest: str) -> h5py.File:
        try:
            f = h5py.File(self.path, "r+", locking=False)
            if (f.attrs.get("settings_digest") == digest
                    and f["frames"].shape == (self.stop - self.first, height, width, 3)):
                return f
            f.close()
        except (OSError, KeyError):
            pass
        unlink_if_present(self.path)  # not ours or damaged: make it anew
        return self._create(height, width, digest)

    def _create(self, height: int, width: int, digest: str) -> h5py.File:
        count = self.stop - self.first
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with h5py.File(tmp, "w", locking=False) as f:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                f.create_dataset("frames", shape=(count, height, width, 3), dtype="u1",
                                 chunks=(1, height, width, 3), dcpl=dcpl)
                f.create_dataset("done", data=np.zeros(count, dtype=bool))
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["settings_digest"] = digest
                f.attrs["first"] = self.first
                f.attrs["stop"] = self.stop
            reserve_blocks(tmp)
            os.replace(tmp, self.path)
            return h5py.File(self.path, "r+", locking=False)
        except OSError as exc:
            unlink_if_present(tmp)
            raise _disk_error(exc, self.buffer_path) from None
        except BaseException:
            unlink_if_present(tmp)
            raise

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.id.get_vfd_handle())

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()


def reserve_blocks(path: str) -> None:
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


def unlink_if_present(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_done(path: str) -> np.ndarray:
    """Done mask of a buffer (the main file's virtual ``done``; for tests and tools)."""
    with h5py.File(path, "r", locking=False) as f:
        return np.asarray(f["done"][...], dtype=bool)
