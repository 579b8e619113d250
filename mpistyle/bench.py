"""``mpistyle bench``: network forward time vs whole-pipeline time, and rank scaling, in one run.

What it measures, on one clip (cut to ``--frames`` first when asked):

1. **forward**: the pure network, in this process: the model loaded as ``stylize`` loads it, the
   same :class:`~mpistyle.models.Stylizer` at the same precision, torch limited to
   ``--threads-per-rank`` threads, two warm-up calls, then the decoded frames one per call
   (decoding is not timed). Also the reduced-precision output (bf16 on CPU, fp16 on CUDA) against
   fp32 on real frames: max abs difference and PSNR.
2. **pipeline**: ``mpiexec -n N python -m mpistyle stylize CLIP --threads T --report R.json`` for
   every N in ``--ranks`` (1 is always included). Three clocks per run, all divided by the frame
   count to give seconds per frame:

   - ``process_s``: the launcher's wall clock (mpiexec, interpreter start, imports, everything);
   - ``wall_s``: the report's clock: from the start of ``run_stylize`` (before model load) to the end
     (output closed);
   - ``work_s``: ``wall_s`` minus ``setup_s`` (probe, model load, buffer): from the moment every rank
     leaves setup to the end, i.e. *excluding* the fixed startup but including the final
     encode/mux.

   ``ratio`` = (1-rank ``work_s`` per frame) / (forward s per frame), target <= 1.15 (``ratio_wall``
   uses ``wall_s``). ``speedup`` = t(1) / t(N) and ``efficiency`` = speedup / N, both on ``work_s``;
   ``speedup_wall`` / ``efficiency_wall`` on ``wall_s``. ``cpu_s`` is the CPU time of every process
   of the run (ranks and ffmpeg): far below ranks x ``process_s`` means other jobs held the cores.
3. **scaling model**: a projection for long videos on 1..512 ranks from the measured per-frame
   costs (see :func:`scaling_model`).
4. **flow and fusion alone**: pair flows/s with 1 thread and with a :class:`~mpistyle.flowpool.FlowPool`
   of one thread per CPU (``--flow-pairs``), so the pool's effect shows on any machine; and fusion
   ms/frame with the NumPy/OpenCV reference and with the torch kernels on ``--device``.
5. **rank 0's serial cost per frame, per output mode**: with ``--encode both`` (default) every
   multi-rank pipeline runs twice, ``--encode segments`` (each rank encodes its frames, rank 0 joins)
   and ``--encode rank0`` (one x264 on rank 0). From the largest run of each mode: rank 0's decode,
   HDF5 write/commit, and encode (rank0) or join (segments), per frame of the video. Their sum is
   the measured serial cost ``s0`` that the scaling model then uses for that mode, giving a frames/s
   ceiling ``1 / s0`` and how many ranks (CPU ranks as measured; GPU ranks at ``--gpu-rank-fps``)
   fit under it (see :func:`rank0_cost` and :func:`encode_projection`).

``--repeat R`` repeats each measurement and keeps the fastest (the least disturbed by other jobs
on a shared machine); every repeat is kept in the JSON. The 1-minute load average before and after
each measurement is recorded next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import __version__
from .errors import MpistyleError

logger = logging.getLogger(__name__)

CHECKOUT_CLIP = os.path.join("tests", "data", "bbb_640x272.mp4")
SCALING_RANKS = (1, 8, 16, 32, 64, 128, 256, 512)
LONG_VIDEO_FRAMES = 10_000
# Phases timed on each rank's main thread (they add up to its work time, minus untimed bookkeeping).
MAIN_PHASES = ("network", "wait_flow", "fuse", "send", "wait_halo", "wait_source")
# Phases of helper threads (flow on every rank; decode/write/encode on rank 0): they overlap the above.
HELPER_PHASES = ("flow", "decode", "write", "encode", "segment_encode", "join")
# Output modes the bench compares (stylize --encode); "both" runs each multi-rank pipeline in each.
ENCODE_MODES = ("rank0", "segments")
# End-to-end rate of one GPU rank that issue 8 targets: how many such ranks fit under rank 0's ceiling.
GPU_RANK_FPS = 300.0
TARGETS = {"ratio": 1.15, "speedup_2": 1.85, "s_per_frame_2": 0.34}


# --------------------------------------------------------------------------------------------
# inputs


def default_video() -> str:
    """The 640x272 test clip when run from a checkout, else the sample clip shipped in the package."""
    package = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(os.getcwd(), CHECKOUT_CLIP),
                      os.path.join(os.path.dirname(package), CHECKOUT_CLIP)):
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(package, "data", "sample.mp4")


def parse_ranks(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] (sorted, unique, 1 always included: speed-ups are relative to it)."""
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rank counts, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"rank counts must be positive integers, got {text!r}")
    return sorted(set(values) | {1})


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _mpi_size_from_env() -> int:
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def _find_mpiexec(explicit: str | None) -> str:
    if explicit:
        found = shutil.which(explicit)
        if not found:
            raise MpistyleError(f"mpiexec not found: {explicit}")
        return found
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(local, os.X_OK):
        return local
    found = shutil.which("mpiexec")
    if not found:
        raise MpistyleError("mpiexec not found: install an MPI (pip install mpich) or pass --mpiexec PATH")
    return found


