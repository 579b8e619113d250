"""``mpistyle train``: train a fast_neural_style TransformerNet with a VGG-19 perceptual loss.

Data-parallel over MPI: every rank draws the same global batch from a generator seeded by
(seed, step), takes its own slice, and the ranks sum their gradients (Allreduce on one flat
float32 buffer). Per-rank losses are scaled by local/global batch size, so the summed gradient is
exactly the gradient of the global-batch mean and N ranks follow the 1-rank curve up to float
summation order. Because the data and augmentation for step k depend only on (seed, k), a
checkpoint (model + optimizer + grad scaler + step) is enough to resume bit-for-bit.

For a GPU: the content is cut once into a pool of crops kept on the device as one uint8 tensor
(refreshed every ``--pool-refresh`` steps), real frame pairs and their flow likewise; each step only
indexes, crops and flips there. Forward passes run under autocast (bf16, or fp16 with a GradScaler)
in channels-last layout, and a single rank never copies its gradients to the host.

The recipe (defaults, configuration, options) is :mod:`mpistyle.training.recipe`; the MPI plumbing
:mod:`mpistyle.training.parallel`; the held-out scores and the choice of the best checkpoint
:mod:`mpistyle.training.scores`; compiling once per job :mod:`mpistyle.training.compiling`.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from mpistyle import __version__
from mpistyle import engine as _engine
from mpistyle import models as _models
from mpistyle.errors import Interrupted, IOFailure, MpistyleError, io_failure
from mpistyle.models import atomic_write, save_model
from mpistyle.nets import TransformerNet, use_torch_instance_norm
from mpistyle.training.compiling import (
    TrainFigures,
    compile_counts,
    private_inductor_cache,
    read_figures,
    record_figures,
    share_compilation,
)
from mpistyle.training.content import (
    PairPool,
    build_crop_pool,
    build_pair_pool,
    collect_content,
    crops_from_pool,
    load_image,
    sample_video_frames,
)
from mpistyle.training.losses import (
    VGG19Features,
    content_loss,
    grid_loss,
    masked_mse,
    palette_directions,
    palette_loss,
    palette_targets,
    random_affines,
    style_grams_of,
    style_loss,
    tv_loss,
    warp_affine,
    warp_by_grid,
)
from mpistyle.training.parallel import Comm, flat_grads, rank_slice, set_grads
from mpistyle.training.recipe import (
    COMPILE_AUTO_MIN_STEPS,
    COMPILE_MODES,
    DATA_SETTINGS,
    PALETTE_STRIDE,
    PRECISIONS,
    TrainConfig,
    add_arguments,
    config_from_args,
)

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1



# ----------------------------------------------------------------------------------------------
# Training


def _resize_style(img: np.ndarray, short: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = short / min(h, w)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(img, (round(w * s), round(h * s)), interpolation=interp))


def resolve_train_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for training; None = fp32. ``auto``: bf16 on a GPU that has it, else fp16; on a CPU,
    bf16 where it has native bf16 (AVX512_BF16/AMX: twice fp32's speed), else fp32 (autocast on a CPU
    without native bf16 emulates it and is slower than fp32)."""
    if precision not in PRECISIONS:
        raise MpistyleError(f"unknown --precision '{precision}' (choose {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _engine.cpu_supports_bf16():
        return torch.bfloat16
    return None


def resolve_compile(mode: str, device: torch.device, steps_left: int, figures: TrainFigures | None = None,
                    batch_size: int = 1) -> bool:
    """Whether to torch.compile the step's loss: ``on``/``off``, or ``auto`` = on for a CPU run whose steps
    left repay the compilation PAYBACK times over by this machine's recorded ``figures`` (rank 0's, for the
    whole ``batch_size``: the same on any rank count), or, until they are recorded, with at least
    :data:`COMPILE_AUTO_MIN_STEPS` steps left (measured on a 2-core Xeon, bf16, 192 px: 1.5 s a step eager,
    0.78 s compiled, about 60 s to compile, so it pays after about 80 steps; on GPUs it is not measured
    yet, so auto leaves it off there)."""
    if mode not in COMPILE_MODES:
        raise MpistyleError(f"unknown --compile '{mode}' (choose {', '.join(COMPILE_MODES)})")
    if mode != "auto":
        return mode == "on"
    if device.type != "cpu":
        return False
    need = figures.min_steps(batch_size) if figures is not None else None
    return steps_left >= (COMPILE_AUTO_MIN_STEPS if need is None else need)


def _atomic_torch_save(obj: Any, path: str) -> None:
    # Serialized in memory first: torch's own file writer reports a full disk as a RuntimeError,
    # a plain write raises the OSError (ENOSPC...) that ends the run with exit 74.
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda fh: fh.write(buf.getbuffer()), suffix=".ckpt")


