"""Real ``mpiexec ... mpistyle stylize`` runs and what their JSON reports say (summaries, rank 0's cost)."""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import MpistyleError
from ..partition import DEFAULT_ANCHOR_EVERY
from .common import ENCODE_MODES, MAIN_PHASES, load_average

logger = logging.getLogger(__name__)

def run_pipeline(mpiexec: str, ranks: int, clip: str, model_path: str, threads: int, precision: str,
                 device: str, directory: str, extra: Sequence[str] = (),
                 launcher_args: Sequence[str] = ()) -> dict[str, Any]:
    """One ``mpiexec -n ranks [launcher_args] ... stylize`` run; returns its report plus the launcher's clock."""
    tag = f"n{ranks}-{time.monotonic_ns()}"
    out = os.path.join(directory, f"out-{tag}.mp4")
    report_path = os.path.join(directory, f"report-{tag}.json")
    cmd = [mpiexec, "-n", str(ranks), *launcher_args, sys.executable, "-m", "mpistyle", "-q", "stylize", clip,
           "-o", out, "--model", model_path, "--threads", str(threads), "--precision", precision, "--device", device,
           "--report", report_path, "--no-progress", *extra]
    logger.info("running %s", " ".join(cmd))
    load_before = load_average()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    process_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of every process of the run (ranks, ffmpeg): against ranks x process_s it shows
    # how much of the cores the run actually got on a shared machine.
    cpu_s = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if proc.returncode != 0 or not os.path.isfile(report_path):
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise MpistyleError(f"the {ranks}-rank pipeline run failed (exit {proc.returncode}): {why}")
    with open(report_path, encoding="utf-8") as fh:
        report = json.load(fh)
    return {"ranks": ranks, "process_s": process_s, "cpu_s": cpu_s, "load_before": load_before,
            "load_after": load_average(), "output": out, "report": report}


def work_seconds(report: dict[str, Any]) -> float:
    """A report's time excluding the fixed setup (work_s; older reports: wall_s - setup_s)."""
    if "work_s" in report:
        return float(report["work_s"])
    return float(report["wall_s"]) - float(report.get("setup_s", 0.0))