def cut_video(path: str, frames: int, directory: str) -> str:
    """The first ``frames`` frames of ``path`` as a new near-lossless H.264 file (audio dropped)."""
    from .io.ffmpeg import ffmpeg_exe

    out = os.path.join(directory, f"clip-{frames}.mp4")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", path,
           "-map", "0:V:0", "-frames:v", str(frames), "-an", "-sn", "-dn",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "10", "-pix_fmt", "yuv420p", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise MpistyleError(f"cannot cut {path} to {frames} frames: {last}")
    return out


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return float("nan")


# --------------------------------------------------------------------------------------------
# (a) the pure network


def measure_forward(video: str, model_path: str, device: str, precision: str, threads: int, frames: int,
                    repeat: int = 1, compare_frames: int = 4, warmup: int = 2,
                    after_pass: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per-frame network time on the first ``frames`` decoded frames, and reduced vs fp32 precision.

    ``after_pass(i)`` runs after timed pass ``i`` (the bench runs the pipelines there, so forward
    and pipeline measurements interleave and share the machine's slow and fast moments).
    Returns ``{"per_frame_s" (mean of the fastest pass), "median_s", "min_s", "max_s", "frames",
    "passes": [mean per pass], "precision", "precision_check": {...}}``.
    """
    import torch

    from .io.media import iter_frames
    from .metrics import psnr
    from .models import Stylizer, load_model, resolve_precision
    from .mpi import configure_threads, select_device

    configure_threads(threads)
    dev = torch.device(select_device(device, 0))
    model = load_model(model_path, dev)
    stylizer = Stylizer(model, device=dev, precision=precision)
    dtype = resolve_precision(precision, dev)
    keep = set(np.linspace(0, frames - 1, max(1, min(compare_frames, frames))).round().astype(int).tolist())
    kept: list[np.ndarray] = []
    passes: list[list[float]] = []
    cpu: list[float] = []  # CPU seconds per timed call: wall >> cpu means other jobs took the core
    load_before = _load()
    for p in range(max(1, repeat)):
        times: list[float] = []
        stream = iter_frames(video)
        try:
            for t, frame in enumerate(stream):
                if t >= frames:
                    break
                batch = frame[None]
                if t == 0 and p == 0:
                    for _ in range(warmup):  # first calls build the oneDNN/cuDNN kernels
                        stylizer(batch)
                _sync(dev)
                start, cpu_start = time.perf_counter(), time.process_time()
                stylizer(batch)
                _sync(dev)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - cpu_start)
                if p == 0 and t in keep:
                    kept.append(frame)
        finally:
            stream.close()
        if not times:
            raise MpistyleError(f"{video}: no frames to time")
        passes.append(times)
        if after_pass is not None:
            after_pass(p)
    best_index = min(range(len(passes)), key=lambda i: float(np.mean(passes[i])))
    best = passes[best_index]
    offset = sum(len(ts) for ts in passes[:best_index])
    best_cpu = cpu[offset:offset + len(best)]
    result: dict[str, Any] = {
        "frames": len(best),
        "warmup_calls": warmup,
        "per_frame_s": float(np.mean(best)),
        "median_s": float(np.median(best)),
        "min_s": float(np.min(best)),
        "max_s": float(np.max(best)),
        "passes": [float(np.mean(ts)) for ts in passes],
        "cpu_per_frame_s": float(np.mean(best_cpu)),
        "precision": _dtype_name(dtype),
        "threads": threads,
        "device": str(dev),
        "load_before": load_before,
        "load_after": _load(),
    }
    if not kept:  # the video had fewer frames than announced
        raise MpistyleError(f"{video}: no frames to compare precisions on")
    result["precision_check"] = _compare_precision(model, dev, dtype, np.stack(kept), psnr)
    del stylizer, model
    gc.collect()
    return result


def _sync(dev: Any) -> None:
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def _compare_precision(model: Any, dev: Any, dtype: Any, frames: np.ndarray, psnr: Any) -> dict[str, Any]:
    """Reduced-precision output against fp32 on real frames (and each one's time per frame there)."""
    import torch

    from .models import Stylizer

    reduced = dtype if dtype is not None else (torch.float16 if dev.type == "cuda" else torch.bfloat16)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[reduced]
    outs: dict[str, np.ndarray] = {}
    per_frame: dict[str, float] = {}
    for label, prec in (("fp32", "fp32"), (name, name)):
        stylizer = Stylizer(model, device=dev, precision=prec)
        stylizer(frames[:1])  # warm-up
        _sync(dev)
        start = time.perf_counter()
        outs[label] = np.concatenate([stylizer(f[None]) for f in frames])
        _sync(dev)
        per_frame[label] = (time.perf_counter() - start) / len(frames)
    diff = np.abs(outs["fp32"].astype(np.int16) - outs[name].astype(np.int16))
    psnrs = [psnr(a, b) for a, b in zip(outs["fp32"], outs[name], strict=True)]
    finite = [p for p in psnrs if math.isfinite(p)]
    return {
        "reduced": name,
        "frames": len(frames),
        "max_abs_diff": int(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "psnr_min_db": min(finite) if finite else None,  # None: identical outputs (infinite PSNR)
        "psnr_mean_db": float(np.mean(finite)) if finite else None,
        "identical_frames": len(psnrs) - len(finite),
        "fp32_s_per_frame": per_frame["fp32"],
        f"{name}_s_per_frame": per_frame[name],
    }


# --------------------------------------------------------------------------------------------
# flow and fusion alone


def _first_frames(video: str, n: int) -> list[np.ndarray]:
    from .io.media import iter_frames

    stream = iter_frames(video)
    try:
        frames = [f for _, f in zip(range(n), stream, strict=False)]
    finally:
        stream.close()
    if len(frames) < 2:
        raise MpistyleError(f"{video}: at least two frames are needed to measure flow")
    return frames


def measure_flow(video: str, cpus: int, pairs: int = 24, frames: int = 8) -> dict[str, Any]:
    """Pair flows/s (DIS fast, forward + backward + mask) with 1 thread and with a pool of ``cpus`` threads.

    1 thread: one worker, OpenCV limited to one thread. All threads: a :class:`~mpistyle.flowpool.FlowPool`
    of ``cpus`` workers of one OpenCV thread each. Consecutive pairs of the first ``frames`` frames, cycled.
    """
    import cv2

    from .temporal.flowpool import measure_pairs_per_s

    clip = _first_frames(video, frames)
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        one = measure_pairs_per_s(clip, workers=1, pairs=pairs)
    finally:
        cv2.setNumThreads(before)
    every = measure_pairs_per_s(clip, workers=cpus, pairs=pairs)
    return {"pairs": pairs, "width": int(clip[0].shape[1]), "height": int(clip[0].shape[0]),
            "threads_1": one, "threads_all": every, "speedup": every["pairs_per_s"] / one["pairs_per_s"]}


def measure_fusion(video: str, device: str, frames: int = 8, repeat: int = 3) -> dict[str, Any]:
    """Per-frame fusion time (warp of the previous output + blend), NumPy/OpenCV vs torch on ``device``.

    The pair flows are computed beforehand (not timed). Torch: the pair's upload, the warp and the
    fuse, synchronised. Both produce the same frames (the check is in the tests); the figure is the
    fastest of ``repeat`` passes.
    """
    import torch

    from .mpi import select_device
    from .temporal.flow import FlowEstimator, pair_flow, to_gray
    from .temporal.kernels import NumpyFusion
    from .temporal.kernels_torch import TorchFusion

    clip = _first_frames(video, frames)
    est = FlowEstimator()
    pairs = [pair_flow(est, to_gray(a), to_gray(b)) for a, b in zip(clip, clip[1:], strict=False)]
    dev = torch.device(select_device(device, 0))
    out: dict[str, Any] = {"frames": len(pairs), "device": str(dev)}
    npf, tf = NumpyFusion(), TorchFusion(dev)
    for name, backend in (("numpy", npf), ("torch", tf)):
        sty = [backend.asarray(f[:, ::-1].copy()) for f in clip]  # stand-in stylizations, already in place
        best = math.inf
        for _ in range(max(1, repeat) + 1):  # the first pass warms up (allocations, kernels)
            _sync(dev)
            start = time.perf_counter()
            for t, pair in enumerate(pairs, start=1):
                p = backend.upload_pair(pair)
                backend.fuse(sty[t], backend.warp(sty[t - 1], p.flow_back), p.mask, 0.7)
            _sync(dev)
            best = min(best, (time.perf_counter() - start) / len(pairs))
        out[f"{name}_ms"] = best * 1e3
    return out


# --------------------------------------------------------------------------------------------
# (b, c) the whole pipeline under mpiexec


def run_pipeline(mpiexec: str, ranks: int, clip: str, model_path: str, threads: int, precision: str,
                 device: str, directory: str, extra: Sequence[str] = ()) -> dict[str, Any]:
    """One ``mpiexec -n ranks ... stylize`` run; returns its report plus the launcher's clock."""
    tag = f"n{ranks}-{time.monotonic_ns()}"
    out = os.path.join(directory, f"out-{tag}.mp4")
    report_path = os.path.join(directory, f"report-{tag}.json")
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpistyle", "-q", "stylize", clip, "-o", out,
           "--model", model_path, "--threads", str(threads), "--precision", precision, "--device", device,
           "--report", report_path, "--no-progress", *extra]
    logger.info("running %s", " ".join(cmd))
    load_before = _load()
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
            "load_after": _load(), "output": out, "report": report}


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


# --------------------------------------------------------------------------------------------
# scaling model


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
        "flow_s": times.get("flow", 0.0) / max(frames - 1, 1),
        "fuse_s": times.get("fuse", 0.0) / frames,
        "send_s": times.get("send", 0.0) / frames,
        "decode_s": times.get("decode", 0.0) / frames,
        "write_s": times.get("write", 0.0) / frames,
        "encode_s": times.get("encode", 0.0) / frames,
        "root_cpu_s": max(root_cpu, 0.0),
        "startup_s": startup,  # launch + imports + setup
        "halo": int(one.get("halo") or 0),
        "halo_wait_s": halo_wait,
    }


def scaling_model(measured: dict[str, Any], ranks: Sequence[int], frames: int = LONG_VIDEO_FRAMES,
                  link_bytes_per_s: float = 1.25e9) -> list[dict[str, Any]]:
    """Project run time and overhead for a long video of ``frames`` frames on P ranks.

    Per-frame costs (seconds, from ``measured``): n = network, c = n + flow + fuse + send (what a
    rank spends per frame it owns), s0 = max(decode + write + encode, root_cpu) + 2 x frame_bytes /
    link (rank 0's serial share of every frame: it decodes and scatters each frame once, gathers,
    buffers and encodes it once; root_cpu is that cost as CPU time, which also counts the ffmpeg
    processes that the threads' clocks miss). K = halo frames, w = measured halo wait per boundary,
    S = startup (launch, imports, model load). When ``measured`` holds ``root_serial_s`` (rank 0's
    serial cost per frame measured in a multi-rank run of one output mode, :func:`rank0_cost`), s0 =
    root_serial_s + 2 x frame_bytes / link instead; ``segment_encode_s`` (each rank's own x264 in
    segments mode) is then part of c. With F frames:

        H(P)     = [P > 1] * (K * (flow + fuse) + w)      one boundary on the critical path
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
    c = n + sum(float(measured.get(k, 0.0)) for k in ("flow_s", "fuse_s", "send_s", "segment_encode_s"))
    s0 = root_serial_per_frame(measured, link_bytes_per_s)
    k = int(measured.get("halo", 0))
    startup = float(measured.get("startup_s", 0.0))
    halo_step = k * (float(measured.get("flow_s", 0.0)) + float(measured.get("fuse_s", 0.0))) + float(
        measured.get("halo_wait_s", 0.0))
    t1 = startup + frames * (c + s0)
    rows = []
    for p in ranks:
        if p < 1:
            raise ValueError(f"rank counts must be positive, got {p}")
        useful = frames * n / p
        halo = halo_step if p > 1 else 0.0
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


def root_serial_per_frame(measured: dict[str, Any], link_bytes_per_s: float = 1.25e9) -> float:
    """s0 of :func:`scaling_model`: rank 0's serial seconds per frame, its link's share included."""
    comm = 2.0 * float(measured.get("frame_bytes", 0)) / link_bytes_per_s
    if measured.get("root_serial_s") is not None:  # measured per mode: use it as it is
        return float(measured["root_serial_s"]) + comm
    threads_s0 = float(measured.get("decode_s", 0.0)) + float(measured.get("write_s", 0.0)) + float(
        measured.get("encode_s", 0.0))
    return max(threads_s0, float(measured.get("root_cpu_s", 0.0))) + comm


def rank0_cost(report: dict[str, Any], mode: str) -> dict[str, Any]:
    """Rank 0's serial cost per frame of the video in one stylize report, split into its parts.

    decode (rank 0's decoder thread), write (the sink's HDF5 writes and commits), encode (the sink
    feeding the one x264, ``--encode rank0``), join (filling holes and the stream-copy concat after
    the work, ``--encode segments``). ``serial_s`` is their sum: the threads overlap each other and
    the work, so the sum is the conservative figure. ``segment_encode_s`` is each rank's own encoder
    per frame it encoded: parallel work, not rank 0's.
    """
    frames = max(int(report["frames"]), 1)
    root = next(e for e in report["per_rank"] if e.get("rank", 0) == 0)
    times = {k: float(v) for k, v in (root.get("times_s") or {}).items()}
    parts = {f"{k}_s": times.get(k, 0.0) / frames for k in ("decode", "write", "encode", "join")}
    seg_time = sum(float((e.get("times_s") or {}).get("segment_encode", 0.0)) for e in report["per_rank"])
    seg_frames = sum(int(e.get("frames") or 0) for e in report["per_rank"]
                     if (e.get("times_s") or {}).get("segment_encode") is not None)
    return {"mode": mode, "ranks": int(report["ranks"]), "frames": frames, **parts,
            "serial_s": sum(parts.values()),
            "segment_encode_s": seg_time / seg_frames if seg_frames else 0.0,
            "segments": sum(int((e.get("counts") or {}).get("segments", 0)) for e in report["per_rank"])}


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
    c = float(measured["network_s"]) + sum(
        float(model_in.get(k, 0.0)) for k in ("flow_s", "fuse_s", "send_s", "segment_encode_s"))
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


def encode_jobs(ranks: Sequence[int], encode: str) -> list[tuple[int, str]]:
    """(rank count, --encode mode) of one pipeline round; a rank count's first job is its primary run.

    Primary runs are what the speed-up and targets use: stylize's default (auto: rank0 on 1 rank,
    segments on more) unless one mode is forced. ``both`` adds a rank0 run for each multi-rank count.
    """
    if encode in ENCODE_MODES:
        return [(n, encode) for n in ranks]
    jobs = []
    for n in ranks:
        jobs.append((n, "rank0" if n == 1 else "segments"))
        if encode == "both" and n > 1:
            jobs.append((n, "rank0"))
    return jobs


# --------------------------------------------------------------------------------------------
# output


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  " + "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return lines


def format_report(result: dict[str, Any]) -> str:
    """The human-readable tables of a bench result."""
    fwd = result["forward"]
    summ = result["summary"]
    chk = fwd["precision_check"]
    host = result["host"]
    lines = [
        f"mpistyle bench: {result['video']} ({result['frames']} frames, "
        f"{result['width']}x{result['height']}), model {os.path.basename(result['model'])}",
        f"device {fwd['device']}, precision {fwd['precision']}, {result['threads_per_rank']} thread(s) per "
        f"rank, {host['cpus']} CPUs, load (1 min) {host['load_start']} at start, {host['load_end']} at end",
        "",
        f"network forward (pure, 1 frame/call, {fwd['frames']} frames after {fwd['warmup_calls']} warm-up "
        f"calls): {fwd['per_frame_s']:.4f} s/frame (median {fwd['median_s']:.4f}, min {fwd['min_s']:.4f}; "
        f"CPU {fwd['cpu_per_frame_s']:.4f} s/frame)",
        f"{chk['reduced']} vs fp32 on {chk['frames']} real frames: max abs diff {chk['max_abs_diff']}/255, "
        f"mean {chk['mean_abs_diff']:.4f}, PSNR min {_fmt(chk['psnr_min_db'], '.1f')} dB "
        f"(fp32 {chk['fp32_s_per_frame']:.3f} s/frame, {chk['reduced']} "
        f"{chk[chk['reduced'] + '_s_per_frame']:.3f} s/frame)",
        "",
        _flow_line(result),
        _fusion_line(result),
        "",
        "pipeline (mpiexec -n N mpistyle stylize; s/frame: process = launcher clock, wall = report wall_s "
        "incl. setup, work = wall_s - setup_s):",
    ]
    rows = [[str(r["ranks"]), _fmt(r["process_s"], ".1f"), _fmt(r["wall_s"], ".1f"),
             _fmt(r["setup_s"], ".1f"), _fmt(r["work_s"], ".1f"), _fmt(r["s_per_frame_process"], ".4f"),
             _fmt(r["s_per_frame_wall"], ".4f"), _fmt(r["s_per_frame_work"], ".4f"),
             _fmt(r["speedup"], ".2f") + "x", _fmt(r["efficiency"], ".2f"),
             _fmt(r["speedup_wall"], ".2f") + "x", _fmt(r["cpu_s"], ".1f"),
             f"{r['load_before']}/{r['load_after']}"]
            for r in summ["runs"]]
    lines += _table(["ranks", "process_s", "wall_s", "setup_s", "work_s", "s/f proc", "s/f wall", "s/f work",
                     "speedup", "eff", "speedup(wall)", "cpu_s", "load"], rows)
    lines += ["", f"pipeline/forward at 1 rank: {summ['ratio']:.3f} (work_s), {summ['ratio_wall']:.3f} "
                  f"(wall_s), {summ['ratio_process']:.3f} (process); work_s / network time in the same run: "
                  f"{_fmt(summ['ratio_in_run'])}"]
    lines += ["", "per rank (s; main thread: network wait_flow fuse send wait_halo wait_source; helpers: "
                  "flow decode write encode segment_encode join; other = work_s - main thread):"]
    rows = []
    for r in summ["runs"]:
        for pr in r["per_rank"]:
            t = pr["times_s"]
            counts = pr["counts"] or {}
            net = t.get("network", 0.0) / counts["network_frames"] if counts.get("network_frames") else None
            rows.append([str(r["ranks"]), str(pr["rank"]), str(pr["frames"]),
                         *(_fmt(t.get(p, 0.0), ".2f") for p in (*MAIN_PHASES, *HELPER_PHASES)),
                         _fmt(pr["other_s"], ".2f"), str(counts.get("halo_frames", 0)), _fmt(net, ".4f")])
    lines += _table(["N", "rank", "frames", *MAIN_PHASES, *HELPER_PHASES, "other", "halo_fr", "net/frame"],
                    rows)
    ob = result["overhead_1rank"]
    lines += ["", "1-rank time beyond frames x forward (s): " + ", ".join(
        f"{k} {v:+.2f}" for k, v in ob.items())]
    lines += ["", "targets: " + "; ".join(
        f"{t['name']} {t['value']:.3f} ({'<=' if t['kind'] == 'max' else '>='} {t['target']}: "
        f"{'met' if t['met'] else 'MISSED'})" for t in result["targets"])]
    m = result["measured"]
    lines += ["", f"scaling model ({result['scaling'][0]['frames']} frames; per frame: network "
                  f"{m['network_s']:.3f} s, flow {m['flow_s']:.4f}, fuse {m['fuse_s']:.4f}, rank-0 serial: "
                  f"decode {m['decode_s']:.4f} + write {m['write_s']:.4f} + encode {m['encode_s']:.4f} "
                  f"(as CPU time incl. ffmpeg: {m['root_cpu_s']:.4f}); "
                  f"startup {m['startup_s']:.1f} s; halo {m['halo']} frames, wait {m['halo_wait_s']:.2f} "
                  "s/boundary; formulas: bench.scaling_model):"]
    rows = [[str(r["ranks"]), _fmt(r["frames_per_rank"], ".0f"), _fmt(r["total_s"], ".0f"),
             _fmt(r["overhead_fraction"] * 100, ".1f") + "%", _fmt(r["speedup"], ".1f") + "x",
             _fmt(r["efficiency"], ".2f"), _fmt(r["total_balanced_s"], ".0f"),
             _fmt(r["overhead_fraction_balanced"] * 100, ".1f") + "%", r["bound"]] for r in result["scaling"]]
    lines += _table(["ranks", "frames/rank", "T_s", "overhead", "speedup", "eff", "T_bal_s", "overhead_bal",
                     "bound (bal)"], rows)
    lines += _encode_lines(result)
    return "\n".join(lines)


def _encode_lines(result: dict[str, Any]) -> list[str]:
    """Rank 0's measured serial cost per --encode mode and how far each mode scales with it."""
    projections = result.get("encode_scaling") or {}
    if not projections:
        return []
    lines = ["", "pipeline runs by --encode mode (s/frame work, speed-up over the 1-rank run):"]
    for mode, mode_runs in result["encode_runs"].items():
        lines.append(f"  {mode}: " + ", ".join(
            f"{n} rank(s) {_fmt(r['s_per_frame_work'], '.4f')} ({_fmt(r['speedup'], '.2f')}x)"
            for n, r in mode_runs.items()))
    gpu_fps = next(iter(projections.values()))["gpu_rank_fps"]
    lines += ["", "rank 0's serial cost per frame, measured (ms/frame of the video, from the largest run of each "
                  "mode; serial = decode + write + encode + join; link = scatter + gather at 10 Gb/s; "
                  "seg_enc = each rank's own encoder, parallel):"]
    rows = []
    for mode, proj in projections.items():
        cost = result["rank0_cost"][mode]
        rows.append([mode, str(cost["ranks"]), *(_fmt(cost[k] * 1e3, ".2f") for k in (
            "decode_s", "write_s", "encode_s", "join_s", "serial_s")), _fmt(proj["link_s"] * 1e3, ".2f"),
            _fmt(cost["segment_encode_s"] * 1e3, ".2f"), _fmt(proj["ceiling_fps"], ".0f"),
            _fmt(proj["cpu_ranks_to_wall"], ".0f"), _fmt(proj["gpu_ranks_to_wall"], ".1f"),
            _fmt(proj["ceiling_overlapped_fps"], ".0f")])
    lines += _table(["encode", "ranks", "decode", "write", "encode", "join", "serial", "link", "seg_enc",
                     "ceiling f/s", "ranks to wall (this run's c)", f"GPU ranks @{gpu_fps:.0f} f/s",
                     "ceiling if threads overlap"], rows)
    lines += ["  (join is mostly a fixed cost, a process start and one stream copy, spread here over "
              f"{result['frames']} frames: short clips overstate it per frame)",
              "", "scaling model with each mode's measured rank-0 cost (overhead, equal partitions / balanced):"]
    for mode, proj in projections.items():
        lines.append(f"  {mode}: " + ", ".join(
            f"{r['ranks']}: {r['overhead_fraction'] * 100:.0f}%/{r['overhead_fraction_balanced'] * 100:.0f}%"
            for r in proj["scaling"]))
    return lines


