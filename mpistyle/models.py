"""Per-frame style networks: the fast_neural_style TransformerNet, safe loading, saving, inference.

A second, tiny architecture, :class:`PointwiseNet` (a 1x1 convolution), loads through the same safe
path; its identity instance (:func:`write_identity_model`) lets benchmarks measure the pipeline alone.

The layout and the state-dict key names are exactly those of pytorch/examples' fast_neural_style,
so models trained by ``mpistyle train`` load in other tools and theirs load here.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpistyle.errors import MpistyleError

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "starry-night"
# Name of the extra record that save_model() adds inside torch's zip archive. torch.load ignores
# records it does not reference, so the file stays a plain state dict for every other tool.
PROVENANCE_RECORD = "mpistyle_provenance.json"


class ConvLayer(nn.Module):
    """Reflection-padded convolution (fast_neural_style's ``ConvLayer``: attribute ``conv2d``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.reflection_pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d(self.reflection_pad(x))


class ResidualBlock(nn.Module):
    """conv-IN-ReLU-conv-IN plus identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, kernel_size=3, stride=1)
        self.in1 = nn.InstanceNorm2d(channels, affine=True)
        self.conv2 = ConvLayer(channels, channels, kernel_size=3, stride=1)
        self.in2 = nn.InstanceNorm2d(channels, affine=True)
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
        if self.upsample:
            x = F.interpolate(x, mode="nearest", scale_factor=self.upsample)
        return self.conv2d(self.reflection_pad(x))


class TransformerNet(nn.Module):
    """Johnson et al.'s image transformation network, fast_neural_style layout; RGB 0..255 in and out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvLayer(3, 32, kernel_size=9, stride=1)
        self.in1 = nn.InstanceNorm2d(32, affine=True)
        self.conv2 = ConvLayer(32, 64, kernel_size=3, stride=2)
        self.in2 = nn.InstanceNorm2d(64, affine=True)
        self.conv3 = ConvLayer(64, 128, kernel_size=3, stride=2)
        self.in3 = nn.InstanceNorm2d(128, affine=True)
        self.res1 = ResidualBlock(128)
        self.res2 = ResidualBlock(128)
        self.res3 = ResidualBlock(128)
        self.res4 = ResidualBlock(128)
        self.res5 = ResidualBlock(128)
        self.deconv1 = UpsampleConvLayer(128, 64, kernel_size=3, stride=1, upsample=2)
        self.in4 = nn.InstanceNorm2d(64, affine=True)
        self.deconv2 = UpsampleConvLayer(64, 32, kernel_size=3, stride=1, upsample=2)
        self.in5 = nn.InstanceNorm2d(32, affine=True)
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


# ----------------------------------------------------------------------------------------------
# Bundled models and model specs


def bundled_models() -> dict[str, str]:
    """Name -> file path of every model shipped in ``mpistyle/weights/*.pth``."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    return {p.stem: str(p) for p in sorted(WEIGHTS_DIR.glob("*.pth"))}


def resolve_model(spec: str | None) -> str:
    """Turn ``--model`` into a file path: None -> default bundled model, a bundled name, or a path."""
    bundled = bundled_models()
    if spec is None:
        if not bundled:
            raise MpistyleError(
                "no bundled model is installed; pass --model PATH to a TransformerNet .pth file"
            )
        if DEFAULT_MODEL in bundled:
            return bundled[DEFAULT_MODEL]
        return bundled[sorted(bundled)[0]]
    if spec in bundled:
        return bundled[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path)
    looks_like_name = os.sep not in spec and not spec.endswith((".pth", ".pt"))
    if looks_like_name:
        names = ", ".join(sorted(bundled)) or "none installed"
        raise MpistyleError(f"unknown model '{spec}' (bundled: {names})")
    raise MpistyleError(f"model file not found: {spec}")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True, every failure turned into one line naming the file."""
    try:
        if os.path.getsize(path) == 0:
            raise MpistyleError(f"model file {path} is empty")
    except OSError as exc:
        raise MpistyleError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    try:
        # weights_only=True: the unpickler only builds tensors and plain containers, so a file
        # carrying a code payload is refused before any of it runs.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights_only" in text.lower() or "global" in text.lower():
            # torch names the refused callable on a line of its own ("unsupported GLOBAL posix.system").
            why = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "global" in ln), "")
            raise MpistyleError(
                f"refusing to load {path}: it holds pickled code or objects other than tensors"
                + (f" ({why[:160]})" if why else "")
            ) from None
        raise MpistyleError(f"model file {path} is not a valid torch file ({_first_line(exc)})") from None
    except (
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        zipfile.BadZipFile,
        KeyError,
        AttributeError,
        TypeError,
        UnicodeDecodeError,
        IndexError,
    ) as exc:
        raise MpistyleError(
            f"model file {path} is corrupt or not a torch file ({_first_line(exc)})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # tolerate the common {"state_dict": ...} wrapper
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict) and "step" in obj:
        obj = obj["model"]  # an mpistyle training checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MpistyleError(f"model file {path} does not hold a state dict of tensors")
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) or not text:
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text.splitlines()[0][:160]


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop stale InstanceNorm running stats (pre-0.4 files) and bring every tensor to float32."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")  # saved from DataParallel
        last = key.rsplit(".", 1)[-1]
        if last in ("running_mean", "running_var", "num_batches_tracked"):
            continue
        out[key] = value.float() if value.is_floating_point() else value
    return out


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


