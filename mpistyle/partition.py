"""Contiguous partitions, halos and the per-rank work plan: pure arithmetic, no MPI.

Every rank computes the same :class:`Plan` from the same inputs (frame count, rank count, the
buffer's done-mask, halo length), so no plan has to be communicated.

Why a halo: temporal fusion is a recursion, out_t = f(stylized_t, warp(out_{t-1})). A rank that
starts its partition at frame ``a`` without out_{a-1} would restart the style there (a seam). It
therefore *warms up* the recursion over the K frames before ``a`` (the halo). The fusion is a
contraction (an error in the state shrinks by ``strength`` per frame), so after K frames the
state matches the 1-rank run to well under a grey level. The network outputs for halo frames are
not recomputed: their owner stylizes them first and sends them over ("exports"), so the halo costs
K flow+fusion steps per boundary, not K network passes.

Resume: frames already in the buffer are skipped. A run of missing frames whose predecessor is
done starts exactly from that stored output ("buffer" start); this is what makes a resumed run
identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def partition_bounds(n_frames: int, n_parts: int) -> list[tuple[int, int]]:
    """Split ``range(n_frames)`` into ``n_parts`` contiguous [start, stop) parts.

    Sizes differ by at most one; the first parts get the extra frames. Parts may be empty
    when there are more parts than frames.
    """
    if n_parts < 1:
        raise ValueError("n_parts must be >= 1")
    base, extra = divmod(max(n_frames, 0), n_parts)
    bounds = []
    start = 0
    for i in range(n_parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def boundaries(n_frames: int, n_parts: int) -> list[int]:
    """First frame of every non-empty partition after the first (where seams could appear)."""
    return [a for a, b in partition_bounds(n_frames, n_parts)[1:] if b > a]


def owner_of(frame: int, bounds: Sequence[tuple[int, int]]) -> int:
    for rank, (a, b) in enumerate(bounds):
        if a <= frame < b:
            return rank
    raise ValueError(f"frame {frame} is outside every partition")


@dataclass(frozen=True)
class Run:
    """A maximal run [start, stop) of frames to compute on one rank, and how its state begins.

    ``init`` is one of:
      - ``"fresh"``: frame ``start`` is stylized without a prior (video start, or K == 0);
      - ``"buffer"``: continue exactly from stored output ``state_frame`` (== ``warm_start - 1``);
      - ``"halo"``: warm up over frames [warm_start, start) whose network outputs come from their
        owners, starting fresh at ``warm_start`` (or exactly from the buffer when
        ``state_frame`` is not None).
    """

    start: int
    stop: int
    init: str
    warm_start: int
    state_frame: int | None = None

    @property
    def halo_frames(self) -> range:
        return range(self.warm_start, self.start)

    @property
    def first_source(self) -> int:
        """First source frame this run needs (state frame for flow, or the warm-up start)."""
        return self.state_frame if self.state_frame is not None else self.warm_start


@dataclass
class RankPlan:
    rank: int
    bounds: tuple[int, int]
    runs: list[Run] = field(default_factory=list)
    exports: dict[int, list[int]] = field(default_factory=dict)  # frame -> consumer ranks
    imports: dict[int, int] = field(default_factory=dict)  # halo frame -> owner rank

    @property
    def todo(self) -> list[int]:
        return [t for run in self.runs for t in range(run.start, run.stop)]

    def source_frames(self) -> list[int]:
        """Sorted source frames rank 0 must send to this rank."""
        needed: set[int] = set()
        for run in self.runs:
            needed.update(range(run.first_source, run.stop))
        return sorted(needed)

    def buffer_frames(self) -> list[int]:
        """Stored output frames this rank needs as exact starting states."""
        return [run.state_frame for run in self.runs if run.state_frame is not None]


@dataclass
class Plan:
    n_frames: int
    n_ranks: int
    halo: int
    ranks: list[RankPlan]

    @property
    def n_todo(self) -> int:
        return sum(len(rp.todo) for rp in self.ranks)

    def halo_cost(self) -> int:
        """Extra flow+fusion steps spent warming up (frames re-fused, not re-stylized)."""
        return sum(len(run.halo_frames) for rp in self.ranks for run in rp.runs)


def _runs_of(frames: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for t in frames:
        if runs and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1)
        else:
            runs.append((t, t + 1))
    return runs


def make_plan(n_frames: int, n_ranks: int, halo: int, done: Sequence[bool] | None = None,
              temporal: bool = True) -> Plan:
    """Plan every rank's work: contiguous partitions minus done frames, with halos.

    ``temporal=False`` (per-frame stylization) needs no state, so every run starts fresh.
    """
    if done is None:
        done = [False] * n_frames
    if len(done) != n_frames:
        raise ValueError("done mask length differs from frame count")
    halo = max(0, halo) if temporal else 0
    bounds = partition_bounds(n_frames, n_parts=n_ranks)
    plans = [RankPlan(rank=r, bounds=bounds[r]) for r in range(n_ranks)]
    for rp in plans:
        a0, b0 = rp.bounds
        for start, stop in _runs_of([t for t in range(a0, b0) if not done[t]]):
            rp.runs.append(_make_run(start, stop, halo, done, temporal))
    # Halo frames are owned (and still to be computed) by earlier ranks: wire exports/imports.
    for rp in plans:
        for run in rp.runs:
            for t in run.halo_frames:
                owner = owner_of(t, bounds)
                rp.imports[t] = owner
                plans[owner].exports.setdefault(t, []).append(rp.rank)
    return Plan(n_frames=n_frames, n_ranks=n_ranks, halo=halo, ranks=plans)


def _make_run(start: int, stop: int, halo: int, done: Sequence[bool], temporal: bool) -> Run:
    if not temporal or start == 0:
        return Run(start, stop, "fresh", warm_start=start)
    if done[start - 1]:
        return Run(start, stop, "buffer", warm_start=start, state_frame=start - 1)
    warm = max(0, start - halo)
    # A done frame inside the window gives an exact state: start right after it.
    for t in range(start - 1, warm - 1, -1):
        if done[t]:
            return Run(start, stop, "halo", warm_start=t + 1, state_frame=t)
    if warm == start:  # halo == 0: restart the style at the boundary (measurably seamy)
        return Run(start, stop, "fresh", warm_start=start)
    return Run(start, stop, "halo", warm_start=warm)
