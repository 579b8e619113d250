"""Network outputs computed ahead of their turn, kept on local disk so a rank's memory stays bounded.

A rank stylizes the frames its successor warms up over first (its "exports"), and keeps stylizing its
own frames while its own warm-up is on the way; both are fused later, in frame order. Up to
``every + lead - 1`` frames of each wait here, so at 1080p or 4K they would weigh gigabytes in memory.
"""

from __future__ import annotations

import errno
import os
import tempfile

import numpy as np

from ..errors import io_failure


def spool_write(fd: int, data: bytes, offset: int, scratch: str | None) -> None:
    """pwrite all of ``data`` at ``offset``; a full scratch disk is an I/O failure (exit 74) naming it."""
    try:
        written = os.pwrite(fd, data, offset)
        while written < len(data):  # a short write comes before ENOSPC: finish it or get the error
            more = os.pwrite(fd, data[written:], offset + written)
            if more == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written += more
    except OSError as exc:
        where = scratch or tempfile.gettempdir()
        raise io_failure(exc, f"the frame spool in {where} (--scratch)") from None


class OutputSpool:
    """Frames keyed by index in an unlinked scratch file: put, membership, pop (one thread)."""

    def __init__(self, shape: tuple[int, int, int], scratch: str | None) -> None:
        self.shape = shape
        self.nbytes = int(np.prod(shape))
        self.scratch = scratch
        self._file = tempfile.TemporaryFile(dir=scratch, prefix="mpistyle-outputs-")
        self._slots: dict[int, int] = {}
        self._free: list[int] = []
        self._next = 0
        self.peak = 0  # most frames held at once (reported)

    def put(self, t: int, frame: np.ndarray) -> None:
        if t in self._slots:
            raise ValueError(f"frame {t} is already spooled")
        if self._free:
            slot = self._free.pop()
        else:
            slot, self._next = self._next, self._next + 1
        spool_write(self._file.fileno(), np.ascontiguousarray(frame, dtype=np.uint8).tobytes(), slot * self.nbytes,
                    self.scratch)
        self._slots[t] = slot
        self.peak = max(self.peak, len(self._slots))

    def pop(self, t: int) -> np.ndarray:
        slot = self._slots.pop(t)
        data = os.pread(self._file.fileno(), self.nbytes, slot * self.nbytes)
        self._free.append(slot)
        return np.frombuffer(data, dtype=np.uint8).reshape(self.shape)

    def __contains__(self, t: object) -> bool:
        return t in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def close(self) -> None:
        self._file.close()
