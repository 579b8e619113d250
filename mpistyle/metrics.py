"""Quality metrics: PSNR and Lai et al.'s warping error, with the ``mpistyle evaluate`` command.

The warping error (Lai et al., ECCV 2018) of a stylized video: for each consecutive pair
(t-1, t), optical flow is computed on the *source* frames, pixels failing the forward-backward
check or lying on motion boundaries are masked out, and the masked MSE between output_t and
output_{t-1} warped to t is taken on [0, 1] RGB. Absolute values depend on the flow
implementation: compare methods only within this implementation, on the same videos.

Partition seams show up as boundary pairs (the first frame of a partition against the last of
the previous one) with a higher error than the interior pairs; a visible restart at the fusion's
anchors would show the same way at the anchor pairs. :func:`seam_report` compares an N-rank run
with the 1-rank run frame by frame (``bin/measure-seams``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from itertools import zip_longest

import cv2
import numpy as np

from mpistyle.errors import MpistyleError, write_failure
from mpistyle.io.media import iter_frames
from mpistyle.partition import DEFAULT_ANCHOR_EVERY
from mpistyle.partition import boundaries as partition_boundaries
from mpistyle.temporal.flow import FLOW_METHODS, FlowEstimator, certainty_mask, to_gray, warp

logger = logging.getLogger(__name__)

# DIS preset of the metric: fixed, so figures compare across runs and settings, and more accurate
# than the fusion's default ("fast"), so the fuser is not graded with its own flow.
METRIC_DIS_PRESET = "medium"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when equal)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0 ** 2 / mse)


def seam_report(reference: Iterable[np.ndarray], frames: Iterable[np.ndarray]) -> dict:
    """Per-frame PSNR of an N-rank run against the 1-rank run: the lowest, where, and how many are identical.

    Streams (two frames at a time). ``lowest_psnr`` is inf when every frame is bit-identical.
    """
    per_frame: list[float] = []
    marker = object()
    for i, (a, b) in enumerate(zip_longest(reference, frames, fillvalue=marker)):
        if a is marker or b is marker:
            raise MpistyleError(f"the two runs differ in length (one ends after {i} frames)")
        per_frame.append(psnr(a, b))
    if not per_frame:
        raise MpistyleError("no frames to compare")
    worst = int(np.argmin(per_frame))
    return {"frames": len(per_frame), "lowest_psnr": per_frame[worst], "lowest_at": worst,
            "identical_frames": sum(1 for p in per_frame if math.isinf(p)), "per_frame": per_frame}


def _pair_error(flow_est: FlowEstimator, prev_gray: np.ndarray, cur_gray: np.ndarray,
                prev_out: np.ndarray, cur_out: np.ndarray) -> float:
    flow_back = flow_est.flow(cur_gray, prev_gray)
    flow_fwd = flow_est.flow(prev_gray, cur_gray)
    mask = certainty_mask(flow_back, flow_fwd, motion_boundaries=True)
    n = float(mask.sum())
    if n == 0.0:  # nothing can be compared (e.g. a scene cut): no evidence of flicker
        return 0.0
    # Warp in float (as Lai et al. do): a uint8 warp would add its own rounding noise to the score.
    warped = warp(prev_out.astype(np.float32), flow_back)
    diff = (cur_out.astype(np.float32) - warped) * np.float32(1.0 / 255.0)
    sq = np.einsum("hwc,hwc->hw", diff, diff)
    return float(np.dot(sq.ravel().astype(np.float64), mask.ravel())) / (n * diff.shape[2])


def warping_errors(source: Iterable[np.ndarray], output: Iterable[np.ndarray],
                   flow_method: str = "dis") -> np.ndarray:
    """Per-pair warping error (len N-1; pair i is frames (i, i+1)); streams, holds two frames."""
    est = FlowEstimator(flow_method, METRIC_DIS_PRESET if flow_method == "dis" else "fast")
    errors: list[float] = []
    prev_gray: np.ndarray | None = None
    prev_out: np.ndarray | None = None
    marker = object()
    for i, (src, out) in enumerate(zip_longest(source, output, fillvalue=marker)):
        if src is marker or out is marker:
            which = "source" if src is marker else "output"
            raise MpistyleError(f"the {which} video ends after {i} frames but the other one is longer")
        if src.shape[:2] != out.shape[:2]:
            raise MpistyleError(f"frame {i}: output is {out.shape[1]}x{out.shape[0]} but source is "
                                f"{src.shape[1]}x{src.shape[0]}")
        gray = to_gray(src)
        if prev_gray is not None and prev_out is not None:
            errors.append(_pair_error(est, prev_gray, gray, prev_out, out))
        prev_gray, prev_out = gray, out
    return np.asarray(errors, dtype=np.float64)


def _fit(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bring a stylized frame to the source size: crop encoder padding, else resize."""
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    if height <= h <= height + 1 and width <= w <= width + 1:  # padded to even size for yuv420p
        return np.ascontiguousarray(frame[:height, :width])
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA if w > width else cv2.INTER_LINEAR)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def evaluate(source_path: str, stylized_path: str, boundaries: Sequence[int] = (),
             flow_method: str = "dis", partitions: int = 0, anchor_every: int = DEFAULT_ANCHOR_EVERY) -> dict:
    """Warping error of ``stylized_path`` against the motion of ``source_path``, as a JSON-able dict.

    A boundary b means the pair (b-1, b). ``partitions`` > 0 derives the boundaries of an even
    contiguous split instead (used by ``--partitions``). The pairs at the fusion's anchors (every
    ``anchor_every`` frames, where the output switches chains) are scored apart as well, so a
    visible restart there would show; "interior" excludes both.
    """
    if partitions < 0:
        raise MpistyleError(f"--partitions must be at least 1, got {partitions}")
    if any(int(b) < 1 for b in boundaries):
        raise MpistyleError(f"boundaries must be frame numbers >= 1 (a boundary b scores the pair b-1, b), "
                            f"got {list(boundaries)}")
    src_iter = iter_frames(source_path)
    first = next(src_iter, None)
    if first is None:
        raise MpistyleError(f"video {source_path!r} has no frames")
    height, width = first.shape[:2]

    def sources() -> Iterator[np.ndarray]:
        yield first
        yield from src_iter

    outputs = (_fit(f, height, width) for f in iter_frames(stylized_path))
    per_pair = warping_errors(sources(), outputs, flow_method=flow_method)
    n_frames = per_pair.size + 1
    if partitions:
        boundaries = partition_boundaries(n_frames, partitions)
    bounds = sorted(set(int(b) for b in boundaries))
    bad = [b for b in bounds if not 0 < b < n_frames]
    if bad:
        raise MpistyleError(f"boundaries {bad} are outside 1..{n_frames - 1} for a video of {n_frames} frames")
    idx = np.array([b - 1 for b in bounds], dtype=np.int64)
    is_boundary = np.zeros(per_pair.size, bool)
    is_boundary[idx] = True
    anchors = list(range(anchor_every, n_frames, anchor_every)) if anchor_every > 0 else []
    is_anchor = np.zeros(per_pair.size, bool)
    is_anchor[np.array([a - 1 for a in anchors], dtype=np.int64)] = True
    boundary_mean = _mean(per_pair[is_boundary])
    interior_mean = _mean(per_pair[~is_boundary & ~is_anchor])
    anchor_mean = _mean(per_pair[is_anchor])
    return {
        "source": source_path,
        "stylized": stylized_path,
        "flow": flow_method,
        "frames": n_frames,
        "warping_error": _mean(per_pair),
        "per_pair": [float(x) for x in per_pair],
        "boundary_pairs": {"boundaries": bounds, "indices": idx.tolist(), "mean": boundary_mean,
                           "values": [float(x) for x in per_pair[is_boundary]]},
        "anchor_pairs": {"anchors": anchors, "mean": anchor_mean,
                         "values": [float(x) for x in per_pair[is_anchor]]},
        "interior_mean": interior_mean,
        "boundary_to_interior": (boundary_mean / interior_mean
                                 if boundary_mean is not None and interior_mean else None),
        "anchor_to_interior": anchor_mean / interior_mean if anchor_mean is not None and interior_mean else None,
    }


