"""``mpistyle train``: train a fast_neural_style TransformerNet with a VGG-19 perceptual loss.

Data-parallel over MPI: every rank draws the same global batch from a generator seeded by
(seed, step), takes its own slice, and the ranks sum their gradients (Allreduce on one flat
float32 buffer). Per-rank losses are scaled by local/global batch size, so the summed gradient is
exactly the gradient of the global-batch mean and N ranks follow the 1-rank curve up to float
summation order. Because the data and augmentation for step k depend only on (seed, k), a
checkpoint (model + optimizer + step) is enough to resume bit-for-bit.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from mpistyle import __version__
from mpistyle.errors import Interrupted, MpistyleError
from mpistyle.losses import (
    DEFAULT_CONTENT_LAYERS,
    DEFAULT_STYLE_LAYERS,
    VGG19Features,
    content_loss,
    gram,
    style_grams_of,
    tv_loss,
)
from mpistyle.models import TransformerNet, atomic_write, save_model

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".y4m")
CHECKPOINT_VERSION = 1

# Documented defaults (README "Training"). Losses are on caffe-scaled VGG-19 features (0..255 input).
DEFAULTS = {
    "size": 160,
    "batch_size": 4,
    "steps": 2000,
    "lr": 1e-3,
    "content_weight": 1.0,
    "style_weight": 1.0,  # 10+ lets the texture wipe out the content (see README, Training)
    "tv_weight": 2e-2,
    "temporal_weight": 0.0,
    "style_size": 256,
    "video_frames": 48,
}


# ----------------------------------------------------------------------------------------------
# Images and content data


def load_image(path: str) -> np.ndarray:
    """(H,W,3) uint8 RGB of an image file; MpistyleError if missing or unreadable."""
    if not os.path.isfile(path):
        raise MpistyleError(f"image not found: {path}")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise MpistyleError(f"cannot read image {path} (not an image OpenCV can decode)")
    return np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


def sample_video_frames(path: str, count: int, consecutive: bool = False) -> list[np.ndarray]:
    """``count`` frames spread evenly over a video (with ``consecutive``: the frame after each, too)."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    except (OSError, RuntimeError, StopIteration) as exc:
        raise MpistyleError(f"cannot read video {path}: {str(exc).splitlines()[0][:160]}") from None
    if not frames:
        raise MpistyleError(f"video {path} has no frames")
    n = len(frames) - (1 if consecutive else 0)
    if n < 1:
        return []
    idx = sorted({int(i) for i in np.linspace(0, n - 1, num=min(count, n))})
    out: list[np.ndarray] = []
    for i in idx:
        out.append(frames[i].copy())
        if consecutive:
            out.append(frames[i + 1].copy())
    return out


def _shrink(img: np.ndarray, short: int) -> np.ndarray:
    """Downscale so the short side is at most ``short`` (keeps memory small for big photos)."""
    h, w = img.shape[:2]
    if min(h, w) <= short:
        return img
    s = short / min(h, w)
    return np.ascontiguousarray(cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA))