def _flow_line(result: dict[str, Any]) -> str:
    flow = result.get("flow")
    if not flow:
        return "flow alone: not measured"
    one, every = flow["threads_1"], flow["threads_all"]
    return (f"flow alone (DIS fast fwd+bwd + mask, {flow['width']}x{flow['height']}, {flow['pairs']} pairs): "
            f"{one['pairs_per_s']:.1f} pairs/s at 1 thread, {every['pairs_per_s']:.1f} pairs/s with a pool of "
            f"{every['workers']} threads ({flow['speedup']:.2f}x); CPU {one['cpu_s'] / one['pairs'] * 1e3:.1f} ms/pair "
            "(on a shared machine, pairs/s drops with the load; CPU time does not)")


def _fusion_line(result: dict[str, Any]) -> str:
    fusion = result.get("fusion")
    if not fusion:
        return "fusion alone: not measured"
    return (f"fusion alone (warp + blend, {fusion['frames']} frames): NumPy/OpenCV {fusion['numpy_ms']:.2f} ms/frame, "
            f"torch on {fusion['device']} {fusion['torch_ms']:.2f} ms/frame")


def _targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = [{"name": "pipeline/forward (1 rank, work_s)", "kind": "max", "target": TARGETS["ratio"],
            "value": summary["ratio"], "met": summary["ratio"] <= TARGETS["ratio"]}]
    two = next((r for r in summary["runs"] if r["ranks"] == 2), None)
    if two is not None:
        out.append({"name": "2-rank speed-up (wall_s)", "kind": "min", "target": TARGETS["speedup_2"],
                    "value": two["speedup_wall"], "met": two["speedup_wall"] >= TARGETS["speedup_2"]})
        spf = two["s_per_frame_wall"]
        out.append({"name": "2-rank s/frame (wall_s)", "kind": "max", "target": TARGETS["s_per_frame_2"],
                    "value": spf, "met": spf <= TARGETS["s_per_frame_2"]})
    return out


