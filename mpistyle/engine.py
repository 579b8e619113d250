"""Running a style network on frames: precision, batch size, the batched (and on CUDA overlapped) Stylizer.

Networks are :mod:`mpistyle.nets`; files are :mod:`mpistyle.models`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpistyle.errors import MpistyleError
from mpistyle.nets import TransformerNet, use_torch_instance_norm

logger = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512_BF16 or AMX), where bf16 autocast pays off."""
    try:
        if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX"):  # newer torch reports these
            return True
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--precision``; None means plain fp32."""
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise MpistyleError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return None
    raise MpistyleError(f"unknown precision '{precision}' (choose auto, fp32, bf16, fp16)")


# Auto batch: what a frame of TransformerNet costs in device memory, and how much of it a rank may take.
# Peak live activation elements per pixel of one frame, measured with :func:`peak_activation_bytes`
# (bf16 and fp32: 176.6 at 640x360, 178.8 at 128x72, padding weighs more on small frames; fp16: 208,
# its instance norms work on a float32 copy): rounded up.
PEAK_ACTIVATION_ELEMENTS_PER_PIXEL = 210
# uint8 input, its float32 and channels-last copies, the float32 output and the uint8 result.
IO_BYTES_PER_PIXEL = 3 + 12 + 12 + 12 + 3
# Allocator rounding, cuDNN workspaces, InstanceNorm run in float32 under autocast.
AUTO_BATCH_SAFETY = 1.5
AUTO_BATCH_MEMORY_FRACTION = 0.5  # of the free device memory at start: the rest for fusion and other ranks
CUDA_MAX_AUTO_BATCH = 16  # H100 figures: 501 frames/s at 8, 536 at 32: past 16 only latency and memory grow
# CPU: frames per call that the CPU figures favour (docs/performance.md); batching buys nothing there.
CPU_AUTO_BATCH = 1


def parse_batch(text: str | int | None) -> int | str:
    """``--batch``: a positive integer or ``auto``; ValueError otherwise."""
    if text is None or text == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected a positive integer or auto, got {text!r}") from None
    if value < 1:
        raise ValueError(f"expected a positive integer or auto, got {text!r}")
    return value


def frame_memory_bytes(height: int, width: int, dtype: torch.dtype | None = torch.float16) -> int:
    """Estimated device memory of one frame in a TransformerNet forward (activations + I/O copies, with margin)."""
    element = torch.finfo(dtype).bits // 8 if dtype is not None else 4
    ph, pw = height + (-height) % 4, width + (-width) % 4  # the network's input is padded to multiples of 4
    per_pixel = PEAK_ACTIVATION_ELEMENTS_PER_PIXEL * element + IO_BYTES_PER_PIXEL
    return int(AUTO_BATCH_SAFETY * per_pixel * ph * pw)


def resolve_batch(spec: str | int | None, device: str | torch.device, height: int, width: int, *,
                  free_bytes: int | None = None, dtype: torch.dtype | None = torch.float16,
                  ranks_per_device: int = 1) -> int:
    """Frames per network call for ``--batch`` (an integer, or ``auto``/None/0 for automatic).

    Automatic: on CUDA, as many frames as fit in ``AUTO_BATCH_MEMORY_FRACTION`` of the free memory
    (``free_bytes``, default ``torch.cuda.mem_get_info``; split among ``ranks_per_device`` ranks sharing
    the GPU) at :func:`frame_memory_bytes` each, between 1 and ``CUDA_MAX_AUTO_BATCH``. On other
    devices ``CPU_AUTO_BATCH``.
    """
    if spec not in (None, 0, "auto"):
        value = parse_batch(spec)
        assert isinstance(value, int)
        return value
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_AUTO_BATCH
    if free_bytes is None:
        free_bytes = int(torch.cuda.mem_get_info(device)[0])
    if ranks_per_device < 1:
        raise ValueError(f"ranks_per_device must be positive, got {ranks_per_device}")
    budget = free_bytes * AUTO_BATCH_MEMORY_FRACTION / ranks_per_device
    batch = int(budget // frame_memory_bytes(height, width, dtype))
    if batch < 1:
        logger.warning("%.1f GB of free device memory is less than one %dx%d frame needs (%.1f GB): batch 1",
                       free_bytes / 1e9, width, height, frame_memory_bytes(height, width, dtype) / 1e9)
    return max(1, min(CUDA_MAX_AUTO_BATCH, batch))


def peak_activation_bytes(height: int, width: int, dtype: torch.dtype = torch.float16, batch: int = 1) -> int:
    """Peak bytes of live tensors in a TransformerNet forward at this size, counted on the meta device.

    No memory is allocated and nothing is computed: every op's output size is recorded as it is
    created and released when freed. This is how ``PEAK_ACTIVATION_ELEMENTS_PER_PIXEL`` was measured.
    """
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class _Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0

        def _free(self, n: int) -> None:
            self.live -= n

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if not func._schema.is_mutable:  # in-place ops allocate nothing
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t._base is None:  # views share their base's memory
                        n = t.numel() * t.element_size()
                        self.live += n
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(t, self._free, n)
            return out

    net = TransformerNet().to("meta", dtype).to(memory_format=torch.channels_last)
    x = torch.empty(batch, 3, height, width, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
    mode = _Live()
    with torch.inference_mode(), mode:
        net(x)
    return mode.peak


class PendingBatch:
    """A batch submitted to :meth:`Stylizer.submit`: its result on the host or on the device.

    On CUDA the upload, network and download are queued on one of the stylizer's two streams and
    this object holds the event that marks their end; on CPU the work is already done.
    """

    def __init__(self, device_out: torch.Tensor, host_out: torch.Tensor | None, event: Any, stream: Any) -> None:
        self._device_out = device_out
        self._host_out = host_out  # pinned buffer being filled by a non-blocking copy (CUDA), or None
        self._event = event
        self._stream = stream
        self._result: np.ndarray | None = None

    def result(self) -> np.ndarray:
        """(N, H, W, 3) uint8 on the host (waits for the batch on CUDA)."""
        if self._result is None:
            if self._host_out is not None:
                self._event.synchronize()
                # A copy: the pinned buffer is reused by a later batch of the same stream.
                self._result = self._host_out.numpy().copy()
                self._host_out = None
            else:
                if self._event is not None:  # computed on a side stream: wait for it before reading
                    self._event.synchronize()
                self._result = self._device_out.cpu().numpy()
        return self._result

    def tensor(self) -> torch.Tensor:
        """(N, H, W, 3) uint8 on the device, usable on the caller's current stream (no host sync)."""
        out = self._device_out
        if self._event is not None:
            current = torch.cuda.current_stream(out.device)
            current.wait_event(self._event)
            out.record_stream(current)  # the allocator must not reuse it before the caller's stream is done
        return out


