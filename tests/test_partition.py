"""Partitions, halos and the per-rank plan (pure, no MPI)."""

from __future__ import annotations

import pytest

from mpistyle.partition import boundaries, make_plan, owner_of, partition_bounds


@pytest.mark.parametrize("n,parts", [(24, 1), (24, 2), (24, 5), (3, 5), (0, 2), (75, 3), (7, 7)])
def test_partitions_cover_frames_contiguously(n: int, parts: int) -> None:
    bounds = partition_bounds(n, parts)
    assert len(bounds) == parts
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (a0, b0), (a1, _b1) in zip(bounds, bounds[1:], strict=False):
        assert b0 == a1 and a0 <= b0
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # first parts take the extra frames


def test_boundaries_and_owner() -> None:
    assert boundaries(24, 3) == [8, 16]
    assert boundaries(2, 4) == [1]
    bounds = partition_bounds(10, 3)
    assert [owner_of(t, bounds) for t in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_plan_fresh_run_has_halos_exported_by_the_previous_rank() -> None:
    plan = make_plan(30, 3, halo=4)
    r0, r1, r2 = plan.ranks
    assert [(r.start, r.stop, r.init) for r in r0.runs] == [(0, 10, "fresh")]
    assert [(r.start, r.stop, r.init, r.warm_start) for r in r1.runs] == [(10, 20, "halo", 6)]
    assert r1.imports == {6: 0, 7: 0, 8: 0, 9: 0}
    assert r0.exports == {6: [1], 7: [1], 8: [1], 9: [1]}
    assert r2.imports == {16: 1, 17: 1, 18: 1, 19: 1}
    assert r1.source_frames() == list(range(6, 20))
    assert plan.halo_cost() == 8
    assert plan.n_todo == 30


def test_plan_halo_spanning_several_small_partitions() -> None:
    plan = make_plan(6, 6, halo=3)
    last = plan.ranks[5]
    assert last.runs[0].warm_start == 2
    assert last.imports == {2: 2, 3: 3, 4: 4}
    assert plan.ranks[2].exports[2] == [3, 4, 5]


def test_plan_without_temporal_needs_no_halo() -> None:
    plan = make_plan(30, 3, halo=4, temporal=False)
    assert all(run.init == "fresh" for rp in plan.ranks for run in rp.runs)
    assert plan.halo_cost() == 0 and not any(rp.imports for rp in plan.ranks)


def test_plan_resume_starts_exactly_from_stored_frames() -> None:
    done = [False] * 30
    for t in list(range(0, 4)) + list(range(10, 13)):
        done[t] = True
    plan = make_plan(30, 2, halo=5, done=done)
    r0, r1 = plan.ranks
    assert [(r.start, r.stop, r.init, r.state_frame) for r in r0.runs] == [(4, 10, "buffer", 3), (13, 15, "buffer", 12)]
    # rank 1 starts at 15; frame 14 is not done but 12 is: warm up exactly from the stored frame 12
    assert [(r.start, r.init, r.warm_start, r.state_frame) for r in r1.runs] == [(15, "halo", 13, 12)]
    assert r1.imports == {13: 0, 14: 0}
    assert r1.buffer_frames() == [12] and r1.source_frames()[0] == 12
    assert plan.n_todo == 30 - 7


def test_plan_more_ranks_than_frames() -> None:
    plan = make_plan(2, 4, halo=10)
    assert [len(rp.todo) for rp in plan.ranks] == [1, 1, 0, 0]
    assert plan.ranks[1].runs[0].init == "halo" and plan.ranks[1].runs[0].warm_start == 0


def test_plan_all_done_has_nothing_to_do() -> None:
    plan = make_plan(5, 2, halo=2, done=[True] * 5)
    assert plan.n_todo == 0 and all(not rp.runs for rp in plan.ranks)
