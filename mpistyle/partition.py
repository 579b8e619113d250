"""Contiguous partitions, anchors, halos and the per-rank work plan: pure arithmetic, no MPI.

Every rank computes the same :class:`Plan` from the same inputs (frame count, rank count, the
buffer's done-mask, anchor spacing and lead), so no plan has to be communicated.

Why anchors (issue 9): temporal fusion is a recursion, out_t = f(stylized_t, warp(out_{t-1})), so
frame t depends on every frame since the last reset. A bounded halo (warm-up from a cold start a
few frames before a partition) converges to the 1-rank state only up to the uint8 rounding
(a rounded contraction has several fixed points: where the flow is exact, an error of one grey
level is kept forever at strength >= 0.5), and any difference left at all, even one grey level in
a few pixels, changes every H.264 decision after it. So the recursion itself restarts at points
fixed by the frame index, never by the partitioning: the chain that outputs frames
[A, A + every) starts fresh at A - lead (``Anchors.chain_start``) and runs alongside the old chain
during those ``lead`` frames, so at A the output switches between two chains that have already
converged (a contraction: the switch is below a grey level; no visible restart). Every frame is
then a pure function of the source frames from its chain start, and a rank whose run starts at
s warms up from ``chain_start(s)``: its output is bit-identical to the 1-rank output for any rank
count, schedule or resume. The network outputs of warm-up frames come from their owners
("exports"), so in the static schedule a boundary costs at most ``every + lead - 1`` flow+fusion
steps and no network passes; done warm-up frames (resume) are re-stylized locally.

Resume: frames already in the buffer are skipped. A run of missing frames starts exactly from
the stored output of the previous frame when that output *is* the whole state (one chain alive:
not at an anchor, not inside a lead window, ``Anchors.exact_from_output``); otherwise it warms up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_ANCHOR_EVERY = 64  # frames per fusion chain; a static boundary costs at most every + lead - 1 fusion steps


@dataclass(frozen=True)
class Anchors:
    """Where the fusion recursion restarts, from the frame index alone (see the module docstring).

    Anchors are the frames A = k * ``every`` (k >= 1). The chain that outputs [A, A + every)
    starts fresh at A - ``lead``; frames [0, every) come from the chain started at 0.
    """

    every: int = DEFAULT_ANCHOR_EVERY
    lead: int = 10

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"anchor spacing must be >= 1, got {self.every}")
        if not 0 <= self.lead < self.every:  # at most two chains alive at once
            raise ValueError(f"anchor lead must be in [0, {self.every}), got {self.lead}")

    def is_anchor(self, t: int) -> bool:
        """The output switches to a new chain at t."""
        return t > 0 and t % self.every == 0

    def starts_chain(self, t: int) -> bool:
        """A new chain starts fresh at t (``lead`` frames before the next anchor)."""
        return t + self.lead >= self.every and (t + self.lead) % self.every == 0

    def chain_start(self, t: int) -> int:
        """First frame of the chain whose output is frame t."""
        anchor = (t // self.every) * self.every
        return 0 if anchor == 0 else anchor - self.lead

    def exact_from_output(self, t: int) -> bool:
        """Is (source_{t-1}, out_{t-1}) the whole fusion state before frame t (only one chain alive)?"""
        if t <= 0 or self.is_anchor(t):
            return False
        next_start = (t // self.every + 1) * self.every - self.lead
        return t - 1 < next_start


def partition_bounds(n_frames: int, n_parts: int, align: int = 1) -> list[tuple[int, int]]:
    """Split ``range(n_frames)`` into ``n_parts`` contiguous [start, stop) parts.

    Sizes differ by at most one; the first parts get the extra frames. Parts may be empty
    when there are more parts than frames. ``align`` > 1 rounds every inner bound to a multiple
    of ``align`` (dynamic chunks start at anchors, so each warms up over ``lead`` frames only);
    parts may then be empty.
    """
    if n_parts < 1:
        raise ValueError("n_parts must be >= 1")
    if align < 1:
        raise ValueError("align must be >= 1")
    base, extra = divmod(max(n_frames, 0), n_parts)
    cuts = [0]
    for i in range(n_parts):
        cuts.append(cuts[-1] + base + (1 if i < extra else 0))
    if align > 1:
        cuts = [0] + [min(max(n_frames, 0), int(round(c / align)) * align) for c in cuts[1:-1]] + [cuts[-1]]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def balanced_bounds(done: Sequence[bool], n_parts: int) -> list[tuple[int, int]]:
    """Contiguous parts covering every frame, each holding an equal share of the frames not done.

    With nothing done this is ``partition_bounds``. After a kill the missing frames often sit at the
    end of each old partition; cutting by them keeps every rank busy on a resume (pure).
    """
    n_frames = len(done)
    todo = [t for t in range(n_frames) if not done[t]]
    shares = partition_bounds(len(todo), n_parts)
    cuts = [0] + [todo[a] if a < len(todo) else n_frames for a, _ in shares[1:]] + [n_frames]
    return [(cuts[k], cuts[k + 1]) for k in range(n_parts)]


def boundaries(n_frames: int, n_parts: int, align: int = 1) -> list[int]:
    """First frame of every non-empty partition after the first (where seams could appear)."""
    return [a for a, b in partition_bounds(n_frames, n_parts, align=align)[1:] if b > a > 0]


def owner_of(frame: int, bounds: Sequence[tuple[int, int]]) -> int:
    for rank, (a, b) in enumerate(bounds):
        if a <= frame < b:
            return rank
    raise ValueError(f"frame {frame} is outside every partition")


@dataclass(frozen=True)
class Run:
    """A maximal run [start, stop) of frames to compute on one rank, and how its state begins.

    ``init`` is one of:
      - ``"fresh"``: frame ``start`` is a chain start (video start) with no warm-up;
      - ``"buffer"``: continue exactly from stored output ``state_frame`` (== ``warm_start - 1``);
      - ``"halo"``: warm up over frames [warm_start, start), starting fresh at ``warm_start`` (a
        chain start) or exactly from the buffer when ``state_frame`` is not None. The network
        outputs of warm-up frames still to do come from their owners; those of done frames
        (``local``) are computed by this rank.
    """

    start: int
    stop: int
    init: str
    warm_start: int
    state_frame: int | None = None
    local: tuple[int, ...] = ()

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

    def source_order(self) -> list[int]:
        """``source_frames`` with the exported frames first, the order the network wants them in."""
        first = sorted(self.exports)
        return first + [t for t in self.source_frames() if t not in self.exports]

    def buffer_frames(self) -> list[int]:
        """Stored output frames this rank needs as exact starting states."""
        return [run.state_frame for run in self.runs if run.state_frame is not None]


@dataclass
class Plan:
    n_frames: int
    n_ranks: int
    halo: int  # the anchors' lead
    ranks: list[RankPlan]
    anchors: Anchors | None = None

    aligned: bool = False  # partition bounds on anchors (dynamic chunks)

    def boundaries(self) -> list[int]:
        """First frames of the non-empty partitions after the first, as planned."""
        align = self.anchors.every if self.anchors is not None and self.aligned else 1
        return boundaries(self.n_frames, self.n_ranks, align=align)

    @property
    def max_warmup(self) -> int:
        """Longest warm-up any run can need (frames before its start)."""
        return self.anchors.every + self.anchors.lead - 1 if self.anchors is not None else 0

    @property
    def n_todo(self) -> int:
        return sum(len(rp.todo) for rp in self.ranks)

    def halo_cost(self) -> int:
        """Extra flow+fusion steps spent warming up (frames re-fused, not re-stylized)."""
        return sum(len(run.halo_frames) for rp in self.ranks for run in rp.runs)


def runs_of(frames: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) of each run of consecutive numbers in ``frames`` (sorted), in order (pure)."""
    runs: list[tuple[int, int]] = []
    for t in frames:
        if runs and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1)
        else:
            runs.append((t, t + 1))
    return runs