# --------------------------------------------------------------------------------------------
# command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mpistyle bench [VIDEO]``."""
    parser.add_argument("video", nargs="?", default=None, metavar="VIDEO",
                        help=f"clip to measure on (default {CHECKOUT_CLIP} in a checkout, else the packaged "
                             "sample)")
    parser.add_argument("--ranks", type=parse_ranks, default=[1, 2], metavar="N1,N2,...",
                        help="rank counts to run the pipeline with (1 is always included; default 1,2)")
    parser.add_argument("--threads-per-rank", type=_positive_int, default=1, metavar="T",
                        help="torch/OpenCV threads per rank, also for the forward measurement (default 1)")
    parser.add_argument("--frames", type=_positive_int, default=None, metavar="N",
                        help="cut the clip to its first N frames first (default: the whole clip)")
    parser.add_argument("-m", "--model", default=None,
                        help="bundled model name or .pth file (default: the bundled default)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="network precision, as for stylize (default auto)")
    parser.add_argument("--device", default="auto",
                        help="auto (the local GPU if any, else CPU; default), cpu, cuda or cuda:N")
    parser.add_argument("--repeat", type=_positive_int, default=1, metavar="R",
                        help="repeat each measurement R times and keep the fastest (default 1)")
    parser.add_argument("--compare-frames", type=_positive_int, default=4, metavar="K",
                        help="frames on which reduced precision is compared with fp32 (default 4)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the full result as JSON here")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="also write each run's plots (timeline, warping error, strip) in DIR/ranks-N/")
    parser.add_argument("--long-frames", type=_positive_int, default=LONG_VIDEO_FRAMES, metavar="F",
                        help=f"video length for the scaling model (default {LONG_VIDEO_FRAMES})")
    parser.add_argument("--flow-pairs", type=_positive_int, default=24, metavar="P",
                        help="pairs for the flow throughput figure at 1 thread and at all CPUs (default 24)")
    parser.add_argument("--encode", choices=("both", "auto", *ENCODE_MODES), default="both",
                        help="stylize --encode for the pipeline runs: both (default) runs every multi-rank count "
                             "with segments (stylize's default there) and again with rank0, to measure rank 0's "
                             "serial cost in each; auto, rank0 or segments: one run per rank count")
    parser.add_argument("--gpu-rank-fps", type=float, default=GPU_RANK_FPS, metavar="FPS",
                        help="end-to-end frames/s of one GPU rank, for how many GPU ranks fit under rank 0's "
                             f"measured ceiling (default {GPU_RANK_FPS:.0f})")
    parser.add_argument("--mpiexec", default=None, help="MPI launcher (default: the environment's mpiexec)")


