"""The rank worker: network, optical flow and temporal fusion over the rank's runs.

No rank's network waits for another rank after the start (issue 20). Each rank first stylizes the
frames its successor warms up over ("exports": the tail of its partition, at most
``every + lead - 1`` frames) and sends the raw network outputs. Then, for each run, it keeps
stylizing its own frames while its own warm-up frames are on the way (at most ``every + lead - 1 + batch``
of them), fuses the warm-up once it is there, and fuses its own frames in order. Every network output
waits in an :class:`OutputSpool`, in the buffer's raw-output file, until its frame is committed: a kill
loses at most the batch in the network, and a resume fuses what was stored (issue 32). The frames go
to its own buffer store (and segment encoder): nothing but progress notes goes to rank 0. The static
schedule adds no network passes; the report's ``trace`` records the network's order and every wait, which
the tests check.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict, deque
from typing import Any

import numpy as np

from ..mpi import pause_point, poll_until
from ..partition import Plan, RankPlan, Run
from ..temporal.chains import TemporalSettings
from .comm import TAG_GIVE, TAG_HALO, TAG_REQ, Messenger, Stopped
from .gather import Progress, ProgressSender
from .options import Setup
from .scatter import Receiver, Scheduler, SourceSpool
from .spool import OutputSpool
from .spool import describe as describe_spool
from .store import FrameStore

logger = logging.getLogger(__name__)

MAX_EVENTS = 50_000


class RankWorker:
    """Stylize and fuse one rank's runs; send halo exports; store finished frames; report progress."""

    def __init__(self, comm: Any, rp: RankPlan, plan: Plan, setup: Setup, stylizer: Any,
                 temporal: TemporalSettings, spool: SourceSpool, msgr: Messenger, store: FrameStore,
                 batch: int, state_frames: dict[int, np.ndarray], t0: float, flow_workers: int = 1,
                 outputs: OutputSpool | None = None) -> None:
        from ..temporal.chains import TemporalFuser
        from ..temporal.flowpool import FlowPool
        from ..temporal.kernels import make_backend

        self.comm, self.rp, self.plan, self.setup, self.stylizer = comm, rp, plan, setup, stylizer
        self.temporal, self.spool, self.msgr, self.store, self.batch = temporal, spool, msgr, store, batch
        self.state_frames = state_frames
        self.shape = (setup.height, setup.width, 3)
        self.fbytes = int(np.prod(self.shape))
        # Anchored chains: N ranks == 1 rank, bit for bit. On a GPU rank the fusion runs on the GPU
        # (torch kernels, the same bits as the OpenCV/NumPy reference, which the CPU keeps: faster there).
        device = getattr(stylizer, "device", None)
        backend = make_backend("torch", device) if getattr(device, "type", "cpu") == "cuda" else None
        self.fuser = TemporalFuser(temporal, anchors=plan.anchors, backend=backend)
        self.flow_mode = temporal.mode != "none"
        # Flows depend on source frames only, so a pool computes them ahead of the fusion, in parallel.
        self.flows = FlowPool(workers=flow_workers, lookahead=max(batch + 1, 2 * flow_workers),
                              method=temporal.flow_method, preset=temporal.flow_preset,
                              on_pair=lambda start: self._record("flow", start)) if self.flow_mode else None
        # Raw network outputs until their frames are committed: exports, own frames stylized while the
        # warm-up arrives (at most ``ahead_limit`` of those per run), outputs stored by a stopped job.
        self.cache = outputs if outputs is not None else OutputSpool(self.shape)
        self.cache.watch(store.committed, store.is_alive, msgr.interrupted)
        self.ahead_limit = plan.max_warmup + batch
        # What the network did, in order, and every wait for warm-up frames (the report's "trace").
        self.order: list[list[int]] = []  # runs [first, stop) of frames in the order they were stylized
        self.halo_waits: list[dict[str, int]] = []
        self.exported: set[int] = set()
        self.paused = False
        self.local_halo = False
        self.awaiting_chunk = False
        self.emitted = 0
        self.segments: Any = None  # this rank's SegmentWriter when the output is encoded in segments
        self.pending: list[tuple[Any, np.ndarray]] = []  # in-flight sends and their buffers
        # Ranks > 0 tell rank 0 how far they are (rank 0's sink reads this rank's progress directly).
        self.progress_sender = ProgressSender(comm) if comm.Get_rank() != 0 else None
        self.times: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, float, float]] = []
        self.t0 = t0
        self.counts: dict[str, int] = defaultdict(int)
        # Pre-post every halo receive now, so an owner's send always finds a match (no stuck sends).
        self.halo_reqs: dict[int, tuple[Any, np.ndarray]] = {}
        for t in sorted(rp.imports):
            buf = np.empty(self.shape, dtype=np.uint8)
            self.halo_reqs[t] = (comm.Irecv(buf, source=rp.imports[t], tag=TAG_HALO), buf)
        self.counts["recv_bytes"] += len(rp.imports) * self.fbytes

    # -- driving ------------------------------------------------------------------------------
    def run(self) -> None:
        # Exports first, on every rank (rank 0 too): its successor then has its warm-up after at most
        # every + lead - 1 network passes, not when this rank reaches the end of its partition (issue 20).
        if self.rp.exports:
            self._stylize_exports()
        for run in self.rp.runs:
            self._process_run(run)

    def run_dynamic(self, scheduler: Scheduler | None, receiver: Receiver | None) -> None:
        """Dynamic schedule: ask rank 0 for chunks until none are left. The next chunk is asked for
        when the current one starts, so its frames stream in while this one is stylized."""
        self.local_halo = True
        self._scheduler, self._receiver = scheduler, receiver
        current = self._take()
        while current >= 0:
            following = self._take()
            self.counts["chunks"] += 1
            for run in self.plan.ranks[current].runs:
                self._process_run(run)
            current = following

    def _take(self) -> int:
        if self._scheduler is not None:  # rank 0 asks its own scheduler directly
            chunk, states = self._scheduler.take(0)
        else:
            self.comm.send(None, dest=0, tag=TAG_REQ)
            self.awaiting_chunk = True
            if not poll_until(lambda: self.comm.iprobe(source=0, tag=TAG_GIVE), self.msgr.interrupted):
                raise Stopped()
            chunk, states = self.comm.recv(source=0, tag=TAG_GIVE)
            self.awaiting_chunk = False
        if chunk >= 0:
            frames = self.plan.ranks[chunk].source_frames()
            self.spool.extend(frames)
            if self._receiver is not None:
                self._receiver.assigned.put(frames)
            self.state_frames.update(states)
        return chunk

    def _stylize_exports(self) -> None:
        # In frame order: each consumer's receives are posted in that order and match in it (MPI's
        # non-overtaking rule). Outputs a stopped job stored are sent as they are.
        frames = sorted(self.rp.exports)
        i = 0
        while i < len(frames):
            if frames[i] in self.cache:
                self._export(frames[i], self.cache.peek(frames[i]))
                i += 1
                continue
            group = []
            while i < len(frames) and len(group) < self.batch and frames[i] not in self.cache:
                group.append(frames[i])
                i += 1
            outs = self._network(group)
            self.cache.put_many(zip(group, outs, strict=True))
            for t, out in zip(group, outs, strict=True):
                self._export(t, out)
            self._check_stop()

    def _export(self, t: int, out: np.ndarray) -> None:
        """Send frame t's raw network output to the ranks that warm up over it (once)."""
        if t in self.rp.exports and t not in self.exported:
            self.exported.add(t)
            for consumer in self.rp.exports[t]:
                self._send(out, consumer, TAG_HALO)

    def progress(self) -> Progress:
        return Progress(self.counts["network_frames"], self.emitted, self.store.committed())

    def _process_run(self, run: Run) -> None:
        self.store.begin_run(run.start, run.stop)
        if self.segments is not None:
            self.segments.begin_run(run.start, run.stop)
        self.fuser.reset()
        if run.state_frame is not None:
            self.fuser.reset(prev_source=self._source(run.state_frame),
                             prev_output=self.state_frames[run.state_frame], prev_t=run.state_frame)
        # Every frame of the run needs the flow from its predecessor, except a fresh first frame.
        order = [*run.halo_frames, *range(run.start, run.stop)]
        needs = order if run.state_frame is not None else order[1:]
        flows = _RunFlows(self.flows, needs, self._source) if self.flows is not None else None
        try:
            self._process_run_frames(run, flows)
        finally:
            if flows is not None:
                flows.close()

    def _process_run_frames(self, run: Run, flows: _RunFlows | None) -> None:
        # Dynamic schedule: the halo's network outputs are computed here; static: only those of
        # warm-up frames already done (a resume), which no owner computes any more.
        halo = list(run.halo_frames) if self.local_halo else list(run.local)
        raw = {}
        if halo:
            for i in range(0, len(halo), self.batch):
                group = halo[i:i + self.batch]
                raw.update(zip(group, self._network(group), strict=True))
                self.counts["halo_network_frames"] += len(group)
        ahead = self._stylize_ahead_while_halo_arrives(run) if not self.local_halo else {}
        # Warm-up over the halo: raw network outputs come from their owners.
        for t in run.halo_frames:
            pair = self._wait_pair(flows, t)
            if t in raw:
                buf = raw.pop(t)
            else:
                start = time.perf_counter()
                req, buf = self.halo_reqs[t]
                if not req.Test():  # the network stops here: the trace says how far ahead it had got, and
                    # after how many passes (the first "network" frames of the trace's order came before it)
                    self.halo_waits.append({"frame": t, "run_start": run.start, **ahead,
                                            "network": self.counts["network_frames"]})
                    self.msgr.wait(req)
                self._record("wait_halo", start)
            self._fuse(t, buf, pair)
            self.counts["halo_frames"] += 1
        frames = list(range(run.start, run.stop))
        for i in range(0, len(frames), self.batch):
            group = frames[i:i + self.batch]
            todo = [t for t in group if t not in self.cache]
            if todo:
                outs = self._network(todo)
                self.cache.put_many(zip(todo, outs, strict=True))  # durable before the fusion takes them
                for t, out in zip(todo, outs, strict=True):
                    self._export(t, out)
            for t in group:
                stylized = self.cache.pop(t)
                pair = self._wait_pair(flows, t)
                out = self._fuse(t, stylized, pair)
                self._emit(t, out)
            self._check_stop()

    def _stylize_ahead_while_halo_arrives(self, run: Run) -> dict[str, int]:
        """Keep the network on this run's own frames until every warm-up frame has arrived (fusion
        must wait for them; the network need not), at most ``ahead_limit`` frames. Returns how many
        frames it stylized ahead and how many it could have (the trace of a wait that follows)."""
        reqs = [self.halo_reqs[t][0] for t in run.halo_frames if t in self.halo_reqs]
        own = [t for t in range(run.start, run.stop) if t not in self.cache]
        if not reqs:
            return {"ahead": 0, "could": 0}
        done = 0
        while done < min(len(own), self.ahead_limit) and not all(req.Test() for req in reqs):
            group = own[done:done + min(self.batch, self.ahead_limit - done)]
            self.cache.put_many(zip(group, self._network(group), strict=True))
            done += len(group)
            self._check_stop()
        return {"ahead": done, "could": min(len(own), self.ahead_limit)}

    # -- steps --------------------------------------------------------------------------------
    def _source(self, t: int) -> np.ndarray:
        start = time.perf_counter()
        frame = self.spool.get(t)
        self._record("wait_source", start, min_s=1e-3)
        return frame

    def _record(self, phase: str, start: float, min_s: float = 0.0) -> None:
        """Accumulate a phase's time and keep a bounded timeline of events for the report."""
        end = time.perf_counter()
        self.times[phase] += end - start
        if end - start >= min_s and len(self.events) < MAX_EVENTS:
            self.events.append((phase, round(start - self.t0, 5), round(end - self.t0, 5)))

    def _network(self, frames: list[int]) -> np.ndarray:
        sources = [self._source(t) for t in frames]
        start = time.perf_counter()
        out = self.stylizer(np.stack(sources))
        self._record("network", start)
        self.counts["network_frames"] += len(frames)
        # -v: what the network has done, as it happens (a killed run's log says what a kill lost)
        logger.debug("rank %d: network: frames %s", self.comm.Get_rank(), frames)
        for t in frames:
            if self.order and self.order[-1][1] == t:
                self.order[-1][1] = t + 1
            else:
                self.order.append([t, t + 1])
        if self.progress_sender is not None:
            self.progress_sender.maybe_send(self.progress)
        return out

    def _wait_pair(self, flows: _RunFlows | None, t: int) -> Any:
        if flows is None:
            return None
        start = time.perf_counter()
        pair = flows.get(t)
        self._record("wait_flow", start, min_s=1e-3)
        return pair

    def _fuse(self, t: int, stylized: np.ndarray, pair: Any) -> np.ndarray:
        source = self._source(t)
        start = time.perf_counter()
        out = self.fuser.step(source, stylized, pair=pair, t=t)
        self._record("fuse", start)
        if self.fuser.last_was_cut:
            self.counts["scene_cuts"] += 1
        return out

    def _emit(self, t: int, out: np.ndarray) -> None:
        _inject_fault(self.comm.Get_rank(), t)
        self.emitted += 1
        start = time.perf_counter()
        if self.segments is not None:
            self.segments.put(t, out)
        self.store.put(t, out)
        if self.progress_sender is not None:
            self.progress_sender.maybe_send(self.progress)
        self._record("store", start, min_s=1e-3)
        if not self.paused and self.exported >= self.rp.exports.keys():
            # test hook (MPISTYLE_PAUSE_AT): hold mid-work for a signal, once this rank has emitted a frame
            # and sent its neighbours their warm-up (so they can reach their own pause)
            self.paused = True
            pause_point("compute", self.msgr.stop)

    def _send(self, frame: np.ndarray, dest: int, tag: int) -> None:
        self._send_raw(np.ascontiguousarray(frame).reshape(-1), dest, tag)

    def _send_raw(self, buf: np.ndarray, dest: int, tag: int) -> None:
        self.pending = [(r, b) for r, b in self.pending if not r.Test()]
        while len(self.pending) >= 8:  # bound the memory held by in-flight sends
            start = time.perf_counter()
            req, _ = self.pending.pop(0)
            self.msgr.wait(req, interruptible=False)
            self._record("wait_send", start, min_s=1e-3)
        self.pending.append((self.comm.Isend(buf, dest=dest, tag=tag), buf))

    def _check_stop(self) -> None:
        if self.msgr.interrupted():
            raise Stopped()

    # -- shutdown -----------------------------------------------------------------------------
    def finish_sends(self) -> None:
        for req, _ in self.pending:
            poll_until(req.Test)
        self.pending = []
        if self.progress_sender is not None:
            self.progress_sender.finish()

    def trace(self) -> dict[str, Any]:
        """The network's order and the waits for warm-up frames, for the report (and the tests)."""
        return {"exports": sorted(self.rp.exports), "imports": sorted(self.rp.imports), "order": self.order,
                "halo_waits": self.halo_waits, "ahead_limit": self.ahead_limit, **describe_spool(self.cache)}

    def cancel_unmatched(self) -> None:
        for req, _ in self.halo_reqs.values():
            if not req.Test():
                req.Cancel()
                req.Wait()
        if self.flows is not None:
            self.flows.close()
        self.cache.close()