POSTFILTERS = ("none", "median3")


def median3(y: torch.Tensor) -> torch.Tensor:
    """3x3 median of each channel of an (N,C,H,W) tensor, borders replicated (as OpenCV's ``medianBlur``).

    Johnson's and Ruder's code apply it to every stylized frame by default: it halves the fine grid of
    period 4 that a stride-4 network prints, and keeps edges. A model asks for it in its file
    (provenance ``"postfilter": "median3"``, set by ``mpistyle train --postfilter``); the network's
    weights stay a plain fast_neural_style state dict.
    """
    p = F.pad(y, (1, 1, 1, 1), mode="replicate") if y.is_floating_point() else F.pad(
        y.float(), (1, 1, 1, 1), mode="replicate").to(y.dtype)
    n, c, h, w = y.shape
    return p.unfold(2, 3, 1).unfold(3, 3, 1).reshape(n, c, h, w, 9).median(dim=-1).values


# How the network runs, per device and precision (measured: docs/performance.md; how: docs/design.md).
# CPU with native bf16 (AMX, AVX512-BF16): weights and activations in bf16, channels-last, fused instance
# norm (0.15 s against 0.38 s for bf16 autocast with torch's instance norm, 640x272, one thread).
# CPU fp32 (640x272, one thread, side by side): torch's instance norm on NCHW 0.69 s, the fused norm on
# channels-last 0.77 s and on NCHW 0.82 s, torch's on channels-last (0.3's path) 0.90 s. On NCHW torch's
# norm runs as batch_norm on a view (no copy) and its statistics are one pass: it stays.
CPU_FP32_CHANNELS_LAST = False
CPU_FP32_NORM = "torch"
# CUDA: autocast and channels-last with torch's instance norm, as measured on the H100 (docs/performance.md); the
# fused norm is not measured on CUDA yet (channels-last instance norm is reported slower there, PyTorch
# issue 59168), so CUDA keeps torch's until it is.
CUDA_FUSED_NORM = False