def make_plan(n_frames: int, n_ranks: int, halo: int, done: Sequence[bool] | None = None,
              temporal: bool = True, every: int = DEFAULT_ANCHOR_EVERY, align: bool = False) -> Plan:
    """Plan every rank's work: contiguous partitions minus done frames, with warm-ups.

    ``halo`` is the anchors' lead (clipped to ``every - 1``), ``every`` their spacing; ``align``
    puts partition bounds on anchors (dynamic chunks). ``temporal=False`` (per-frame
    stylization) needs no state, so every run starts fresh.
    """
    if done is None:
        done = [False] * n_frames
    if len(done) != n_frames:
        raise ValueError("done mask length differs from frame count")
    anchors = Anchors(every=max(1, every), lead=min(max(0, halo), max(1, every) - 1)) if temporal else None
    if align and anchors:
        bounds = partition_bounds(n_frames, n_parts=n_ranks, align=anchors.every)
    else:  # a resume shares the frames still to do evenly, wherever they are (a fresh run: equal parts)
        bounds = balanced_bounds(done, n_ranks)
    plans = [RankPlan(rank=r, bounds=bounds[r]) for r in range(n_ranks)]
    for rp in plans:
        a0, b0 = rp.bounds
        for start, stop in runs_of([t for t in range(a0, b0) if not done[t]]):
            rp.runs.append(_make_run(start, stop, anchors, done))
    # Warm-up frames still to do are owned (and computed) by earlier ranks: wire exports/imports.
    for rp in plans:
        for run in rp.runs:
            for t in run.halo_frames:
                if t in run.local:
                    continue
                owner = owner_of(t, bounds)
                rp.imports[t] = owner
                plans[owner].exports.setdefault(t, []).append(rp.rank)
    return Plan(n_frames=n_frames, n_ranks=n_ranks, halo=anchors.lead if anchors else 0, ranks=plans,
                anchors=anchors, aligned=align)


def _make_run(start: int, stop: int, anchors: Anchors | None, done: Sequence[bool]) -> Run:
    if anchors is None or start == 0:
        return Run(start, stop, "fresh", warm_start=start)
    if done[start - 1] and anchors.exact_from_output(start):
        return Run(start, stop, "buffer", warm_start=start, state_frame=start - 1)
    warm = anchors.chain_start(start)
    state_frame = None
    # A done frame inside the window whose output is the whole state gives an exact start after it.
    for t in range(start - 2, warm - 1, -1):
        if done[t] and anchors.exact_from_output(t + 1):
            warm, state_frame = t + 1, t
            break
    if warm == start and state_frame is None:  # the run starts a chain itself (lead 0 at an anchor)
        return Run(start, stop, "fresh", warm_start=start)
    local = tuple(t for t in range(warm, start) if done[t])
    return Run(start, stop, "halo", warm_start=warm, state_frame=state_frame, local=local)
