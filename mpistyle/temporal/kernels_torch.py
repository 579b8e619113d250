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

from mpistyle.temporal.flow import MASK_MIN_FILTER, PairFlow

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

    def warp(self, image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Backward warp ``out(x) = image(x + flow(x))``: bilinear, border replicate, same dtype and shape."""
        if flow.ndim != 3 or flow.shape[2] != 2 or tuple(flow.shape[:2]) != tuple(image.shape[:2]):
            raise ValueError(f"flow of shape {tuple(flow.shape)} does not fit an image of shape {tuple(image.shape)}")
        mx, my = self._maps(flow)
        return self._remap(image, mx, my)

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

    def fuse(self, stylized: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor, strength: float) -> torch.Tensor:
        """:meth:`blend` rounded half to even and clipped to uint8 (kernels.fuse)."""
        return self.blend(stylized, warped, mask, strength).round_().clamp_(0, 255).to(torch.uint8)

    def fuse_gated(self, stylized: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor, confidence: Any,
                   strength: float, scene_cut: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse, or keep ``stylized`` where ``confidence < scene_cut`` (a cut), without a host sync.

        Returns (out uint8, cut as a 0-dim bool tensor). The comparison is in float64, as the NumPy
        recursion compares a Python float. With the weight zero the result is ``stylized`` exactly.
        """
        conf = torch.as_tensor(confidence, device=mask.device).to(torch.float64)
        cut = conf < scene_cut
        gated = torch.where(cut, torch.zeros_like(mask, dtype=torch.float32), mask.to(torch.float32))
        return self.fuse(stylized, warped, gated, strength), cut