@dataclass(frozen=True)
class Recipe:
    """The numeric path of a network: every rank of a job takes the same one (frames match 1 rank).

    ``cast``: weights and input in ``dtype`` (no autocast); else autocast to ``dtype`` (None: fp32).
    ``norm``: ``fused`` (:class:`~mpistyle.nets.InstanceNorm`) or ``torch`` (``nn.InstanceNorm2d``).
    """

    dtype: torch.dtype | None
    cast: bool
    channels_last: bool
    norm: str

    def describe(self) -> str:
        """A short name, e.g. ``fused-bf16-cl``, ``torch-autocast-fp16-cl``, ``fused-fp32-nchw``."""
        prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        mode = "" if self.cast or self.dtype is None else "autocast-"
        return f"{self.norm}-{mode}{prec}-{'cl' if self.channels_last else 'nchw'}"


def choose_recipe(device: torch.device, dtype: torch.dtype | None, network: str = "fused",
                  channels_last: bool | None = None) -> Recipe:
    """The recipe for ``device`` and the precision's ``dtype``.

    ``network``: ``fused`` (mpistyle's default: the fastest measured path for the device) or ``torch``
    (torch's instance norm under autocast, channels-last: the path of mpistyle 0.3 and of
    fast_neural_style, the bench's baseline).
    """
    device = torch.device(device)
    if network == "torch":
        return Recipe(dtype, False, True if channels_last is None else channels_last, "torch")
    if network != "fused":
        raise ValueError(f"unknown network path {network!r}")
    if device.type == "cuda":
        norm = "fused" if CUDA_FUSED_NORM else "torch"
        return Recipe(dtype, False, True if channels_last is None else channels_last, norm)
    if dtype is None:
        return Recipe(None, False, CPU_FP32_CHANNELS_LAST if channels_last is None else channels_last, CPU_FP32_NORM)
    return Recipe(dtype, True, True if channels_last is None else channels_last, "fused")


class FrameNet(nn.Module):
    """A style network between uint8 frames: (N, H, W, 3) uint8 RGB -> (N, H, W, 3) uint8 RGB.

    Pads to a multiple of 4 (the net halves twice and doubles twice), converts to the recipe's dtype
    and layout, runs the net, rounds back to uint8. The compiled path compiles this whole module.
    """

    def __init__(self, net: nn.Module, recipe: Recipe, device_type: str) -> None:
        super().__init__()
        self.net = net
        self.recipe = recipe
        self.device_type = device_type

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        r = self.recipe
        h, w = frames.shape[1], frames.shape[2]
        # uint8 -> float: 0..255 are exact in bf16 and fp16 too
        x = frames.permute(0, 3, 1, 2).to(r.dtype if r.cast else torch.float32)
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            mode = "reflect" if h > ph and w > pw else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        x = x.contiguous(memory_format=torch.channels_last if r.channels_last else torch.contiguous_format)
        if r.dtype is not None and not r.cast:
            with torch.autocast(device_type=self.device_type, dtype=r.dtype):
                y = self.net(x)
        else:
            y = self.net(x)
        y = y[:, :, :h, :w].float().clamp(0, 255).round().to(torch.uint8)
        if getattr(self.net, "postfilter", "none") == "median3":  # asked for by the model file
            y = median3(y)
        return y.permute(0, 2, 3, 1).contiguous()


