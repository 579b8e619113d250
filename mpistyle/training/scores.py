"""How far stylized frames moved toward the painting, and how much of the picture they kept (issue 28).

The four figures every bundled style is held to, on held-out frames (uint8 RGB, the size they were
stylized at). Each is a pure function; :func:`style_scores` computes all four for a batch of frames.

- :func:`texture_closeness` = 1 - d(output, painting) / d(source, painting). d is the mean, over VGG-19
  relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 (max pooling, caffe input), of
  ||G(x) - G(p)||_F / ||G(p)||_F with G = F F^T / (H W). 1: the output's texture statistics equal the
  painting's; 0: no move toward them; negative: away from them.
- :func:`palette_closeness`: the same ratio with d the sliced Wasserstein-1 distance of pixel colours in
  OpenCV's 8-bit CIELAB (20,000 pixels sampled with a fixed seed, 64 fixed random unit directions, the
  mean absolute difference of the sorted projections).
- :func:`structure_kept`: correlation of edge maps (luminance, 5x5 Gaussian blur, Sobel magnitude, 4x area
  downscale; both standardised, mean of their product).
- :func:`grid_levels`: per colour channel, the high-pass (minus a 5x5 box blur) averaged per pixel phase
  (y mod 4, x mod 4); the RMS of the 16 zero-mean phase means in the worst channel, in 8-bit levels.

The painting is scaled to :data:`PAINTING_LONG_SIDE` px on its long side before its statistics are taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import torch

TEXTURE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
PAINTING_LONG_SIDE = 512
PALETTE_PIXELS = 20_000
PALETTE_DIRECTIONS = 64
SEED = 0

# The bars of issue 28 for a bundled style, on held-out frames: name -> (comparison, value).
BARS = {"texture": (">=", 0.45), "palette": (">=", 0.25), "structure": (">=", 0.70), "grid": ("<=", 1.0)}


def luminance(img: np.ndarray) -> np.ndarray:
    """(H,W) float32 BT.601 luma of an (H,W,3) uint8 RGB image."""
    f = img.astype(np.float32)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def resize_long(img: np.ndarray, long_side: int = PAINTING_LONG_SIDE) -> np.ndarray:
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(img, (round(w * s), round(h * s)), interpolation=interp))


# -- structure and grid ---------------------------------------------------------------------------


def edge_map(img: np.ndarray) -> np.ndarray:
    """Luminance, 5x5 Gaussian blur, Sobel gradient magnitude, 4x area downscale: (H/4, W/4) float32."""
    y = cv2.GaussianBlur(luminance(img), (5, 5), 0, borderType=cv2.BORDER_REFLECT)
    gx = cv2.Sobel(y, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
    gy = cv2.Sobel(y, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
    mag = cv2.magnitude(gx, gy)
    h, w = mag.shape
    return cv2.resize(mag, (max(1, w // 4), max(1, h // 4)), interpolation=cv2.INTER_AREA)


def structure_kept(output: np.ndarray, source: np.ndarray) -> float:
    """Correlation of the standardised edge maps of ``output`` and ``source`` (same size)."""
    if output.shape != source.shape:
        raise ValueError(f"structure_kept: shapes differ {output.shape} vs {source.shape}")
    a = edge_map(output).astype(np.float64).ravel()
    b = edge_map(source).astype(np.float64).ravel()
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return 0.0
    return float(np.mean((a - a.mean()) / sa * (b - b.mean()) / sb))


def grid_levels(img: np.ndarray, period: int = 4) -> float:
    """RMS (8-bit levels) of the period-``period`` phase means of the high-pass, worst channel."""
    f = img.astype(np.float32)
    h, w = f.shape[:2]
    h, w = h - h % period, w - w % period
    f = f[:h, :w]
    hp = f - cv2.blur(f, (5, 5), borderType=cv2.BORDER_REFLECT)
    pat = hp.reshape(h // period, period, w // period, period, -1).mean(axis=(0, 2), dtype=np.float64)
    pat = pat - pat.mean(axis=(0, 1), keepdims=True)
    return float(np.sqrt((pat**2).mean(axis=(0, 1))).max())


# -- palette --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _directions() -> np.ndarray:
    d = np.random.default_rng(SEED).normal(size=(PALETTE_DIRECTIONS, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def lab_sample(img: np.ndarray, n: int = PALETTE_PIXELS) -> np.ndarray:
    """``n`` pixels (fixed seed, with replacement) of ``img`` in OpenCV's 8-bit CIELAB, float (n,3)."""
    lab = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)
    idx = np.random.default_rng(SEED).integers(0, len(lab), size=n)
    return lab[idx]