def _run_row(run: dict[str, Any], one: dict[str, Any]) -> dict[str, Any]:
    """One run of a given --encode mode, for comparing modes at the same rank count."""
    rep = run["report"]
    work = work_seconds(rep)
    return {"ranks": run["ranks"], "encode": run["encode"], "work_s": work, "wall_s": float(rep["wall_s"]),
            "s_per_frame_work": work / int(rep["frames"]), "speedup": work_seconds(one["report"]) / work,
            "process_s": run["process_s"], "cpu_s": run.get("cpu_s")}


def _check_writable(path: str | None, what: str) -> None:
    if path:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise MpistyleError(f"cannot write the {what} {path}: directory {parent} does not exist")


def main(args: argparse.Namespace) -> int:
    """Run ``mpistyle bench``: print the tables; write the JSON."""
    from .io.media import probe
    from .models import resolve_model

    if _mpi_size_from_env() > 1:
        raise MpistyleError("run `mpistyle bench` as a plain process, not under mpiexec: it starts mpiexec "
                            "itself")
    video = args.video or default_video()
    _check_writable(args.json, "JSON result")
    if args.plots:
        _check_writable(args.plots, "plot directory")
    info = probe(video)
    model_path = resolve_model(args.model)
    mpiexec = _find_mpiexec(args.mpiexec)
    threads = args.threads_per_rank
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.device in ("cpu", "auto") and max(args.ranks) * threads > cpus:
        logger.warning("%d ranks x %d threads exceed the %d CPUs: those runs are oversubscribed",
                       max(args.ranks), threads, cpus)
    load_start = _load()
    with tempfile.TemporaryDirectory(prefix="mpistyle-bench-") as tmp:
        clip = video
        if args.frames is not None and args.frames < info.n_frames:
            clip = cut_video(video, args.frames, tmp)
            info = probe(clip)
        jobs = encode_jobs(args.ranks, args.encode)
        primary = {n: mode for n, mode in reversed(jobs)}  # a rank count's first job
        by_mode: dict[str, dict[int, dict[str, Any]]] = {}  # fastest run of each (mode, ranks)
        repeats: dict[str, list[dict[str, Any]]] = {}

        def pipelines(_: int) -> None:  # one round of pipeline runs after each forward pass
            for n, mode in jobs:
                run = run_pipeline(mpiexec, n, clip, model_path, threads, args.precision, args.device, tmp,
                                   extra=("--encode", mode))
                run["encode"] = mode
                key = str(n) if primary[n] == mode else f"{n}-{mode}"
                repeats.setdefault(key, []).append(
                    {k: run[k] for k in ("process_s", "cpu_s", "load_before", "load_after")} | {
                        "wall_s": run["report"]["wall_s"], "work_s": work_seconds(run["report"])})
                best = by_mode.setdefault(mode, {})
                if n not in best or work_seconds(run["report"]) < work_seconds(best[n]["report"]):
                    if n in best:
                        _remove(best[n]["output"])
                    best[n] = run
                else:
                    _remove(run["output"])

        logger.info("forward pass: %d frames at %dx%d", info.n_frames, info.width, info.height)
        forward = measure_forward(clip, model_path, args.device, args.precision, threads, info.n_frames,
                                  repeat=args.repeat, compare_frames=args.compare_frames,
                                  after_pass=pipelines)
        logger.info("flow alone: %d pairs at 1 thread and at %d threads", args.flow_pairs, cpus)
        flow = measure_flow(clip, cpus, pairs=args.flow_pairs)
        fusion = measure_fusion(clip, args.device)
        runs = {n: by_mode[mode][n] for n, mode in primary.items()}
        if args.plots:
            from .report import write_plots

            for n, run in runs.items():
                write_plots(run["report"], clip, run["output"], os.path.join(args.plots, f"ranks-{n}"))
        summary = summarize(forward, runs)
        measured = measured_costs(summary, runs)
        costs = {mode: rank0_cost(mode_runs[max(mode_runs)]["report"], mode)
                 for mode, mode_runs in by_mode.items()}  # the largest run: rank 0 serves the most ranks
        result: dict[str, Any] = {
            "mpistyle": __version__,
            "video": video,
            "clip_cut_to": args.frames if clip != video else None,
            "frames": info.n_frames,
            "width": runs[1]["report"]["width"],
            "height": runs[1]["report"]["height"],
            "model": model_path,
            "device": args.device,
            "precision": forward["precision"],
            "threads_per_rank": threads,
            "host": {"cpus": cpus, "load_start": load_start, "load_end": _load()},
            "forward": forward,
            "flow": flow,
            "fusion": fusion,
            "summary": summary,
            "overhead_1rank": overhead_breakdown(forward["per_frame_s"], runs[1]["report"]),
            "targets": _targets(summary),
            "measured": measured,
            "scaling": scaling_model(measured, SCALING_RANKS, frames=args.long_frames),
            "encode": args.encode,
            "encode_runs": {mode: {str(n): _run_row(run, runs[1]) for n, run in sorted(mode_runs.items())}
                            for mode, mode_runs in by_mode.items()},
            "rank0_cost": costs,
            "encode_scaling": {mode: encode_projection(measured, cost, SCALING_RANKS, frames=args.long_frames,
                                                       gpu_rank_fps=args.gpu_rank_fps)
                               for mode, cost in costs.items()},
            "repeats": repeats,
            "reports": {str(n): run["report"] for n, run in runs.items()},
            "extra_reports": {f"{n}-{mode}": run["report"] for mode, mode_runs in by_mode.items()
                              for n, run in mode_runs.items() if primary[n] != mode},
        }
    for n, run in runs.items():  # (the other mode's runs share these settings)
        if run["report"].get("precision") != forward["precision"]:
            logger.warning("the %d-rank run used %s but the forward pass %s", n,
                           run["report"].get("precision"), forward["precision"])
    print(format_report(result))
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2, default=str)
                fh.write("\n")
        except OSError as exc:
            raise MpistyleError(f"cannot write {args.json}: {exc.strerror or exc}") from None
    return 0


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
