"""Picture scores of a stylized frame against its source: structure kept, the period-4 grid, PSNR.

Pure functions on uint8 RGB frames (NumPy and OpenCV only), used by ``mpistyle quality`` and by
``mpistyle train --score-on`` (score every checkpoint on held-out frames, keep the best).

- :func:`structure`: how much of the source's shape survives. Both frames' luminance edges (Sobel
  gradient magnitude) are blurred (Gaussian, sigma 3 px, so brush strokes and texture do not count,
  only where the edges are) and correlated (Pearson). 1 = the same edges in the same places.
- :func:`grid_amplitude`: the fine grid a stride-4 network prints. Each colour channel's high-pass
  (the frame minus its 4x4 box mean, which holds no period-4 component, so all of it passes) is
  averaged per pixel phase (y mod 4, x mod 4) over the whole frame, so only what repeats every 4
  pixels survives; the RMS over the 16 phases of the largest
  channel, in 8-bit levels. Big Buck Bunny's frames are about 0.34.
- :func:`psnr`: peak signal-to-noise ratio in dB; a stylized frame that is just the source has a
  high one (the bars want it below 18 dB, i.e. the style did change the picture).

The bars a bundled style must pass on held-out frames are :data:`BARS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

PERIOD = 4
EDGE_BLUR_SIGMA = 3.0
HIGHPASS_BOX = PERIOD  # a PERIODxPERIOD box mean cancels any period-PERIOD pattern exactly

# Bars of issue 22 for a bundled style, on held-out frames: (name, comparison, value).
BARS = {"structure": (">=", 0.70), "grid": ("<=", 1.0), "psnr": ("<", 18.0)}


def luminance(img: np.ndarray) -> np.ndarray:
    """(H,W) float32 BT.601 luma of an (H,W,3) uint8 RGB image."""
    f = img.astype(np.float32)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def blurred_edges(img: np.ndarray, sigma: float = EDGE_BLUR_SIGMA) -> np.ndarray:
    """Gaussian-blurred Sobel gradient magnitude of the luminance, (H,W) float32."""
    y = luminance(img)
    gx = cv2.Sobel(y, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
    gy = cv2.Sobel(y, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
    mag = cv2.magnitude(gx, gy)
    return cv2.GaussianBlur(mag, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def structure(output: np.ndarray, source: np.ndarray) -> float:
    """Pearson correlation of the blurred luminance edges of ``output`` and ``source`` (same size)."""
    if output.shape != source.shape:
        raise ValueError(f"structure: shapes differ {output.shape} vs {source.shape}")
    a = blurred_edges(output).ravel().astype(np.float64)
    b = blurred_edges(source).ravel().astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else 0.0


def grid_pattern(img: np.ndarray, period: int = PERIOD) -> np.ndarray:
    """(period, period, C) mean high-pass per pixel phase (y mod period, x mod period), zero-mean."""
    f = img.astype(np.float32)
    if f.ndim == 2:
        f = f[..., None]
    h, w = f.shape[:2]
    h, w = h - h % period, w - w % period
    f = f[:h, :w]
    hp = f - cv2.blur(f, (HIGHPASS_BOX, HIGHPASS_BOX), borderType=cv2.BORDER_REFLECT).reshape(f.shape)
    pat = hp.reshape(h // period, period, w // period, period, -1).mean(axis=(0, 2), dtype=np.float64)
    return pat - pat.mean(axis=(0, 1), keepdims=True)


def grid_amplitude(img: np.ndarray, period: int = PERIOD) -> float:
    """RMS amplitude (8-bit levels) of the period-``period`` grid of the largest colour channel."""
    pat = grid_pattern(img, period)
    return float(np.sqrt((pat**2).mean(axis=(0, 1))).max())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when equal)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def picture_scores(outputs: Sequence[np.ndarray], sources: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean structure, grid and PSNR over frames (outputs[i] stylizes sources[i])."""
    if len(outputs) != len(sources) or not len(outputs):
        raise ValueError("picture_scores: give as many outputs as sources, at least one")
    return {
        "structure": float(np.mean([structure(o, s) for o, s in zip(outputs, sources, strict=True)])),
        "grid": float(np.mean([grid_amplitude(o) for o in outputs])),
        "psnr": float(np.mean([psnr(o, s) for o, s in zip(outputs, sources, strict=True)])),
    }


def passes(scores: dict[str, float]) -> dict[str, bool]:
    """Which of :data:`BARS` the scores pass."""
    out = {}
    for k, (op, v) in BARS.items():
        x = scores[k]
        out[k] = x >= v if op == ">=" else (x <= v if op == "<=" else x < v)
    return out


def shortfall(scores: dict[str, float]) -> float:
    """How far the scores are from passing every bar (0 = all pass), in units of each bar's scale."""
    s = max(0.0, BARS["structure"][1] - scores["structure"]) / 0.1
    s += max(0.0, scores["grid"] - BARS["grid"][1]) / 1.0
    s += max(0.0, scores["psnr"] - BARS["psnr"][1] + 1e-9) / 2.0
    return s


def median3(img: np.ndarray) -> np.ndarray:
    """3x3 median filter per channel (Johnson's and Ruder's inference default), uint8 in and out."""
    return cv2.medianBlur(np.ascontiguousarray(img), 3)
