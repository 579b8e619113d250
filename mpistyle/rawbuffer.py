"""Raw network outputs that wait for their fusion, kept beside the HDF5 buffer so a kill does not lose them.

A rank stylizes some frames long before it fuses them: the frames its successor warms up over (its
exports, fused last) and its own frames while its warm-up arrives (issue 20). Before issue 32 they waited
in an unlinked scratch file, so a kill lost up to ``every + lead - 1 + batch`` network passes per rank.
Now every network output waits in the buffer's folder ``BUF.raw/`` until the frame it makes is committed
done, so a kill -9 loses at most the batch in the network on each rank.

``BUF.raw/raw-<rank>-<id>.h5``: one file per rank and job, written by that rank alone with serial h5py
(with the ``mpio`` layout too: these files are never shared, so no collective call is needed):

- ``frames`` (slots, H, W, 3) uint8: network outputs, exactly the bits the fusion takes;
- ``index`` (slots,) int64: the frame a slot holds, -1 for none.

Crash safety, as for the parts (``buffer.py``): every chunk is allocated when the file is created and the
space reserved, so no write changes HDF5 metadata; a slot's frame is flushed and fsync'ed *before* its
``index`` entry names it; an entry is cleared, and that made durable, *before* its slot is written again.
So an entry that names frame t always holds t's network output, whatever instant a kill comes at.

Resume (any rank count): rank 0 scans every file whose settings digest matches the buffer's and lists
the entries of frames not done. The network output of a frame depends on that frame's source alone (N
ranks equal 1 rank bit for bit, whatever the batches), so any rank may use an entry any rank wrote. Each
rank copies the entries of its own frames into its new file, then rank 0 deletes the old files: one
generation of files at a time, so the disk stays bounded however often a job is killed.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence

import h5py
import numpy as np

from .buffer import raw_dir, reserve_blocks, unlink_if_present
from .errors import MpistyleError, write_failure

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_RAW = re.compile(r"^raw-\d+-[0-9a-f]+\.h5$")


def _disk_error(exc: OSError, path: str) -> MpistyleError:
    """A failed write beside the buffer: exit 74 when the disk failed (full, quota, I/O), else 2."""
    return write_failure(exc, f"network outputs beside buffer {path}")


class RawFile:
    """One rank's raw-output file: fixed slots, written in place (one owner thread)."""

    def __init__(self, buffer_path: str, rank: int, slots: int, shape: tuple[int, int, int], digest: str) -> None:
        self.buffer_path = buffer_path
        self.slots = slots
        directory = raw_dir(buffer_path)
        self.name = f"raw-{rank}-{uuid.uuid4().hex[:12]}.h5"
        self.path = os.path.join(directory, self.name)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            os.makedirs(directory, exist_ok=True)
            with h5py.File(tmp, "w", locking=False) as f:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                f.create_dataset("frames", shape=(slots, *shape), dtype="u1", chunks=(1, *shape), dcpl=dcpl)
                f.create_dataset("index", data=np.full(slots, -1, dtype=np.int64))
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["settings_digest"] = digest
            reserve_blocks(tmp)
            os.replace(tmp, self.path)
            self._f = h5py.File(self.path, "r+", locking=False)
        except OSError as exc:
            unlink_if_present(tmp)
            raise _disk_error(exc, buffer_path) from None
        self._frames, self._index = self._f["frames"], self._f["index"]

    def write(self, slot: int, frame: np.ndarray) -> None:
        try:
            self._frames[slot] = frame
        except OSError as exc:
            raise _disk_error(exc, self.buffer_path) from None

    def name_slots(self, entries: Iterable[tuple[int, int]]) -> None:
        """Set index[slot] = frame (-1: none) for each (slot, frame); durable only after :meth:`sync`."""
        try:
            for slot, t in entries:
                self._index[slot] = t
        except OSError as exc:
            raise _disk_error(exc, self.buffer_path) from None

    def read(self, slot: int) -> np.ndarray:
        return np.asarray(self._frames[slot])

    def sync(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.id.get_vfd_handle())
        except OSError as exc:
            raise _disk_error(exc, self.buffer_path) from None

    def close(self, remove: bool = False) -> None:
        if self._f.id.valid:
            self._f.close()
        if remove:
            unlink_if_present(self.path)


def scan_raw(buffer_path: str, digest: str, shape: tuple[int, int, int],
             done: Sequence[bool]) -> tuple[dict[int, tuple[str, int]], list[str]]:
    """Stored network outputs of frames not done: {frame: (file name, slot)}, and every file name seen.

    Files made for other settings or of another frame size, and unreadable ones, hold nothing usable
    (they are listed, so they get deleted). A frame found in two files (a kill between a resume's copy and
    its deletion of the old files) holds the same bits in both: the first is taken.
    """
    directory = raw_dir(buffer_path)
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    found: dict[int, tuple[str, int]] = {}
    for name in names:
        if not _RAW.match(name):
            continue  # a file being created when its rank was killed
        try:
            with h5py.File(os.path.join(directory, name), "r", locking=False) as f:
                if f.attrs.get("settings_digest") != digest or f["frames"].shape[1:] != shape:
                    logger.warning("ignoring stored network outputs %s: made for another run", name)
                    continue
                index = np.asarray(f["index"][...], dtype=np.int64)
        except (OSError, KeyError) as exc:
            logger.warning("ignoring unreadable stored network outputs %s (%s)", name, exc)
            continue
        for slot in np.flatnonzero((index >= 0) & (index < len(done))):
            t = int(index[slot])
            if not done[t] and t not in found:
                found[t] = (name, int(slot))
    return found, names


def read_raw(buffer_path: str, entries: dict[int, tuple[str, int]]) -> Iterator[tuple[int, np.ndarray]]:
    """(frame, network output) for each entry, one open per file."""
    by_file: dict[str, list[tuple[int, int]]] = {}
    for t, (name, slot) in sorted(entries.items()):
        by_file.setdefault(name, []).append((t, slot))
    for name, items in by_file.items():
        path = os.path.join(raw_dir(buffer_path), name)
        try:
            with h5py.File(path, "r", locking=False) as f:
                for t, slot in items:
                    yield t, np.asarray(f["frames"][slot])
        except OSError as exc:
            raise MpistyleError(f"cannot read stored network outputs {path}: {exc}") from None


def remove_raw_except(buffer_path: str, keep: Iterable[str]) -> int:
    """Delete every file in the buffer's raw folder but ``keep`` (this job's own). Returns how many."""
    directory = raw_dir(buffer_path)
    keep = set(keep)
    removed = 0
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name not in keep:
            unlink_if_present(os.path.join(directory, name))
            removed += 1
    return removed


