"""The fusion kernels in torch, on any device: warp, certainty mask, erosion, confidence, blend/fuse.

They reproduce :mod:`mpistyle.temporal.flow` and :func:`mpistyle.temporal.kernels.fuse` operation by operation in
float32, so on real frames they give the same bits as the OpenCV/NumPy reference (the tests check
"within 1 grey level", the requirement, and report how many values differ at all):

* **uint8 warp**: OpenCV 5's ``remap`` (INTER_LINEAR, BORDER_REPLICATE) interpolates 8-bit images in
  float32 at the exact sub-pixel position and rounds half to even; here: floor, the two lerps
  ``p0 + (p1 - p0) a`` (x then y), ``round``. (OpenCV 4 used 5-bit fixed-point positions for 8-bit
  images; against it the difference is at most 1 grey level on smooth content.)
* **float32 warp** (the backward flow inside the forward-backward check): OpenCV still quantises
  the position to 1/32 px and sums the four weighted taps in float32 in a fixed order; so does this.
* **mask**: the same thresholds, evaluated with the same float32 operations in the same order
  (separate tensor ops, so no fused multiply-add changes a bit on CUDA), Sobel ksize 1 as
  ``(f[x+1] - f[x-1]) * 0.5`` with replicated border, erosion as a min-pool over a replicated border.
* **cubic warp** (the fusion state's warp): OpenCV 5's 8-bit INTER_CUBIC, which is Keys' kernel (a = -0.75)
  with float32 weights at the exact sub-pixel position, each row's four taps summed in order, then the
  four rows; the same here, so the bits agree.
* **detail kept**: :func:`mpistyle.temporal.detail.keep_detail`: window sums of integers (exact in any
  order), then the same float64 element-wise operations.
* **confidence**: the mask is 0/1, so its float32 sum is an exact count (frames below 2^24 px) and
  ``count / n`` in float32 is NumPy's float32 mean.

Index arithmetic (gather), not ``grid_sample``: grid_sample's normalised coordinates
(``(x + 1) / 2 * (W - 1)``) cost a rounding step that would move the sampling position by a few ulps.
All ops are deterministic on CPU and CUDA (gathers and a min-pool forward, no atomics).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mpistyle.temporal.detail import DETAIL_WINDOW, VARIANCE_WINDOW, detail_max_gain
from mpistyle.temporal.flow import MASK_MIN_FILTER, WARP_INTERPOLATIONS, PairFlow

logger = logging.getLogger(__name__)

_TAB = 32  # OpenCV's INTER_TAB_SIZE: sub-pixel steps of float-image remap
_C_OCC = 0.01  # forward-backward check: |w + w^|^2 <= 0.01 (|w|^2 + |w^|^2) + 0.5
_C_OCC_ADD = 0.5
_C_MB = 0.01  # motion boundary: |grad u|^2 + |grad v|^2 <= 0.01 |w|^2 + 0.002
_C_MB_ADD = 0.002


class TorchFusion:
    """Fusion kernels on ``device``; frames are (H, W, C) tensors, flows (H, W, 2) float32, masks (H, W)."""

    name = "torch"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._grids: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"TorchFusion(device={str(self.device)!r})"

    # -- transfers ------------------------------------------------------------------------------
    def asarray(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A host array (or a tensor anywhere) on this device, same dtype."""
        if isinstance(frame, torch.Tensor):
            return frame.to(self.device)
        return torch.from_numpy(np.ascontiguousarray(frame)).to(self.device)

    def to_host(self, frame: torch.Tensor) -> np.ndarray:
        return frame.detach().cpu().numpy()

    def upload_pair(self, pair: PairFlow) -> PairFlow:
        """A CPU pair flow with its flow and mask on this device; the confidence stays a host float."""
        return PairFlow(flow_back=self.asarray(pair.flow_back), mask=self.asarray(pair.mask),
                        confidence=float(pair.confidence))

    # -- kernels --------------------------------------------------------------------------------
    def _grid(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h, w)
        if key not in self._grids:
            if len(self._grids) >= 8:
                self._grids.clear()
            gx = torch.arange(w, dtype=torch.float32, device=self.device).expand(h, w)
            gy = torch.arange(h, dtype=torch.float32, device=self.device)[:, None].expand(h, w)
            self._grids[key] = (gx, gy)
        return self._grids[key]

    def _maps(self, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute sampling positions ``x + flow``, as float32 (what flow.warp hands to cv2.remap)."""
        gx, gy = self._grid(flow.shape[0], flow.shape[1])
        flow = flow.to(torch.float32)
        return gx + flow[..., 0], gy + flow[..., 1]

    def warp(self, image: torch.Tensor, flow: torch.Tensor, interpolation: str = "linear") -> torch.Tensor:
        """Backward warp ``out(x) = image(x + flow(x))``: bilinear or bicubic, border replicate, same dtype, shape."""
        if flow.ndim != 3 or flow.shape[2] != 2 or tuple(flow.shape[:2]) != tuple(image.shape[:2]):
            raise ValueError(f"flow of shape {tuple(flow.shape)} does not fit an image of shape {tuple(image.shape)}")
        if interpolation not in WARP_INTERPOLATIONS:
            raise ValueError(f"unknown warp interpolation {interpolation!r} (choose linear or cubic)")
        mx, my = self._maps(flow)
        if interpolation == "cubic":
            return self._remap_cubic(image, mx, my)
        return self._remap(image, mx, my)

    def _remap_cubic(self, image: torch.Tensor, mx: torch.Tensor, my: torch.Tensor) -> torch.Tensor:
        if image.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"warp supports uint8 and float32 images, got {image.dtype}")
        h, w = image.shape[:2]
        flat = image.reshape(h * w, -1)
        x0f, y0f = torch.floor(mx), torch.floor(my)
        wx, wy = _keys_weights(mx - x0f), _keys_weights(my - y0f)
        x0 = x0f.clamp(-2, w + 1).to(torch.int32)  # the taps are clamped to the frame anyway
        y0 = y0f.clamp(-2, h + 1).to(torch.int32)
        cols = [(x0 + (k - 1)).clamp(0, w - 1) for k in range(4)]
        shape = (*x0.shape, flat.shape[1])
        out: torch.Tensor | None = None
        for i in range(4):
            row_start = (y0 + (i - 1)).clamp(0, h - 1) * w
            row: torch.Tensor | None = None
            for k in range(4):
                tap = flat.index_select(0, (row_start + cols[k]).reshape(-1)).reshape(shape).to(torch.float32)
                term = tap * wx[k][..., None]
                row = term if row is None else row + term
            assert row is not None
            term = row * wy[i][..., None]
            out = term if out is None else out + term
        assert out is not None
        if image.dtype == torch.uint8:
            return out.round_().clamp_(0, 255).to(torch.uint8).reshape(image.shape)
        return out.reshape(image.shape)

    def _remap(self, image: torch.Tensor, mx: torch.Tensor, my: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8:
            return self._remap_u8(image, mx, my)
        if image.dtype == torch.float32:
            return self._remap_f32(image, mx, my)
        raise ValueError(f"warp supports uint8 and float32 images, got {image.dtype}")

    @staticmethod
    def _taps(image: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor) -> list[torch.Tensor]:
        """The neighbours (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1), border replicated, as float32 (H, W, C).

        Gathered in the image's own dtype (uint8: a quarter of the bytes), then converted. int32 indices
        (frames are far below 2**31 px), after clamping the corner, which keeps the conversion safe for any
        flow (the taps are clamped to the frame anyway).
        """
        h, w = image.shape[:2]
        flat = image.reshape(h * w, -1)
        x0 = x0.clamp(-1, w).to(torch.int32)
        y0 = y0.clamp(-1, h).to(torch.int32)
        xa, xb = x0.clamp(0, w - 1), (x0 + 1).clamp(0, w - 1)
        ya, yb = y0.clamp(0, h - 1) * w, (y0 + 1).clamp(0, h - 1) * w
        shape = (*x0.shape, flat.shape[1])
        return [flat.index_select(0, (row + col).reshape(-1)).reshape(shape).to(torch.float32)
                for row, col in ((ya, xa), (ya, xb), (yb, xa), (yb, xb))]

    def _remap_u8(self, image: torch.Tensor, mx: torch.Tensor, my: torch.Tensor) -> torch.Tensor:
        x0f, y0f = torch.floor(mx), torch.floor(my)
        ax, ay = (mx - x0f)[..., None], (my - y0f)[..., None]
        p00, p01, p10, p11 = self._taps(image, x0f, y0f)
        top = p00 + (p01 - p00) * ax
        bottom = p10 + (p11 - p10) * ax
        out = top + (bottom - top) * ay
        return out.round_().clamp_(0, 255).to(torch.uint8).reshape(image.shape)

    def _remap_f32(self, image: torch.Tensor, mx: torch.Tensor, my: torch.Tensor) -> torch.Tensor:
        # OpenCV: position rounded (half to even) to 1/32 px, weights from its table, taps summed in order.
        limit = float(2**26)  # far beyond the frame either way; keeps the int32 conversion exact
        qx = torch.round(mx.clamp(-limit, limit) * _TAB).to(torch.int32)
        qy = torch.round(my.clamp(-limit, limit) * _TAB).to(torch.int32)
        x0, y0 = qx >> 5, qy >> 5  # arithmetic shift: floor division, also for negative positions
        step = torch.tensor(1.0 / _TAB, dtype=torch.float32, device=mx.device)
        wx1, wy1 = (qx & (_TAB - 1)).to(torch.float32) * step, (qy & (_TAB - 1)).to(torch.float32) * step
        wx0, wy0 = 1.0 - wx1, 1.0 - wy1
        taps = self._taps(image, x0, y0)
        weights = (wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1)
        acc = taps[0] * weights[0][..., None]
        for tap, wgt in zip(taps[1:], weights[1:], strict=True):
            acc = acc + tap * wgt[..., None]
        return acc.reshape(image.shape)

    def certainty_mask(self, flow_fw: torch.Tensor, flow_bw: torch.Tensor,
                       motion_boundaries: bool = True) -> torch.Tensor:
        """Ruder et al.'s forward-backward check, float32 (H, W) in {0, 1}.

        See :func:`mpistyle.temporal.flow.certainty_mask`.
        """
        if flow_fw.shape != flow_bw.shape or flow_fw.ndim != 3 or flow_fw.shape[2] != 2:
            raise ValueError(f"flows of shapes {tuple(flow_fw.shape)} and {tuple(flow_bw.shape)} do not match")
        h, w = flow_fw.shape[:2]
        flow_fw = flow_fw.to(torch.float32)
        u, v = flow_fw[..., 0].contiguous(), flow_fw[..., 1].contiguous()
        x, y = self._maps(flow_fw)
        inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
        back = self._remap_f32(flow_bw.to(torch.float32).contiguous(), x, y)
        bu, bv = back[..., 0], back[..., 1]
        fw_sq = u * u + v * v
        su, sv = u + bu, v + bv
        ok = inside & (su * su + sv * sv <= _C_OCC * (fw_sq + bu * bu + bv * bv) + _C_OCC_ADD)
        if motion_boundaries:
            grad_sq = torch.zeros((h, w), dtype=torch.float32, device=flow_fw.device)
            for comp in (u, v):
                for d in self._central_differences(comp):
                    grad_sq = grad_sq + d * d
            ok &= grad_sq <= _C_MB * fw_sq + _C_MB_ADD
        return ok.to(torch.float32)

    @staticmethod
    def _central_differences(comp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """d/dx then d/dy as ``(f[+1] - f[-1]) * 0.5``, replicated border (cv2.Sobel ksize=1, scale=0.5)."""
        padded = F.pad(comp[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
        dx = (padded[1:-1, 2:] - padded[1:-1, :-2]) * 0.5
        dy = (padded[2:, 1:-1] - padded[:-2, 1:-1]) * 0.5
        return dx, dy

    @staticmethod
    def erode(mask: torch.Tensor, width: int = MASK_MIN_FILTER) -> torch.Tensor:
        """Min-filter of ``width`` x ``width`` anchored at the centre, replicated border (cv2.erode)."""
        if width <= 1:
            return mask
        before, after = width // 2, width - 1 - width // 2
        padded = F.pad(mask[None, None], (before, after, before, after), mode="replicate")
        return (-F.max_pool2d(-padded, kernel_size=width, stride=1))[0, 0]

    @staticmethod
    def confidence(mask: torch.Tensor) -> torch.Tensor:
        """0-dim float32 mean of a 0/1 mask, equal to NumPy's float32 ``mask.mean()`` (no host sync)."""
        return mask.sum(dtype=torch.float32) / torch.tensor(mask.numel(), dtype=torch.float32, device=mask.device)

    def pair_from_flows(self, flow_back: torch.Tensor, flow_fwd: torch.Tensor, min_filter: int = MASK_MIN_FILTER,
                        motion_boundaries: bool = True) -> PairFlow:
        """:func:`mpistyle.temporal.flow.pair_flow` after its two flow calls: mask, erosion, confidence here.

        The confidence is a 0-dim device tensor (``float()`` of it syncs); compare it in float64, as
        NumPy compares the float one, or use :meth:`fuse_gated`.
        """
        mask = self.erode(self.certainty_mask(flow_back, flow_fwd, motion_boundaries), min_filter)
        return PairFlow(flow_back=flow_back, mask=mask, confidence=self.confidence(mask))  # type: ignore[arg-type]

    def blend(self, stylized: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor,
              strength: float) -> torch.Tensor:
        """``s + a (w - s)``, ``a = strength * mask``, in float32 as kernels.fuse, not rounded."""
        if stylized.shape != warped.shape or tuple(stylized.shape[:2]) != tuple(mask.shape):
            raise ValueError(f"fuse: shapes differ: stylized {tuple(stylized.shape)}, warped {tuple(warped.shape)}, "
                             f"mask {tuple(mask.shape)}")
        a = (float(np.float32(strength)) * mask.to(torch.float32))[..., None]
        s = stylized.to(torch.float32)
        out = warped.to(torch.float32) - s
        out.mul_(a)
        out.add_(s)
        return out

    def fuse(self, stylized: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor, strength: float,
             keep_detail_energy: bool = False) -> torch.Tensor:
        """:meth:`blend` (with the detail kept if asked) rounded half to even and clipped to uint8 (kernels.fuse)."""
        out = self.blend(stylized, warped, mask, strength).round_().clamp_(0, 255).to(torch.uint8)
        return keep_detail(out, stylized, mask, strength) if keep_detail_energy and strength > 0 else out

    def fuse_gated(self, stylized: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor, confidence: Any,
                   strength: float, scene_cut: float,
                   keep_detail_energy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse, or keep ``stylized`` where ``confidence < scene_cut`` (a cut), without a host sync.

        Returns (out uint8, cut as a 0-dim bool tensor). The comparison is in float64, as the NumPy
        recursion compares a Python float. With the weight zero the result is ``stylized`` exactly.
        """
        conf = torch.as_tensor(confidence, device=mask.device).to(torch.float64)
        cut = conf < scene_cut
        gated = torch.where(cut, torch.zeros_like(mask, dtype=torch.float32), mask.to(torch.float32))
        return self.fuse(stylized, warped, gated, strength, keep_detail_energy), cut


def _keys_weights(x: torch.Tensor) -> list[torch.Tensor]:
    """Keys' cubic weights (a = -0.75) of the taps at -1, 0, 1, 2 for fractions ``x``, float32 as OpenCV's."""
    a = -0.75
    x1 = x + 1
    c0 = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
    c1 = ((a + 2) * x - (a + 3)) * x * x + 1
    y = 1 - x
    c2 = ((a + 2) * y - (a + 3)) * y * y + 1
    return [c0, c1, c2, 1 - c0 - c1 - c2]


def window_sums(image: torch.Tensor, size: int = DETAIL_WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mpistyle.temporal.detail.window_sums` of an (H, W, C) uint8 tensor: the same exact sums.

    Prefix sums in float64 (exact for integers), differenced, then float32 (the window sums are below 2**24).
    """
    x = image.to(torch.float64)
    return window_sum(x, size), window_sum(x * x, size)


def window_sum(image: torch.Tensor, size: int = DETAIL_WINDOW) -> torch.Tensor:
    """The first of :func:`window_sums` alone: float64 prefix sums, differenced, then float32."""
    r = size // 2
    c = F.pad(image.to(torch.float64).permute(2, 0, 1)[None], (r, r, r, r), mode="replicate")[0]
    c = torch.cumsum(c, dim=1)
    c = torch.cat([torch.zeros_like(c[:, :1]), c], dim=1)
    c = c[:, size:] - c[:, :-size]
    c = torch.cumsum(c, dim=2)
    c = torch.cat([torch.zeros_like(c[:, :, :1]), c], dim=2)
    return (c[:, :, size:] - c[:, :, :-size]).to(torch.float32).permute(1, 2, 0)


def local_variance(sums: tuple[torch.Tensor, torch.Tensor], size: int = DETAIL_WINDOW) -> torch.Tensor:
    """:func:`mpistyle.temporal.detail.local_variance` in torch (the same float32 operations)."""
    s1, s2 = sums
    v = s2 - (s1 / float(size * size)) * s1
    return v[..., 0] + v[..., 1] + v[..., 2]


def keep_detail(fused: torch.Tensor, stylized: torch.Tensor, mask: torch.Tensor, strength: float) -> torch.Tensor:
    """:func:`mpistyle.temporal.detail.keep_detail` in torch: uint8 in, uint8 out, the same bits."""
    base = window_sum(fused, DETAIL_WINDOW) / float(DETAIL_WINDOW * DETAIL_WINDOW)
    n = VARIANCE_WINDOW * VARIANCE_WINDOW
    reg = float(3 * n)
    v_stylized = local_variance(window_sums(stylized, VARIANCE_WINDOW), VARIANCE_WINDOW)
    ratio = (v_stylized + reg) / (local_variance(window_sums(fused, VARIANCE_WINDOW), VARIANCE_WINDOW) + reg)
    gain = torch.sqrt(ratio.to(torch.float64)).to(torch.float32)
    gain.clamp_(1.0, float(np.float32(detail_max_gain(strength))))
    gain = torch.where(mask > 0, gain, torch.ones_like(gain))
    out = fused.to(torch.float32) - base
    out.mul_(gain[..., None])
    out.add_(base)
    return out.round_().clamp_(0, 255).to(torch.uint8)
