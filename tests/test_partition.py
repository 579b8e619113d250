"""Partitions, anchors, halos and the per-rank plan (pure, no MPI)."""

from __future__ import annotations

import pytest

from mpistyle.partition import Anchors, boundaries, make_plan, owner_of, partition_bounds


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


def test_anchors_chain_starts_and_exact_states() -> None:
    a = Anchors(every=10, lead=3)
    assert [t for t in range(40) if a.is_anchor(t)] == [10, 20, 30]
    assert [t for t in range(40) if a.starts_chain(t)] == [7, 17, 27, 37]
    assert [a.chain_start(t) for t in (0, 9, 10, 19, 20, 35)] == [0, 0, 7, 7, 17, 27]
    # out_{t-1} is the whole state except at anchors and inside lead windows (two chains alive)
    assert [t for t in range(1, 25) if not a.exact_from_output(t)] == [8, 9, 10, 18, 19, 20]
    hard = Anchors(every=10, lead=0)  # restarts without a lead: only anchors need a warm-up
    assert [t for t in range(1, 25) if not hard.exact_from_output(t)] == [10, 20]
    assert hard.chain_start(15) == 10
    with pytest.raises(ValueError):
        Anchors(every=10, lead=10)


def test_plan_warm_up_reaches_back_to_the_chain_start_not_k_frames() -> None:
    plan = make_plan(30, 3, halo=4, every=8)  # anchors 8, 16, 24; chains start at 0, 4, 12, 20
    r0, r1, r2 = plan.ranks
    assert [(r.start, r.stop, r.init) for r in r0.runs] == [(0, 10, "fresh")]
    assert [(r.start, r.stop, r.init, r.warm_start) for r in r1.runs] == [(10, 20, "halo", 4)]
    assert r1.imports == {t: 0 for t in range(4, 10)}
    assert r0.exports == {t: [1] for t in range(4, 10)}
    assert r2.imports == {t: 1 for t in range(12, 20)}  # frame 20 is an anchor whose chain starts at 12
    assert r1.source_frames() == list(range(4, 20))
    assert plan.halo_cost() == 6 + 8 and plan.max_warmup == 8 + 4 - 1
    assert plan.n_todo == 30


def test_plan_warm_up_lengths_are_bounded_and_independent_of_the_rank_count() -> None:
    for ranks in range(2, 9):
        plan = make_plan(500, ranks, halo=10, every=64)
        for rp in plan.ranks:
            for run in rp.runs:
                assert run.warm_start == Anchors(64, 10).chain_start(run.start)
                assert len(run.halo_frames) <= plan.max_warmup == 73


def test_dynamic_chunks_start_at_anchors_and_warm_up_over_the_lead_only() -> None:
    plan = make_plan(300, 8, halo=10, every=64, align=True)
    starts = [rp.bounds[0] for rp in plan.ranks if rp.bounds[1] > rp.bounds[0]]
    assert all(a % 64 == 0 for a in starts) and plan.ranks[-1].bounds[1] == 300
    assert sum(len(rp.todo) for rp in plan.ranks) == 300
    assert all(len(run.halo_frames) == 10 for rp in plan.ranks for run in rp.runs if run.start > 0)
    assert partition_bounds(10, 3, align=4) == [(0, 4), (4, 8), (8, 10)]
    assert make_plan(76, 4, halo=10, every=64, align=True).boundaries() == [64]  # leading empty chunks


def test_plan_halo_spanning_several_small_partitions() -> None:
    plan = make_plan(6, 6, halo=3, every=5)  # frame 5 is an anchor, its chain starts at 2
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
    # the 23 frames to do are shared 12 / 11: the cut falls at frame 19
    assert [rp.bounds for rp in plan.ranks] == [(0, 19), (19, 30)]
    assert [(r.start, r.stop, r.init, r.state_frame) for r in r0.runs] == [(4, 10, "buffer", 3), (13, 19, "buffer", 12)]
    # rank 1 starts at 19; frames 13-18 are not done but 12 is: warm up exactly from the stored frame 12
    assert [(r.start, r.init, r.warm_start, r.state_frame) for r in r1.runs] == [(19, "halo", 13, 12)]
    assert r1.imports == {t: 0 for t in range(13, 19)}
    assert r1.buffer_frames() == [12] and r1.source_frames()[0] == 12
    assert plan.n_todo == 30 - 7


def test_resume_shares_the_missing_frames_between_the_ranks() -> None:
    """Killed near the end: the missing frames sit at the end of each old partition. The new plan gives
    every rank an equal share of them instead of reusing the old bounds (which left rank 0 idle)."""
    done = [t < 30 or 38 <= t < 62 for t in range(75)]  # 2 ranks were at frames 30 and 62
    assert [len(rp.todo) for rp in make_plan(75, 2, halo=10, done=done).ranks] == [11, 10]
    done = [t < 62 for t in range(75)]
    plan = make_plan(75, 2, halo=10, done=done)
    assert [len(rp.todo) for rp in plan.ranks] == [7, 6]
    assert make_plan(75, 2, halo=10).ranks[0].bounds == (0, 38)  # a fresh run: equal parts as before


def test_plan_resume_warms_up_where_the_stored_output_is_not_the_whole_state() -> None:
    done = [t < 18 for t in range(40)]  # stopped at 18, inside the lead window of anchor 20
    plan = make_plan(40, 1, halo=4, done=done, every=10)
    (run,) = plan.ranks[0].runs
    # frames 16 and 17 were output by the old chain while the new one (from 16) ran alongside:
    # warm up from 16, re-stylizing the done frames locally (no owner computes them any more)
    assert (run.start, run.init, run.warm_start, run.state_frame, run.local) == (18, "halo", 16, 15, (16, 17))
    assert plan.ranks[0].imports == {}
    done = [t < 20 for t in range(40)]  # stopped right at an anchor: its chain starts fresh at 16
    (run,) = make_plan(40, 1, halo=4, done=done, every=10).ranks[0].runs
    assert (run.warm_start, run.state_frame, run.local) == (16, None, (16, 17, 18, 19))
    done = [t < 13 for t in range(40)]  # inside a chain with one chain alive: exact from the buffer
    (run,) = make_plan(40, 1, halo=4, done=done, every=10).ranks[0].runs
    assert (run.init, run.state_frame) == ("buffer", 12)


def test_plan_more_ranks_than_frames() -> None:
    plan = make_plan(2, 4, halo=10)  # lead clipped below the anchor spacing
    assert [len(rp.todo) for rp in plan.ranks] == [1, 1, 0, 0]
    assert plan.ranks[1].runs[0].init == "halo" and plan.ranks[1].runs[0].warm_start == 0


def test_plan_all_done_has_nothing_to_do() -> None:
    plan = make_plan(5, 2, halo=2, done=[True] * 5)
    assert plan.n_todo == 0 and all(not rp.runs for rp in plan.ranks)
