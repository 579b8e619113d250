"""The network's order on a rank, with a wait for the warm-up forced (issue 32, item 1).

On real ranks the warm-up usually arrives before a rank runs out of frames to stylize ahead, so no wait
happens there. Here a fake communicator delivers the warm-up frames only when the worker blocks on them,
so the wait always happens, and the test derives from the recorded ``order`` (not from the numbers the
worker reports about itself) that everything the rank may stylize before its warm-up came first. The
plan, the worker, the fusion and the HDF5 raw-output file are the real ones; the network is a cheap
per-frame function (the order, not the pixels, is under test here).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from mpistyle.partition import make_plan
from mpistyle.rawbuffer import RawFile
from mpistyle.stylize.comm import TAG_HALO
from mpistyle.stylize.spool import OutputSpool, slots_needed
from mpistyle.stylize.worker import RankWorker
from mpistyle.temporal.chains import TemporalSettings

SHAPE = (8, 12, 3)


class _Request:
    def __init__(self, done: bool = True, on_wait: Any = None) -> None:
        self.done, self.on_wait = done, on_wait

    def Test(self) -> bool:  # noqa: N802 - mpi4py's name
        return self.done

    def Wait(self) -> None:  # noqa: N802
        if not self.done:
            self.on_wait()

    def Cancel(self) -> None:  # noqa: N802
        pass


class _Comm:
    """One rank's view of a 2-rank job: halo receives complete only when the worker blocks on one."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.halo: dict[int, tuple[_Request, np.ndarray]] = {}  # in posting order: frame order
        self.sent: list[tuple[int, int, np.ndarray]] = []  # (dest, tag, data)

    def Get_rank(self) -> int:  # noqa: N802
        return self.rank

    def Irecv(self, buf: np.ndarray, source: int, tag: int) -> _Request:  # noqa: N802
        t = len(self.halo)
        req = _Request(done=False, on_wait=self.deliver_all)
        self.halo[t] = (req, buf)
        return req

    def deliver_all(self) -> None:
        """The owner's outputs all arrive (what a real owner sends: its network on those sources)."""
        for req, _ in self.halo.values():
            req.done = True

    def Isend(self, buf: np.ndarray, dest: int, tag: int) -> _Request:  # noqa: N802
        self.sent.append((dest, tag, buf.copy()))
        return _Request()

    def isend(self, msg: Any, dest: int, tag: int) -> _Request:
        return _Request()


class _Msgr:
    stop = None

    def interrupted(self) -> bool:
        return False

    def wait(self, req: _Request, interruptible: bool = True) -> None:
        req.Wait()


class _Store:
    """Commits every frame at once (the raw-output slots are released as the real store allows)."""

    def __init__(self) -> None:
        self.frames: dict[int, np.ndarray] = {}
        self.runs: dict[int, int] = {}

    def begin_run(self, start: int, stop: int) -> None:
        self.runs[start] = start

    def put(self, t: int, frame: np.ndarray) -> None:
        self.frames[t] = frame.copy()
        start = max(s for s in self.runs if s <= t)
        self.runs[start] = t + 1

    def committed(self) -> dict[int, int]:
        return dict(self.runs)

    def is_alive(self) -> bool:
        return True


def _source(t: int) -> np.ndarray:
    return np.full(SHAPE, t % 251, dtype=np.uint8)


def _network(frames: np.ndarray) -> np.ndarray:
    return (255 - frames).astype(np.uint8)


def _run_rank(tmp_path, n_frames: int, rank: int, batch: int) -> tuple[RankWorker, _Comm, _Store]:
    plan = make_plan(n_frames, 2, halo=10, temporal=True)
    rp = plan.ranks[rank]
    comm, store = _Comm(rank), _Store()
    setup = SimpleNamespace(height=SHAPE[0], width=SHAPE[1])
    spool = SimpleNamespace(get=_source, scratch=None)
    ahead = plan.max_warmup + batch if rp.imports else 0
    raw = RawFile(str(tmp_path / f"buf{rank}.h5"), rank, slots_needed(len(rp.exports), 0, ahead, batch), SHAPE, "x")
    worker = RankWorker(comm, rp, plan, setup, _network, TemporalSettings(mode="none"), spool, _Msgr(), store,
                        batch, {}, t0=0.0, outputs=OutputSpool(SHAPE, raw))
    worker.run()
    worker.cancel_unmatched()
    return worker, comm, store


def _flat(order: list[list[int]]) -> list[int]:
    return [t for first, stop in order for t in range(first, stop)]


@pytest.mark.parametrize(("n_frames", "batch"), [(200, 2), (140, 1), (200, 4)])
def test_a_forced_wait_comes_only_after_every_frame_the_rank_may_stylize_ahead(tmp_path, n_frames, batch) -> None:
    worker, comm, store = _run_rank(tmp_path, n_frames, 1, batch)
    trace = worker.trace()
    start = n_frames // 2  # rank 1's partition: [n/2, n); its chain started at 54 (anchor 64, lead 10)
    assert trace["imports"] == list(range(54, start)) and trace["exports"] == []
    assert trace["ahead_limit"] == 64 + 10 - 1 + batch
    assert len(trace["halo_waits"]) == 1  # forced: nothing arrives until the worker blocks
    wait = trace["halo_waits"][0]
    assert (wait["frame"], wait["run_start"]) == (54, start)
    order = _flat(trace["order"])
    assert order == list(range(start, n_frames))  # each own frame once, in order, no warm-up re-stylized
    # before the wait: the rank's own frames from its start, as many as the limit allows (or all of them)
    expected = list(range(start, start + min(n_frames - start, 64 + 10 - 1 + batch)))
    assert order[:wait["network"]] == expected, (wait, trace["order"])
    assert sorted(store.frames) == list(range(start, n_frames))
    assert all(np.array_equal(store.frames[t], _network(_source(t)[None])[0]) for t in store.frames)
    assert not list((tmp_path / "buf1.h5.raw").iterdir())  # every stored output consumed and deleted


def test_two_ranks_export_the_successors_warm_up_first(tmp_path) -> None:
    """190 frames on 2 ranks: [0, 95) and [95, 190). Rank 1 warms up from the chain start 54 (anchor 64,
    lead 10), so rank 0 exports 54..94, stylizes them before its own first frame and sends them in order."""
    worker, comm, store = _run_rank(tmp_path, 190, 0, 2)
    trace = worker.trace()
    assert trace["exports"] == list(range(54, 95)) and trace["imports"] == []
    assert trace["order"] == [[54, 95], [0, 54]]
    assert trace["halo_waits"] == []
    assert [dest for dest, _, _ in comm.sent] == [1] * 41 and {tag for _, tag, _ in comm.sent} == {TAG_HALO}
    sent = [data.reshape(SHAPE) for _, _, data in comm.sent]
    assert all(np.array_equal(sent[i], _network(_source(54 + i)[None])[0]) for i in range(41))
    assert sorted(store.frames) == list(range(95))
