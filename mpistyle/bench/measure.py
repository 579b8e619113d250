"""Micro-benchmarks in this process: the network forward (and reduced precision vs fp32), flow, fusion."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import MpistyleError
from .common import load_average


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

    from ..engine import Stylizer, resolve_precision
    from ..io.media import iter_frames
    from ..metrics import psnr
    from ..models import load_model
    from ..mpi import configure_threads, select_device

    configure_threads(threads)
    dev = torch.device(select_device(device, 0))
    model = load_model(model_path, dev)
    stylizer = Stylizer(model, device=dev, precision=precision)
    dtype = resolve_precision(precision, dev)
    keep = set(np.linspace(0, frames - 1, max(1, min(compare_frames, frames))).round().astype(int).tolist())
    kept: list[np.ndarray] = []
    passes: list[list[float]] = []
    cpu: list[float] = []  # CPU seconds per timed call: wall >> cpu means other jobs took the core
    load_before = load_average()
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
                sync(dev)
                start, cpu_start = time.perf_counter(), time.process_time()
                stylizer(batch)
                sync(dev)
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
        "load_after": load_average(),
    }
    if not kept:  # the video had fewer frames than announced
        raise MpistyleError(f"{video}: no frames to compare precisions on")
    result["precision_check"] = _compare_precision(model, dev, dtype, np.stack(kept), psnr)
    del stylizer, model
    gc.collect()
    return result


def sync(dev: Any) -> None:
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def _compare_precision(model: Any, dev: Any, dtype: Any, frames: np.ndarray, psnr: Any) -> dict[str, Any]:
    """Reduced-precision output against fp32 on real frames (and each one's time per frame there)."""
    import torch

    from ..engine import Stylizer

    reduced = dtype if dtype is not None else (torch.float16 if dev.type == "cuda" else torch.bfloat16)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[reduced]
    outs: dict[str, np.ndarray] = {}
    per_frame: dict[str, float] = {}
    for label, prec in (("fp32", "fp32"), (name, name)):
        stylizer = Stylizer(model, device=dev, precision=prec)
        stylizer(frames[:1])  # warm-up
        sync(dev)
        start = time.perf_counter()
        outs[label] = np.concatenate([stylizer(f[None]) for f in frames])
        sync(dev)
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


def _first_frames(video: str, n: int) -> list[np.ndarray]:
    from ..io.media import iter_frames

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

    1 thread: one worker, OpenCV limited to one thread. All threads: a :class:`~mpistyle.temporal.flowpool.FlowPool`
    of ``cpus`` workers of one OpenCV thread each. Consecutive pairs of the first ``frames`` frames, cycled.
    """
    import cv2

    from ..temporal.flowpool import measure_pairs_per_s

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

    from ..mpi import select_device
    from ..temporal.flow import FlowEstimator, pair_flow, to_gray
    from ..temporal.kernels import NumpyFusion
    from ..temporal.kernels_torch import TorchFusion

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
            sync(dev)
            start = time.perf_counter()
            for t, pair in enumerate(pairs, start=1):
                p = backend.upload_pair(pair)
                backend.fuse(sty[t], backend.warp(sty[t - 1], p.flow_back), p.mask, 0.7)
            sync(dev)
            best = min(best, (time.perf_counter() - start) / len(pairs))
        out[f"{name}_ms"] = best * 1e3
    return out
