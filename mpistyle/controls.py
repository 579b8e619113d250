"""Look controls applied to the network's output, per frame, before temporal fusion (issue 29).

``--style-strength S``, ``--keep-colors`` and ``--stroke-scale K|auto`` work for any fast_neural_style
model: they need nothing from the network but its output. They are pure functions of the source frame
and the stylized frame, written with torch ops only (the same code on CPU and CUDA), all local (box
filters, pointwise colour maps, resizes): no reduction over the whole frame, so a frame's result does
not depend on the thread count, and N ranks give the bits of 1 rank.

Frames are (N, 3, H, W) float32 tensors in 0..255 here; :func:`apply_controls` takes and returns uint8
(N, H, W, 3) as the network does. The order is: stroke scale (the network ran on the frame scaled by
1/K; back to full size with the fine detail of a full-size pass or of the source), keep colours, style
strength (last, so S = 0 returns the source).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Strokes relate to the frame as they do at this short side (the size the bundled styles are judged at,
# and near the 256-px crops they were trained on): --stroke-scale auto = short side / 360, at least 1.
AUTO_STROKE_SHORT_SIDE = 360
# Where the fine detail of a stroke-scaled frame comes from (docs/controls.md): "painted", the network's own
# fine strokes from a second, full-size pass (two scales: the big strokes' low frequencies plus the
# full-size stylization's high ones; texture at 1080p 0.51 against 0.17 for the upscale alone, at 1 + 1/K^2
# the network's cost of K = 1), or "source", the source's detail by guided upsampling (the network at 1/K
# only: K^2 times cheaper, but the painted texture is soft).
STROKE_DETAILS = ("painted", "source")
STROKE_DETAIL = "painted"
# The two scales meet at a Gaussian of sigma = K output pixels: the small pass's strokes below it, the full
# pass's above (measured at K = 3: sigma 1.5 gave texture 0.44, 3 gave 0.51, 6 gave 0.51 with the big
# strokes fading at 1:1; by eye 3 keeps both).
DETAIL_SIGMA_PER_K = 1.0
# Guided detail restoration (stroke scale): box radius at the network's size and the regulariser on
# [0,1] intensities (about 3 levels of standard deviation: flat areas keep the painted look).
GUIDED_RADIUS = 2
GUIDED_EPS = 1e-3
# Structure-aware strength: base radius at the output size (pixels) and how fast the strokes come in.
BASE_RADIUS = 4
DETAIL_GAMMA = 0.5
STRENGTH_METHODS = ("pixel", "structure")
# Chosen by measurement (docs/controls.md): the pixel blend dips below the source's texture closeness at low S
# (not monotonic) and gives less texture at the same structure kept.
STRENGTH_METHOD = "structure"
COLOR_SPACES = ("lab", "yuv")
# Chosen by measurement (docs/controls.md): CIELAB keeps a* and b* within the bound, YUV does not.
KEEP_COLORS_SPACE = "lab"


# -- parsing ----------------------------------------------------------------------------------------
def parse_style_strength(text: str) -> float:
    """``--style-strength``: a number in [0, 1]; ValueError otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise ValueError(f"must be between 0 and 1: {text}")
    return value


def parse_stroke_scale(text: str) -> float | str:
    """``--stroke-scale``: ``auto`` or a number >= 1 (the frame is scaled by 1/K for the network)."""
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number >= 1 or auto, got {text!r}") from None
    if not 1.0 <= value <= 64.0:
        raise ValueError(f"must be between 1 and 64, or auto: {text}")
    return value


def resolve_stroke_scale(spec: float | str, height: int, width: int) -> float:
    """K for this frame size: ``auto`` = short side / 360 (at least 1), a number as given, rounded to
    1/1000 so the buffer records one exact value."""
    k = max(1.0, min(height, width) / AUTO_STROKE_SHORT_SIDE) if spec == "auto" else float(spec)
    return round(k, 3)


def network_size(height: int, width: int, k: float) -> tuple[int, int]:
    """The (height, width) the network paints the strokes at for stroke scale ``k`` (at least 8 x 8)."""
    if k == 1.0:
        return height, width
    return max(8, round(height / k)), max(8, round(width / k))