def sorted_projections(img: np.ndarray) -> np.ndarray:
    """(directions, pixels) sorted projections of the image's Lab sample: what the distance compares."""
    return np.sort(lab_sample(img) @ _directions().T, axis=0).T


def palette_distance(a: np.ndarray, b_proj: np.ndarray) -> float:
    """Sliced Wasserstein-1 distance between ``a``'s colours and precomputed sorted projections."""
    return float(np.abs(sorted_projections(a) - b_proj).mean())


# -- texture --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _vgg() -> torch.nn.Module:
    from mpistyle.training.losses import VGG19Features

    return VGG19Features(TEXTURE_LAYERS, pool="max").eval()


def _grams(img: np.ndarray) -> list[torch.Tensor]:
    """G = F F^T / (H W) per texture layer, float64 (C,C)."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        feats = _vgg()(x)
    out = []
    for name in TEXTURE_LAYERS:
        f = feats[name][0].double()
        c, h, w = f.shape
        m = f.reshape(c, h * w)
        out.append(m @ m.T / (h * w))
    return out


def texture_distance(grams: Sequence[torch.Tensor], painting: Sequence[torch.Tensor]) -> float:
    return float(np.mean([float(torch.linalg.norm(g - p) / torch.linalg.norm(p))
                          for g, p in zip(grams, painting, strict=True)]))


@dataclass(frozen=True)
class Painting:
    """A painting's statistics, taken once: its Gram matrices and its sorted colour projections."""

    grams: tuple[torch.Tensor, ...]
    palette: np.ndarray

    @classmethod
    def of(cls, image: np.ndarray) -> Painting:
        small = resize_long(image)
        return cls(tuple(_grams(small)), sorted_projections(small))


def texture_closeness(output: np.ndarray, source: np.ndarray, painting: Painting) -> float:
    d_src = texture_distance(_grams(source), painting.grams)
    return 1.0 - texture_distance(_grams(output), painting.grams) / d_src


def palette_closeness(output: np.ndarray, source: np.ndarray, painting: Painting) -> float:
    return 1.0 - palette_distance(output, painting.palette) / palette_distance(source, painting.palette)


def style_scores(outputs: Sequence[np.ndarray], sources: Sequence[np.ndarray], painting: Painting) -> dict[str, float]:
    """Mean texture, palette, structure and grid over frames (``outputs[i]`` stylizes ``sources[i]``)."""
    if len(outputs) != len(sources) or not len(outputs):
        raise ValueError("style_scores: give as many outputs as sources, at least one")
    pairs = list(zip(outputs, sources, strict=True))
    return {
        "texture": float(np.mean([texture_closeness(o, s, painting) for o, s in pairs])),
        "palette": float(np.mean([palette_closeness(o, s, painting) for o, s in pairs])),
        "structure": float(np.mean([structure_kept(o, s) for o, s in pairs])),
        "grid": float(np.mean([grid_levels(o) for o in outputs])),
    }


def passes(scores: dict[str, float]) -> dict[str, bool]:
    """Which of :data:`BARS` the scores pass."""
    return {k: (scores[k] >= v if op == ">=" else scores[k] <= v) for k, (op, v) in BARS.items()}


# Each bar's scale: how far from passing counts as one unit of shortfall.
_SCALE = {"texture": 0.1, "palette": 0.1, "structure": 0.05, "grid": 0.5}


def shortfall(scores: dict[str, float]) -> float:
    """How far the scores are from passing every bar of :data:`BARS` (0 = all pass), in units of each
    bar's scale; checkpoint selection minimises it."""
    total = 0.0
    for k, (op, v) in BARS.items():
        gap = v - scores[k] if op == ">=" else scores[k] - v
        total += max(0.0, gap) / _SCALE[k]
    return total


def better(scores: dict[str, float], best: dict[str, float] | None) -> bool:
    """Whether a checkpoint's held-out ``scores`` beat the best so far: nearer to passing every bar, then
    further toward the painting (texture plus palette closeness). Records without these scores (from
    before 0.5) are always beaten."""
    if best is None or "texture" not in best or "shortfall" not in best:
        return True
    toward = scores["texture"] + scores["palette"]
    return (scores["shortfall"], -toward) < (best["shortfall"], -(best["texture"] + best["palette"]))
