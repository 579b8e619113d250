"""Training content: images, video frames, consecutive frame pairs, and device-side crop pools.

Used by ``mpistyle train`` (which crops, augments and batches them) and ``mpistyle quality`` (which
reads frames to score). Everything here is deterministic given a seed, so a training step's batch
depends only on (seed, step) and a checkpoint resumes exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from mpistyle.errors import MpistyleError

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".y4m")


def load_image(path: str) -> np.ndarray:
    """(H,W,3) uint8 RGB of an image file (grey images become 3 equal channels); MpistyleError if unusable."""
    if not os.path.isfile(path):
        raise MpistyleError(f"image not found: {path}")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise MpistyleError(f"cannot read image {path} (not an image OpenCV can decode)")
    return np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


def read_video_frames(path: str) -> list[np.ndarray]:
    """Every frame of a video as (H,W,3) uint8 RGB (imageio-ffmpeg's ffmpeg; OpenCV's where that is missing,
    as on a bare GPU machine that has opencv but no imageio-ffmpeg)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return _read_video_frames_cv2(path)
    try:
        reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    except (OSError, RuntimeError, StopIteration) as exc:
        raise MpistyleError(f"cannot read video {path}: {str(exc).splitlines()[0][:160]}") from None
    if not frames:
        raise MpistyleError(f"video {path} has no frames")
    return frames


def _read_video_frames_cv2(path: str) -> list[np.ndarray]:
    cap = cv2.VideoCapture(path)
    frames: list[np.ndarray] = []
    try:
        while cap.isOpened():
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    finally:
        cap.release()
    if not frames:
        raise MpistyleError(f"cannot read video {path} (no frames; OpenCV without imageio-ffmpeg)")
    return frames


def sample_video_frames(path: str, count: int, consecutive: bool = False) -> list[np.ndarray]:
    """``count`` frames spread evenly over a video (with ``consecutive``: the frame after each, too).

    ``count`` <= 0 takes every frame (every frame that has a successor, with ``consecutive``).
    """
    frames = read_video_frames(path)
    n = len(frames) - (1 if consecutive else 0)
    if n < 1:
        return []
    num = n if count <= 0 else min(count, n)
    idx = sorted({int(i) for i in np.linspace(0, n - 1, num=num)})
    out: list[np.ndarray] = []
    for i in idx:
        out.append(frames[i].copy())
        if consecutive:
            out.append(frames[i + 1].copy())
    return out


def shrink(img: np.ndarray, short: int) -> np.ndarray:
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


def list_content_files(paths: Sequence[str]) -> list[str]:
    """Image and video files named directly or found (sorted, not recursive) in the given directories."""
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
    return files


