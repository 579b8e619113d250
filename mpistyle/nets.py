"""The style networks: fast_neural_style's TransformerNet, the tiny PointwiseNet, and a fused instance norm.

The layout and the state-dict key names are exactly those of pytorch/examples' fast_neural_style,
so models trained by ``mpistyle train`` load in other tools and theirs load here. Loading and saving
files is :mod:`mpistyle.models`; running a network on frames is :mod:`mpistyle.engine`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Keys of pre-0.4 InstanceNorm files (running statistics) that an affine instance norm never uses.
STALE_NORM_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Affine instance norm of an (N, C, H, W) tensor in its own dtype and memory layout.

    Why not ``F.instance_norm``: PyTorch runs it as ``batch_norm`` on a reshaped contiguous copy of the
    tensor (PyTorch issue 72341), which costs more than the convolutions on a channels-last bf16
    tensor. Here the statistics are reduced straight from ``x``, the variance and the scale/shift
    are float32, and one ``addcmul`` writes the result in ``x``'s dtype and layout. Differentiable
    (plain ops): training uses it too.

    bfloat16 input: the mean and the mean of squares with float32 accumulation, one pass each; the
    cancellation in E[x^2] - E[x]^2 stays below the input's own bf16 rounding (bundled model: 53.6 dB
    against fp32). Other dtypes: all in float32, ``torch.var_mean`` (Welford, exact to float32
    rounding; float16 squares would overflow); under float16 autocast the result stays float32, as
    autocast runs ``instance_norm`` (float16 gradients of a large loss would overflow too).
    """
    if x.dtype == torch.bfloat16:
        mean = x.mean(dim=(2, 3), keepdim=True, dtype=torch.float32)
        msq = (x * x).mean(dim=(2, 3), keepdim=True, dtype=torch.float32)
        var = (msq - mean * mean).clamp_min(0)
        scale, shift = _scale_shift(mean, var, weight, bias, eps)
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))
    out_dtype = torch.float32 if torch.is_autocast_enabled("cuda" if x.is_cuda else "cpu") else x.dtype
    x = x.float()
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    scale, shift = _scale_shift(mean, var, weight, bias, eps)
    return torch.addcmul(shift, x, scale).to(out_dtype)