def _phase_sums(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for entry in report.get("per_rank", []):
        times = {k: float(v) for k, v in (entry.get("times_s") or {}).items()}
        main = sum(times.get(p, 0.0) for p in MAIN_PHASES)
        rows.append({"rank": entry.get("rank"), "frames": entry.get("frames"), "times_s": times,
                     "main_thread_s": main, "other_s": work_seconds(report) - main,
                     "counts": entry.get("counts", {})})
    return rows


def summarize(forward: dict[str, Any], runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per rank count: seconds per frame (three clocks), speed-up and efficiency; the 1-rank ratio.

    ``runs`` maps a rank count to :func:`run_pipeline`'s result (must hold 1).
    """
    if 1 not in runs:
        raise ValueError("summarize needs the 1-rank run")
    fwd = float(forward["per_frame_s"])
    one = runs[1]["report"]
    t1_work, t1_wall = work_seconds(one), float(one["wall_s"])
    rows = []
    for n in sorted(runs):
        run = runs[n]
        rep = run["report"]
        frames = int(rep["frames"])
        work, wall = work_seconds(rep), float(rep["wall_s"])
        speedup, speedup_wall = t1_work / work, t1_wall / wall
        phases = _phase_sums(rep)
        network = [p["times_s"].get("network", 0.0) for p in phases]
        # issue 20: the share of its work time a rank's main thread waited for warm-up frames
        halo_waits = [p["times_s"].get("wait_halo", 0.0) / work for p in phases]
        rows.append({
            "ranks": n,
            "frames": frames,
            "threads_per_rank": rep.get("threads_per_rank"),
            "process_s": run["process_s"],
            "cpu_s": run.get("cpu_s"),
            "wall_s": wall,
            "setup_s": wall - work,
            "work_s": work,
            "s_per_frame_process": run["process_s"] / frames,
            "s_per_frame_wall": wall / frames,
            "s_per_frame_work": work / frames,
            "speedup": speedup,
            "efficiency": speedup / n,
            "speedup_wall": speedup_wall,
            "efficiency_wall": speedup_wall / n,
            "speedup_process": runs[1]["process_s"] / run["process_s"],  # the whole process, launch included
            "wait_halo_max_fraction": max(halo_waits, default=0.0),
            "network_fraction": float(np.mean(network)) / work if network else None,
            "load_before": run.get("load_before"),
            "load_after": run.get("load_after"),
            "per_rank": phases,
        })
    frames1 = int(one["frames"])
    network1 = rows[0]["per_rank"][0]["times_s"].get("network", 0.0)
    return {
        "forward_s_per_frame": fwd,
        "ratio": t1_work / frames1 / fwd,
        # Same run, same machine state: work time over the network time inside it (immune to drift
        # between the forward measurement and the pipeline run, blind to helpers slowing the network).
        "ratio_in_run": t1_work / network1 if network1 > 0 else None,
        "ratio_wall": t1_wall / frames1 / fwd,
        "ratio_process": runs[1]["process_s"] / frames1 / fwd,
        "runs": rows,
    }


def overhead_breakdown(forward_s: float, report: dict[str, Any]) -> dict[str, float]:
    """Where the 1-rank pipeline spends its time beyond ``frames x forward`` (seconds, rank 0)."""
    frames = int(report["frames"])
    entry = next(e for e in report["per_rank"] if e.get("rank", 0) == 0)
    times = {k: float(v) for k, v in (entry.get("times_s") or {}).items()}
    work = work_seconds(report)
    main = sum(times.get(p, 0.0) for p in MAIN_PHASES)
    parts = {
        "network_slowdown": times.get("network", 0.0) - frames * forward_s,
        **{p: times.get(p, 0.0) for p in MAIN_PHASES if p != "network"},
        "untimed": work - main,
    }
    parts["total"] = work - frames * forward_s
    return parts


def measured_costs(summary: dict[str, Any], runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-frame costs for :func:`scaling_model`, from the forward pass and the 1-rank report."""
    one = runs[1]["report"]
    frames = int(one["frames"])
    root = next(e for e in one["per_rank"] if e.get("rank", 0) == 0)
    times = {k: float(v) for k, v in (root.get("times_s") or {}).items()}
    halo_wait = 0.0
    multi = [n for n in runs if n > 1]
    if multi:  # per boundary: how long an importing rank waited for its halo (critical path)
        rep = runs[max(multi)]["report"]
        waits = [float((e.get("times_s") or {}).get("wait_halo", 0.0)) for e in rep["per_rank"]
                 if (e.get("counts") or {}).get("halo_frames")]
        halo_wait = float(np.mean(waits)) if waits else 0.0
    row1 = summary["runs"][0]
    # rank 0's serial stream also costs CPU outside the timed threads (the ffmpeg decoder and x264
    # encoder processes): estimate it from the run's CPU time less the per-frame compute and startup.
    compute_cpu = sum(times.get(p, 0.0) for p in ("network", "flow", "fuse"))
    startup = row1["process_s"] - row1["work_s"]
    root_cpu = (float(row1["cpu_s"]) - compute_cpu - startup) / frames if row1.get("cpu_s") else 0.0
    return {
        "frames_measured": frames,
        "frame_bytes": int(one["width"]) * int(one["height"]) * 3,
        "network_s": float(summary["forward_s_per_frame"]),
        # everything one rank spends per frame on a core of its own: the 1-rank run's work time per frame
        # (the helper threads' clocks below overlap it and each other, so they do not add up)
        "rank_s": float(row1["work_s"]) / frames,
        "flow_s": times.get("flow", 0.0) / max(frames - 1, 1),
        "fuse_s": times.get("fuse", 0.0) / frames,
        "send_s": times.get("send", 0.0) / frames,
        "decode_s": times.get("decode", 0.0) / frames,
        "write_s": times.get("write", 0.0) / frames,
        "encode_s": times.get("encode", 0.0) / frames,
        "root_cpu_s": max(root_cpu, 0.0),
        "startup_s": startup,  # launch + imports + setup
        "halo": int(one.get("halo") or 0),
        # temporal fusion on: warm-ups reach back to the chain start (see scaling.network_schedule)
        "every": DEFAULT_ANCHOR_EVERY if (one.get("temporal") or {}).get("mode", "flow") != "none" else 0,
        "halo_wait_s": halo_wait,
    }


def rank0_cost(report: dict[str, Any], mode: str) -> dict[str, Any]:
    """Rank 0's serial cost per frame of the video in one stylize report, split into its parts.

    decode (rank 0's decoder thread), write (rank 0's store thread: its own frames only, since 0.3 every
    rank writes its own; reported, not serial), encode (the sink feeding the one x264, ``--encode
    rank0``), join (filling holes and the stream-copy concat after the work, ``--encode segments``).
    ``serial_s`` is decode + encode + join: the threads overlap each other and the work, so the sum is
    the conservative figure. With ``--decode each`` (the report's ``decode``) rank 0 decodes only its
    own frames, parallel work like every rank's: not serial either. ``segment_encode_s``
    is each rank's own encoder per frame it encoded: parallel work, not rank 0's.
    """
    frames = max(int(report["frames"]), 1)
    root = next(e for e in report["per_rank"] if e.get("rank", 0) == 0)
    times = {k: float(v) for k, v in (root.get("times_s") or {}).items()}
    if report.get("decode") == "each":
        times["decode"] = 0.0
    parts = {f"{k}_s": times.get(k, 0.0) / frames for k in ("decode", "write", "encode", "join")}
    # Segments are encoded as frames come out (segment_encode) or, for blocks no run covered whole,
    # from the buffer after the work (leftover_encode): both are the ranks' parallel work.
    seg_time = sum(float((e.get("times_s") or {}).get(k, 0.0)) for e in report["per_rank"]
                   for k in ("segment_encode", "leftover_encode"))
    seg_frames = sum(int((e.get("counts") or {}).get(k, 0)) for e in report["per_rank"]
                     for k in ("segment_frames", "leftover_frames"))
    return {"mode": mode, "ranks": int(report["ranks"]), "frames": frames, **parts,
            "serial_s": sum(v for k, v in parts.items() if k != "write_s"),
            "segment_encode_s": seg_time / seg_frames if seg_frames else 0.0,
            "segments": sum(int((e.get("counts") or {}).get(k, 0)) for e in report["per_rank"]
                            for k in ("segments", "leftover_blocks"))}


def encode_jobs(ranks: Sequence[int], encode: str) -> list[tuple[int, str]]:
    """(rank count, --encode mode) of one pipeline round; a rank count's first job is its primary run.

    Primary runs are what the speed-up and targets use: stylize's default (auto: segments for any rank
    count) unless one mode is forced. ``both`` adds a rank0 run for each multi-rank count.
    """
    if encode in ENCODE_MODES:
        return [(n, encode) for n in ranks]
    jobs = []
    for n in ranks:
        jobs.append((n, "segments"))
        if encode == "both" and n > 1:
            jobs.append((n, "rank0"))
    return jobs