@dataclass
class ContentData:
    """Content images (stills and video frames) and consecutive video frame pairs."""

    images: list[np.ndarray] = field(default_factory=list)
    pairs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def collect_content(paths: Sequence[str], size: int, video_frames: int, want_pairs: bool) -> ContentData:
    """Images, directories of images/videos, and videos (``video_frames`` frames sampled from each)."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += [
                os.path.join(p, f)
                for f in sorted(os.listdir(p))
                if f.lower().endswith(IMAGE_EXTS + VIDEO_EXTS)
            ]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise MpistyleError(f"content path not found: {p}")
    data = ContentData()
    keep = 2 * size  # random crops are taken at scales 1x..1.5x of --size
    for f in files:
        ext = os.path.splitext(f)[1].lower()
        if ext in VIDEO_EXTS:
            frames = sample_video_frames(f, video_frames, consecutive=want_pairs)
            frames = [_shrink(x, keep) for x in frames]
            if want_pairs:
                data.pairs += list(zip(frames[0::2], frames[1::2], strict=True))
                data.images += frames[0::2]
            else:
                data.images += frames
        else:
            data.images.append(_shrink(load_image(f), keep))
        data.sources.append(os.path.basename(f))
    data.images = [im for im in data.images if min(im.shape[:2]) >= 8]
    if not data.images:
        raise MpistyleError(
            "no usable content images (give image files, videos or directories with --content)"
        )
    return data


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random-scale (1..1.5x), random-position square crop with a random horizontal flip."""
    h, w = img.shape[:2]
    scale = size * rng.uniform(1.0, 1.5) / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    y, x = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    crop = img[y : y + size, x : x + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def to_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------------------------
# Temporal loss: simulated camera motion with exactly known flow


def random_affines(
    n: int, size: int, rng: np.random.Generator, shift: float = 0.05, zoom: float = 0.08, rot_deg: float = 3.0
) -> torch.Tensor:
    """(n,2,3) affine_grid matrices: small shift (fraction of the frame), zoom and rotation."""
    mats = []
    for _ in range(n):
        a = math.radians(rng.uniform(-rot_deg, rot_deg))
        s = 1.0 + rng.uniform(-zoom, zoom)
        tx, ty = rng.uniform(-2 * shift, 2 * shift, size=2)  # affine_grid units: the frame spans [-1, 1]
        mats.append([[s * math.cos(a), -s * math.sin(a), tx], [s * math.sin(a), s * math.cos(a), ty]])
    return torch.tensor(mats, dtype=torch.float32)


def warp_affine(x: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp by the affine ``theta`` (bilinear); returns the image and the mask of valid pixels."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = ((grid.abs() <= 1.0 - 1e-6).all(dim=-1)).unsqueeze(1).to(x.dtype)
    return moved, inside


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over the masked pixels, averaged over the batch."""
    num = ((a - b) ** 2 * mask).sum(dim=(1, 2, 3))
    den = mask.sum(dim=(1, 2, 3)).clamp_min(1.0) * a.shape[1]
    return (num / den).mean()


def flow_to_grid(flow: np.ndarray) -> torch.Tensor:
    """(H,W,2) pixel flow -> grid_sample grid (1,H,W,2) for backward warping (align_corners=False)."""
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    gx = (xs + flow[..., 0] + 0.5) * (2.0 / w) - 1.0
    gy = (ys + flow[..., 1] + 0.5) * (2.0 / h) - 1.0
    return torch.from_numpy(np.stack([gx, gy], axis=-1))[None]


def video_pair_sample(
    pair: tuple[np.ndarray, np.ndarray], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Same random crop of two consecutive frames, plus the backward flow t->t-1 and its certainty mask."""
    from mpistyle import flow as flowmod

    a, b = pair
    stacked = np.concatenate([a, b], axis=2)
    h, w = a.shape[:2]
    scale = size * rng.uniform(1.0, 1.5) / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    y, x = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    ra = cv2.resize(stacked[..., :3], (nw, nh), interpolation=cv2.INTER_AREA)[y : y + size, x : x + size]
    rb = cv2.resize(stacked[..., 3:], (nw, nh), interpolation=cv2.INTER_AREA)[y : y + size, x : x + size]
    prev, cur = np.ascontiguousarray(ra), np.ascontiguousarray(rb)
    est = flowmod.FlowEstimator("dis", "medium")
    g_cur, g_prev = flowmod.to_gray(cur), flowmod.to_gray(prev)
    back = est.flow(g_cur, g_prev)  # cur(x) ~ prev(x + back(x))
    fwd = est.flow(g_prev, g_cur)
    mask = _certainty(back, fwd)
    return prev, cur, back, mask


def _certainty(back: np.ndarray, fwd: np.ndarray) -> np.ndarray:
    """Ruder et al.'s forward-backward consistency check, computed here so training does not depend on
    the exact helper names of :mod:`mpistyle.flow`."""
    h, w = back.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx, my = xs + back[..., 0], ys + back[..., 1]
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    fwd_at = cv2.remap(fwd, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    s = back + fwd_at
    ok = (s**2).sum(-1) <= 0.01 * ((back**2).sum(-1) + (fwd_at**2).sum(-1)) + 0.5
    return (inside & ok).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# MPI


class Comm:
    """MPI world when mpi4py is importable (1 rank without mpiexec), else a single-rank stand-in."""

    def __init__(self) -> None:
        self._mpi = None
        self.comm = None
        self.rank, self.size = 0, 1
        try:
            from mpi4py import MPI
        except ImportError:  # pragma: no cover - mpi4py is an optional extra
            return
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        if self.size > 1:
            self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        return buf

    def bcast_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` on every rank (lets all ranks fail together, no hang)."""
        if self.size == 1:
            return ok
        return bool(self.comm.allreduce(int(ok), op=self._mpi.MIN))

    def abort(self, code: int = 1) -> None:
        if self.size > 1:
            self.comm.Abort(code)


def rank_slice(global_n: int, rank: int, size: int) -> slice:
    """Contiguous share of a global batch (earlier ranks take the remainder)."""
    base, extra = divmod(global_n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    style: str
    content: list[str]
    output: str
    size: int = DEFAULTS["size"]
    batch_size: int = DEFAULTS["batch_size"]
    steps: int = DEFAULTS["steps"]
    epochs: float | None = None
    lr: float = DEFAULTS["lr"]
    content_weight: float = DEFAULTS["content_weight"]
    style_weight: float = DEFAULTS["style_weight"]
    tv_weight: float = DEFAULTS["tv_weight"]
    temporal_weight: float = DEFAULTS["temporal_weight"]
    style_size: int = DEFAULTS["style_size"]
    video_frames: int = DEFAULTS["video_frames"]
    style_layers: tuple[str, ...] = DEFAULT_STYLE_LAYERS
    content_layers: tuple[str, ...] = DEFAULT_CONTENT_LAYERS
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    checkpoint_every: int = 25
    resume: bool = False
    log_every: int = 10
    threads: int | None = None

    def settings(self) -> dict[str, Any]:
        """What goes into the model's provenance record and the checkpoint (paths reduced to names)."""
        return {
            "size": self.size,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "content_weight": self.content_weight,
            "style_weight": self.style_weight,
            "tv_weight": self.tv_weight,
            "temporal_weight": self.temporal_weight,
            "style_size": self.style_size,
            "style_layers": list(self.style_layers),
            "content_layers": list(self.content_layers),
            "seed": self.seed,
            "video_frames": self.video_frames,
        }


def _resize_style(img: np.ndarray, short: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = short / min(h, w)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(img, (round(w * s), round(h * s)), interpolation=interp))


def _flat_grads(params: list[torch.nn.Parameter]) -> np.ndarray:
    return (
        torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        )
        .cpu()
        .numpy()
    )


def _set_grads(params: list[torch.nn.Parameter], flat: np.ndarray) -> None:
    t = torch.from_numpy(flat)
    off = 0
    for p in params:
        n = p.numel()
        p.grad = t[off : off + n].view_as(p).to(device=p.device, dtype=p.dtype).clone()
        off += n


def _atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh), suffix=".ckpt")


def load_checkpoint(path: str) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable checkpoint
        raise MpistyleError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:160]}") from None
    if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION or "model" not in ck:
        raise MpistyleError(f"{path} is not an mpistyle training checkpoint")
    return ck


class Trainer:
    """One training run; ``run()`` returns the final per-step loss history (rank-0 view, global values)."""

    def __init__(self, cfg: TrainConfig, comm: Comm | None = None) -> None:
        self.cfg = cfg
        self.comm = comm or Comm()
        self.stop: Any = None  # mpistyle.mpi.StopFlag from the CLI (signal -> checkpoint, exit 75)
        self.device = torch.device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        for name in ("size", "batch_size", "style_size"):
            if getattr(cfg, name) < 1:
                raise MpistyleError(f"--{name.replace('_', '-')} must be positive")
        if cfg.size < 16 or cfg.size % 4:
            raise MpistyleError("--size must be a multiple of 4 and at least 16")
        if cfg.batch_size < self.comm.size:
            raise MpistyleError(
                f"--batch-size {cfg.batch_size} is smaller than the {self.comm.size} MPI ranks; "
                "every rank needs at least one image per step"
            )
        self.style_image = _resize_style(load_image(cfg.style), cfg.style_size)
        want_pairs = cfg.temporal_weight > 0
        self.data = collect_content(cfg.content, cfg.size, cfg.video_frames, want_pairs)
        self.use_video_pairs = want_pairs and bool(self.data.pairs) and _have_flow()
        if cfg.epochs is not None:
            cfg.steps = max(1, math.ceil(cfg.epochs * len(self.data.images) / cfg.batch_size))
        torch.manual_seed(cfg.seed)
        self.model = TransformerNet().to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        layers = tuple(dict.fromkeys(cfg.style_layers + cfg.content_layers))
        self.vgg = VGG19Features(layers).to(self.device)
        self.style_grams = style_grams_of(self.vgg, self.style_image, cfg.style_layers)
        self.step = 0
        self.history: list[dict[str, float]] = []
        # Loss settings per stretch of steps: a resumed run may change weights or lr (a schedule done
        # by hand); the model's provenance lists every phase, so its record stays true.
        self.phases: list[dict[str, Any]] = [{"from_step": 0, **cfg.settings()}]
        if cfg.resume:
            self._resume()

    # -- checkpoints --------------------------------------------------------------------------
    def _ckpt_path(self) -> str:
        return self.cfg.checkpoint or (os.path.splitext(self.cfg.output)[0] + ".ckpt")

    def _resume(self) -> None:
        path = self._ckpt_path()
        if not os.path.exists(path):
            logger.warning("no checkpoint at %s: starting from scratch", path)
            return
        ck = load_checkpoint(path)
        saved = ck.get("settings", {})
        changed = [
            k
            for k in ("size", "batch_size", "seed", "style_size")
            if k in saved and saved[k] != self.cfg.settings()[k]
        ]
        if changed:
            raise MpistyleError(
                f"cannot resume {path}: {', '.join(changed)} differ from the checkpoint's "
                f"({', '.join(f'{k}={saved[k]}' for k in changed)})"
            )
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr
        self.step = int(ck["step"])
        self.history = [dict(h) for h in ck.get("history", [])]
        self.phases = [dict(p) for p in ck.get("phases", [{"from_step": 0, **saved}])]
        current = self.cfg.settings()
        if any(current[k] != v for k, v in self.phases[-1].items() if k in current):
            self.phases.append({"from_step": self.step, **current})
            logger.info(
                "settings changed at step %d: %s",
                self.step,
                {k: v for k, v in current.items() if self.phases[-2].get(k) != v},
            )
        torch.set_rng_state(ck["torch_rng"])
        logger.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> None:
        if self.comm.rank != 0:
            return
        ck = {
            "version": CHECKPOINT_VERSION,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "torch_rng": torch.get_rng_state(),
            "settings": self.cfg.settings(),
            "history": self.history,
            "phases": self.phases,
        }
        _atomic_torch_save(ck, self._ckpt_path())
        self.save_model()

    def save_model(self) -> None:
        if self.comm.rank != 0:
            return
        prov = {
            "format": "fast_neural_style TransformerNet state dict",
            "style": os.path.basename(self.cfg.style),
            "style_name": os.path.splitext(os.path.basename(self.cfg.style))[0],
            "content": self.data.sources[:50],
            "steps": self.step,
            "settings": self.cfg.settings(),
            "mpi_ranks": self.comm.size,
            "mpistyle_version": __version__,
            "torch_version": torch.__version__,
            "final_losses": self.history[-1] if self.history else {},
            "phases": self.phases,
        }
        save_model(self.model, self.cfg.output, prov, half=True)

    # -- one step -----------------------------------------------------------------------------
    def _step_batch(self, step: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The global batch of step ``step`` (same on every rank) and its augmentation parameters."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.integers(0, len(self.data.images), size=cfg.batch_size)
        crops = np.stack([random_crop(self.data.images[i], cfg.size, rng) for i in idx])
        extra: dict[str, Any] = {}
        if cfg.temporal_weight > 0:
            if self.use_video_pairs and rng.random() < 0.5:
                k = int(rng.integers(0, len(self.data.pairs)))
                extra["pair"] = video_pair_sample(self.data.pairs[k], cfg.size, rng)
            extra["theta"] = random_affines(cfg.batch_size, cfg.size, rng)
        return crops, extra

    def _losses(
        self, x: torch.Tensor, extra: dict[str, Any], sl: slice
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted total loss of the local batch ``x`` (means over the local images) and its parts."""
        cfg = self.cfg
        y = self.model(x)
        fy = self.vgg(y)
        with torch.no_grad():
            fx = self.vgg(x)
        lc = content_loss(fy, fx, cfg.content_layers)
        ls = torch.zeros((), device=self.device)
        for n in cfg.style_layers:
            g = gram(fy[n])
            ls = ls + F.mse_loss(g, self.style_grams[n].expand_as(g))
        ltv = tv_loss(y)
        total = cfg.content_weight * lc + cfg.style_weight * ls + cfg.tv_weight * ltv
        parts = {
            "content": lc.item() * cfg.content_weight,
            "style": ls.item() * cfg.style_weight,
            "tv": ltv.item() * cfg.tv_weight,
            "temporal": 0.0,
        }
        if cfg.temporal_weight > 0:
            lt = self._temporal_loss(x, y, extra, sl)
            total = total + cfg.temporal_weight * lt
            parts["temporal"] = lt.item() * cfg.temporal_weight
        return total, parts

    def batch_loss(self, step: int) -> float:
        """Weighted total loss of step ``step``'s global batch under the current weights (no update)."""
        crops, extra = self._step_batch(step)
        sl = slice(0, self.cfg.batch_size)
        with torch.no_grad():
            total, _ = self._losses(to_batch(crops).to(self.device), extra, sl)
        return float(total)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        crops, extra = self._step_batch(self.step)
        sl = rank_slice(cfg.batch_size, self.comm.rank, self.comm.size)
        local = crops[sl]
        frac = len(local) / cfg.batch_size  # scales local means so the Allreduce sum is the global mean
        x = to_batch(local).to(self.device)
        self.opt.zero_grad(set_to_none=True)
        total, parts = self._losses(x, extra, sl)
        (total * frac).backward()
        flat = _flat_grads(self.params)
        losses = (
            np.array([parts["content"], parts["style"], parts["tv"], parts["temporal"]], dtype=np.float64)
            * frac
        )
        self.comm.allreduce_sum(flat)
        self.comm.allreduce_sum(losses)
        _set_grads(self.params, flat)
        self.opt.step()
        self.step += 1
        rec = {
            "step": float(self.step),
            "content": float(losses[0]),
            "style": float(losses[1]),
            "tv": float(losses[2]),
            "temporal": float(losses[3]),
            "total": float(losses.sum()),
        }
        self.history.append(rec)
        return rec

    def _temporal_loss(
        self, x: torch.Tensor, y: torch.Tensor, extra: dict[str, Any], sl: slice
    ) -> torch.Tensor:
        """net(moved frame) vs moved(net(frame)) under the valid mask; plus a real video pair when drawn."""
        theta = extra["theta"][sl].to(self.device)
        x2, m = warp_affine(x, theta)
        y_moved, m2 = warp_affine(y, theta)
        # Pixels the motion brings in from outside the frame are black in x2: leave them out.
        mask = m * m2
        y2 = self.model(x2)
        loss = masked_mse(y2, y_moved, mask)
        if "pair" in extra and self.comm.rank == 0:
            # The one real pair of a step counts on rank 0 only, so it is counted once globally
            # (the 1/frac rescale undoes the local-share scaling applied to the whole loss).
            prev, cur, back, cmask = extra["pair"]
            frac = (sl.stop - sl.start) / self.cfg.batch_size
            tp = to_batch([prev, cur]).to(self.device)
            out = self.model(tp)
            warped = F.grid_sample(
                out[:1],
                flow_to_grid(back).to(self.device),
                mode="bilinear",
                padding_mode="border",
                align_corners=False,
            )
            mk = torch.from_numpy(cmask)[None, None].to(self.device)
            loss = loss + masked_mse(out[1:], warped, mk) / frac / self.cfg.batch_size
        return loss

    # -- loop ---------------------------------------------------------------------------------
    def run(self) -> list[dict[str, float]]:
        cfg = self.cfg
        bar = None
        tty = self.comm.rank == 0 and sys.stderr.isatty()
        if tty:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        t0 = time.monotonic()
        start = self.step
        try:
            while self.step < cfg.steps:
                rec = self.train_step()
                if not all(math.isfinite(v) for v in rec.values()):
                    raise MpistyleError(
                        f"training diverged at step {self.step} (non-finite loss); "
                        "lower --lr or the loss weights"
                    )
                if self.comm.rank == 0:
                    msg = (
                        f"content {rec['content']:.4g} style {rec['style']:.4g} tv {rec['tv']:.3g}"
                        + (f" temporal {rec['temporal']:.4g}" if cfg.temporal_weight > 0 else "")
                        + f" total {rec['total']:.4g}"
                    )
                    if bar is not None:
                        bar.set_postfix_str(msg, refresh=False)
                        bar.update(1)
                    elif self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        rate = (time.monotonic() - t0) / max(1, self.step - start)
                        print(
                            f"step {self.step}/{cfg.steps} {msg} ({rate:.2f} s/step)",
                            file=sys.stderr,
                            flush=True,
                        )
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                # SIGTERM/SIGUSR1 (SLURM's time-limit warning) on any rank: all ranks agree after
                # this step, save a checkpoint and exit 75 so the sbatch script requeues.
                if self.stop is not None and self.step < cfg.steps and not self.comm.bcast_ok(not self.stop):
                    self.save_checkpoint()
                    raise Interrupted(f"stopped at step {self.step} ({self.stop.reason or 'signal'}); "
                                      "checkpoint saved: rerun with --resume to continue")
        finally:
            if bar is not None:
                bar.close()
        self.save_checkpoint()
        if self.comm.rank == 0:
            logger.info(
                "trained %d steps in %.1f s; model written to %s",
                self.step - start,
                time.monotonic() - t0,
                cfg.output,
            )
        return self.history


def _have_flow() -> bool:
    try:
        from mpistyle import flow  # noqa: F401
    except ImportError:
        return False
    return hasattr(flow, "FlowEstimator") and hasattr(flow, "to_gray")


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--style", required=True, help="style image (painting) to learn")
    parser.add_argument(
        "--content",
        required=True,
        nargs="+",
        metavar="PATH",
        help="content images, videos, or directories of them (frames are sampled from videos)",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="MODEL.pth",
        help="model file to write (fast_neural_style state dict, fp16, with provenance)",
    )
    parser.add_argument(
        "--size", type=int, default=d["size"], help=f"training crop size in pixels (default {d['size']})"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help=f"global batch size, split across MPI ranks (default {d['batch_size']})",
    )
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=d["steps"], help=f"optimizer steps (default {d['steps']})")
    g.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="train for this many passes over the content images instead of --steps",
    )
    parser.add_argument("--lr", type=float, default=d["lr"], help=f"Adam learning rate (default {d['lr']})")
    parser.add_argument(
        "--content-weight",
        type=float,
        default=d["content_weight"],
        help=f"weight of the content loss (VGG-19 relu2_2 MSE; default {d['content_weight']})",
    )
    parser.add_argument(
        "--style-weight",
        type=float,
        default=d["style_weight"],
        help="weight of the style loss (Gram MSE, relu1_1..relu4_1, Gram / (C*H*W); "
        f"default {d['style_weight']})",
    )
    parser.add_argument(
        "--tv-weight",
        type=float,
        default=d["tv_weight"],
        help=f"weight of the total-variation loss (default {d['tv_weight']})",
    )
    parser.add_argument(
        "--temporal-weight",
        type=float,
        default=d["temporal_weight"],
        help="weight of the temporal loss (simulated camera motion; plus real frame pairs "
        "when videos are given); 0 = off (default); try 20",
    )
    parser.add_argument(
        "--style-size",
        type=int,
        default=d["style_size"],
        help=f"the style image is resized so its short side is this (default {d['style_size']})",
    )
    parser.add_argument(
        "--video-frames",
        type=int,
        default=d["video_frames"],
        help=f"frames sampled from each content video (default {d['video_frames']})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for initialisation and data order (default 0)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, cuda:N, or auto (each rank takes its node-local GPU; default cpu)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: torch's)")
    parser.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="checkpoint file (default: the output path with .ckpt)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=25,
        metavar="N",
        help="write the checkpoint and the model every N steps (default 25; 0 = only at the end)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    parser.add_argument(
        "--log-every",
        type=int,
        default=10,
        metavar="N",
        help="print a loss line every N steps when stderr is not a terminal (default 10)",
    )


def _pick_device(spec: str, comm: Comm) -> str:
    if spec != "auto":
        if spec.startswith("cuda") and not torch.cuda.is_available():
            raise MpistyleError(f"--device {spec}: CUDA is not available here")
        return spec
    if torch.cuda.is_available():
        local = int(
            os.environ.get(
                "MPI_LOCALRANKID",
                os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("SLURM_LOCALID", comm.rank)),
            )
        )
        return f"cuda:{local % torch.cuda.device_count()}"
    return "cpu"


def config_from_args(args: argparse.Namespace, comm: Comm) -> TrainConfig:
    return TrainConfig(
        style=args.style,
        content=list(args.content),
        output=args.output,
        size=args.size,
        batch_size=args.batch_size,
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        content_weight=args.content_weight,
        style_weight=args.style_weight,
        tv_weight=args.tv_weight,
        temporal_weight=args.temporal_weight,
        style_size=args.style_size,
        video_frames=args.video_frames,
        seed=args.seed,
        device=_pick_device(args.device, comm),
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        log_every=args.log_every,
        threads=args.threads,
    )


def main(args: argparse.Namespace) -> int:
    from mpistyle.mpi import StopFlag

    comm = Comm()
    cfg = config_from_args(args, comm)
    trainer = Trainer(cfg, comm)
    trainer.stop = StopFlag()
    trainer.stop.install_signal_handlers()
    trainer.run()
    if comm.rank == 0:
        last = trainer.history[-1] if trainer.history else {}
        print(
            f"wrote {cfg.output} ({trainer.step} steps"
            + (f", final total loss {last['total']:.4g}" if last else "")
            + ")"
        )
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m mpistyle.train", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _comm = Comm()
    try:
        sys.exit(main(_parser.parse_args()))
    except Interrupted as _exc:  # every rank stopped together after saving: no abort
        if _comm.rank == 0:
            print(f"mpistyle train: interrupted: {_exc}", file=sys.stderr)
        sys.exit(_exc.exit_code)
    except MpistyleError as _exc:
        print(f"mpistyle train: error: {_exc}", file=sys.stderr)
        if _comm.size > 1:
            _comm.abort(_exc.exit_code)
        sys.exit(_exc.exit_code)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        if _comm.size > 1:  # one rank failing must not leave the others waiting in Allreduce
            import traceback

            traceback.print_exc()
            _comm.abort(1)
        raise
