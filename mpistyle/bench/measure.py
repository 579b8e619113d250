"""Micro-benchmarks in this process: the network forward (and reduced precision vs fp32), flow, fusion."""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import MpistyleError
from .common import load_average

logger = logging.getLogger(__name__)


def measure_forward(video: str, model_path: str, device: str, precision: str, threads: int, frames: int,
                    repeat: int = 1, compare_frames: int = 4, warmup: int = 2,
                    after_pass: Callable[[int], None] | None = None, compile: str = "off") -> dict[str, Any]:
    """Per-frame network time on the first ``frames`` decoded frames, and reduced vs fp32 precision.

    ``after_pass(i)`` runs after timed pass ``i`` (the bench runs the pipelines there, so forward
    and pipeline measurements interleave and share the machine's slow and fast moments).
    ``compile``: as stylize's ``--compile`` for a 1-rank job on this clip (the network path the 1-rank
    pipeline run takes). Returns ``{"per_frame_s" (mean of the fastest pass), "median_s", "min_s",
    "max_s", "frames", "passes": [mean per pass], "precision", "network", "eager_per_frame_s",
    "decode_s", "precision_check": {...}}``.
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
    if compile != "off":
        _use_compiled_if(stylizer, compile, video, threads)
    # mpistyle 0.3's path (torch's instance norm under autocast), timed frame by frame beside it
    baseline = Stylizer(model, device=dev, precision=precision, network="torch")
    dtype = resolve_precision(precision, dev)
    keep = set(np.linspace(0, frames - 1, max(1, min(compare_frames, frames))).round().astype(int).tolist())
    kept: list[np.ndarray] = []
    passes: list[list[float]] = []
    base_passes: list[list[float]] = []
    decode_passes: list[float] = []  # seconds to decode the frames (the stream's own time)
    cpu: list[float] = []  # CPU seconds per timed call: wall >> cpu means other jobs took the core
    load_before = load_average()
    for p in range(max(1, repeat)):
        times: list[float] = []
        base_times: list[float] = []
        decode = 0.0
        stream = iter_frames(video)
        try:
            t_decode = time.perf_counter()
            for t, frame in enumerate(stream):
                decode += time.perf_counter() - t_decode
                if t >= frames:
                    break
                batch = frame[None]
                if t == 0 and p == 0:
                    for _ in range(warmup):  # first calls build the oneDNN/cuDNN kernels
                        stylizer(batch)
                        baseline(batch)
                sync(dev)
                start, cpu_start = time.perf_counter(), time.process_time()
                stylizer(batch)
                sync(dev)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - cpu_start)
                start = time.perf_counter()
                baseline(batch)
                sync(dev)
                base_times.append(time.perf_counter() - start)
                if p == 0 and t in keep:
                    kept.append(frame)
                t_decode = time.perf_counter()
        finally:
            stream.close()
        if not times:
            raise MpistyleError(f"{video}: no frames to time")
        passes.append(times)
        base_passes.append(base_times)
        decode_passes.append(decode)
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
        "network": stylizer.network,
        # mpistyle 0.3's network (torch's instance norm under autocast), interleaved frame by frame
        "eager_per_frame_s": min(float(np.mean(ts)) for ts in base_passes),
        "decode_s": min(decode_passes),  # decoding the timed frames in this process (fastest pass)
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
    del stylizer, baseline, model
    gc.collect()
    return result


def _use_compiled_if(stylizer: Any, option: str, video: str, threads: int) -> None:
    """Give ``stylizer`` the compiled package where a 1-rank ``stylize --compile option`` would use it."""
    from ..compiled import decide, is_transformer, load_package, obtain_package, read_figures
    from ..io.media import probe

    info = probe(video)
    shape = (1, info.height, info.width, 3)
    on, why = decide(option, stylizer.device, info.n_frames, info.height, info.width, threads,
                     transformer=is_transformer(stylizer), figures=read_figures(stylizer.device.type))
    if on:
        data, _ = obtain_package(stylizer, shape)
        if data is not None:
            stylizer.use_compiled(load_package(data, stylizer.device), shape)
    logger.info("forward pass: network %s (%s)", stylizer.network, why)


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
    from ..temporal.chains import TemporalSettings
    from ..temporal.flow import FlowEstimator, pair_flow, to_gray
    from ..temporal.kernels import NumpyFusion
    from ..temporal.kernels_torch import TorchFusion

    settings = TemporalSettings()  # the default fusion: bicubic warp, detail kept

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
                warped = backend.warp(sty[t - 1], p.flow_back, settings.warp_interpolation)
                backend.fuse(sty[t], warped, p.mask, settings.strength, settings.keep_detail)
            sync(dev)
            best = min(best, (time.perf_counter() - start) / len(pairs))
        out[f"{name}_ms"] = best * 1e3
    return out


NETWORK_SIZES = ((640, 272), (1280, 720))
NETWORK_THREADS = (1, 2)


def measure_networks(video: str, model_path: str, sizes: Any = NETWORK_SIZES, threads: Any = NETWORK_THREADS,
                     frames: int = 3, repeat: int = 3, openvino: bool = True) -> dict[str, Any]:
    """Network time per frame of each path, side by side in this process, on CPU, per size and thread count.

    Paths: ``eager`` (torch's instance norm under bf16 autocast, channels-last: mpistyle 0.3 and
    fast_neural_style), ``fused`` (mpistyle's eager recipe), ``compiled`` (the AOTInductor package a
    stylize job runs; from the cache, else compiled here, which is timed) and ``openvino`` (torch's
    network converted by OpenVINO, its default bf16 on AMX; only where ``openvino`` is installed). Each
    figure: the fastest of ``repeat`` rounds of the mean over ``frames`` real frames, the paths taking
    turns within each round. Beside it, the PSNR of the output against fp32 eager.
    """
    import torch

    from ..compiled import load_package, obtain_package
    from ..engine import Stylizer, resolve_precision
    from ..io.media import iter_frames
    from ..metrics import psnr
    from ..models import load_model
    from ..mpi import configure_threads

    dev = torch.device("cpu")
    model = load_model(model_path, dev)
    precision = "bf16" if resolve_precision("auto", dev) is not None else "fp32"
    out: dict[str, Any] = {"precision": precision, "frames": frames, "repeat": repeat, "rows": []}
    for width, height in sizes:
        stream = iter_frames(video, size=(width, height))
        try:
            clip = np.stack([f for _, f in zip(range(frames), stream, strict=False)])
        finally:
            stream.close()
        shape = (1, height, width, 3)
        paths: dict[str, Any] = {
            "eager": Stylizer(model, dev, precision, network="torch"),
            "fused": Stylizer(model, dev, precision),
        }
        compiled = Stylizer(model, dev, precision)
        data, info = obtain_package(compiled, shape)
        setup: dict[str, Any] = {"compiled": info}
        if data is not None:
            compiled.use_compiled(load_package(data, dev), shape)
            paths["compiled"] = compiled
        if openvino:
            runner, ov_info = _openvino_runner(model, clip[:1])
            setup["openvino"] = ov_info
            if runner is not None:
                paths["openvino"] = runner
        reference = Stylizer(model, dev, "fp32", network="torch")
        configure_threads(max(threads))
        want = [reference(f[None])[0] for f in clip]
        for n_threads in threads:
            configure_threads(n_threads)
            if "openvino" in paths:
                paths["openvino"].set_threads(n_threads)
            best = {name: math.inf for name in paths}
            outs: dict[str, list[np.ndarray]] = {}
            for name, run in paths.items():  # warm-up (first calls build kernels) and the outputs
                run(clip[:1])
                outs[name] = [run(f[None])[0] for f in clip]
            for _ in range(max(1, repeat)):
                for name, run in paths.items():
                    start = time.perf_counter()
                    for f in clip:
                        run(f[None])
                    best[name] = min(best[name], (time.perf_counter() - start) / len(clip))
            row: dict[str, Any] = {"width": width, "height": height, "threads": n_threads, "paths": {}}
            for name in paths:
                dbs = [psnr(a, b) for a, b in zip(want, outs[name], strict=True)]
                finite = [d for d in dbs if math.isfinite(d)]
                row["paths"][name] = {"s_per_frame": best[name], "psnr_db": min(finite) if finite else None,
                                      "ratio": best[name] / best["eager"]}
            row["setup"] = setup
            out["rows"].append(row)
            logger.info("network %dx%d, %d thread(s): %s", width, height, n_threads,
                        ", ".join(f"{k} {v['s_per_frame']:.3f} s" for k, v in row["paths"].items()))
    return out


class _OpenVinoRunner:
    """OpenVINO's CPU plugin on torch's network (instance norms become MVN), frames in and out as uint8."""

    def __init__(self, core: Any, ov_model: Any) -> None:
        self.core, self.ov_model, self.threads, self.request = core, ov_model, 0, None

    def set_threads(self, n: int) -> None:
        if n != self.threads:
            compiled = self.core.compile_model(self.ov_model, "CPU", {"INFERENCE_NUM_THREADS": n,
                                                                     "PERFORMANCE_HINT": "LATENCY"})
            self.request, self.threads = compiled.create_infer_request(), n

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        if self.request is None:
            self.set_threads(1)
        x = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32)
        self.request.infer({0: x})
        y = self.request.get_output_tensor(0).data
        return np.clip(np.round(y), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def _openvino_runner(model: Any, example: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """(runner or None, info) for OpenVINO, if it is installed."""
    try:
        import openvino
    except ImportError:
        return None, {"error": "openvino is not installed"}
    import copy

    import torch

    from ..nets import use_torch_instance_norm

    start = time.perf_counter()
    try:
        net = use_torch_instance_norm(copy.deepcopy(model)).float().eval()
        x = torch.from_numpy(example).permute(0, 3, 1, 2).float()
        ov_model = openvino.convert_model(net, example_input=x)
        ov_model.reshape(list(x.shape))  # one static shape, as the compiled path
        runner = _OpenVinoRunner(openvino.Core(), ov_model)
        runner.set_threads(1)
    except Exception as exc:  # noqa: BLE001 - a bench figure, not a failure
        return None, {"error": str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}
    precision = str(runner.request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT"))
    return runner, {"version": openvino.get_version(), "convert_s": time.perf_counter() - start,
                    "precision": precision}