# Architectures load_model knows, recognised by their state-dict keys: (class, description for errors).
ARCHITECTURES: dict[str, tuple[type[nn.Module], str]] = {
    "transformer": (TransformerNet, "a fast_neural_style TransformerNet"),
    "pointwise": (PointwiseNet, "a PointwiseNet (1x1 convolution 3->3)"),
}


def architecture_of(state: dict[str, torch.Tensor]) -> str:
    """Which of :data:`ARCHITECTURES` a state dict is meant for: ``pointwise`` when its keys say so."""
    # Any pointwise key and no TransformerNet key: a PointwiseNet (whose errors then name the odd keys).
    if any(k.startswith("pointwise.") for k in state) and not any(k.startswith("conv1.") for k in state):
        return "pointwise"
    return "transformer"  # the default: its error message lists what is missing


def load_model(spec: str | None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a TransformerNet (or a PointwiseNet) from a bundled name or a .pth path; eval mode, on ``device``."""
    path = resolve_model(spec)
    state = clean_state_dict(_read_state_dict(path))
    cls, what = ARCHITECTURES[architecture_of(state)]
    model = cls()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_abbrev(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_abbrev(unexpected)}")
        raise MpistyleError(f"model file {path} is not {what}: " + "; ".join(parts))
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise MpistyleError(
                f"model file {path} is not {what}: shape mismatch "
                f"for {key}: {tuple(state[key].shape)} in file, {tuple(value.shape)} expected"
            )
    model.load_state_dict(state, strict=True)
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise MpistyleError(f"model file {path} has non-finite weights in {_abbrev(bad)}")
    return model.eval().to(device)


def identity_model() -> PointwiseNet:
    """A PointwiseNet that returns its input: weight = identity, bias = 0 (exact in fp32, bf16 and fp16)."""
    net = PointwiseNet()
    with torch.no_grad():
        net.pointwise.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
        net.pointwise.bias.zero_()
    return net.eval()


def write_identity_model(path: str) -> str:
    """Write the identity :class:`PointwiseNet` to ``path`` (fp32, with a provenance record); returns ``path``."""
    save_model(identity_model(), path, {"architecture": "PointwiseNet", "style": "identity"}, half=False)
    return path


def _abbrev(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def model_info(path: str) -> dict[str, Any]:
    """Provenance recorded by save_model() (style, settings, version); {} when the file has none."""
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith("/" + PROVENANCE_RECORD) or name == PROVENANCE_RECORD:
                    return json.loads(zf.read(name).decode("utf-8"))
    except (OSError, zipfile.BadZipFile, ValueError, UnicodeDecodeError):
        pass
    return {}


def save_model(model: nn.Module, path: str, provenance: dict[str, Any], half: bool = True) -> None:
    """Write a flat fast_neural_style state dict (fp16 when ``half``) plus a provenance record.

    The provenance is an extra JSON record inside torch's zip archive, next to ``data.pkl``; torch
    never reads it, so a strict ``TransformerNet().load_state_dict(torch.load(path))`` works anywhere.
    The file is written to a temporary name and renamed, so a crash never leaves half a model.
    """
    state = {
        k: (v.detach().to("cpu").half() if half and v.is_floating_point() else v.detach().to("cpu"))
        for k, v in model.state_dict().items()
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    meta = dict(provenance)
    meta.setdefault("stored_dtype", "float16" if half else "float32")

    def write(raw: BinaryIO) -> None:
        with zipfile.ZipFile(buf) as src, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as dst:
            prefix = src.namelist()[0].split("/", 1)[0]
            for info in src.infolist():
                dst.writestr(info, src.read(info.filename))
            # torch's reader wants 64-byte-aligned records only for tensor data; a JSON record
            # written after them does not disturb it.
            dst.writestr(f"{prefix}/{PROVENANCE_RECORD}", json.dumps(meta, indent=1, sort_keys=True))

    atomic_write(path, write, suffix=".pth")


def atomic_write(path: str, write: Callable[[BinaryIO], None], suffix: str = "") -> None:
    """Write ``path`` through a temporary file in the same directory, fsync, then rename.

    A crash never leaves half a file. mkstemp creates 0600 files; the result gets the permissions a
    plain open() would give (0666 & ~umask).
    """
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=out_dir)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    try:
        with os.fdopen(fd, "wb") as raw:
            write(raw)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# Inference


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
# (176.6 at 640x360, 178.8 at 128x72: padding weighs more on small frames): rounded up.
PEAK_ACTIVATION_ELEMENTS_PER_PIXEL = 180
# uint8 input, its float32 and channels-last copies, the float32 output and the uint8 result.
IO_BYTES_PER_PIXEL = 3 + 12 + 12 + 12 + 3
# Allocator rounding, cuDNN workspaces, InstanceNorm run in float32 under autocast.
AUTO_BATCH_SAFETY = 1.5
AUTO_BATCH_MEMORY_FRACTION = 0.5  # of the free device memory at start: the rest for fusion and other ranks
CUDA_MAX_AUTO_BATCH = 16  # H100 figures: 501 frames/s at 8, 536 at 32: past 16 only latency and memory grow
# CPU: frames per call that the CPU figures favour (README "Measured"); batching buys nothing there.
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


class Stylizer:
    """Batched, deterministic inference: (N,H,W,3) uint8 RGB -> (N,H,W,3) uint8 RGB.

    On CUDA, :meth:`submit` overlaps batches: frames go through a pinned host buffer with a
    non-blocking upload, the network and the download run on one of two CUDA streams, so batch k's
    download overlaps batch k+1's upload and network (at most two batches in flight). On CPU
    everything runs at once, exactly as ``__call__``.
    """

    def __init__(
        self, model: nn.Module, device: torch.device, precision: str = "auto", channels_last: bool = True
    ) -> None:
        self.device = torch.device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.channels_last = channels_last
        self.model = model.eval().to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._cuda = self.device.type == "cuda"
        self._streams = [torch.cuda.Stream(self.device) for _ in range(2)] if self._cuda else []
        self._pinned: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]  # (in, out) per stream
        self._last: list[PendingBatch | None] = [None, None]
        self._slot = 0

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

    def _forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 on the device -> (N, H, W, 3) uint8 on the device."""
        n, h, w, _ = frames.shape
        if n == 0:
            return frames.clone()
        x = frames.permute(0, 3, 1, 2).float()
        # The net halves twice and doubles twice: pad to a multiple of 4 so the output matches.
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            mode = "reflect" if h > ph and w > pw else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                y = self.model(x)
        else:
            y = self.model(x)
        y = y[:, :, :h, :w].float().clamp_(0, 255).round_()
        return y.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
