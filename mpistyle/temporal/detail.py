"""The fusion's detail step: the fused frame keeps the fresh stylization's local detail energy (0.5).

Averaging the fresh stylization with a warped previous output that does not line up stroke for stroke
fades the strokes, and the style's texture with them (texture closeness 0.46 -> 0.36 for starry-night on
Big Buck Bunny; docs/styles.md). So the fused frame's local detail (its difference from the 9x9 mean) is
rescaled toward the fresh stylization's: ``base + detail * g`` with ``g = sqrt((V_s + 1) / (V_fused + 1))``
from the 5x5 local variances (channel means, in grey levels squared), clamped to
``[1, min(2, 0.9 / strength)]``, and 1 where the flow is rejected (those pixels stay the stylization
exactly).

* The mean colour of every 9x9 window, which is what flickers, stays the blend's; g >= 1 only gives back
  energy the averaging took.
* strength x g <= 0.9 keeps the map from state to output a contraction, so a wrong state still decays,
  more slowly: on fast motion, at the anchors' 10-frame lead a cold chain is within 0.4 grey levels on
  average of the running one (4 at the 99th percentile), against 0.05 (1) with the plain average;
  ``--halo 16`` gives 0.12 (2).
* The window sums are of integers (uint8 frames) below 2**24, so they are exact in float32 in any order,
  and the rest is element-wise float32: every CPU and the torch backend give the same bits.

This is the NumPy/OpenCV reference; :mod:`mpistyle.temporal.kernels_torch` computes the same bits in torch,
and both import the constants from here.
"""

from __future__ import annotations

import cv2
import numpy as np

DETAIL_WINDOW = 9  # the detail is the difference from this box mean (which keeps the blend's colour)
VARIANCE_WINDOW = 5  # detail energies are local variances over this window (5: the most texture kept, measured)
DETAIL_MAX_GAIN = 2.0
DETAIL_DECAY = 0.9  # strength * gain stays at or below this: the recursion remains a contraction


def detail_max_gain(strength: float) -> float:
    """The largest detail gain at this temporal strength: ``min(2, 0.9 / strength)``."""
    return DETAIL_MAX_GAIN if strength <= DETAIL_DECAY / DETAIL_MAX_GAIN else DETAIL_DECAY / float(strength)


def window_sums(image: np.ndarray, size: int = DETAIL_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """Sums of a uint8 image and of its squares over ``size`` x ``size`` windows (border replicated), float32.

    The sums are integers below 2**24 (81 x 255**2 for a 9x9 window), so float32 holds them exactly whatever
    order a SIMD path or a thread split adds them in: every CPU and the torch kernels get the same bits.
    """
    kw = {"ksize": (size, size), "normalize": False, "borderType": cv2.BORDER_REPLICATE}
    return window_sum(image, size), cv2.sqrBoxFilter(image, cv2.CV_32F, **kw)


def window_sum(image: np.ndarray, size: int = DETAIL_WINDOW) -> np.ndarray:
    """The first of :func:`window_sums` alone (the 9x9 base needs no squares)."""
    return cv2.boxFilter(image, cv2.CV_32F, (size, size), normalize=False, borderType=cv2.BORDER_REPLICATE)


def local_variance(sums: tuple[np.ndarray, np.ndarray], size: int = DETAIL_WINDOW) -> np.ndarray:
    """``size**2`` x the local variance, summed over the channels, from :func:`window_sums`: (H, W) float32.

    ``S2 - S1 (S1 / n)`` per channel, then ``(c0 + c1) + c2``: element-wise float32 in a fixed order (the
    torch kernels do the same).
    """
    s1, s2 = sums
    t = s1 / np.float32(size * size)
    t *= s1
    v = s2 - t
    return v[..., 0] + v[..., 1] + v[..., 2]


def keep_detail(fused: np.ndarray, stylized: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    """The fused uint8 frame with its local detail rescaled toward the stylization's energy (module docstring).

    ``base + (fused - base) g``: base is the 9x9 mean of the fused frame, g = sqrt((V_s + 3n) / (V_fused + 3n))
    from the 5x5 local variances (:func:`local_variance`, n = 25: one grey level squared per channel added
    to each), clamped to [1, min(2, 0.9 / strength)], and 1 where the mask is 0 (there the fused frame is the
    stylization, and stays it exactly); float32, rounded to uint8.
    """
    base = window_sum(fused, DETAIL_WINDOW) / np.float32(DETAIL_WINDOW * DETAIL_WINDOW)
    n = VARIANCE_WINDOW * VARIANCE_WINDOW
    reg = np.float32(3 * n)
    v_stylized = local_variance(window_sums(stylized, VARIANCE_WINDOW), VARIANCE_WINDOW)
    ratio = (v_stylized + reg) / (local_variance(window_sums(fused, VARIANCE_WINDOW), VARIANCE_WINDOW) + reg)
    # the square root in float64 (correctly rounded in NumPy and torch alike; torch's float32 one is not)
    gain = np.sqrt(ratio.astype(np.float64)).astype(np.float32)
    np.clip(gain, np.float32(1.0), np.float32(detail_max_gain(strength)), out=gain)
    gain[mask <= 0] = 1.0  # rejected flow: the stylization as it is (issue 30)
    out = fused.astype(np.float32)
    out -= base
    out *= gain[..., None]
    out += base
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)