# -- settings ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Controls:
    """The look controls of a job (every rank the same); the defaults are today's behaviour."""

    style_strength: float = 1.0
    keep_colors: bool = False
    stroke_scale: float = 1.0  # resolved (auto already turned into a number for the frame size)
    stroke_detail: str = STROKE_DETAIL  # STROKE_DETAILS; only used where stroke_scale > 1
    strength_method: str = STRENGTH_METHOD
    color_space: str = KEEP_COLORS_SPACE

    @property
    def identity(self) -> bool:
        """True when the network's output passes unchanged (the path of earlier versions)."""
        return self.style_strength == 1.0 and not self.keep_colors and self.stroke_scale == 1.0

    def settings(self) -> dict[str, Any]:
        """What the buffer records: a resume with other choices is refused (``buffer.py``)."""
        return {"style_strength": self.style_strength, "keep_colors": self.keep_colors,
                "stroke_scale": self.stroke_scale, "stroke_detail": self.stroke_detail}

    def describe(self) -> str:
        detail = f" ({self.stroke_detail} detail)" if self.stroke_scale > 1.0 else ""
        return (f"style strength {self.style_strength:g}, keep colors {'on' if self.keep_colors else 'off'}, "
                f"stroke scale {self.stroke_scale:g}{detail}")

    def network_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The (height, width) sizes the network runs at for frames of this size, largest first."""
        small = network_size(height, width, self.stroke_scale)
        if small == (height, width):
            return [small]
        return [(height, width), small] if self.stroke_detail == "painted" else [small]


# -- filters ----------------------------------------------------------------------------------------
def box(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window, borders reflected (replicated where the frame is too small)."""
    if r <= 0:
        return x
    h, w = x.shape[-2:]
    mode = "reflect" if h > r and w > r else "replicate"
    return F.avg_pool2d(F.pad(x, (r, r, r, r), mode=mode), 2 * r + 1, stride=1)


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 luma (N,1,H,W) of (N,3,H,W) RGB, same scale."""
    return 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]


def downscale(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area average to ``size`` (H, W): what the network sees at stroke scale K."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="area")


def upscale(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius ceil(3 sigma), borders reflected or, where the frame is too small,
    replicated), as a sum of shifted copies: each output is the same fixed-order sum whatever the thread
    count (a convolution kernel's blocking may differ), so N ranks keep the bits of 1 rank."""
    r = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-r, r + 1, dtype=torch.float64)
    weights = torch.exp(-taps * taps / (2 * sigma * sigma))
    weights = (weights / weights.sum()).tolist()
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 0, r, r), mode="reflect" if h > r else "replicate")
    x = sum(wt * x[..., i:i + h, :] for i, wt in enumerate(weights))
    x = F.pad(x, (r, r, 0, 0), mode="reflect" if w > r else "replicate")
    return sum(wt * x[..., i:i + w] for i, wt in enumerate(weights))


def two_scale(stylized_small: torch.Tensor, stylized_full: torch.Tensor, k: float,
              sigma_per_k: float = DETAIL_SIGMA_PER_K) -> torch.Tensor:
    """Big strokes with painted fine detail: the stroke-scaled stylization (upscaled bicubically) below a
    Gaussian of sigma = K output pixels, the full-size stylization above it. (N,3,H,W), 0..255."""
    big = upscale(stylized_small, tuple(stylized_full.shape[-2:]), mode="bicubic")
    # blur(big) + full - blur(full), with one blur
    return stylized_full + gaussian_blur(big - stylized_full, sigma_per_k * k)


def guided_slope(guide: torch.Tensor, p: torch.Tensor, r: int, eps: float) -> torch.Tensor:
    """The guided filter's smoothed local slope mean(a) of ``p`` against ``guide`` (He et al., 2013):
    how much of a change in the guide each channel of ``p`` follows, in (2r+1)^2 windows."""
    mean_i, mean_p = box(guide, r), box(p, r)
    cov = box(guide * p, r) - mean_i * mean_p
    var = box(guide * guide, r) - mean_i * mean_i
    return box(cov / (var + eps), r)


def guided_restore(stylized_small: torch.Tensor, source: torch.Tensor, source_small: torch.Tensor,
                   r: int = GUIDED_RADIUS, eps: float = GUIDED_EPS) -> torch.Tensor:
    """Stylized frame computed at a smaller size -> the full size, with the source's detail restored.

    The stylized frame is upscaled (bilinear: its strokes keep their size), then the detail the network
    never saw (the full-size source minus its upscaled small copy, in luma) is added, weighted per
    channel by how the stylized frame follows the source's luma locally (the guided filter's slope,
    computed at the small size: edge-aware, cheap). Where the style ignores the source (flat painted
    areas) little detail comes back; where it follows the source's edges, they come back sharp.
    All inputs (N,3,H,W) in 0..255; returns the full size.
    """
    size = tuple(source.shape[-2:])
    g_small = luma(source_small) / 255.0
    slope = guided_slope(g_small, stylized_small / 255.0, r, eps)
    detail = luma(source) - upscale(luma(source_small), size)
    return upscale(stylized_small, size) + upscale(slope, size) * detail


