"""Per-frame fusion kernels behind one small interface, so the recursion can run on the CPU or the rank's device.

The recursion (:class:`mpistyle.temporal.chains.TemporalFuser`: state, resets, scene cuts, halos) stays in
:mod:`mpistyle.temporal.chains`, which imports this module (never the other way); the per-frame math it needs
is four kernels:

* ``asarray(frame)`` / ``to_host(frame)``: a host uint8 (H, W, 3) frame into the backend and back;
* ``upload_pair(pair)``: a :class:`~mpistyle.temporal.flow.PairFlow` computed on the CPU (e.g. by the flow pool)
  into the backend (its ``confidence`` stays a host float, so the scene-cut test needs no device sync);
* ``warp(image, flow_back)``: bilinear backward warp, border replicate (uint8 or float32 images);
* ``blend(stylized, warped, mask, strength)``: ``s + a (w - s)`` with ``a = strength * mask`` in float32,
  unrounded (for a state kept in float); ``fuse(...)``: the same rounded to uint8 (today's state).

The pure :func:`fuse` (the fused frame, rounded to uint8) lives here too. :class:`NumpyFusion` is the
reference (OpenCV/NumPy, exactly :func:`fuse`); :class:`mpistyle.temporal.kernels_torch.TorchFusion` computes
the same in torch on any device, and also the certainty mask, erosion and confidence from raw flows when the
flow pool only runs DIS.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from mpistyle.temporal.flow import PairFlow, warp


def fuse(stylized: np.ndarray, warped_prev: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    """``stylized (1 - a) + warped_prev a`` with ``a = strength * mask``, float32 math, rounded to uint8.

    Pure and deterministic. As a map of ``warped_prev`` it is a contraction with factor
    ``strength``; the final rounding to uint8 means two different states converge to within
    about ``1 / (1 - strength)`` grey levels (a quantised contraction can have several fixed
    points), not always to bit equality.
    """
    if stylized.shape != warped_prev.shape or stylized.shape[:2] != mask.shape:
        raise ValueError(f"fuse: shapes differ: stylized {stylized.shape}, warped {warped_prev.shape}, "
                         f"mask {mask.shape}")
    # numpy, not cv2.blendLinear (faster, but SIMD-dependent rounding): element-wise IEEE float32 ops give the same bits
    # on every CPU, so ranks and resumed runs on other node types agree exactly.
    a = (np.float32(strength) * mask.astype(np.float32, copy=False))[..., None]
    s = stylized.astype(np.float32)
    out = warped_prev.astype(np.float32)
    out -= s  # s + a (w - s) == s (1 - a) + w a, with one product fewer
    out *= a
    out += s
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


@runtime_checkable
class FusionBackend(Protocol):
    """What :class:`~mpistyle.temporal.chains.TemporalFuser` needs for one frame; frames are backend arrays."""

    name: str

    def asarray(self, frame: np.ndarray) -> Any: ...

    def to_host(self, frame: Any) -> np.ndarray: ...

    def upload_pair(self, pair: PairFlow) -> PairFlow: ...

    def warp(self, image: Any, flow: Any) -> Any: ...

    def blend(self, stylized: Any, warped: Any, mask: Any, strength: float) -> Any: ...

    def fuse(self, stylized: Any, warped: Any, mask: Any, strength: float) -> Any: ...


class NumpyFusion:
    """The reference backend: OpenCV's remap and NumPy float32 math on host arrays."""

    name = "numpy"

    def asarray(self, frame: np.ndarray) -> np.ndarray:
        return frame

    def to_host(self, frame: np.ndarray) -> np.ndarray:
        return frame

    def upload_pair(self, pair: PairFlow) -> PairFlow:
        return pair

    def warp(self, image: np.ndarray, flow: np.ndarray) -> np.ndarray:
        return warp(image, flow)

    def blend(self, stylized: np.ndarray, warped: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
        # Same float32 operations, in the same order, as fuse() before its rounding.
        a = (np.float32(strength) * mask.astype(np.float32, copy=False))[..., None]
        s = stylized.astype(np.float32)
        out = warped.astype(np.float32)
        out -= s
        out *= a
        out += s
        return out

    def fuse(self, stylized: np.ndarray, warped: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
        return fuse(stylized, warped, mask, strength)


def make_backend(kind: str = "numpy", device: Any = "cpu") -> FusionBackend:
    """``numpy`` (host, the reference) or ``torch`` (on ``device``: ``cpu``, ``cuda``, ``cuda:N``)."""
    if kind == "numpy":
        return NumpyFusion()
    if kind == "torch":
        from mpistyle.temporal.kernels_torch import TorchFusion

        return TorchFusion(device)
    raise ValueError(f"unknown fusion backend {kind!r} (choose numpy or torch)")