def load_checkpoint(path: str) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable checkpoint
        raise MpistyleError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:160]}") from None
    if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION or "model" not in ck:
        raise MpistyleError(f"{path} is not an mpistyle training checkpoint")
    return ck


@dataclass
class StepBatch:
    """What step k trains on: the local crops and, with the temporal loss, motion and real pairs."""

    x: torch.Tensor  # (n,3,S,S) float 0..255 on the device: this rank's share of the global batch
    frac: float  # local share of the global batch
    theta: torch.Tensor | None = None  # (n,2,3) simulated camera motion
    pairs: np.ndarray | None = None  # indices into the pair pool (rank 0 only)


class Trainer:
    """One training run; ``run()`` returns the final per-step loss history (rank-0 view, global values)."""

    def __init__(self, cfg: TrainConfig, comm: Comm | None = None) -> None:
        self.cfg = cfg
        self.comm = comm or Comm()
        self.stop: Any = None  # mpistyle.mpi.StopFlag from the CLI (signal -> checkpoint, exit 75)
        self.device = torch.device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        for name in ("size", "batch_size", "style_size", "pool_size"):
            if getattr(cfg, name) < 1:
                raise MpistyleError(f"--{name.replace('_', '-')} must be positive")
        if cfg.size < 16 or cfg.size % 4:
            raise MpistyleError("--size must be a multiple of 4 and at least 16")
        if cfg.batch_size < self.comm.size:
            raise MpistyleError(
                f"--batch-size {cfg.batch_size} is smaller than the {self.comm.size} MPI ranks; "
                "every rank needs at least one image per step"
            )
        self.amp_dtype = resolve_train_precision(cfg.precision, self.device)
        # fp16 needs loss scaling (small gradients underflow); bf16 has fp32's range and does not. The
        # losses here are 1e4..1e7 (caffe-scale VGG features), not ~1: torch's default first scale of
        # 2**16 would overflow and skip the first ~20 steps, so start at 1 and let the scaler adapt.
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=1.0,
                                           enabled=self.amp_dtype == torch.float16)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.style_image = _resize_style(load_image(cfg.style), cfg.style_size)
        want_pairs = cfg.temporal_weight > 0
        t0 = time.monotonic()
        self.data = collect_content(cfg.content, cfg.size, cfg.video_frames, want_pairs)
        self.use_video_pairs = want_pairs and bool(self.data.pairs) and cfg.pairs_per_step > 0 and _have_flow()
        if cfg.epochs is not None:
            cfg.steps = max(1, math.ceil(cfg.epochs * len(self.data.images) / cfg.batch_size))
        self._pool_gen = -1
        self.pool = self._crop_pool(0)
        self.pair_pool: PairPool | None = None
        if self.use_video_pairs:
            self.pair_pool = build_pair_pool(self.data.pairs, cfg.size, cfg.pair_pool, cfg.seed, self.device)
        logger.debug(
            "content: %d images, %d frame pairs from %d files; pool %s, %d pairs with flow (%.1f s)",
            len(self.data.images), len(self.data.pairs), len(self.data.sources), tuple(self.pool.shape),
            len(self.pair_pool) if self.pair_pool is not None else 0, time.monotonic() - t0,
        )
        torch.manual_seed(cfg.seed)
        self.model = TransformerNet()
        if cfg.norm == "torch":
            use_torch_instance_norm(self.model)
        self.init_info: dict[str, Any] = {}
        if cfg.init:
            self._init_from(cfg.init)
        self.model = self.model.to(self.device, memory_format=self.memory_format)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        layers = tuple(dict.fromkeys(cfg.style_layers + cfg.content_layers))
        self.vgg = VGG19Features(layers, pool=cfg.vgg_pool).to(self.device, memory_format=self.memory_format)
        self.style_grams = style_grams_of(self.vgg, self.style_image, cfg.style_layers)
        self.palette_dirs = palette_directions()
        side = -(-cfg.size // PALETTE_STRIDE)
        self.palette_targets = palette_targets(self.style_image, self.palette_dirs, side * side).to(self.device)
        self.palette_dirs = self.palette_dirs.to(self.device)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.scores: list[dict[str, float]] = []  # --score-on: one record per scored checkpoint
        self.best: dict[str, float] | None = None
        self._score_frames: np.ndarray | None = None
        self._painting: Any = None
        self.compiled = False
        # What a step calls for its loss parts: _loss_parts, or its compiled graph (see below).
        self._loss_fn: Any = self._loss_parts
        self._pending: list[torch.Tensor] = []  # per-step loss parts not yet copied to the host
        # Loss settings per stretch of steps: a resumed run may change weights or lr (a schedule done
        # by hand); the model's provenance lists every phase, so its record stays true.
        self.phases: list[dict[str, Any]] = [{"from_step": 0, **cfg.settings()}]
        if cfg.resume:
            self._resume()
        self.compile_info: dict[str, Any] = {}
        self.figures_key = {"device": self.device.type, "size": cfg.size, "batch_size": cfg.batch_size,
                            "precision": str(self.amp_dtype), "temporal": cfg.temporal_weight > 0,
                            "video_pairs": bool(self.use_video_pairs), "norm": cfg.norm, "vgg_pool": cfg.vgg_pool,
                            "layers": sorted(set(cfg.style_layers) | set(cfg.content_layers)),
                            "grid": cfg.grid_weight > 0}
        figures = None
        if cfg.compile == "auto" and self.device.type == "cpu":  # rank 0's record decides for every rank
            figures = self._bcast(read_figures(self.figures_key) if self.comm.rank == 0 else None)
        if resolve_compile(cfg.compile, self.device, cfg.steps - self.step, figures, cfg.batch_size):
            # The whole loss (network, VGG, Grams, every term) as one graph, so the compiler fuses the
            # pointwise work between the convolutions, forward and backward: compiling the two networks
            # apart left that work eager and gave a third of the speed-up. Static shapes: the batch's
            # shape is fixed for the run (and a no-grad call, batch_loss, is one more graph).
            self._loss_fn = torch.compile(self._loss_parts, dynamic=False)
            self.compiled = True

    def _bcast(self, obj: Any) -> Any:
        return self.comm.comm.bcast(obj, root=0) if self.comm.size > 1 else obj

    def _warm_up(self) -> None:
        """Rank 0, before the first step: run the loss forward and backward once for each shape of local
        batch the job's ranks will see, so every graph is compiled here (the gradients are dropped: the
        weights and the optimizer are untouched)."""
        seen = set()
        for rank in range(self.comm.size):
            sl = rank_slice(self.cfg.batch_size, rank, self.comm.size)
            variant = (sl.stop - sl.start, rank == 0 and self.cfg.temporal_weight > 0 and self.pair_pool is not None)
            if variant in seen or sl.stop == sl.start:
                continue
            seen.add(variant)
            self.opt.zero_grad(set_to_none=True)
            total, _ = self._losses(self._step_batch(self.step, as_rank=rank))
            total.backward()
        self.opt.zero_grad(set_to_none=True)

    def _init_from(self, spec: str) -> None:
        """Start from a trained model's weights (bundled name or .pth; fresh optimizer); its provenance
        becomes this model's earlier stages."""
        path = _models.resolve_model(spec)
        net = _models.load_model(path)
        if not isinstance(net, TransformerNet):
            raise MpistyleError(f"--init {spec}: not a TransformerNet model")
        self.model.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
        info = _models.model_info(path)
        import hashlib

        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        self.init_info = {"model": os.path.basename(path), "sha256": digest, "provenance": info}
        logger.info("initial weights from %s", path)

    # -- data ---------------------------------------------------------------------------------
    def _crop_pool(self, step: int) -> torch.Tensor:
        """The device crop pool in force at ``step`` (a new generation every ``pool_refresh`` steps)."""
        cfg = self.cfg
        gen = step // cfg.pool_refresh if cfg.pool_refresh > 0 else 0
        if gen != self._pool_gen:
            arr = build_crop_pool(self.data.images, cfg.size, cfg.pool_size, cfg.seed, gen)
            self.pool = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(self.device)
            self._pool_gen = gen
        return self.pool

    def _step_batch(self, step: int, local: bool = True, as_rank: int | None = None) -> StepBatch:
        """Step ``step``'s batch: drawn from a generator seeded by (seed, step), so identical on every
        rank and after a resume; ``local`` keeps this rank's slice (``as_rank``'s: another rank's, for
        the warm-up), else the whole global batch."""
        cfg = self.cfg
        me = self.comm.rank if as_rank is None else as_rank
        rng = np.random.default_rng([cfg.seed, step])
        pool = self._crop_pool(step)
        idx = rng.integers(0, pool.shape[0], size=cfg.batch_size)
        sl = rank_slice(cfg.batch_size, me, self.comm.size) if local else slice(0, cfg.batch_size)
        # The crop parameters of every image are drawn even where another rank builds the image.
        side = pool.shape[-1]
        crop_rng = np.random.default_rng(rng.integers(0, 2**63))
        x = crops_from_pool(pool, idx, cfg.size, crop_rng, keep=sl, side=side)
        x = x.contiguous(memory_format=self.memory_format)
        batch = StepBatch(x=x, frac=(sl.stop - sl.start) / cfg.batch_size)
        if cfg.temporal_weight > 0:
            batch.theta = random_affines(cfg.batch_size, cfg.size, rng)[sl]
            if self.pair_pool is not None:
                pairs = rng.integers(0, len(self.pair_pool), size=cfg.pairs_per_step)
                # The real pairs of a step count on rank 0 only, so they are counted once globally.
                batch.pairs = pairs if (me == 0 or not local) else None
        return batch

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _losses(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted total loss of the local batch (means over the local images, times the local share
        ``frac``) and its weighted parts (content, style, tv, temporal), as float32 device tensors."""
        pairs = None if batch.pairs is None else torch.from_numpy(batch.pairs).to(self.device)
        parts = self._loss_fn(batch.x, batch.theta, pairs, batch.frac)
        return parts.sum() * batch.frac, parts * batch.frac

    def _loss_parts(self, x: torch.Tensor, theta: torch.Tensor | None, pairs: torch.Tensor | None,
                    frac: float) -> torch.Tensor:
        """The weighted loss parts (content, style, tv, temporal) of the local images ``x``, float32."""
        cfg = self.cfg
        with self._autocast():
            y = self.model(x)
            fy = self.vgg(y)
            with torch.no_grad():
                fx = self.vgg(x, cfg.content_layers)  # only as deep as the content layers
            lc = content_loss(fy, fx, cfg.content_layers)
            ls = cfg.style_weight * style_loss(fy, self.style_grams, cfg.style_layers)
            if cfg.palette_weight > 0:  # counted with the style: the painting's colours are part of its look
                ls = ls + cfg.palette_weight * palette_loss(y, self.palette_dirs, self.palette_targets,
                                                            PALETTE_STRIDE)
            # The grid loss counts with the TV part (both penalise high frequencies the style did not ask for).
            ltv = cfg.tv_weight * tv_loss(y)
            if cfg.grid_weight > 0:
                ltv = ltv + cfg.grid_weight * grid_loss(y)
            if cfg.temporal_weight > 0:
                assert theta is not None
                lt = self._temporal_loss(x, y, theta, pairs, frac)
            else:
                lt = torch.zeros((), device=x.device)
        return torch.stack([cfg.content_weight * lc, ls, ltv, cfg.temporal_weight * lt]).float()

    def _temporal_loss(self, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, pairs: torch.Tensor | None,
                       frac: float) -> torch.Tensor:
        """Ruder et al.: net(moved frame) vs moved(net(frame)) under the valid mask, for simulated camera
        motion on every image; with real frame pairs, the mean of that and the pairs' flow-warped MSE."""
        x2, m = warp_affine(x, theta)
        y_moved, m2 = warp_affine(y, theta)
        # Pixels the motion brings in from outside the frame are black in x2: leave them out.
        y2 = self.model(x2.to(x.dtype).contiguous(memory_format=self.memory_format))
        loss = masked_mse(y2, y_moved, m * m2)
        if self.pair_pool is not None:
            real = torch.zeros((), device=x.device)
            if pairs is not None:
                pp = self.pair_pool
                both = torch.cat([pp.prev[pairs], pp.cur[pairs]]).float().contiguous(memory_format=self.memory_format)
                out = self.model(both)
                n = len(pairs)
                warped = warp_by_grid(out[:n], pp.grid[pairs])  # previous output moved onto the current frame
                # Counted once globally: rank 0 undoes the local-share scaling applied to the whole loss.
                real = masked_mse(out[n:], warped, pp.mask[pairs]) / frac
            loss = 0.5 * (loss + real)
        return loss

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step``: --lr, decayed linearly to --lr-end over the last
        --lr-decay-steps steps."""
        cfg = self.cfg
        if cfg.lr_end is None or cfg.lr_decay_steps <= 0:
            return cfg.lr
        start = cfg.steps - cfg.lr_decay_steps
        if step < start:
            return cfg.lr
        t = min(1.0, (step - start + 1) / cfg.lr_decay_steps)
        return cfg.lr + t * (cfg.lr_end - cfg.lr)

    def batch_loss(self, step: int) -> float:
        """Weighted total loss of step ``step``'s global batch under the current weights (no update)."""
        batch = self._step_batch(step, local=False)
        with torch.no_grad():
            total, _ = self._losses(batch)
        return float(total)

    def train_step(self) -> None:
        """One optimizer step. The loss parts stay on the device until :meth:`flush_history`."""
        batch = self._step_batch(self.step)
        lr = self.lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        total, parts = self._losses(batch)
        self.scaler.scale(total).backward()
        if self.comm.size > 1:
            flat = flat_grads(self.params)
            self.comm.allreduce_sum(flat)
            set_grads(self.params, flat)
            parts = torch.from_numpy(self.comm.allreduce_sum(parts.detach().cpu().double().numpy()))
        # With fp16 the scaler skips a step whose gradients overflowed (same decision on every rank:
        # the summed gradients are identical) and lowers the scale.
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step += 1
        self._pending.append(parts.detach())

    def flush_history(self) -> list[dict[str, float]]:
        """Copy the pending steps' losses to the host (one transfer) and append them to the history."""
        if not self._pending:
            return []
        vals = torch.stack([p.to("cpu", torch.float64) for p in self._pending]).numpy()
        first = self.step - len(self._pending) + 1
        self._pending = []
        recs = []
        for i, v in enumerate(vals):
            recs.append({"step": float(first + i), "content": float(v[0]), "style": float(v[1]),
                         "tv": float(v[2]), "temporal": float(v[3]), "total": float(v.sum())})
        self.history += recs
        return recs

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
        changed = [k for k in DATA_SETTINGS if k in saved and saved[k] != self.cfg.settings()[k]]
        if changed:
            raise MpistyleError(
                f"cannot resume {path}: {', '.join(changed)} differ from the checkpoint's "
                f"({', '.join(f'{k}={saved[k]}' for k in changed)})"
            )
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr
        if ck.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ck["scaler"])
        self.step = int(ck["step"])
        self.history = [dict(h) for h in ck.get("history", [])]
        self.phases = [dict(p) for p in ck.get("phases", [{"from_step": 0, **saved}])]
        self.init_info = dict(ck.get("init_info") or self.init_info)
        self.scores = [dict(r) for r in ck.get("scores", [])]
        self.best = dict(ck["best"]) if ck.get("best") else None
        if ck.get("score_settings") != self._score_settings():
            # Scores taken on other frames or at another size do not compare: the next checkpoint is the best.
            self.best = None
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
        """Rank 0 writes the checkpoint and the model; every rank learns whether that worked.

        A failed write (full disk, quota, I/O error) ends every rank together with IOFailure (exit 74),
        the last checkpoint still in place for --resume; no rank is left waiting in a collective."""
        self.flush_history()
        failure = ""
        if self.comm.rank == 0:
            try:
                self._write_checkpoint()
            except OSError as exc:
                failure = str(io_failure(exc, f"the checkpoint or model ({exc.filename or self.cfg.output})"))
        if not self.comm.bcast_ok(not failure):
            raise IOFailure(failure or "rank 0 could not write the checkpoint")

    def _write_checkpoint(self) -> None:
        ck = {
            "version": CHECKPOINT_VERSION,
            "model": {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step,
            "torch_rng": torch.get_rng_state(),
            "settings": self.cfg.settings(),
            "history": self.history,
            "phases": self.phases,
            "init_info": self.init_info,
            "score_settings": self._score_settings(),
            "scores": self.scores,
            "best": self.best,
        }
        self.score_checkpoint()
        ck["scores"], ck["best"] = self.scores, self.best
        _atomic_torch_save(ck, self._ckpt_path())
        self.save_model()

    def _plain_model(self) -> TransformerNet:
        """A plain contiguous fp32 CPU copy: the file must not depend on the training layout or device."""
        plain = TransformerNet()
        plain.load_state_dict({k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()})
        return plain.eval()

    def _score_settings(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"on": os.path.basename(cfg.score_on or ""), "frames": cfg.score_frames, "size": cfg.score_size,
                "postfilter": cfg.postfilter}

    def best_path(self) -> str:
        return self.cfg.best or (os.path.splitext(self.cfg.output)[0] + ".best.pth")

    def score_checkpoint(self) -> dict[str, float] | None:
        """--score-on: score the current weights on held-out frames (texture and palette closeness to the
        painting, structure kept, grid: :mod:`mpistyle.training.scores`) and keep the best model: the
        one nearest to passing every bar, then the one that moved furthest toward the painting."""
        cfg = self.cfg
        if not cfg.score_on or self.comm.rank != 0:
            return None
        from mpistyle.training import scores as cl
        from mpistyle.training.losses import resize_short

        if self._score_frames is None:
            frames = sample_video_frames(cfg.score_on, max(1, cfg.score_frames))
            self._score_frames = np.stack([resize_short(f, cfg.score_size) for f in frames])
            self._painting = cl.Painting.of(load_image(cfg.style))
        src = self._score_frames
        plain = self._plain_model()
        plain.postfilter = cfg.postfilter
        out = _engine.Stylizer(plain, torch.device("cpu"), "auto")(src)
        rec: dict[str, float] = {"step": self.step, **cl.style_scores(list(out), list(src), self._painting)}
        rec["shortfall"] = cl.shortfall(rec)
        self.scores.append(rec)
        better = cl.better(rec, self.best)
        logger.info("step %d held-out scores: texture %.3f palette %.3f structure %.3f grid %.2f%s", self.step,
                    rec["texture"], rec["palette"], rec["structure"], rec["grid"],
                    " (best so far)" if better else "")
        if better:
            self.best = rec
            save_model(plain, self.best_path(), {**self._provenance(), "scores": rec}, half=True)
        return rec

    def _provenance(self) -> dict[str, Any]:
        stage = {
            "style": os.path.basename(self.cfg.style),
            "steps": self.step,
            "images": self.step * self.cfg.batch_size,
            "init": {k: v for k, v in self.init_info.items() if k != "provenance"} or None,
            "phases": self.phases,
            "precision": str(self.amp_dtype or torch.float32).replace("torch.", ""),
            "compiled_loss": self.compiled,
            **({"compile": self.compile_info} if self.compile_info else {}),
            "mpi_ranks": self.comm.size,
            "mpistyle_version": __version__,
        }
        earlier: list[dict[str, Any]] = []
        prior = self.init_info.get("provenance") or {}
        if prior:
            earlier = list(prior.get("stages") or [
                {"style": prior.get("style"), "steps": prior.get("steps"), "phases": prior.get("phases"),
                 "mpistyle_version": prior.get("mpistyle_version"), "note": "from the init model's record"}
            ])
        elif self.init_info:
            earlier = [{"model": self.init_info.get("model"), "note": "init model without a provenance record"}]
        return {
            "format": "fast_neural_style TransformerNet state dict",
            "style": os.path.basename(self.cfg.style),
            "style_name": os.path.splitext(os.path.basename(self.cfg.style))[0],
            "content": self.data.sources[:50],
            "content_images": len(self.data.images),
            "steps": self.step,
            "settings": self.cfg.settings(),
            "precision": stage["precision"],
            "mpi_ranks": self.comm.size,
            "mpistyle_version": __version__,
            "torch_version": torch.__version__,
            "final_losses": self.history[-1] if self.history else {},
            "phases": self.phases,
            "init": stage["init"],
            "stages": earlier + [stage],
            "held_out_scores": self.scores[-1] if self.scores else None,
            "postfilter": self.cfg.postfilter,
        }

    def save_model(self) -> None:
        self.flush_history()
        if self.comm.rank != 0:
            return
        save_model(self._plain_model(), self.cfg.output, self._provenance(), half=True)

    # -- loop ---------------------------------------------------------------------------------
    def _check_finite(self, recs: list[dict[str, float]]) -> None:
        bad = [r for r in recs if not all(math.isfinite(v) for v in r.values())]
        # fp16 overflows now and then by design (the scaler skips those steps); only a run of them,
        # or any in fp32/bf16, means divergence.
        if bad and (not self.scaler.is_enabled() or len(bad) == len(recs) >= 10):
            raise MpistyleError(
                f"training diverged at step {int(bad[0]['step'])} (non-finite loss); lower --lr or the loss weights"
            )

    def _record_figures(self, steps: int, after_first_s: float) -> None:
        """Rank 0: this run's seconds per image of a step (after the first, which may hold the compilation)
        and the compilation's cost, for later ``--compile auto`` decisions on this machine."""
        if self.comm.rank != 0 or steps < 3:
            return
        sl = rank_slice(self.cfg.batch_size, 0, self.comm.size)
        step_s = after_first_s / (steps - 1)
        image_s = step_s / max(1, sl.stop - sl.start)
        if self.compiled:
            compile_s = self.compile_info.get("rank0_compile_s", 0.0) - step_s  # the warm-up held one step
            record_figures(self.figures_key, compiled_image_s=image_s, compile_s=compile_s if compile_s > 0 else None)
        else:
            record_figures(self.figures_key, eager_image_s=image_s)

    def run(self) -> list[dict[str, float]]:
        # Ranks other than 0 read rank 0's compiled loss into a private inductor cache (compiling.py).
        with private_inductor_cache(self.compiled and self.comm.rank != 0):
            return self._run()

    def _run(self) -> list[dict[str, float]]:
        cfg = self.cfg
        bar = None
        tty = self.comm.rank == 0 and sys.stderr.isatty()
        if tty:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        if self.comm.rank == 0:
            logger.info("training %s for %d steps on %d rank(s), device %s (%s)", os.path.basename(cfg.output),
                        cfg.steps - self.step, self.comm.size, self.device,
                        str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32")
        t0 = time.monotonic()
        start = self.step
        if self.compiled and self.step < cfg.steps:  # compiled once per job: rank 0 compiles, the others read
            self.compile_info = share_compilation(self.comm.comm, self.comm.rank, self.comm.size, self._warm_up)
        t_first = t0
        t_last, s_last = t0, self.step
        try:
            while self.step < cfg.steps:
                self.train_step()
                if self.step == start + 1:
                    t_first = time.monotonic()
                log_now = self.step % cfg.log_every == 0 or self.step == cfg.steps
                if bar is not None:
                    bar.update(1)
                if log_now:
                    recs = self.flush_history()
                    self._check_finite(recs)
                    now = time.monotonic()
                    rate = (self.step - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last = now, self.step
                    rec = recs[-1]
                    msg = (
                        f"content {rec['content']:.4g} style {rec['style']:.4g} tv {rec['tv']:.3g}"
                        + (f" temporal {rec['temporal']:.4g}" if cfg.temporal_weight > 0 else "")
                        + f" total {rec['total']:.4g}"
                    )
                    speed = f"{rate:.3g} steps/s, {rate * cfg.batch_size:.4g} images/s"
                    if bar is not None:
                        bar.set_postfix_str(f"{msg} ({speed})", refresh=True)
                    elif self.comm.rank == 0:
                        logger.info("step %d/%d %s (%s)", self.step, cfg.steps, msg, speed)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                if self.stop is not None and self.step == start + 1:
                    from mpistyle.mpi import pause_point

                    pause_point("train", self.stop)  # test hook (MPISTYLE_PAUSE_AT=train): hold after one step
                # SIGTERM/SIGUSR1 (SLURM's time-limit warning) on any rank: all ranks agree after
                # this step, save a checkpoint and exit 75 so the sbatch script requeues.
                if self.stop is not None and self.step < cfg.steps and not self.comm.bcast_ok(not self.stop):
                    self.save_checkpoint()
                    raise Interrupted(f"stopped at step {self.step} ({self.stop.reason or 'signal'}); "
                                      "checkpoint saved: rerun with --resume to continue")
        finally:
            if bar is not None:
                bar.close()
        self._check_finite(self.flush_history())
        t_end = time.monotonic()
        if self.compile_info:  # each rank's compiled and read graphs, for the record (all ranks take part)
            counts = compile_counts()
            self.compile_info["per_rank"] = self.comm.comm.gather(counts, root=0) if self.comm.size > 1 else [counts]
        self._record_figures(self.step - start, t_end - t_first)
        self.save_checkpoint()
        if self.comm.rank == 0:
            took = time.monotonic() - t0
            n = self.step - start
            logger.info(
                "trained %d steps in %.1f s (%.3g steps/s, %.4g images/s); model written to %s",
                n, took, n / max(took, 1e-9), n * cfg.batch_size / max(took, 1e-9), cfg.output,
            )
        return self.history


def _have_flow() -> bool:
    try:
        from mpistyle.temporal import flow  # noqa: F401
    except ImportError:
        return False
    return hasattr(flow, "FlowEstimator") and hasattr(flow, "to_gray")


# ----------------------------------------------------------------------------------------------
# Command line


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
    _parser = argparse.ArgumentParser(prog="python -m mpistyle.training.train", description=__doc__.splitlines()[0])
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
