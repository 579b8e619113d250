"""Optical flow backends, backward warping and the forward-backward certainty mask.

Conventions (OpenCV's): ``flow = est.flow(src, dst)`` means ``src(x) ~ dst(x + flow(x))``, so
``warp(dst, flow)`` brings ``dst`` into ``src``'s frame of reference. ``flow[..., 0]`` is the x
(column) component, ``flow[..., 1]`` the y (row) component, in pixels.

Everything here is deterministic given its inputs (no random state, no reuse of the previous
call's flow as initialisation), which the resumable fusion in :mod:`mpistyle.temporal.chains` relies on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from mpistyle.errors import MpistyleError

logger = logging.getLogger(__name__)

DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
FLOW_METHODS = ("dis", "farneback")
# The fusion's DIS preset. "medium" since 0.5 (issue 30, docs/flicker.md): on held-out fast motion (bikes) with the
# 0.5 styles it left 0.39 of the added flicker where "fast" left 0.43, scored with an independent Farneback flow,
# and kept more of the structure (0.79 against 0.77); about 3x fast's flow time, small beside the network on a CPU.
DEFAULT_DIS_PRESET = "medium"

# Farneback parameters of the Galatic thesis' ``--fast`` setting.
_FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5,
              "poly_sigma": 1.2, "flags": 0}

_DIS_MIN_SIDE = 16  # DIS needs frames of a few 8-px patches; smaller ones are padded

# Width of the min-filter applied to the certainty mask used for fusion. Ruder et al. use 7; 1 (none) is
# measured better (issue 30): on held-out bikes (64 frames, 320x136, 0.4's starry-night) 98 % of the flicker the
# default mode left came from the 21 % of the metric's valid pixels that the fusion mask rejected, and most of
# those were rejected by the 7x7 erosion alone, not by the forward-backward check. Without it the added flicker
# fell from 0.33 to 0.24 (DIS-medium metric) and from 0.13 to 0.00 (Farneback metric), structure kept unchanged.
# Pixels the check rejects still take the per-frame output exactly.
MASK_MIN_FILTER = 1


class FlowEstimator:
    """Dense optical flow between two grey frames.

    One instance holds one OpenCV object (DIS creation allocates its pyramids), so reuse it
    across frames. It is not thread-safe: give each thread its own estimator.
    """

    def __init__(self, method: str = "dis", preset: str = DEFAULT_DIS_PRESET) -> None:
        method = method.lower()
        if method not in FLOW_METHODS:
            raise MpistyleError(f"unknown flow method {method!r} (choose from {', '.join(FLOW_METHODS)})")
        self.method = method
        self.preset = preset.lower()
        self._dis = None
        if method == "dis":
            if self.preset not in DIS_PRESETS:
                raise MpistyleError(
                    f"unknown DIS preset {preset!r} (choose from {', '.join(DIS_PRESETS)})")
            self._dis = cv2.DISOpticalFlow_create(DIS_PRESETS[self.preset])

    def __repr__(self) -> str:
        return f"FlowEstimator(method={self.method!r}, preset={self.preset!r})"

    def flow(self, src_gray: np.ndarray, dst_gray: np.ndarray) -> np.ndarray:
        """(H, W, 2) float32 flow with ``src(x) ~ dst(x + flow(x))``."""
        for name, img in (("src_gray", src_gray), ("dst_gray", dst_gray)):
            if img.dtype != np.uint8 or img.ndim != 2:
                raise ValueError(f"{name} must be a uint8 (H, W) grey image, got {img.dtype} {img.shape}")
        if src_gray.shape != dst_gray.shape:
            raise MpistyleError(f"flow between frames of different sizes {src_gray.shape} and {dst_gray.shape}")
        src_gray, dst_gray = np.ascontiguousarray(src_gray), np.ascontiguousarray(dst_gray)
        h, w = src_gray.shape
        if self._dis is not None:
            if h < _DIS_MIN_SIDE or w < _DIS_MIN_SIDE:
                # DIS rejects frames smaller than a few patches: pad (replicate) and crop the flow back.
                pad = ((0, max(0, _DIS_MIN_SIDE - h)), (0, max(0, _DIS_MIN_SIDE - w)))
                out = self._dis.calc(np.pad(src_gray, pad, mode="edge"), np.pad(dst_gray, pad, mode="edge"), None)
                out = out[:h, :w]
            else:
                out = self._dis.calc(src_gray, dst_gray, None)
        else:
            out = cv2.calcOpticalFlowFarneback(src_gray, dst_gray, None, **_FARNEBACK)
        return np.ascontiguousarray(out, dtype=np.float32)


def to_gray(frame: np.ndarray) -> np.ndarray:
    """uint8 (H, W) luma of an RGB uint8 frame (a grey frame is returned as is)."""
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8, got {frame.dtype}")
    if frame.ndim == 2:
        return frame
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be (H, W, 3) RGB, got shape {frame.shape}")
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> np.ndarray:
    """(H, W, 2) float32 pixel coordinates (x, y); cached because every warp needs one."""
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    grid = np.stack([xs, ys], axis=-1)
    grid.setflags(write=False)
    return grid


@lru_cache(maxsize=8)
def _grid_xy(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The x and y planes of :func:`_grid`, each C-contiguous (H, W)."""
    grid = _grid(height, width)
    xs, ys = np.ascontiguousarray(grid[..., 0]), np.ascontiguousarray(grid[..., 1])
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def _check_flow(flow: np.ndarray, shape: tuple[int, ...]) -> None:
    if flow.ndim != 3 or flow.shape[2] != 2 or flow.shape[:2] != shape[:2]:
        raise ValueError(f"flow of shape {flow.shape} does not fit an image of shape {shape}")


