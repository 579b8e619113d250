"""Network outputs that wait for their fusion, kept in the buffer's raw-output file (``rawbuffer.py``).

A rank stylizes the frames its successor warms up over first (its "exports") and keeps stylizing its own
frames while its own warm-up is on the way; both are fused later, in frame order. Up to
``every + lead - 1`` frames of each wait, so at 1080p or 4K they would weigh gigabytes in memory; and they
are the most expensive work of the job, so they wait where a resume finds them (issue 32). Every network
output goes through here: it is durable before the fusion takes it, and stays until its frame is
committed done, so a kill loses at most the batch in the network.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..errors import io_failure
from ..rawbuffer import RawFile
from .comm import Stopped

logger = logging.getLogger(__name__)

COMMIT_WAIT_S = 0.01  # poll interval while every slot waits for its frame's commit (rare: see slots_needed)
COMMIT_WAIT_LIMIT_S = 10.0  # a store this slow: the batch waits in memory instead (not kept across a kill)


def slots_needed(exports: int, inherited: int, ahead_limit: int, batch: int) -> int:
    """Slots that always suffice: what may wait at once (exports and inherited outputs, the frames stylized
    ahead, the batch just stylized) and the frames fused but not yet committed (the store's queue of 8 and
    a commit interval's worth; beyond that the network waits for the store, as it would anyway)."""
    return exports + inherited + ahead_limit + 2 * batch + 16


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
    """Frames keyed by index: put (durable on return), membership, pop (one thread).

    An entry's life: :meth:`put_many` after the network -> :meth:`pop` when the fusion takes it -> released
    once the store reports its frame committed (the slot is cleared, durably, before it is reused).
    Without a raw file (``raw=None``) outputs stay in memory: nothing then survives a kill.
    """

    def __init__(self, shape: tuple[int, int, int], raw: RawFile | None = None) -> None:
        self.shape = shape
        self.raw = raw
        self._waiting: dict[int, int] = {}  # frame -> slot, not fused yet
        self._fused: dict[int, int] = {}  # frame -> slot, fused, its frame not committed yet
        self._free: list[int] = list(range(raw.slots))[::-1] if raw is not None else []  # entry -1, durable
        self._dirty: list[int] = []  # entry cleared, not yet durable: reusable after the next sync
        self._memory: dict[int, np.ndarray] = {}  # no slot to spare (or no raw file)
        self._recent: dict[int, np.ndarray] = {}  # the last batch put, still in memory: no read back
        self._committed: Callable[[], dict[int, int]] = dict
        self._alive: Callable[[], bool] = lambda: True
        self._interrupted: Callable[[], bool] = lambda: False
        self.peak = 0  # most frames waiting at once (reported)
        self.inherited = 0  # outputs stored by an earlier, stopped job and fused in this one
        self.stored = 0  # outputs made durable by this job

    def watch(self, committed: Callable[[], dict[int, int]], alive: Callable[[], bool],
              interrupted: Callable[[], bool]) -> None:
        """Where to learn which frames are committed (the rank's store: run start -> committed up to)."""
        self._committed, self._alive, self._interrupted = committed, alive, interrupted

    # -- the worker's calls ---------------------------------------------------------------------
    def load(self, items: Iterable[tuple[int, np.ndarray]], group: int = 8) -> None:
        """Take over outputs an earlier job stored (a resume), durably, before the old files go; a few
        frames at a time (memory stays bounded at any frame size)."""
        chunk: list[tuple[int, np.ndarray]] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == group:
                self.put_many(chunk, keep=False)
                self.inherited += len(chunk)
                chunk = []
        if chunk:
            self.put_many(chunk, keep=False)
            self.inherited += len(chunk)

    def put(self, t: int, frame: np.ndarray) -> None:
        self.put_many([(t, frame)])

    def put_many(self, items: Iterable[tuple[int, np.ndarray]], keep: bool = True) -> None:
        """Store a batch of network outputs; they are on disk when this returns. ``keep``: also keep the
        batch in memory until popped (the fusion usually takes it next)."""
        items = [(t, np.ascontiguousarray(frame, dtype=np.uint8)) for t, frame in items]
        for t, _ in items:
            if t in self:
                raise ValueError(f"frame {t} is already spooled")
        slots = self._take_slots(len(items)) if self.raw is not None else []
        stored = list(zip(items, slots, strict=False))
        for (_, frame), slot in stored:
            self.raw.write(slot, frame)  # type: ignore[union-attr]
        for t, frame in items[len(stored):]:
            self._memory[t] = frame
        if stored:
            self.raw.sync()  # type: ignore[union-attr]  # the frames first: an entry never names a slot half written
            self._free.extend(self._dirty)  # that sync made their cleared entries durable too
            self._dirty = []
            self.raw.name_slots((slot, t) for (t, _), slot in stored)  # type: ignore[union-attr]
            self.raw.sync()  # type: ignore[union-attr]
            self.stored += len(stored)
        for (t, _), slot in stored:
            self._waiting[t] = slot
        self._recent = {t: frame for (t, frame), _ in stored} if keep else {}
        self.peak = max(self.peak, len(self))

    def peek(self, t: int) -> np.ndarray:
        """Frame t's output, left in place (an export stored before a stop, sent before it is fused)."""
        if t in self._memory:
            return self._memory[t]
        if t in self._recent:
            return self._recent[t]
        return self.raw.read(self._waiting[t])  # type: ignore[union-attr]

    def pop(self, t: int) -> np.ndarray:
        """Frame t's output for the fusion; its entry stays until the frame is committed."""
        if t in self._memory:
            return self._memory.pop(t)
        frame = self._recent.pop(t) if t in self._recent else self.raw.read(self._waiting[t])  # type: ignore[union-attr]
        self._fused[t] = self._waiting.pop(t)
        return frame

    def __contains__(self, t: object) -> bool:
        return t in self._waiting or t in self._memory

    def __len__(self) -> int:
        return len(self._waiting) + len(self._memory)

    def close(self) -> None:
        """Close the file; delete it when nothing in it is still needed (every frame it held committed)."""
        if self.raw is None:
            return
        self._release_committed()
        needed = bool(self._waiting or self._fused)
        self.raw.close(remove=not needed)
        if needed:
            logger.debug("keeping %d stored network outputs for a resume in %s",
                         len(self._waiting) + len(self._fused), self.raw.path)

    # -- slots ----------------------------------------------------------------------------------
    def _take_slots(self, n: int) -> list[int]:
        self._release_committed()
        deadline = time.monotonic() + COMMIT_WAIT_LIMIT_S
        while len(self._free) + len(self._dirty) < n and self._fused and time.monotonic() < deadline:
            # Every slot holds an output the fusion took whose frame the store has not committed yet.
            if self._interrupted() or not self._alive():
                raise Stopped()
            time.sleep(COMMIT_WAIT_S)
            self._release_committed()
        if len(self._free) < n and self._dirty:
            self.raw.sync()  # type: ignore[union-attr]  # cleared entries durable before their slots are rewritten
            self._free.extend(self._dirty)
            self._dirty = []
        if len(self._free) < n:
            logger.debug("raw-output file full: %d frame(s) wait in memory", n - len(self._free))
        take, self._free = self._free[-n:] if n else [], self._free[:-n] if n else self._free
        return take[::-1]

    def _release_committed(self) -> None:
        if not self._fused:
            return
        committed = self._committed()
        starts = sorted(committed)
        released = []
        for t, slot in self._fused.items():
            k = bisect.bisect_right(starts, t) - 1
            if k >= 0 and t < committed[starts[k]]:
                released.append((t, slot))
        if released:
            self.raw.name_slots((slot, -1) for _, slot in released)  # type: ignore[union-attr]
            for t, slot in released:
                del self._fused[t]
                self._dirty.append(slot)


def describe(spool: Any) -> dict[str, int]:
    """The spool's figures for the report's trace."""
    return {"spool_peak": spool.peak, "outputs_inherited": spool.inherited, "outputs_stored": spool.stored}