class Stylizer:
    """Batched, deterministic inference: (N,H,W,3) uint8 RGB -> (N,H,W,3) uint8 RGB.

    The numeric path is :func:`choose_recipe`'s for the device and precision (``network="torch"``:
    the baseline of earlier versions). :meth:`use_compiled` swaps in a compiled :class:`FrameNet` of
    one static shape (:mod:`mpistyle.compiled`); batches of another size go through it in pieces of its
    size, the last one padded, so every frame takes the same path.
    A model with a ``postfilter`` attribute (``"median3"``, from its file: :func:`mpistyle.models.load_model`)
    has it applied to every output frame.

    On CUDA, :meth:`submit` overlaps batches: frames go through a pinned host buffer with a
    non-blocking upload, the network and the download run on one of two CUDA streams, so batch k's
    download overlaps batch k+1's upload and network (at most two batches in flight). On CPU
    everything runs at once, exactly as ``__call__``.
    """

    def __init__(self, model: nn.Module, device: torch.device, precision: str = "auto",
                 channels_last: bool | None = None, network: str = "fused") -> None:
        self.device = torch.device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.recipe = choose_recipe(self.device, self.dtype, network, channels_last)
        self.channels_last = self.recipe.channels_last
        net = copy.deepcopy(model).eval().to(self.device)  # the caller's model stays as it was
        if self.recipe.norm == "torch":
            net = use_torch_instance_norm(net)
        if self.recipe.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.recipe.cast:
            net = net.to(self.recipe.dtype)
        for p in net.parameters():
            p.requires_grad_(False)
        self.model = net
        self.framenet = FrameNet(net, self.recipe, self.device.type).eval()
        self.compiled: Any = None  # a callable on (B, H, W, 3) uint8 device tensors of one shape
        self.compiled_shape: tuple[int, ...] | None = None
        self._cuda = self.device.type == "cuda"
        self._streams = [torch.cuda.Stream(self.device) for _ in range(2)] if self._cuda else []
        self._pinned: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]  # (in, out) per stream
        self._last: list[PendingBatch | None] = [None, None]
        self._slot = 0

    @property
    def network(self) -> str:
        """The numeric path, for the buffer's settings and the report: e.g. ``compiled/fused-bf16-cl``."""
        return ("compiled/" if self.compiled is not None else "") + self.recipe.describe()

    def use_compiled(self, runner: Any, shape: tuple[int, ...]) -> None:
        """From now on run frames through ``runner`` (compiled for (B, H, W, 3) uint8 ``shape``)."""
        self.compiled, self.compiled_shape = runner, tuple(shape)

    def resolve_batch(self, spec: str | int | None, height: int, width: int, ranks_per_device: int = 1) -> int:
        """:func:`resolve_batch` for this stylizer's device and precision."""
        return resolve_batch(spec, self.device, height, width, dtype=self.dtype, ranks_per_device=ranks_per_device)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return self.submit(frames).result()

    def submit(self, frames: np.ndarray, to_host: bool = True) -> PendingBatch:
        """Start a batch; ``result()`` gives the host frames, ``tensor()`` the device frames (``to_host=False``)."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected (N,H,W,3) frames, got shape {frames.shape}")
        if not self._cuda or frames.shape[0] == 0 or frames.dtype != np.uint8:
            # CPU (and anything the pinned uint8 path does not take): synchronous, nothing to overlap.
            with torch.inference_mode():
                out = self._forward(torch.from_numpy(np.ascontiguousarray(frames)).to(self.device))
            return PendingBatch(out, None, None, None)
        slot, self._slot = self._slot, 1 - self._slot
        previous = self._last[slot]
        if previous is not None:  # its pinned buffers are about to be reused: finish and keep its result
            if previous._host_out is not None:
                previous.result()
            else:
                previous._event.synchronize()
        n = frames.shape[0]
        pin_in, pin_out = self._buffers(slot, frames.shape)
        host_in = pin_in[:n]
        host_in.numpy()[...] = frames  # into page-locked memory: the upload can then be asynchronous
        stream = self._streams[slot]
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the model's weights are ready
        with torch.inference_mode(), torch.cuda.stream(stream):
            x = host_in.to(self.device, non_blocking=True)
            out = self._forward(x)
            host_out = None
            if to_host:
                host_out = pin_out[:n]
                host_out.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        batch = PendingBatch(out, host_out, event, stream)
        self._last[slot] = batch
        return batch

    def _buffers(self, slot: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pinned (in, out) host buffers of this stream, grown when a batch is larger or the frame size changes."""
        have = self._pinned[slot]
        if have is not None and tuple(have[0].shape[1:]) == tuple(shape[1:]) and have[0].shape[0] >= shape[0]:
            return have
        have = (torch.empty(tuple(shape), dtype=torch.uint8, pin_memory=True),
                torch.empty(tuple(shape), dtype=torch.uint8, pin_memory=True))
        self._pinned[slot] = have
        return have

    def forward_tensor(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 on the device -> the same on the device, synchronously (the controls' path)."""
        with torch.inference_mode():
            return self._forward(frames)

    def _forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 on the device -> (N, H, W, 3) uint8 on the device."""
        n = frames.shape[0]
        if n == 0:
            return frames.clone()
        shape = self.compiled_shape
        if frames.dtype != torch.uint8:  # float RGB 0..255 (not from a video): the eager network takes it
            return self.framenet(frames)
        if self.compiled is None or shape is None or tuple(frames.shape[1:]) != shape[1:]:
            if self.compiled is not None:
                raise ValueError(f"the compiled network takes {shape[2]}x{shape[1]} frames, got "
                                 f"{frames.shape[2]}x{frames.shape[1]}")
            return self.framenet(frames)
        b = shape[0]
        if n == b:
            return self.compiled(frames)
        outs = []
        for i in range(0, n, b):  # pieces of the compiled batch size; the last padded with its last frame
            piece = frames[i:i + b]
            k = piece.shape[0]
            if k < b:
                piece = torch.cat([piece, piece[-1:].expand(b - k, *piece.shape[1:])])
            outs.append(self.compiled(piece.contiguous())[:k])
        return torch.cat(outs)


class ControlledStylizer:
    """A :class:`Stylizer` as the rank worker uses it, with the look controls (:mod:`mpistyle.controls`)
    applied to its output: source frames in, the final look out, before temporal fusion (so the fusion,
    the warm-up exports and the spool all see the final look).

    The default controls pass frames straight to the stylizer (the path of earlier versions, bit for
    bit). Otherwise the frames go to the stylizer's device once; the network (compiled or eager) runs at
    the stroke scale's size and the controls run there too, in torch: one code path on CPU and GPU.
    """

    def __init__(self, stylizer: Stylizer, controls: Any) -> None:
        self.stylizer = stylizer
        self.controls = controls
        self.device = stylizer.device

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        from .controls import apply_controls

        if self.controls.identity:
            return self.stylizer(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected (N,H,W,3) frames, got shape {frames.shape}")
        with torch.inference_mode():
            source = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
            out = apply_controls(source, self._network, self.controls)
            return out.cpu().numpy()

    def _network(self, frames: torch.Tensor) -> torch.Tensor:
        """The compiled network at the size it was compiled for (the largest the controls use), the eager
        one at the other (painted detail runs the network at two sizes): the same choice on every rank."""
        shape = self.stylizer.compiled_shape
        if self.stylizer.compiled is not None and shape is not None and tuple(frames.shape[1:]) != shape[1:]:
            return self.stylizer.framenet(frames)
        return self.stylizer.forward_tensor(frames)