def collect_content(paths: Sequence[str], size: int, video_frames: int, want_pairs: bool) -> ContentData:
    """Images, directories of images/videos, and videos (``video_frames`` frames sampled from each;
    0 = all). With ``want_pairs`` each sampled video frame also yields the pair (frame, next frame)."""
    data = ContentData()
    keep = 2 * size  # random crops are taken at scales 1x..1.5x of --size
    for f in list_content_files(paths):
        ext = os.path.splitext(f)[1].lower()
        if ext in VIDEO_EXTS:
            frames = [shrink(x, keep) for x in sample_video_frames(f, video_frames, consecutive=want_pairs)]
            if want_pairs:
                data.pairs += list(zip(frames[0::2], frames[1::2], strict=True))
                data.images += frames[0::2]
            else:
                data.images += frames
        else:
            data.images.append(shrink(load_image(f), keep))
        data.sources.append(os.path.basename(f))
    data.images = [im for im in data.images if min(im.shape[:2]) >= 8]
    if not data.images:
        raise MpistyleError("no usable content images (give image files, videos or directories with --content)")
    return data


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator, max_scale: float = 1.5) -> np.ndarray:
    """Random-scale (1..``max_scale`` x ``size`` on the short side), random-position square crop with a
    random horizontal flip."""
    h, w = img.shape[:2]
    scale = size * rng.uniform(1.0, max_scale) / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    y, x = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    crop = img[y : y + size, x : x + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def to_batch(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """(N,H,W,3) uint8 RGB -> float (N,3,H,W) 0..255."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------------------------
# Crop pool: content preloaded on the training device


def pool_side(size: int) -> int:
    """Side of the pooled squares: 1.25x the crop, so each step can still crop, shift and zoom."""
    return int(round(size * 1.25 / 4) * 4)


def build_crop_pool(
    images: Sequence[np.ndarray], size: int, count: int, seed: int, generation: int = 0
) -> np.ndarray:
    """(count, S, S, 3) uint8 random squares of side ``pool_side(size)`` cut from the content images.

    Each image is used about equally often (a shuffled round robin), each time at a random scale
    (short side 1..1.5x S), position and horizontal flip. ``generation`` picks an independent pool for
    the same seed (the trainer refreshes its pool every so many steps).
    """
    side = pool_side(size)
    rng = np.random.default_rng([seed, 0x9E3779B9, generation])
    reps = -(-count // len(images))
    order = np.concatenate([rng.permutation(len(images)) for _ in range(reps)])[:count]
    return np.stack([random_crop(images[i], side, rng) for i in order])


def crops_from_pool(
    pool: torch.Tensor,
    idx: np.ndarray,
    size: int,
    rng: np.random.Generator,
    keep: slice | None = None,
    side: int | None = None,
) -> torch.Tensor:
    """A batch of ``size`` crops from pooled squares (uint8 (N,3,S,S) on any device), float 0..255.

    Per image ``idx[j]``: a random square of side size..S at a random position, resized to ``size`` (a
    zoom of up to 1.25x), and a random horizontal flip. The parameters of every image are drawn from
    ``rng`` in order, but only the images in ``keep`` (default all) are built, so MPI ranks that each
    build their own slice agree on the whole batch. The work runs on the pool's device.
    """
    side = int(side or pool.shape[-1])
    n = len(idx)
    sides = rng.integers(size, side + 1, size=n)
    offs = rng.random(size=(n, 2))
    flips = rng.random(size=n) < 0.5
    out = []
    for j in range(n)[keep or slice(None)]:
        c = int(sides[j])
        y, x = (int(v * (side - c + 1)) for v in offs[j])
        crop = pool[int(idx[j]), :, y : y + c, x : x + c].float()[None]
        if c != size:
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if flips[j]:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.cat(out).clamp_(0, 255)


# ----------------------------------------------------------------------------------------------
# Real consecutive frame pairs with flow, for the temporal loss


def video_pair_sample(
    pair: tuple[np.ndarray, np.ndarray], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Same random crop of two consecutive frames, plus the backward flow t->t-1 and its certainty mask."""
    from mpistyle.temporal import flow as flowmod

    a, b = pair
    h, w = a.shape[:2]
    scale = size * rng.uniform(1.0, 1.5) / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    y, x = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    ra = cv2.resize(a, (nw, nh), interpolation=cv2.INTER_AREA)[y : y + size, x : x + size]
    rb = cv2.resize(b, (nw, nh), interpolation=cv2.INTER_AREA)[y : y + size, x : x + size]
    prev, cur = np.ascontiguousarray(ra), np.ascontiguousarray(rb)
    est = flowmod.FlowEstimator("dis", "medium")
    g_cur, g_prev = flowmod.to_gray(cur), flowmod.to_gray(prev)
    back = est.flow(g_cur, g_prev)  # cur(x) ~ prev(x + back(x))
    fwd = est.flow(g_prev, g_cur)
    return prev, cur, back, certainty(back, fwd)


def certainty(back: np.ndarray, fwd: np.ndarray) -> np.ndarray:
    """Ruder et al.'s forward-backward consistency check (1 = reliable), as (H,W) float32."""
    h, w = back.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx, my = xs + back[..., 0], ys + back[..., 1]
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    fwd_at = cv2.remap(fwd, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    s = back + fwd_at
    ok = (s**2).sum(-1) <= 0.01 * ((back**2).sum(-1) + (fwd_at**2).sum(-1)) + 0.5
    return (inside & ok).astype(np.float32)


def flow_to_grid(flow: np.ndarray) -> torch.Tensor:
    """(H,W,2) pixel flow -> grid_sample grid (1,H,W,2) for backward warping (align_corners=False)."""
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    gx = (xs + flow[..., 0] + 0.5) * (2.0 / w) - 1.0
    gy = (ys + flow[..., 1] + 0.5) * (2.0 / h) - 1.0
    return torch.from_numpy(np.stack([gx, gy], axis=-1))[None]


@dataclass
class PairPool:
    """Consecutive-frame crops with their backward flow and certainty, preloaded on the device.

    ``prev``/``cur`` are uint8 (N,3,S,S), ``grid`` is the grid_sample grid (N,S,S,2) that warps
    ``prev``-aligned images onto ``cur``, ``mask`` is (N,1,S,S) float.
    """

    prev: torch.Tensor
    cur: torch.Tensor
    grid: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.prev.shape[0])


def build_pair_pool(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], size: int, count: int, seed: int, device: torch.device
) -> PairPool:
    """``count`` random crops of real frame pairs with DIS flow, computed once (flow is CPU work)."""
    rng = np.random.default_rng([seed, 0x7F4A7C15])
    order = rng.permutation(np.resize(np.arange(len(pairs)), count)) if count > len(pairs) else (
        rng.permutation(len(pairs))[:count]
    )
    prevs, curs, grids, masks = [], [], [], []
    for k in order:
        prev, cur, back, mask = video_pair_sample(pairs[int(k)], size, rng)
        prevs.append(prev)
        curs.append(cur)
        grids.append(flow_to_grid(back))
        masks.append(torch.from_numpy(mask)[None, None])
    to_u8 = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous().to(device)  # noqa: E731
    return PairPool(
        prev=to_u8(prevs), cur=to_u8(curs), grid=torch.cat(grids).to(device), mask=torch.cat(masks).to(device)
    )
