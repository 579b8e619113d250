"""Flow ahead, in parallel: threads computing :func:`~mpistyle.temporal.flow.pair_flow` for many pairs at once.

A pair's flow depends only on the two source frames, never on the fusion state, so it can run as
far ahead of the fusion as memory allows. :class:`FlowPool` keeps at most ``lookahead`` pairs
submitted but not yet consumed (queued, running or finished): memory stays bounded at about
``lookahead`` x (two grey frames + flow + mask) whatever the video length.

Each worker thread has its own :class:`~mpistyle.temporal.flow.FlowEstimator` (OpenCV's DIS object is not
thread-safe). OpenCV's thread count is process-global (``cv2.setNumThreads`` from any thread
changes it for all), so a pool of more than one worker sets it to 1 while it is open: N workers
of one OpenCV thread each scale better than one worker of N OpenCV threads (DIS parallelises
poorly inside one call). The previous setting is restored by :meth:`FlowPool.close`.

Results are bit-identical to serial ``pair_flow`` for any pool size: every call is deterministic
and uses no state from the previous call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import cv2
import numpy as np

from mpistyle.temporal.flow import DEFAULT_DIS_PRESET, MASK_MIN_FILTER, FlowEstimator, PairFlow, pair_flow, to_gray

logger = logging.getLogger(__name__)


class FlowPool:
    """``workers`` threads computing pair flows, at most ``lookahead`` pairs in flight, consumed in order.

    Use :meth:`submit` / :meth:`get` (the caller interleaves them, keeping :attr:`free` >= 1 before
    each submit), or :meth:`pairs` (an iterator that does the interleaving). ``submit`` never blocks:
    submitting more than ``lookahead`` unconsumed pairs is a programming error (``RuntimeError``),
    because a producer that is also the consumer would otherwise deadlock. An exception in a worker
    is raised by the ``get`` of that pair, in the consumer's thread.
    """

    def __init__(self, workers: int = 1, lookahead: int | None = None, method: str = "dis",
                 preset: str = DEFAULT_DIS_PRESET, min_filter: int = MASK_MIN_FILTER, motion_boundaries: bool = True,
                 on_pair: Callable[[float], None] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"a flow pool needs at least one worker, got {workers}")
        self.workers = workers
        # Default: two pairs per worker, so every worker has its next pair queued when it finishes one.
        self.lookahead = lookahead if lookahead is not None else 2 * workers
        if self.lookahead < 1:
            raise ValueError(f"lookahead must be positive, got {self.lookahead}")
        FlowEstimator(method, preset)  # validate the method and preset here, in the caller's thread
        self.method, self.preset = method, preset
        self.min_filter, self.motion_boundaries = min_filter, motion_boundaries
        self.on_pair = on_pair  # called in the worker with the pair's perf_counter start (e.g. a timeline)
        self._local = threading.local()
        self._pending: OrderedDict[int, Future[PairFlow]] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self._busy_s = 0.0
        self._done = 0
        self._cv_threads: int | None = None
        if workers > 1:
            self._cv_threads = cv2.getNumThreads()
            cv2.setNumThreads(1)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mpistyle-flowpool")

    def __repr__(self) -> str:
        return (f"FlowPool(workers={self.workers}, lookahead={self.lookahead}, method={self.method!r}, "
                f"preset={self.preset!r})")

    # -- the worker side ------------------------------------------------------------------------
    def _estimator(self) -> FlowEstimator:
        est = getattr(self._local, "est", None)
        if est is None:  # one estimator per worker thread, created on its first pair
            est = self._local.est = FlowEstimator(self.method, self.preset)
        return est

    def _job(self, prev: np.ndarray, cur: np.ndarray) -> PairFlow:
        start = time.perf_counter()
        try:
            return pair_flow(self._estimator(), to_gray(prev), to_gray(cur), min_filter=self.min_filter,
                             motion_boundaries=self.motion_boundaries)
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self._busy_s += elapsed
                self._done += 1
            if self.on_pair is not None:
                self.on_pair(start)

    @property
    def busy_s(self) -> float:
        """Seconds the workers spent computing pairs, summed over workers (the report's "flow" phase)."""
        return self._busy_s

    @property
    def computed(self) -> int:
        """Pairs computed so far (consumed or not, failed ones included)."""
        return self._done

    # -- the consumer side ----------------------------------------------------------------------
    @property
    def free(self) -> int:
        """How many more pairs may be submitted before one must be consumed with :meth:`get`."""
        return self.lookahead - len(self._pending)

    @property
    def pending(self) -> list[int]:
        """Frame indices submitted and not yet consumed, oldest first."""
        return list(self._pending)

    def submit(self, t: int, prev: np.ndarray, cur: np.ndarray) -> None:
        """Queue the flow of the pair (t-1, t): ``prev`` and ``cur`` are RGB or grey uint8 frames.

        The frames are used as they are, without a copy: the caller must not write into them until
        the pair has been consumed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the flow pool is closed")
            if t in self._pending:
                raise ValueError(f"the pair of frame {t} is already pending")
            if self._pending and t <= next(reversed(self._pending)):
                raise ValueError(f"pairs must be submitted in frame order: {t} after {next(reversed(self._pending))}")
            if len(self._pending) >= self.lookahead:
                raise RuntimeError(f"flow look-ahead of {self.lookahead} pairs is full: get() one first")
            self._pending[t] = self._executor.submit(self._job, prev, cur)

    def get(self, t: int, timeout: float | None = None) -> PairFlow:
        """The pair flow of frame ``t`` (the oldest pending pair), waited for; a worker's exception is raised here."""
        with self._lock:
            if not self._pending:
                raise ValueError(f"no pair is pending (asked for frame {t})")
            head = next(iter(self._pending))
            if head != t:
                raise ValueError(f"pairs are consumed in frame order: the next one is frame {head}, not {t}")
            fut = self._pending.pop(t)
        return fut.result(timeout=timeout)

    def clear(self) -> None:
        """Drop every pending pair (e.g. when a run ends early); running ones finish and are discarded."""
        with self._lock:
            futures = list(self._pending.values())
            self._pending.clear()
        for fut in futures:
            fut.cancel()

    def pairs(self, jobs: Iterable[tuple[int, np.ndarray, np.ndarray]]) -> Iterator[tuple[int, PairFlow]]:
        """Yield ``(t, pair_flow)`` for each ``(t, prev, cur)`` of ``jobs``, in order, ``lookahead`` ahead.

        ``jobs`` is read lazily, in the consumer's thread (so it may read a spool that is not thread-safe).
        Leaving the loop early drops the pairs computed ahead.
        """
        it = iter(jobs)
        exhausted = False
        try:
            while True:
                while not exhausted and self.free > 0:
                    try:
                        t, prev, cur = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    self.submit(t, prev, cur)
                if not self._pending:
                    return
                t = next(iter(self._pending))
                yield t, self.get(t)
        finally:
            self.clear()

    def close(self) -> None:
        """Drop pending pairs, stop the threads (waits for running pairs) and restore OpenCV's thread count."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._cv_threads is not None:
            cv2.setNumThreads(self._cv_threads)

    def __enter__(self) -> FlowPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def measure_pairs_per_s(frames: list[np.ndarray], workers: int, pairs: int | None = None, method: str = "dis",
                        preset: str = DEFAULT_DIS_PRESET) -> dict[str, float]:
    """Pair flows per second with a pool of ``workers`` on consecutive pairs of ``frames`` (after a warm-up).

    ``pairs`` defaults to the available consecutive pairs; frames are reused cyclically when more are asked for.
    """
    if len(frames) < 2:
        raise ValueError("need at least two frames to measure flow")
    grays = [to_gray(f) for f in frames]
    n = pairs if pairs is not None else len(grays) - 1
    jobs = [(t, grays[(t - 1) % len(grays)], grays[t % len(grays)]) for t in range(1, n + 1)]
    with FlowPool(workers=workers, method=method, preset=preset) as pool:
        list(pool.pairs(jobs[:workers]))  # warm-up: the workers create their estimators and DIS pyramids
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in pool.pairs(jobs):
            pass
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    return {"workers": workers, "pairs": n, "seconds": wall, "pairs_per_s": n / wall, "cpu_s": cpu}