def _scale_shift(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.float().view(1, -1, 1, 1) * torch.rsqrt(var + eps)
    return scale, bias.float().view(1, -1, 1, 1) - mean * scale


class InstanceNorm(nn.Module):
    """``nn.InstanceNorm2d(C, affine=True)`` computed by :func:`instance_norm`; same keys (``weight``, ``bias``).

    A state dict from ``nn.InstanceNorm2d`` loads as is; the running statistics of pre-0.4 files are
    dropped on load, as ``nn.InstanceNorm2d`` does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine=True"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for key in STALE_NORM_KEYS:
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ConvLayer(nn.Module):
    """Reflection-padded convolution (fast_neural_style's ``ConvLayer``: attribute ``conv2d``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.reflection_pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d(_reflection_pad(self.reflection_pad, x, self.training))


class ResidualBlock(nn.Module):
    """conv-IN-ReLU-conv-IN plus identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, kernel_size=3, stride=1)
        self.in1 = InstanceNorm(channels)
        self.conv2 = ConvLayer(channels, channels, kernel_size=3, stride=1)
        self.in2 = InstanceNorm(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.in1(self.conv1(x)))
        out = self.in2(self.conv2(out))
        return out + x


class UpsampleConvLayer(nn.Module):
    """Nearest-neighbour upsample, reflection pad, conv (avoids deconvolution checkerboards)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, upsample: int | None = None
    ) -> None:
        super().__init__()
        self.upsample = upsample
        self.reflection_pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample and self.training:
            x = _UpsampleNearest.apply(x, self.upsample)
        elif self.upsample:
            x = F.interpolate(x, mode="nearest", scale_factor=self.upsample)
        return self.conv2d(_reflection_pad(self.reflection_pad, x, self.training))


class TransformerNet(nn.Module):
    """Johnson et al.'s image transformation network, fast_neural_style layout; RGB 0..255 in and out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvLayer(3, 32, kernel_size=9, stride=1)
        self.in1 = InstanceNorm(32)
        self.conv2 = ConvLayer(32, 64, kernel_size=3, stride=2)
        self.in2 = InstanceNorm(64)
        self.conv3 = ConvLayer(64, 128, kernel_size=3, stride=2)
        self.in3 = InstanceNorm(128)
        self.res1 = ResidualBlock(128)
        self.res2 = ResidualBlock(128)
        self.res3 = ResidualBlock(128)
        self.res4 = ResidualBlock(128)
        self.res5 = ResidualBlock(128)
        self.deconv1 = UpsampleConvLayer(128, 64, kernel_size=3, stride=1, upsample=2)
        self.in4 = InstanceNorm(64)
        self.deconv2 = UpsampleConvLayer(64, 32, kernel_size=3, stride=1, upsample=2)
        self.in5 = InstanceNorm(32)
        self.deconv3 = ConvLayer(32, 3, kernel_size=9, stride=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.in1(self.conv1(x)))
        y = self.relu(self.in2(self.conv2(y)))
        y = self.relu(self.in3(self.conv3(y)))
        y = self.res5(self.res4(self.res3(self.res2(self.res1(y)))))
        y = self.relu(self.in4(self.deconv1(y)))
        y = self.relu(self.in5(self.deconv2(y)))
        return self.deconv3(y)


class PointwiseNet(nn.Module):
    """A 1x1 convolution 3->3 (key ``pointwise``); RGB 0..255 in and out, like :class:`TransformerNet`.

    Why: with identity weights (:func:`write_identity_model`) the network costs almost nothing and
    returns the frame, so a stylize run measures the pipeline itself (``mpistyle bench --ceiling``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(3, 3, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(x)


# ----------------------------------------------------------------------------------------------
# Training only (``module.training``): the same forward values, with backward passes that compile well.
# Compiled for training, torch's backward passes of the nearest upsample and of the reflection pad
# became scatter loops (at 256 px, taking them out cut a step from 1.81 to 1.45 s); written as block
# sums and padded slices, the compiler makes them vector code fused with their neighbours. Inference
# (``eval()``) never takes these paths.


def _reflection_pad(pad: nn.ReflectionPad2d, x: torch.Tensor, training: bool) -> torch.Tensor:
    """``pad(x)``; in training, with :class:`_ReflectionPad`'s backward (equal padding on every side)."""
    if training:
        p = pad.padding
        return _ReflectionPad.apply(x, p[0]) if len(set(p)) == 1 else pad(x)
    return pad(x)


class _ReflectionPad(torch.autograd.Function):
    """``F.pad(x, (p, p, p, p), mode="reflect")``; the backward folds the border gradients back in."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: int) -> torch.Tensor:
        ctx.p = p
        return F.pad(x, (p, p, p, p), mode="reflect")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        p = ctx.p
        return _fold_reflection(_fold_reflection(grad, p, 3), p, 2), None


def _fold_reflection(g: torch.Tensor, p: int, dim: int) -> torch.Tensor:
    """The gradient of a reflection pad by ``p`` along ``dim`` (2 or 3): the inside, plus each border
    mirrored onto the inputs it copied (padded index ``j < p`` came from input ``p - j``)."""
    n = g.shape[dim] - 2 * p
    mid = g.narrow(dim, p, n)
    left = g.narrow(dim, 0, p).flip(dim)  # onto inputs 1..p
    right = g.narrow(dim, n + p, p).flip(dim)  # onto inputs n-1-p..n-2
    spans = ((1, n - 1 - p), (n - 1 - p, 1))
    if dim == 2:
        left, right = (F.pad(t, (0, 0, *s)) for t, s in zip((left, right), spans, strict=True))
    else:
        left, right = (F.pad(t, s) for t, s in zip((left, right), spans, strict=True))
    return mid + left + right


class _UpsampleNearest(torch.autograd.Function):
    """``F.interpolate(mode="nearest")`` by an integer factor, with the backward as a sum over k x k blocks.

    Why: compiled for training, torch's backward of the upsample is a scatter-add (``index_put``): about
    50 ms of a 0.76 s step at 192 px. A block sum over a reshaped view compiles to vector code. The
    forward is torch's own, so the values and the layout are the same as at inference.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: int) -> torch.Tensor:
        ctx.k = k
        return F.interpolate(x, mode="nearest", scale_factor=k)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        k = ctx.k
        n, c, h, w = grad.shape
        return grad.unflatten(3, (w // k, k)).unflatten(2, (h // k, k)).sum(dim=(3, 5)), None


def use_torch_instance_norm(model: nn.Module) -> nn.Module:
    """Replace every :class:`InstanceNorm` of ``model`` (in place) by ``nn.InstanceNorm2d`` with the same weights.

    The network as fast_neural_style and mpistyle up to 0.3 ran it: the baseline of ``mpistyle bench``.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, InstanceNorm):
                norm = nn.InstanceNorm2d(child.num_features, eps=child.eps, affine=True)
                norm.load_state_dict(child.state_dict())
                setattr(module, name, norm.to(child.weight.device, child.weight.dtype))
    return model
