"""PNG plots of a stylize run, and the temporal metrics that go into its JSON report.

Three plots, made with matplotlib's Agg backend (no display needed, safe on cluster nodes):

- ``warping_error.png``: Lai et al.'s warping error per consecutive frame pair, with the partition
  boundaries marked, so a seam between ranks shows as a spike on a marked line;
- ``timeline.png``: one lane per rank, coloured spans per phase (network, flow, fusion, waits,
  sends) from the report's ``events``, to see where ranks idle;
- ``strip.png``: evenly spaced source frames above the same frames stylized.

A pair index ``i`` means frames ``(i, i + 1)``; a boundary ``b`` (first frame of a partition) is
therefore drawn at pair ``b - 1``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .errors import MpistyleError, write_failure

logger = logging.getLogger(__name__)

# Phases of the timeline, in legend order, with fixed colours so plots of different runs compare.
# Waits are greys/reds: the eye should find idle time at once.
PHASE_COLOURS: dict[str, str] = {
    "network": "#1f77b4",
    "fuse": "#2ca02c",
    "send": "#9467bd",
    "flow": "#ff7f0e",
    "wait_flow": "#d62728",
    "wait_halo": "#8c564b",
    "wait_source": "#7f7f7f",
    "decode": "#17becf",
    "write": "#bcbd22",
    "encode": "#e377c2",
}
# Phases that run in helper threads beside the main loop (flow; rank 0's decoder and sink): drawn in
# a thinner band under it.
HELPER_PHASES = frozenset({"flow", "decode", "write", "encode"})

PLOT_FILES = ("warping_error.png", "timeline.png", "strip.png")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # never a GUI backend, whatever the user's matplotlibrc says
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    plt = _pyplot()
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        plt.close(fig)
        raise MpistyleError(f"cannot write {path}: directory {directory} does not exist")
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise write_failure(exc, path) from None
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------
# warping error


def plot_warping_error(per_pair: Sequence[float], boundaries: Sequence[int], path: str,
                       title: str = "") -> None:
    """Per-pair warping error (x 1e3) with partition boundaries as vertical lines at pair (b-1, b)."""
    plt = _pyplot()
    values = np.asarray(per_pair, dtype=np.float64) * 1e3
    x = np.arange(values.size)
    bounds = sorted({int(b) for b in boundaries if 0 < int(b) <= values.size})
    fig, ax = plt.subplots(figsize=(9, 3.6))
    if values.size:
        ax.plot(x, values, color="#1f77b4", lw=1.2, marker="." if values.size <= 200 else None, ms=4,
                label="pair (t, t+1)")
        interior = np.ones(values.size, bool)
        interior[[b - 1 for b in bounds]] = False
        if interior.any():
            ax.axhline(values[interior].mean(), color="#7f7f7f", ls=":", lw=1,
                       label=f"interior mean {values[interior].mean():.3g}")
    else:
        ax.text(0.5, 0.5, "fewer than two frames: no pairs", ha="center", va="center", transform=ax.transAxes)
    for i, b in enumerate(bounds):
        ax.axvline(b - 1, color="#d62728", ls="--", lw=1, label="partition boundary" if i == 0 else None)
        if b - 1 < values.size:
            ax.plot([b - 1], [values[b - 1]], "o", color="#d62728", ms=5)
    ax.set_xlabel("frame pair (t, t+1)")
    ax.set_ylabel("warping error (x 1e-3)")
    ax.set_xlim(-0.5, max(values.size - 0.5, 0.5))
    ax.set_ylim(bottom=0)
    ax.set_title(title or "Temporal warping error per frame pair")
    ax.grid(alpha=0.3)
    if values.size or bounds:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# timeline


def _events(entry: dict[str, Any]) -> list[tuple[str, float, float]]:
    out = []
    for ev in entry.get("events") or ():
        try:
            phase, t0, t1 = ev
            t0, t1 = float(t0), float(t1)
        except (TypeError, ValueError):
            continue
        if t1 >= t0:
            out.append((str(phase), t0, t1))
    return out


def plot_timeline(per_rank: list[dict], path: str) -> None:
    """One horizontal lane per rank with coloured spans per phase from each entry's ``events``.

    Main-thread phases fill the upper band of a lane; the helper thread's optical flow, which
    runs at the same time, a thinner band below it.
    """
    plt = _pyplot()
    ranks = sorted(per_rank, key=lambda e: int(e.get("rank", 0)))
    n = max(len(ranks), 1)
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.6 * n))
    seen: list[str] = []
    end = 0.0
    for lane, entry in enumerate(ranks):
        y = n - 1 - lane  # rank 0 on top
        spans: dict[str, list[tuple[float, float]]] = {}
        for phase, t0, t1 in _events(entry):
            spans.setdefault(phase, []).append((t0, max(t1 - t0, 1e-4)))
            end = max(end, t1)
        for phase, xs in spans.items():
            colour = PHASE_COLOURS.get(phase, "#000000")
            band = (y + 0.05, 0.25) if phase in HELPER_PHASES else (y + 0.35, 0.55)
            # A thin edge in the same colour keeps spans narrower than a pixel visible on long runs.
            ax.broken_barh(xs, band, facecolors=colour, edgecolors=colour, linewidth=0.3)
            if phase not in seen:
                seen.append(phase)
    order = [p for p in PHASE_COLOURS if p in seen] + [p for p in seen if p not in PHASE_COLOURS]
    handles = [plt.Rectangle((0, 0), 1, 1, color=PHASE_COLOURS.get(p, "#000000")) for p in order]
    labels = [f"{p} (helper thread)" if p in HELPER_PHASES else p for p in order]
    if handles:
        ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no events in the report", ha="center", va="center", transform=ax.transAxes)
    ax.set_yticks([n - 1 - i + 0.5 for i in range(len(ranks))])
    ax.set_yticklabels([f"rank {int(e.get('rank', i))}" for i, e in enumerate(ranks)])
    ax.set_ylim(0, n)
    ax.set_xlim(0, end * 1.01 if end > 0 else 1.0)
    ax.set_xlabel("seconds since the work started (after setup)")
    ax.set_title("Per-rank timeline")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# strip of source and stylized frames


def _pick(frames: Iterable[np.ndarray], wanted: Sequence[int]) -> dict[int, np.ndarray]:
    """Keep only the wanted frames of a stream (memory: the selection, not the video)."""
    want = set(wanted)
    last = max(want, default=-1)
    got: dict[int, np.ndarray] = {}
    it = iter(frames)
    try:
        for t, frame in enumerate(it):
            if t in want:
                got[t] = frame
            if t >= last:
                break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return got


def plot_strip(source_path: str, stylized_path: str, path: str, frames: Sequence[int] | None = None,
               n: int = 4) -> None:
    """Source frames (top row) above the same frames stylized (bottom row); evenly spaced by default."""
    from .io.media import iter_frames, probe

    plt = _pyplot()
    total = min(probe(source_path).n_frames, probe(stylized_path).n_frames)
    if total <= 0:
        raise MpistyleError(f"{source_path}: no frames to show")
    if frames is None:
        frames = sorted({int(round(x)) for x in np.linspace(0, total - 1, max(1, min(n, total)))})
    frames = [int(t) for t in frames]
    bad = [t for t in frames if not 0 <= t < total]
    if bad or not frames:
        raise MpistyleError(f"strip frames {bad or frames} are outside 0..{total - 1}")
    src = _pick(iter_frames(source_path), frames)
    out = _pick(iter_frames(stylized_path), frames)
    h, w = next(iter(src.values())).shape[:2]
    cols = len(frames)
    scale = min(3.2, 12.0 / cols) / w  # inches per pixel: a strip about 12 inches wide at most
    size = (max(cols * w * scale, 3.0), 2 * h * scale + 0.8)
    fig, axes = plt.subplots(2, cols, figsize=size, squeeze=False)
    for c, t in enumerate(frames):
        for r, (row, name) in enumerate(((src, "source"), (out, "stylized"))):
            ax = axes[r][c]
            if t in row:
                ax.imshow(row[t])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# temporal metrics and the whole set


def temporal_metrics(source_path: str, output_path: str, boundaries: Sequence[int]) -> dict[str, Any]:
    """Warping error (Lai et al.) of the output against the source's motion, boundary vs interior.

    Returns ``{"warping_error": mean over all pairs, "interior_mean", "boundary_mean",
    "boundary_to_interior", "boundaries", "per_pair", "flow"}`` (errors on [0, 1] RGB, not scaled).
    The cost is two DIS flows per frame pair at the source size (a few seconds per 100 frames at
    640x272 on one core).
    """
    from .metrics import evaluate

    result = evaluate(source_path, output_path, boundaries=list(boundaries))
    return {
        "warping_error": result["warping_error"],
        "interior_mean": result["interior_mean"],
        "boundary_mean": result["boundary_pairs"]["mean"],
        "boundary_to_interior": result["boundary_to_interior"],
        "boundaries": result["boundary_pairs"]["boundaries"],
        "per_pair": result["per_pair"],
        "flow": result["flow"],
    }


def _per_pair_from_report(report: dict[str, Any]) -> list[float] | None:
    """Warping errors already in a report: under "temporal_metrics" or "warping_error"."""
    for key in ("temporal_metrics", "warping_error"):
        value = report.get(key)
        if isinstance(value, dict) and isinstance(value.get("per_pair"), list):
            return [float(x) for x in value["per_pair"]]
        if isinstance(value, list) and all(isinstance(x, (int, float)) for x in value):
            return [float(x) for x in value]
    return None


def write_plots(report: dict[str, Any], source_path: str, output_path: str, directory: str) -> list[str]:
    """Write warping_error.png, timeline.png and strip.png into ``directory``; return their paths.

    Warping errors come from the report when it has them (see :func:`temporal_metrics`),
    otherwise they are computed here from the two videos.
    """
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise write_failure(exc, f"the plot directory {directory}") from None
    paths = [os.path.join(directory, name) for name in PLOT_FILES]
    boundaries = [int(b) for b in report.get("boundaries") or ()]
    per_pair = _per_pair_from_report(report)
    if per_pair is None:
        logger.info("computing warping errors of %s for the plot", output_path)
        per_pair = temporal_metrics(source_path, output_path, boundaries)["per_pair"]
    ranks = report.get("ranks")
    title = "Temporal warping error per frame pair"
    if ranks:
        title += f" ({ranks} rank{'s' if ranks != 1 else ''}, halo {report.get('halo', '?')})"
    plot_warping_error(per_pair, boundaries, paths[0], title=title)
    plot_timeline(list(report.get("per_rank") or []), paths[1])
    plot_strip(source_path, output_path, paths[2])
    return paths