def _fmt(x: float | None, scale: float = 1e3) -> str:
    return "-" if x is None else f"{x * scale:.4f}"


def format_table(result: dict) -> str:
    """Human-readable summary of :func:`evaluate`'s result (errors shown x 1e3)."""
    bp = result.get("boundary_pairs", {})
    rows = [
        ("frames", str(result.get("frames", "-"))),
        ("warping error (x1e3), all pairs", _fmt(result.get("warping_error"))),
        ("interior pairs", _fmt(result.get("interior_mean"))),
        (f"boundary pairs {bp.get('boundaries', [])}", _fmt(bp.get("mean"))),
    ]
    ratio = result.get("boundary_to_interior")
    if ratio is not None:
        rows.append(("boundary / interior", f"{ratio:.2f}"))
    ap = result.get("anchor_pairs") or {}
    if ap.get("anchors"):
        rows.append((f"anchor pairs {ap['anchors']}", _fmt(ap.get("mean"))))
        if result.get("anchor_to_interior") is not None:
            rows.append(("anchor / interior", f"{result['anchor_to_interior']:.2f}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{result.get('stylized', 'stylized')} vs {result.get('source', 'source')}"
             f" (flow {result.get('flow', 'dis')})"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame numbers, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mpistyle evaluate SOURCE STYLIZED``."""
    parser.add_argument("source", metavar="SOURCE", help="the original video (flow is computed on it)")
    parser.add_argument("stylized", metavar="STYLIZED", help="the stylized video to score")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--boundaries", type=_int_list, default=[], metavar="B1,B2,...",
                       help="first frames of partitions: pairs (b-1, b) are scored as seams")
    group.add_argument("--partitions", type=_positive_int, default=0, metavar="N",
                       help="score the seams of an even contiguous split into N partitions")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write the full result as JSON to PATH ('-' prints it)")
    parser.add_argument("--flow", choices=FLOW_METHODS, default="dis", help="optical flow for the metric")


def main(args: argparse.Namespace) -> int:
    """Run ``mpistyle evaluate``: print the table; write or print the JSON."""
    if args.json and args.json != "-":
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):  # fail before decoding and scoring the whole video
            raise MpistyleError(f"cannot write {args.json!r}: directory {parent!r} does not exist")
    result = evaluate(args.source, args.stylized, boundaries=args.boundaries or (),
                      flow_method=args.flow, partitions=args.partitions or 0)
    print(format_table(result))
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)
                fh.write("\n")
        except OSError as exc:
            raise write_failure(exc, repr(args.json)) from None
    return 0
