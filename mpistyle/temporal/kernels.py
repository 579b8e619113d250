"""Per-frame fusion kernels behind one small interface, so the recursion can run on the CPU or the rank's device.

The recursion (:class:`mpistyle.temporal.chains.TemporalFuser`: state, resets, scene cuts, halos) stays in
:mod:`mpistyle.temporal.chains`, which imports this module (never the other way); the per-frame math it needs
is four kernels:

* ``asarray(frame)`` / ``to_host(frame)``: a host uint8 (H, W, 3) frame into the backend and back;
* ``upload_pair(pair)``: a :class:`~mpistyle.temporal.flow.PairFlow` computed on the CPU (e.g. by the flow pool)
  into the backend (its ``confidence`` stays a host float, so the scene-cut test needs no device sync);
* ``warp(image, flow_back, interpolation)``: backward warp, border replicate (uint8 or float32 images),
  ``linear`` or ``cubic`` (the state's warp since 0.5);
* ``blend(stylized, warped, mask, strength)``: ``s + a (w - s)`` with ``a = strength * mask`` in float32,
  unrounded; ``fuse(..., keep_detail)``: the same, with the detail energy kept (below), rounded to uint8.

**Detail kept** (since 0.5, ``--fusion-texture keep``): :mod:`mpistyle.temporal.detail` rescales the fused
frame's fine detail toward the fresh stylization's, so the fusion does not fade the style's strokes.

The pure :func:`fuse` (the fused frame, rounded to uint8) lives here too. :class:`NumpyFusion` is the
reference (OpenCV/NumPy, exactly :func:`fuse`); :class:`mpistyle.temporal.kernels_torch.TorchFusion` computes
the same in torch on any device, and also the certainty mask, erosion and confidence from raw flows when the
flow pool only runs DIS.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from mpistyle.temporal.detail import keep_detail
from mpistyle.temporal.flow import PairFlow, warp


def _blend(stylized: np.ndarray, warped: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    if stylized.shape != warped.shape or stylized.shape[:2] != mask.shape:
        raise ValueError(f"fuse: shapes differ: stylized {stylized.shape}, warped {warped.shape}, "
                         f"mask {mask.shape}")
    # numpy, not cv2.blendLinear (faster, but SIMD-dependent rounding): element-wise IEEE float32 ops give the same bits
    # on every CPU, so ranks and resumed runs on other node types agree exactly.
    a = (np.float32(strength) * mask.astype(np.float32, copy=False))[..., None]
    s = stylized.astype(np.float32)
    out = warped.astype(np.float32)
    out -= s  # s + a (w - s) == s (1 - a) + w a, with one product fewer
    out *= a
    out += s
    return out


def fuse(stylized: np.ndarray, warped_prev: np.ndarray, mask: np.ndarray, strength: float,
         keep_detail_energy: bool = False) -> np.ndarray:
    """``stylized (1 - a) + warped_prev a`` with ``a = strength * mask``, float32 math, rounded to uint8.

    With ``keep_detail_energy`` the rounded blend's detail is then rescaled
    (:func:`mpistyle.temporal.detail.keep_detail`).
    Pure and deterministic. As a map of ``warped_prev`` it is a contraction with factor
    ``strength`` (at most 0.9 with the detail kept); the final rounding to uint8 means two different
    states converge to within a few grey levels (a quantised contraction can have several fixed
    points), not always to bit equality.
    """
    out = _blend(stylized, warped_prev, mask, strength)
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    fused = out.astype(np.uint8)
    return keep_detail(fused, stylized, mask, strength) if keep_detail_energy and strength > 0 else fused


@runtime_checkable
class FusionBackend(Protocol):
    """What :class:`~mpistyle.temporal.chains.TemporalFuser` needs for one frame; frames are backend arrays."""

    name: str

    def asarray(self, frame: np.ndarray) -> Any: ...

    def to_host(self, frame: Any) -> np.ndarray: ...

    def upload_pair(self, pair: PairFlow) -> PairFlow: ...

    def warp(self, image: Any, flow: Any, interpolation: str = "linear") -> Any: ...

    def blend(self, stylized: Any, warped: Any, mask: Any, strength: float) -> Any: ...

    def fuse(self, stylized: Any, warped: Any, mask: Any, strength: float,
             keep_detail_energy: bool = False) -> Any: ...


class NumpyFusion:
    """The reference backend: OpenCV's remap and NumPy float32 math on host arrays."""

    name = "numpy"

    def asarray(self, frame: np.ndarray) -> np.ndarray:
        return frame

    def to_host(self, frame: np.ndarray) -> np.ndarray:
        return frame

    def upload_pair(self, pair: PairFlow) -> PairFlow:
        return pair

    def warp(self, image: np.ndarray, flow: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        return warp(image, flow, interpolation)

    def blend(self, stylized: np.ndarray, warped: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
        return _blend(stylized, warped, mask, strength)  # the float32 operations of fuse() before its rounding

    def fuse(self, stylized: np.ndarray, warped: np.ndarray, mask: np.ndarray, strength: float,
             keep_detail_energy: bool = False) -> np.ndarray:
        return fuse(stylized, warped, mask, strength, keep_detail_energy)


def make_backend(kind: str = "numpy", device: Any = "cpu") -> FusionBackend:
    """``numpy`` (host, the reference) or ``torch`` (on ``device``: ``cpu``, ``cuda``, ``cuda:N``)."""
    if kind == "numpy":
        return NumpyFusion()
    if kind == "torch":
        from mpistyle.temporal.kernels_torch import TorchFusion

        return TorchFusion(device)
    raise ValueError(f"unknown fusion backend {kind!r} (choose numpy or torch)")
