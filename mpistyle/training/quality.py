"""``mpistyle quality``: how far a model's frames moved toward its painting, and how much picture they kept.

Scores (:mod:`mpistyle.training.scores`): texture and palette closeness to the painting, structure kept and
the period-4 grid, on frames of a video the model was not trained on, stylized on the path ``mpistyle
stylize`` takes on this machine (bf16 where the CPU has it, the fused norm). ``--reference`` also runs the
optimisation-based stylisation (:mod:`mpistyle.training.reference`) of the first frame at two style weights,
so a user sees how close the model gets to what is possible at about the same structure kept.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from mpistyle.errors import MpistyleError
from mpistyle.training.content import load_image, read_video_frames
from mpistyle.training.losses import resize_short

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None,
                        help="model to score: bundled name or .pth path (repeatable; default: every bundled style)")
    parser.add_argument("--style", default=None,
                        help="the painting the model(s) should match (default: a bundled model's own painting)")
    parser.add_argument("--frame-source", required=True, help="video or image to take content frames from")
    parser.add_argument("--frames", type=int, default=30,
                        help="the video's first N frames are the span scored (default 30)")
    parser.add_argument("--every", type=int, default=4, help="score every K-th frame of that span (default 4)")
    parser.add_argument("--size", type=int, default=180,
                        help="frames are resized so their short side is this many pixels (default 180)")
    parser.add_argument("--reference", action="store_true",
                        help="also stylize the first frame by optimisation (Gatys et al.; about a minute a weight)")
    parser.add_argument("--reference-steps", type=int, default=150, help="L-BFGS steps of --reference (default 150)")


def content_frames(source: str, frames: int, every: int, size: int) -> np.ndarray:
    """(N,H,W,3) uint8: every ``every``-th of the first ``frames`` frames of a video (or one image),
    short side ``size``."""
    if not os.path.exists(source):
        raise MpistyleError(f"frame source not found: {source}")
    if frames < 1 or every < 1 or size < 16:
        raise MpistyleError("--frames and --every must be positive and --size at least 16")
    if os.path.splitext(source)[1].lower() in IMAGE_EXTS:
        picked = [load_image(source)]
    else:
        picked = read_video_frames(source)[:frames:every]
    return np.stack([resize_short(f, size) for f in picked])


def _painting_for(spec: str, style: str | None) -> str:
    from mpistyle import models

    if style:
        return style
    own = models.bundled_style_image(spec)
    if own is None:
        raise MpistyleError(f"--style is needed for {spec} (not a bundled style)")
    return own


def main(args: argparse.Namespace) -> int:
    from mpistyle import engine, models
    from mpistyle.training import reference, scores

    src = content_frames(args.frame_source, args.frames, args.every, args.size)
    specs = args.model or sorted(models.bundled_models())
    rows: list[tuple[str, str, dict[str, float]]] = []
    for spec in specs:
        painting_path = _painting_for(spec, args.style)
        painting = load_image(painting_path)
        stats = scores.Painting.of(painting)
        net = models.load_model(spec)
        out = engine.Stylizer(net, torch.device("cpu"), "auto")(src)
        rows.append((spec, painting_path, scores.style_scores(list(out), list(src), stats)))
        if args.reference:
            for w in reference.STYLE_WEIGHTS:
                t0 = time.monotonic()
                ref = reference.stylize_by_optimisation(src[0], painting, w, args.reference_steps)
                label = f"  optimisation, style weight {w:g} ({time.monotonic() - t0:.0f} s, first frame)"
                rows.append((label, painting_path, scores.style_scores([ref], [src[0]], stats)))
    h, w = src.shape[1:3]
    print(f"frames: {len(src)} of {args.frame_source} at {w}x{h}")
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'texture':>7}  {'palette':>7}  {'structure':>9}  {'grid':>5}  bars")
    for name, _painting, d in rows:
        verdict = ""
        if not name.startswith("  "):
            failed = [k for k, ok in scores.passes(d).items() if not ok]
            verdict = "pass" if not failed else "FAIL: " + ", ".join(failed)
        print(f"{name:{width}}  {d['texture']:7.3f}  {d['palette']:7.3f}  {d['structure']:9.3f}  {d['grid']:5.2f}"
              f"  {verdict}")
    print("bars: " + ", ".join(f"{k} {op} {v:g}" for k, (op, v) in scores.BARS.items())
          + " (texture and palette: 1 = the painting's statistics, 0 = the source's)")
    return 0