WARP_INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


def warp(image: np.ndarray, flow: np.ndarray, interpolation: str = "linear") -> np.ndarray:
    """Backward warp: ``out(x) = image(x + flow(x))``, border replicate, same dtype.

    ``linear`` (bilinear; the metrics' warp) or ``cubic`` (Keys' bicubic, a = -0.75, as OpenCV computes it
    for 8-bit images in OpenCV 5: float32 weights at the exact sub-pixel position, rows then columns; the
    fusion carries its state with it, because a bilinear warp softens the state a little more every frame).
    """
    _check_flow(flow, image.shape)
    if image.dtype not in (np.uint8, np.float32):
        raise ValueError(f"warp supports uint8 and float32 images, got {image.dtype}")
    if interpolation not in WARP_INTERPOLATIONS:
        raise ValueError(f"unknown warp interpolation {interpolation!r} (choose linear or cubic)")
    maps = _grid(*image.shape[:2]) + flow.astype(np.float32, copy=False)
    out = cv2.remap(image, maps, None, interpolation=WARP_INTERPOLATIONS[interpolation],
                    borderMode=cv2.BORDER_REPLICATE)
    # remap drops a trailing channel axis of size 1; keep the caller's shape.
    return out.reshape(image.shape)


def certainty_mask(flow_fw: np.ndarray, flow_bw: np.ndarray, motion_boundaries: bool = True) -> np.ndarray:
    """Ruder et al.'s forward-backward check, float32 (H, W) in {0, 1}, for ``flow_fw``'s pixels.

    ``flow_fw`` maps frame A to B and ``flow_bw`` maps B back to A. A pixel x of A is unreliable
    (0) if x + w leaves the frame, if ``|w + w^|^2 > 0.01 (|w|^2 + |w^|^2) + 0.5`` with w^ the
    backward flow sampled at x + w (occlusion), or, with ``motion_boundaries``, if
    ``|grad u|^2 + |grad v|^2 > 0.01 |w|^2 + 0.002``.
    """
    _check_flow(flow_fw, flow_bw.shape)
    flow_fw = np.ascontiguousarray(flow_fw, dtype=np.float32)
    h, w = flow_fw.shape[:2]
    # Work on separate 2-D channels: much faster than reductions over a trailing axis of 2.
    u, v = cv2.split(flow_fw)
    gx, gy = _grid_xy(h, w)
    x, y = gx + u, gy + v
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    bu, bv = cv2.split(warp(np.ascontiguousarray(flow_bw, dtype=np.float32), flow_fw))
    fw_sq = u * u + v * v
    su, sv = u + bu, v + bv
    ok = inside & (su * su + sv * sv <= np.float32(0.01) * (fw_sq + bu * bu + bv * bv) + np.float32(0.5))
    if motion_boundaries:
        # Central differences (replicated border), as in Ruder et al.'s consistency checker.
        grad_sq = np.zeros((h, w), np.float32)
        for comp in (u, v):
            for dx, dy in ((1, 0), (0, 1)):
                d = cv2.Sobel(comp, cv2.CV_32F, dx, dy, ksize=1, scale=0.5, borderType=cv2.BORDER_REPLICATE)
                grad_sq += d * d
        ok &= grad_sq <= np.float32(0.01) * fw_sq + np.float32(0.002)
    return ok.astype(np.float32)


@dataclass
class PairFlow:
    """Everything needed to carry frame t-1 into frame t."""

    flow_back: np.ndarray  # (H, W, 2) flow t -> t-1: warp(out_{t-1}, flow_back) is aligned with frame t
    mask: np.ndarray  # (H, W) float32 certainty of flow_back (fw-bw check, min-filtered)
    confidence: float  # mean(mask): collapses at scene cuts


def pair_flow(est: FlowEstimator, prev_gray: np.ndarray, cur_gray: np.ndarray,
              min_filter: int = MASK_MIN_FILTER, motion_boundaries: bool = True) -> PairFlow:
    """Flow from the current frame back to the previous one, with its certainty mask.

    Two flow calls (t -> t-1 and t-1 -> t). ``min_filter`` is the width of the erosion applied
    to the mask (Ruder et al.: 7; 1 or less disables it).
    """
    flow_back = est.flow(cur_gray, prev_gray)
    flow_fwd = est.flow(prev_gray, cur_gray)
    mask = erode_mask(certainty_mask(flow_back, flow_fwd, motion_boundaries=motion_boundaries), min_filter)
    return PairFlow(flow_back=flow_back, mask=mask, confidence=mask_confidence(mask))


def erode_mask(mask: np.ndarray, width: int = MASK_MIN_FILTER) -> np.ndarray:
    """Min-filter of ``width`` x ``width`` (anchor at the centre); ``width`` <= 1 returns ``mask`` itself."""
    if width <= 1:
        return mask
    # Erosion with a replicated border: the frame edge itself is not a reason to distrust.
    return cv2.erode(mask, np.ones((width, width), np.uint8), borderType=cv2.BORDER_REPLICATE)


def mask_confidence(mask: np.ndarray) -> float:
    """Scene-cut score: the mean of the mask (float32 mean, as a Python float)."""
    return float(mask.mean())
