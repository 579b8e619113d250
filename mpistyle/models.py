"""Model files: bundled models, safe loading (tensors only), saving with a provenance record.

Two architectures of :mod:`mpistyle.nets` load through the same safe path: fast_neural_style's
:class:`~mpistyle.nets.TransformerNet` and the tiny :class:`~mpistyle.nets.PointwiseNet`, whose
identity instance (:func:`write_identity_model`) lets benchmarks measure the pipeline alone.
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

import torch
from torch import nn

from mpistyle.errors import MpistyleError
from mpistyle.nets import STALE_NORM_KEYS, PointwiseNet, TransformerNet

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
STYLES_DIR = Path(__file__).resolve().parent / "styles"  # the paintings of the bundled styles
DEFAULT_MODEL = "starry-night"
# One line each on what a bundled style looks like (``mpistyle models``).
DESCRIPTIONS = {
    "starry-night": "The Starry Night (van Gogh, 1889): swirling blue and yellow brush strokes over the whole "
                    "frame, the painting's night-blue palette; the subject stays readable",
    "great-wave": "The Great Wave off Kanagawa (Hokusai, c. 1831): the print's cream, slate blue and ink, with "
                  "foam-like curls and woodblock line work",
    "udnie": "Udnie (Picabia, 1913): cubist facets in warm greys, cream, ochre and blue",
}
# Name of the extra record that save_model() adds inside torch's zip archive. torch.load ignores
# records it does not reference, so the file stays a plain state dict for every other tool.
PROVENANCE_RECORD = "mpistyle_provenance.json"


# ----------------------------------------------------------------------------------------------
# Bundled models and model specs


def bundled_models() -> dict[str, str]:
    """Name -> file path of every model shipped in ``mpistyle/weights/*.pth``."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    return {p.stem: str(p) for p in sorted(WEIGHTS_DIR.glob("*.pth"))}


def bundled_style_image(spec: str) -> str | None:
    """The painting a bundled style was trained on (``mpistyle/styles/NAME.jpg``), None for other models."""
    path = STYLES_DIR / f"{spec}.jpg"
    return str(path) if spec in bundled_models() and path.is_file() else None


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
        if last in STALE_NORM_KEYS:
            continue
        out[key] = value.float() if value.is_floating_point() else value
    return out


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
    # A filter on the output that the model was trained and scored with (mpistyle.engine.median3):
    # recorded in the provenance, so the state dict stays plain fast_neural_style.
    post = model_info(path).get("postfilter", "none")
    if post not in ("none", "median3"):
        raise MpistyleError(f"model file {path} asks for an unknown postfilter '{post}' (known: none, median3)")
    model.postfilter = post
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
