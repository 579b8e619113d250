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

# DIS preset of the metric: fixed, so figures compare across runs and settings (issue 30 defines it). Since 0.5 the
# fusion's default preset is the same, so the fuser is graded with a flow like its own: measure it also with
# ``flow_method="farneback"`` (``mpistyle evaluate --flow farneback``), an independent flow, as docs/flicker.md does.
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


def _pair_flow(flow_est: FlowEstimator, prev_gray: np.ndarray, cur_gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flow cur -> prev, Lai et al.'s mask: forward-backward check and motion boundaries) of one pair."""
    flow_back = flow_est.flow(cur_gray, prev_gray)
    flow_fwd = flow_est.flow(prev_gray, cur_gray)
    return flow_back, certainty_mask(flow_back, flow_fwd, motion_boundaries=True)


def _masked_error(flow_back: np.ndarray, mask: np.ndarray, prev_out: np.ndarray, cur_out: np.ndarray) -> float:
    """Masked MSE on [0, 1] RGB between ``cur_out`` and ``prev_out`` warped onto it (0 for an empty mask)."""
    n = float(mask.sum())
    if n == 0.0:  # nothing can be compared (e.g. a scene cut): no evidence of flicker
        return 0.0
    # Warp in float (as Lai et al. do): a uint8 warp would add its own rounding noise to the score.
    warped = warp(prev_out.astype(np.float32), flow_back)
    diff = (cur_out.astype(np.float32) - warped) * np.float32(1.0 / 255.0)
    sq = np.einsum("hwc,hwc->hw", diff, diff)
    return float(np.dot(sq.ravel().astype(np.float64), mask.ravel())) / (n * diff.shape[2])


def _pair_error(flow_est: FlowEstimator, prev_gray: np.ndarray, cur_gray: np.ndarray,
                prev_out: np.ndarray, cur_out: np.ndarray) -> float:
    flow_back, mask = _pair_flow(flow_est, prev_gray, cur_gray)
    return _masked_error(flow_back, mask, prev_out, cur_out)


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


# Lai et al.'s protocol as issue 30 states it: a pair whose mask covers less than this is skipped (a cut, or
# motion too large for the flow), rather than scored 0.
MIN_COVERAGE = 0.3
LONG_GAP = 10  # Lai et al.'s long-term measure: frames t and t+10, flow computed directly between them


def structure_kept(source: np.ndarray, output: np.ndarray) -> float:
    """How much of the source's structure an output keeps: correlation of edge maps, in [-1, 1].

    Edge map: luminance, 5x5 Gaussian blur, Sobel magnitude, 4x area downscale, standardised; the figure
    is the mean of the product of the two maps (1: the same edges; ghosts and lost outlines lower it).
    """
    def edges(img: np.ndarray) -> np.ndarray:
        g = cv2.GaussianBlur(to_gray(img).astype(np.float32), (5, 5), 0)
        m = cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))
        h, w = m.shape
        m = cv2.resize(m, (max(1, w // 4), max(1, h // 4)), interpolation=cv2.INTER_AREA)
        return (m - m.mean()) / (m.std() + 1e-6)

    return float(np.mean(edges(source) * edges(output)))


class FlickerScorer:
    """Streams (source, output[, per-frame output]) frames and scores the flicker issue 30 defines.

    For each consecutive pair, one flow (DIS medium, on the source) and its mask serve all three videos:
    E_source (the source against itself: the floor that flow and occlusion noise give every clip),
    E_output and E_per_frame; pairs whose mask covers under :data:`MIN_COVERAGE` are skipped. The same
    between frames t and t + ``long_gap`` with the flow computed directly between them (long-term
    consistency; 0 turns it off), and the structure kept by each output (:func:`structure_kept`).
    ``pair_errors`` keeps the plain per-pair error of the output (no pair skipped) for :func:`evaluate`.
    """

    def __init__(self, flow_method: str = "dis", long_gap: int = LONG_GAP,
                 min_coverage: float = MIN_COVERAGE) -> None:
        self.est = FlowEstimator(flow_method, METRIC_DIS_PRESET if flow_method == "dis" else "fast")
        self.long_gap, self.min_coverage = long_gap, min_coverage
        self.pair_errors: list[float] = []
        self._sums = {k: np.zeros(3) for k in ("short", "long")}  # source, output, per-frame
        self._counts = {"short": 0, "long": 0}
        self._skipped = {"short": 0, "long": 0}
        self._kept = np.zeros(2)
        self._frames = 0
        self._has_pf: bool | None = None
        self._history: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []

    def _score(self, kind: str, prev: tuple, cur: tuple) -> None:
        flow_back, mask = _pair_flow(self.est, prev[0], cur[0])
        if kind == "short":
            self.pair_errors.append(_masked_error(flow_back, mask, prev[2], cur[2]))
        if float(mask.mean()) < self.min_coverage:
            self._skipped[kind] += 1
            return
        self._counts[kind] += 1
        for i in range(3):
            if prev[i + 1] is not None:
                self._sums[kind][i] += _masked_error(flow_back, mask, prev[i + 1], cur[i + 1])

    def add(self, source: np.ndarray, output: np.ndarray, per_frame: np.ndarray | None = None) -> None:
        if self._has_pf is None:
            self._has_pf = per_frame is not None
        cur = (to_gray(source), source, output, per_frame)
        if self._history:
            self._score("short", self._history[-1], cur)
        if self.long_gap > 0 and len(self._history) >= self.long_gap:
            self._score("long", self._history[-self.long_gap], cur)
        self._kept[0] += structure_kept(source, output)
        if per_frame is not None:
            self._kept[1] += structure_kept(source, per_frame)
        self._frames += 1
        self._history.append(cur)
        del self._history[:-max(self.long_gap, 1)]

    def result(self) -> dict:
        """The figures (None where nothing was scored); ``added_flicker`` needs the per-frame output."""
        def mean(kind: str, i: int) -> float | None:
            if self._counts[kind] == 0 or (i == 2 and not self._has_pf):
                return None
            return float(self._sums[kind][i] / self._counts[kind])

        e_src, e_out, e_pf = (mean("short", i) for i in range(3))
        added = None
        if e_src is not None and e_out is not None and e_pf is not None and e_pf > e_src:
            added = (e_out - e_src) / (e_pf - e_src)
        n = max(self._frames, 1)
        return {
            "e_source": e_src, "e_output": e_out, "e_per_frame": e_pf, "added_flicker": added,
            # The ratio means something only where per-frame stylization adds flicker (issue 30): E_pf >= 2 E_src.
            "adds_flicker": e_pf is not None and e_src is not None and e_pf >= 2 * e_src,
            "pairs": self._counts["short"], "pairs_skipped": self._skipped["short"],
            "long_gap": self.long_gap, "e10_source": mean("long", 0), "e10_output": mean("long", 1),
            "e10_per_frame": mean("long", 2), "long_pairs": self._counts["long"],
            "long_pairs_skipped": self._skipped["long"],
            "kept_output": float(self._kept[0] / n) if self._frames else None,
            "kept_per_frame": float(self._kept[1] / n) if self._frames and self._has_pf else None,
            "min_coverage": self.min_coverage,
        }


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
             flow_method: str = "dis", partitions: int = 0, anchor_every: int = DEFAULT_ANCHOR_EVERY,
             per_frame_path: str | None = None, long_gap: int = 0) -> dict:
    """Warping error of ``stylized_path`` against the motion of ``source_path``, as a JSON-able dict.

    A boundary b means the pair (b-1, b). ``partitions`` > 0 derives the boundaries of an even
    contiguous split instead (used by ``--partitions``). The pairs at the fusion's anchors (every
    ``anchor_every`` frames, where the output switches chains) are scored apart as well, so a
    visible restart there would show; "interior" excludes both. ``flicker`` holds
    :class:`FlickerScorer`'s figures: the source's floor, the added flicker against ``per_frame_path`` (a
    ``--temporal none`` output of the same clip, optional), long-term E over ``long_gap`` frames (0: off).
    """
    if partitions < 0:
        raise MpistyleError(f"--partitions must be at least 1, got {partitions}")
    if long_gap < 0:
        raise MpistyleError(f"--long-gap must be 0 (off) or more, got {long_gap}")
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

    scorer = FlickerScorer(flow_method, long_gap=long_gap)
    marker = object()
    streams = [sources(), (_fit(f, height, width) for f in iter_frames(stylized_path))]
    if per_frame_path is not None:
        streams.append(_fit(f, height, width) for f in iter_frames(per_frame_path))
    names = ["source", "stylized", "per-frame"]
    for i, frames in enumerate(zip_longest(*streams, fillvalue=marker)):
        if any(f is marker for f in frames):
            short = names[[f is marker for f in frames].index(True)]
            raise MpistyleError(f"the {short} video ends after {i} frames but another one is longer")
        scorer.add(*frames)
    per_pair = np.asarray(scorer.pair_errors, dtype=np.float64)
    if per_pair.size == 0:
        raise MpistyleError("the videos need at least two frames to score flicker")
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
        "per_frame": per_frame_path,
        "flicker": scorer.result(),
    }


def flicker_report(source_path: str, output_path: str, per_frame_path: str | None = None,
                   long_gap: int = LONG_GAP, flow_method: str = "dis") -> dict:
    """:class:`FlickerScorer`'s figures for three videos on disk (what ``mpistyle evaluate`` prints)."""
    return evaluate(source_path, output_path, per_frame_path=per_frame_path, long_gap=long_gap,
                    flow_method=flow_method)["flicker"]


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
    fl = result.get("flicker") or {}
    if fl.get("e_source") is not None:
        rows.append((f"flicker (pairs with mask >= {fl['min_coverage']:.0%}, x1e3): "
                     f"{fl['pairs']} pairs, {fl['pairs_skipped']} skipped", ""))
        rows.append(("  E_source (the clip's own floor)", _fmt(fl["e_source"])))
        rows.append(("  E_output", _fmt(fl["e_output"])))
        if fl.get("e_per_frame") is not None:
            rows.append(("  E_per-frame", _fmt(fl["e_per_frame"])))
            added = fl.get("added_flicker")
            note = "" if fl.get("adds_flicker") else " (per-frame adds little over the floor: compare E directly)"
            rows.append(("  added flicker (E_out - E_src) / (E_pf - E_src)",
                         ("-" if added is None else f"{added:.3f}") + note))
        if fl.get("e10_source") is not None:
            gap = fl["long_gap"]
            rows.append((f"  long-term E(t, t+{gap}) source / output", f"{_fmt(fl['e10_source'])} / "
                         f"{_fmt(fl['e10_output'])}" + (f" / per-frame {_fmt(fl['e10_per_frame'])}"
                                                         if fl.get("e10_per_frame") is not None else "")))
        if fl.get("kept_output") is not None:
            kept = f"{fl['kept_output']:.3f}"
            if fl.get("kept_per_frame") is not None:
                kept += f" (per-frame {fl['kept_per_frame']:.3f})"
            rows.append(("  structure kept (edge correlation)", kept))
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
    parser.add_argument("--per-frame", metavar="VIDEO", default=None,
                        help="the same clip stylized with --temporal none: report the added flicker "
                             "(E_out - E_source) / (E_per-frame - E_source)")
    parser.add_argument("--long-gap", type=int, default=LONG_GAP, metavar="K",
                        help=f"long-term consistency between frames t and t+K (default {LONG_GAP}; 0: off)")


def main(args: argparse.Namespace) -> int:
    """Run ``mpistyle evaluate``: print the table; write or print the JSON."""
    if args.json and args.json != "-":
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):  # fail before decoding and scoring the whole video
            raise MpistyleError(f"cannot write {args.json!r}: directory {parent!r} does not exist")
    result = evaluate(args.source, args.stylized, boundaries=args.boundaries or (),
                      flow_method=args.flow, partitions=args.partitions or 0, per_frame_path=args.per_frame,
                      long_gap=args.long_gap)
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
