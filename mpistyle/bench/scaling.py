"""The scaling model: pure functions from measured per-frame costs to projected run times and ceilings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..partition import Plan, make_plan
from .common import GPU_RANK_FPS, LONG_VIDEO_FRAMES

SCHEDULE_POLICIES = ("exports-first", "0.3")


def network_schedule(plan: Plan, ahead_limit: int, policy: str = "exports-first") -> dict[str, Any]:
    """The static schedule's critical path in network passes (one pass = one frame), timing-free (pure).

    Every rank runs one network pass per time unit; fusion and flow cost nothing here. A rank
    stylizes in this order: its exports first (``exports-first``, since 0.4; in ``0.3`` only ranks that
    import did, so rank 0 reached its exports at the end of its partition), then its own frames. Before it
    can fuse its warm-up it stylizes up to ``ahead_limit`` own frames ahead; if the warm-up is still
    not there, the network waits until the predecessor's pass that finishes the last warm-up frame.

    Returns per rank: ``passes``, ``wait`` (time units the network stood still) and ``finish``; and
    ``makespan``, ``ideal`` (the largest partition) and ``speedup`` (frames / makespan).
    """
    done_at: dict[int, int] = {}  # frame -> time its network pass finished (on its owner)
    rows = []
    for rp in plan.ranks:  # warm-ups come from earlier ranks only: one pass in rank order
        if policy not in SCHEDULE_POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        exports = sorted(rp.exports) if policy == "exports-first" or rp.imports else []
        clock, wait = 0, 0
        for t in exports:
            clock += 1
            done_at[t] = clock
        for run in rp.runs:
            own = [t for t in range(run.start, run.stop) if t not in done_at]
            imports = [t for t in run.halo_frames if t in rp.imports]
            arrival = max((done_at[t] for t in imports), default=0)
            i = 0
            while imports and i < min(len(own), ahead_limit) and clock < arrival:
                clock += 1
                done_at[own[i]] = clock
                i += 1
            if clock < arrival:
                wait += arrival - clock
                clock = arrival
            for t in own[i:]:
                clock += 1
                done_at[t] = clock
        rows.append({"rank": rp.rank, "passes": len(rp.todo), "wait": wait, "finish": clock})
    makespan = max((r["finish"] for r in rows), default=0)
    ideal = max((r["passes"] for r in rows), default=0)
    return {"ranks": rows, "makespan": makespan, "ideal": ideal,
            "speedup": plan.n_todo / makespan if makespan else 1.0}


def warmup_wait_passes(frames: int, ranks: int, halo: int, every: int,
                       ahead_limit: int | None = None) -> tuple[int, int]:
    """(network passes the critical path waits, longest warm-up in frames) for a fresh static run."""
    plan = make_plan(frames, ranks, halo, every=every)
    limit = plan.max_warmup + 1 if ahead_limit is None else ahead_limit
    sched = network_schedule(plan, limit)
    longest = max((len(run.halo_frames) for rp in plan.ranks for run in rp.runs), default=0)
    return sched["makespan"] - sched["ideal"], longest


def scaling_model(measured: dict[str, Any], ranks: Sequence[int], frames: int = LONG_VIDEO_FRAMES,
                  link_bytes_per_s: float = 1.25e9) -> list[dict[str, Any]]:
    """Project run time and overhead for a long video of ``frames`` frames on P ranks.

    Per-frame costs (seconds, from ``measured``): n = network, c = what a rank spends per frame it owns
    (``rank_s``, the 1-rank run's work per frame, or n + flow + fuse + send; :func:`rank_cost_per_frame`),
    s0 = max(decode + write + encode, root_cpu) + 2 x frame_bytes /
    link (rank 0's serial share of every frame: it decodes and scatters each frame once, gathers,
    buffers and encodes it once; root_cpu is that cost as CPU time, which also counts the ffmpeg
    processes that the threads' clocks miss). W = the longest warm-up of the plan (up to
    ``every + lead - 1`` flow+fusion steps; with the lead K alone when ``every`` is not in
    ``measured``), D = the network passes the critical path waits for warm-up frames, from
    :func:`network_schedule` (0 for the static schedule of 0.4, where every rank stylizes its exports
    first), w = the measured wait per boundary beyond that, S = startup (launch, imports, model load).
    When ``measured`` holds ``root_serial_s`` (rank 0's serial cost per frame measured in a multi-rank
    run of one output mode, :func:`rank0_cost`), s0 =
    root_serial_s + 2 x frame_bytes / link instead; ``segment_encode_s`` (each rank's own x264 in
    segments mode) is then part of c. With F frames:

        H(P)     = [P > 1] * (W * (flow + fuse) + D * n + w)   the warm-up on the critical path
        T(P)     = S + F*c/P + F*s0 + H(P)                  equal partitions (current design:
                                                            rank 0 does 1/P of the frames *and* the
                                                            serial stream on its own core)
        T_bal(P) = S + max(F*(c + s0)/P, F*s0) + H(P)      partitions balanced so rank 0 computes
                                                            fewer frames; floor: the serial stream
        overhead = 1 - (F*n/P) / T                          time not spent in the network

    Overhead grows with P in both: the parallel part shrinks as 1/P, the serial stream, halo and
    startup do not. ``speedup`` and ``efficiency`` are against T(1).
    """
    n = float(measured["network_s"])
    c = rank_cost_per_frame(measured)
    s0 = root_serial_per_frame(measured, link_bytes_per_s)
    k = int(measured.get("halo", 0))
    every = int(measured.get("every", 0))
    startup = float(measured.get("startup_s", 0.0))
    step = float(measured.get("flow_s", 0.0)) + float(measured.get("fuse_s", 0.0))
    t1 = startup + frames * (c + s0)
    rows = []
    for p in ranks:
        if p < 1:
            raise ValueError(f"rank counts must be positive, got {p}")
        useful = frames * n / p
        halo = 0.0
        if p > 1:
            waited, longest = warmup_wait_passes(frames, p, k, every) if every else (0, k)
            halo = longest * step + waited * n + float(measured.get("halo_wait_s", 0.0))
        total = startup + frames * c / p + frames * s0 + halo
        parallel_bal = frames * (c + s0) / p
        total_bal = startup + max(parallel_bal, frames * s0) + halo
        rows.append({
            "ranks": p,
            "frames": frames,
            "frames_per_rank": frames / p,
            "network_s": useful,
            "compute_s": frames * c / p,
            "root_serial_s": frames * s0,
            "halo_s": halo,
            "startup_s": startup,
            "total_s": total,
            "overhead_fraction": 1.0 - useful / total,
            "speedup": t1 / total,
            "efficiency": t1 / total / p,
            "total_balanced_s": total_bal,
            "overhead_fraction_balanced": 1.0 - useful / total_bal,
            "bound": "rank-0 stream" if frames * s0 >= parallel_bal else "compute",
        })
    return rows


def rank_cost_per_frame(measured: dict[str, Any]) -> float:
    """c of :func:`scaling_model`: what one rank spends per frame it owns. ``rank_s`` (the 1-rank run's
    work time per frame, measured on a core of its own) when given, else the sum of the parts."""
    if measured.get("rank_s") is not None:
        return float(measured["rank_s"])
    return float(measured["network_s"]) + sum(
        float(measured.get(k, 0.0)) for k in ("flow_s", "fuse_s", "send_s", "segment_encode_s"))


def root_serial_per_frame(measured: dict[str, Any], link_bytes_per_s: float = 1.25e9) -> float:
    """s0 of :func:`scaling_model`: rank 0's serial seconds per frame, its link's share included."""
    comm = 2.0 * float(measured.get("frame_bytes", 0)) / link_bytes_per_s
    if measured.get("root_serial_s") is not None:  # measured per mode: use it as it is
        return float(measured["root_serial_s"]) + comm
    threads_s0 = float(measured.get("decode_s", 0.0)) + float(measured.get("write_s", 0.0)) + float(
        measured.get("encode_s", 0.0))
    return max(threads_s0, float(measured.get("root_cpu_s", 0.0))) + comm


def encode_projection(measured: dict[str, Any], cost: dict[str, Any], ranks: Sequence[int],
                      frames: int = LONG_VIDEO_FRAMES, gpu_rank_fps: float = GPU_RANK_FPS,
                      link_bytes_per_s: float = 1.25e9) -> dict[str, Any]:
    """How far one output mode scales, from rank 0's measured serial cost (``cost``, :func:`rank0_cost`).

    ``ceiling_fps`` = 1 / s0: no rank count makes the run faster than rank 0 can decode, buffer and
    encode or join. ``cpu_ranks_to_wall`` = c / s0: ranks of this run's per-frame cost c that it takes
    to reach that ceiling; ``gpu_ranks_to_wall`` = ceiling / ``gpu_rank_fps``: the same for GPU ranks
    running at that end-to-end rate. ``scaling`` is :func:`scaling_model` with these costs.
    ``ceiling_overlapped_fps`` is the optimistic bound where the decoder thread and the sink thread
    (write + encode) run on cores of their own: 1 / (max(decode, write + encode) + join + link).
    """
    model_in = {**measured, "root_serial_s": cost["serial_s"], "segment_encode_s": cost["segment_encode_s"]}
    s0 = root_serial_per_frame(model_in, link_bytes_per_s)
    c = rank_cost_per_frame(model_in)
    ceiling = 1.0 / s0 if s0 > 0 else math.inf
    link = s0 - cost["serial_s"]
    overlapped = max(float(cost.get("decode_s", 0.0)), float(cost.get("write_s", 0.0)) + float(
        cost.get("encode_s", 0.0))) + float(cost.get("join_s", 0.0)) + link
    return {
        "mode": cost["mode"],
        "measured_at_ranks": cost["ranks"],
        "root_serial_s": cost["serial_s"],
        "link_s": link,
        "s0": s0,
        "rank_s_per_frame": c,
        "ceiling_fps": ceiling,
        "cpu_ranks_to_wall": c / s0 if s0 > 0 else math.inf,
        "gpu_rank_fps": gpu_rank_fps,
        "gpu_ranks_to_wall": ceiling / gpu_rank_fps,
        "ceiling_overlapped_fps": 1.0 / overlapped if overlapped > 0 else math.inf,
        "model_input": model_in,
        "scaling": scaling_model(model_in, ranks, frames=frames, link_bytes_per_s=link_bytes_per_s),
    }


def ceiling_projection(serial_s: float, recv_bytes_per_frame: float, link_gbps: float = 10.0,
                       gpu_rank_fps: float = GPU_RANK_FPS, ranks: Sequence[int] = (8, 64, 512)) -> dict[str, Any]:
    """How many GPU ranks one job can use when rank 0 costs ``serial_s`` seconds per frame (pure).

    ``serial_s`` is rank 0's serial seconds (CPU time) per frame of the video, measured with a network
    that costs almost nothing (``bench --ceiling``); ``recv_bytes_per_frame`` is what rank 0 receives
    per frame, over a link of ``link_gbps`` Gb/s. Each GPU rank runs ``gpu_rank_fps`` frames/s. Then

        serial limit = 1 / serial_s                       rank 0 handles every frame once
        link limit   = link bytes/s / recv_bytes_per_frame
        rate(P)      = min(P x gpu_rank_fps, serial limit, link limit)
        usable ranks = min(serial limit, link limit) / gpu_rank_fps

    A limit is infinite when its cost is zero (e.g. rank 0 receives no frame data).
    """
    if serial_s < 0 or recv_bytes_per_frame < 0 or link_gbps <= 0 or gpu_rank_fps <= 0:
        raise ValueError("costs must be >= 0, link and GPU rank rates > 0")
    link_bytes_per_s = link_gbps * 1e9 / 8
    serial_fps = 1.0 / serial_s if serial_s > 0 else math.inf
    link_fps = link_bytes_per_s / recv_bytes_per_frame if recv_bytes_per_frame > 0 else math.inf
    ceiling = min(serial_fps, link_fps)
    rows = []
    for p in ranks:
        if p < 1:
            raise ValueError(f"rank counts must be positive, got {p}")
        limits = {"GPU ranks": p * gpu_rank_fps, "rank-0 serial": serial_fps, "link": link_fps}
        bound = min(limits, key=lambda k: limits[k])  # ties: the ranks (dict order), i.e. still scaling
        rows.append({"ranks": p, "fps": limits[bound], "bound": bound,
                     "efficiency": limits[bound] / (p * gpu_rank_fps)})
    return {
        "serial_s": serial_s,
        "recv_bytes_per_frame": recv_bytes_per_frame,
        "link_gbps": link_gbps,
        "gpu_rank_fps": gpu_rank_fps,
        "serial_fps": serial_fps,
        "link_fps": link_fps,
        "ceiling_fps": ceiling,
        "bound": "rank-0 serial" if serial_fps <= link_fps else "link",
        "usable_gpu_ranks": ceiling / gpu_rank_fps,
        "predicted": rows,
    }