class _RunFlows:
    """The pair flows one run needs, in frame order, kept ``lookahead`` pairs ahead in the pool."""

    def __init__(self, pool: Any, needs: list[int], source: Any) -> None:
        self.pool, self.needs, self.source = pool, set(needs), source
        self.todo = deque(needs)
        self.top_up()  # the pool starts on the warm-up's flows while the halo's network outputs arrive

    def top_up(self) -> None:
        while self.todo and self.pool.free > 0:
            t = self.todo.popleft()
            self.pool.submit(t, self.source(t - 1), self.source(t))

    def get(self, t: int) -> Any:
        if t not in self.needs:
            return None
        self.top_up()
        pair = self.pool.get(t)
        self.top_up()
        return pair

    def close(self) -> None:
        self.pool.clear()


def _inject_fault(rank: int, frame: int) -> None:
    """Test hook: MPISTYLE_FAULT="RANK:FRAME:raise|kill|hang" (with MPISTYLE_TEST_HOOKS=1) makes that rank
    fail at that frame.

    The failure tests use it to prove that one rank's exception, death or stall ends the whole job.
    """
    from mpistyle.testhooks import hook_value

    spec = hook_value("MPISTYLE_FAULT")
    if not spec:
        return
    want_rank, want_frame, kind = spec.split(":")
    if int(want_rank) != rank or int(want_frame) != frame:
        return
    if kind == "kill":
        os.kill(os.getpid(), 9)
    if kind == "hang":
        time.sleep(3600)
    raise RuntimeError(f"injected fault at frame {frame}")
