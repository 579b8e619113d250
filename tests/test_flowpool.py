"""The flow pool: same pair flows as serial ``pair_flow`` for any pool size, bounded look-ahead, errors surface."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from mpistyle.errors import MpistyleError
from mpistyle.io.media import iter_frames, read_all
from mpistyle.temporal.flow import FlowEstimator, pair_flow, to_gray
from mpistyle.temporal.flowpool import FlowPool, measure_pairs_per_s

from .conftest import CARPHONE, DATA

BIG = DATA / "bbb_640x272.mp4"


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return list(itertools.islice(iter_frames(str(BIG)), 6))


@pytest.fixture(scope="module")
def serial(frames) -> list:
    est = FlowEstimator()
    return [pair_flow(est, to_gray(frames[t - 1]), to_gray(frames[t])) for t in range(1, len(frames))]


def _same(a, b) -> bool:
    return (np.array_equal(a.flow_back, b.flow_back) and np.array_equal(a.mask, b.mask)
            and a.confidence == b.confidence)


@pytest.mark.parametrize("workers,lookahead", [(1, 1), (2, None), (3, 2), (4, 5)])
def test_pool_matches_serial_pair_flow(frames, serial, workers, lookahead):
    jobs = [(t, frames[t - 1], frames[t]) for t in range(1, len(frames))]
    starts: list[float] = []
    with FlowPool(workers=workers, lookahead=lookahead, on_pair=starts.append) as pool:
        got = list(pool.pairs(jobs))
    assert len(starts) == len(jobs)
    assert [t for t, _ in got] == list(range(1, len(frames)))
    assert all(_same(p, s) for (_, p), s in zip(got, serial, strict=True))
    assert all(p.confidence > 0.5 for _, p in got)  # real consecutive frames: the comparison is not vacuous
    assert pool.computed == len(jobs) and pool.busy_s > 0


def test_submit_get_and_grey_inputs(frames, serial):
    with FlowPool(workers=2, lookahead=3) as pool:
        assert pool.free == 3
        for t in (1, 2, 3):
            pool.submit(t, to_gray(frames[t - 1]), to_gray(frames[t]))  # grey frames work too
        assert pool.free == 0 and pool.pending == [1, 2, 3]
        with pytest.raises(RuntimeError, match="full"):
            pool.submit(4, frames[3], frames[4])
        with pytest.raises(ValueError, match="frame order"):
            pool.get(2)
        assert _same(pool.get(1), serial[0])
        pool.submit(4, frames[3], frames[4])
        assert _same(pool.get(2), serial[1])
        with pytest.raises(ValueError, match="already pending"):
            pool.submit(4, frames[3], frames[4])
        with pytest.raises(ValueError, match="frame order"):
            pool.submit(2, frames[1], frames[2])
        assert [_same(pool.get(t), serial[t - 1]) for t in (3, 4)] == [True] * 2
        with pytest.raises(ValueError, match="no pair"):
            pool.get(5)


def test_lookahead_bounds_what_is_read_ahead(frames):
    pulled: list[int] = []

    def jobs():
        for t in range(1, len(frames)):
            pulled.append(t)
            yield t, frames[t - 1], frames[t]

    with FlowPool(workers=2, lookahead=2) as pool:
        for t, _ in pool.pairs(jobs()):
            assert pulled[-1] <= t + 2 - 1  # never more than 2 pairs ahead of the consumer
            if t == 2:
                break  # leaving early drops what was computed ahead
        assert pool.pending == [] and pool.free == 2


def test_worker_error_surfaces_in_the_consumer(frames):
    small = cv2.resize(frames[1], (320, 136))
    jobs = [(1, frames[0], frames[1]), (2, frames[1], small), (3, frames[2], frames[3])]
    with FlowPool(workers=2) as pool:
        it = pool.pairs(jobs)
        t, first = next(it)
        assert t == 1 and first.confidence > 0.5
        with pytest.raises(MpistyleError, match="different sizes"):
            next(it)
        assert pool.pending == []
        # the pool is still usable after a failed pair
        pool.submit(5, frames[4], frames[5])
        assert pool.get(5).flow_back.shape == frames[5].shape[:2] + (2,)
    with FlowPool(workers=1) as pool:
        pool.submit(1, frames[0][..., 0].astype(np.float32), frames[1])
        with pytest.raises(ValueError, match="uint8"):
            pool.get(1, timeout=60)


def test_opencv_threads_are_process_global_and_restored():
    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        with FlowPool(workers=1):
            assert cv2.getNumThreads() == 2  # one worker: OpenCV may use its own threads inside it
        with FlowPool(workers=2) as pool:
            assert cv2.getNumThreads() == 1
            pool.close()
            assert cv2.getNumThreads() == 2
            with pytest.raises(RuntimeError, match="closed"):
                pool.submit(1, np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8))
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)


def test_bad_settings_are_refused_in_the_caller():
    with pytest.raises(MpistyleError, match="preset"):
        FlowPool(workers=2, preset="slow")
    with pytest.raises(ValueError, match="worker"):
        FlowPool(workers=0)
    with pytest.raises(ValueError, match="lookahead"):
        FlowPool(workers=1, lookahead=0)


def test_measure_pairs_per_s():
    frames = list(read_all(str(CARPHONE))[:4])
    r = measure_pairs_per_s(frames, workers=2, pairs=5)
    assert r["workers"] == 2 and r["pairs"] == 5
    assert r["seconds"] > 0 and r["pairs_per_s"] == pytest.approx(5 / r["seconds"])
    with pytest.raises(ValueError, match="two frames"):
        measure_pairs_per_s(frames[:1], workers=1)


def test_pool_feeds_the_fusion_recursion_exactly_as_serial_flow(frames):
    """The worker's use: pairs from the pool, in order, into TemporalFuser.step (same frames as serial flow)."""
    from mpistyle.temporal.chains import TemporalFuser, TemporalSettings

    settings = TemporalSettings()
    sty = [np.ascontiguousarray(f[:, ::-1]) for f in frames]  # a stand-in stylization
    serial = TemporalFuser(settings)
    ref = [serial.step(f, s) for f, s in zip(frames, sty, strict=True)]
    fuser = TemporalFuser(settings)
    outs = [fuser.step(frames[0], sty[0])]
    with FlowPool(workers=3, lookahead=4) as pool:
        for t, pair in pool.pairs((t, frames[t - 1], frames[t]) for t in range(1, len(frames))):
            outs.append(fuser.step(frames[t], sty[t], pair=pair))
    assert len(outs) == len(ref) and all(np.array_equal(a, b) for a, b in zip(outs, ref, strict=True))
    assert not np.array_equal(ref[2], sty[2])  # fusion changed the frames