# -- colours ----------------------------------------------------------------------------------------
# OpenCV's 8-bit CIELAB (D65 white, sRGB companding): L*255/100, a+128, b+128.
_RGB2XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
_WHITE = (0.950456, 1.0, 1.088754)


def _srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055).clamp_min(0) ** 2.4)


def _linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    c = c.clamp(0, 1)
    return torch.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """3x3 colour matrix on (N,3,H,W), as three pointwise sums (no reduction across pixels)."""
    m = m.to(x.device, x.dtype)
    return torch.cat([m[i, 0] * x[:, 0:1] + m[i, 1] * x[:, 1:2] + m[i, 2] * x[:, 2:3] for i in range(3)], 1)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) RGB 0..255 -> CIELAB scaled as OpenCV's 8-bit Lab (L 0..255, a and b offset by 128)."""
    xyz = _mix(_RGB2XYZ, _srgb_to_linear(rgb / 255.0))
    white = torch.tensor(_WHITE, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    t = xyz / white
    d = 6.0 / 29.0
    f = torch.where(t > d ** 3, t.clamp_min(1e-12) ** (1 / 3), t / (3 * d * d) + 4.0 / 29.0)
    lum = 116.0 * f[:, 1:2] - 16.0
    a = 500.0 * (f[:, 0:1] - f[:, 1:2])
    b = 200.0 * (f[:, 1:2] - f[:, 2:3])
    return torch.cat([lum * 255.0 / 100.0, a + 128.0, b + 128.0], 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab` (RGB 0..255, out-of-gamut colours clipped)."""
    return _linear_to_srgb(_lab_to_linear(lab)) * 255.0


def _lab_to_linear(lab: torch.Tensor) -> torch.Tensor:
    """OpenCV-scaled CIELAB -> linear RGB 0..1, not clipped (out of gamut: below 0 or above 1)."""
    lum = lab[:, 0:1] * 100.0 / 255.0
    fy = (lum + 16.0) / 116.0
    fx = fy + (lab[:, 1:2] - 128.0) / 500.0
    fz = fy - (lab[:, 2:3] - 128.0) / 200.0
    d = 6.0 / 29.0
    f = torch.cat([fx, fy, fz], 1)
    t = torch.where(f > d, f ** 3, 3 * d * d * (f - 4.0 / 29.0))
    white = torch.tensor(_WHITE, device=lab.device, dtype=lab.dtype).view(1, 3, 1, 1)
    return _mix(torch.linalg.inv(_RGB2XYZ.double()).float(), t * white)


# Lightness steps toward the source's where the stylized lightness with the source's chroma is out of
# the sRGB gamut: 8 halvings leave L within 1/256 of the range (below a level).
GAMUT_STEPS = 8
# How much of the lightness move that would bring a pixel into the gamut is made (the rest is clipped):
# all of it keeps the chroma within 0.5 but flattens the strokes' lightness (measured: luminance texture
# closeness 0.048 against the stylized 0.124, starry-night, 640x360); none keeps the lightness but moves b*
# by 6 (128x72). 0.65: b* 2.45, a* 0.59 (starry-night, 128x72): within the bound of 3, most lightness kept.
GAMUT_PULL = 0.65


def _in_gamut(lab: torch.Tensor) -> torch.Tensor:
    lin = _lab_to_linear(lab)
    return ((lin >= -1e-3) & (lin <= 1.0 + 1e-3)).all(dim=1, keepdim=True)


def lab_transfer(src: torch.Tensor, sty: torch.Tensor, pull: float | None = None) -> torch.Tensor:
    """The stylized L* with the source's a* b* (OpenCV-scaled CIELAB), as RGB 0..255.

    Clipping an out-of-gamut colour per RGB channel would change its chroma (measured: mean |db*| 6.1 for
    starry-night over Big Buck Bunny's saturated sky and grass), so where the pair is out of the gamut its
    lightness moves toward the source's (which is in gamut with that chroma), :data:`GAMUT_PULL` of the way
    that makes it fit (found by bisection per pixel, :data:`GAMUT_STEPS` halvings, pointwise: no reduction
    across pixels); what is left out of the gamut is clipped.
    """
    l_sty, l_src, chroma = sty[:, 0:1], src[:, 0:1], src[:, 1:3]
    lo = torch.zeros_like(l_sty)
    hi = torch.ones_like(l_sty)
    fits = _in_gamut(torch.cat([l_sty, chroma], 1))
    hi = torch.where(fits, lo, hi)
    for _ in range(GAMUT_STEPS):
        mid = (lo + hi) / 2
        ok = _in_gamut(torch.cat([l_sty + mid * (l_src - l_sty), chroma], 1))
        hi = torch.where(ok | fits, torch.where(fits, hi, mid), hi)
        lo = torch.where(ok | fits, lo, mid)
    pull = GAMUT_PULL if pull is None else pull
    return lab_to_rgb(torch.cat([l_sty + pull * hi * (l_src - l_sty), chroma], 1))


def rgb_to_yuv(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 Y, Cb, Cr (0..255, chroma offset by 128), as OpenCV's YCrCb but in Y, Cb, Cr order."""
    y = luma(rgb)
    return torch.cat([y, (rgb[:, 2:3] - y) * 0.564 + 128.0, (rgb[:, 0:1] - y) * 0.713 + 128.0], 1)


def yuv_to_rgb(yuv: torch.Tensor) -> torch.Tensor:
    y, cb, cr = yuv[:, 0:1], yuv[:, 1:2] - 128.0, yuv[:, 2:3] - 128.0
    r = y + 1.403 * cr
    b = y + 1.773 * cb
    g = y - 0.714 * cr - 0.344 * cb
    return torch.cat([r, g, b], 1)


def keep_colors(source: torch.Tensor, stylized: torch.Tensor, space: str = KEEP_COLORS_SPACE) -> torch.Tensor:
    """Luminance transfer (Gatys et al. 2016): the stylized frame's lightness, the source's chroma."""
    if space == "lab":
        return lab_transfer(rgb_to_lab(source), rgb_to_lab(stylized))
    if space == "yuv":
        src, sty = rgb_to_yuv(source), rgb_to_yuv(stylized)
        return yuv_to_rgb(torch.cat([sty[:, 0:1], src[:, 1:3]], 1))
    raise ValueError(f"unknown colour space {space!r}")


# -- strength ---------------------------------------------------------------------------------------
def blend_strength(source: torch.Tensor, stylized: torch.Tensor, s: float,
                   method: str = STRENGTH_METHOD) -> torch.Tensor:
    """How much of the style: S = 0 the source, S = 1 the stylized frame, continuous between.

    ``pixel``: (1-S)·source + S·stylized. ``structure``: both frames split into a base (box mean,
    radius ``BASE_RADIUS``) and a detail; the bases blend at S, the source's detail fades as 1-S and the
    stylized detail (the strokes) comes in as S^0.5, so texture arrives early and edges are less doubled.
    """
    if s >= 1.0:
        return stylized
    if s <= 0.0:
        return source
    if method == "pixel":
        return source + s * (stylized - source)
    if method == "structure":
        bs, by = box(source, BASE_RADIUS), box(stylized, BASE_RADIUS)
        return bs + s * (by - bs) + (1 - s) * (source - bs) + s ** DETAIL_GAMMA * (stylized - by)
    raise ValueError(f"unknown strength method {method!r}")


# -- all of it --------------------------------------------------------------------------------------
def to_float(frames: torch.Tensor) -> torch.Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) float32 0..255."""
    return frames.permute(0, 3, 1, 2).float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) float 0..255 -> (N,H,W,3) uint8, rounded."""
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def apply_controls(source: torch.Tensor, network: Callable[[torch.Tensor], torch.Tensor],
                   controls: Controls) -> torch.Tensor:
    """(N,H,W,3) uint8 source frames -> (N,H,W,3) uint8 frames with the controls applied.

    ``network`` takes (N,h,w,3) uint8 frames on the source's device and returns the stylized ones; it
    runs at :meth:`Controls.network_sizes`: :func:`network_size` for the stroke scale, and the full size
    too for painted detail.
    """
    if controls.identity:
        return network(source)
    if controls.style_strength == 0.0:  # the source itself: no network pass is needed
        return source.clone()
    h, w = source.shape[1], source.shape[2]
    src = to_float(source)
    size = network_size(h, w, controls.stroke_scale)
    if size != (h, w):
        src_small = downscale(src, size)
        # the network takes uint8 frames: the small frame is rounded, and the detail is measured from it
        small_u8 = to_uint8(src_small)
        stylized_small = to_float(network(small_u8))
        if controls.stroke_detail == "painted":
            y = two_scale(stylized_small, to_float(network(source)), controls.stroke_scale)
        else:
            y = guided_restore(stylized_small, src, to_float(small_u8))
    else:
        y = to_float(network(source))
    if controls.keep_colors:
        y = keep_colors(src, y.clamp(0, 255), controls.color_space)
    if controls.style_strength < 1.0:
        y = blend_strength(src, y.clamp(0, 255), controls.style_strength, controls.strength_method)
    return to_uint8(y)
