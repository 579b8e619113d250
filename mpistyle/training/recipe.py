"""The recipe of ``mpistyle train``: its defaults, its configuration and its command-line options.

Pure data and argument parsing: :mod:`mpistyle.training.train` runs a :class:`TrainConfig`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from mpistyle.training.losses import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS
from mpistyle.training.parallel import Comm

# Documented defaults (docs/training.md). Losses are on caffe-scaled VGG-19 features (0..255 input).
DEFAULTS = {
    # The recipe of the 0.5 bundled styles (issue 28, docs/training.md): 128 px crops with the painting at
    # 384 px (strokes as large as the painting shows them at 512 px), content at relu2_2 weight 5 against
    # style 1.5, a palette pull toward the painting's colours, a light TV and grid penalty. From a trained
    # style (--init starry-night) 300-400 steps move a model most of the way to a new painting.
    "size": 128,
    "batch_size": 4,
    "steps": 400,
    "lr": 1e-3,
    "content_weight": 5.0,
    "style_weight": 1.5,  # 3+ with content 5 lets the texture wipe out the picture (docs/training.md)
    "palette_weight": 3000.0,
    "grid_weight": 10.0,
    "tv_weight": 2e-3,
    "temporal_weight": 0.0,
    "style_size": 384,
    "video_frames": 48,
    "pool_size": 2048,  # crops kept on the device; at 256 px (320 px pooled) 2048 take 630 MB as uint8
    "pool_refresh": 0,  # steps between new pools (0 = one pool for the whole run)
    "pair_pool": 256,  # real frame pairs (with flow) kept on the device for the temporal loss
    "pairs_per_step": 1,
    "precision": "auto",
    "compile": "auto",
    # Held-out scoring: frames spread over the video, at 256 px on the short side. `mpistyle quality` scores at
    # 180 px, where the same strokes cover more of the frame: a user's model logged at 0.43 texture closeness
    # scored 0.49 there (docs/training.md).
    "score_frames": 4,
    "score_size": 256,
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "on", "off")
# --compile auto: compile the loss (about 60 s once, on a 2-core CPU) only when the run has at least
# this many steps left, where the 2x faster steps repay it several times over. A first guess: once this
# machine's figures for the setting are recorded (mpistyle.training.compiling), they decide.
COMPILE_AUTO_MIN_STEPS = 300
# Every PALETTE_STRIDE-th pixel (each way) of the output enters the palette loss.
PALETTE_STRIDE = 3


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
    pool_size: int = DEFAULTS["pool_size"]
    pool_refresh: int = DEFAULTS["pool_refresh"]
    pair_pool: int = DEFAULTS["pair_pool"]
    pairs_per_step: int = DEFAULTS["pairs_per_step"]
    precision: str = DEFAULTS["precision"]
    channels_last: bool = True
    compile: str = DEFAULTS["compile"]
    init: str | None = None  # model (bundled name or .pth) whose weights start the run; fresh optimizer
    lr_end: float | None = None  # with lr_decay_steps: linear decay of the lr to this over the last steps
    lr_decay_steps: int = 0
    vgg_pool: str = "max"
    grid_weight: float = DEFAULTS["grid_weight"]
    palette_weight: float = DEFAULTS["palette_weight"]
    postfilter: str = "none"  # recorded in the model file; the engine applies it at inference
    norm: str = "fused"  # "torch": nn.InstanceNorm2d, the network as mpistyle 0.3 trained it (for comparisons)
    score_on: str | None = None  # held-out video: score every checkpoint, keep the best model
    score_frames: int = DEFAULTS["score_frames"]
    score_size: int = DEFAULTS["score_size"]
    best: str | None = None  # where the best-scoring model goes (default OUTPUT with .best.pth)

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
            "pool_size": self.pool_size,
            "pool_refresh": self.pool_refresh,
            "pair_pool": self.pair_pool,
            "pairs_per_step": self.pairs_per_step,
            "lr_end": self.lr_end,
            "lr_decay_steps": self.lr_decay_steps,
            "vgg_pool": self.vgg_pool,
            "grid_weight": self.grid_weight,
            "palette_weight": self.palette_weight,
            "postfilter": self.postfilter,
        }


# Settings that fix the data of every step: a checkpoint resumes only with the same ones.
DATA_SETTINGS = ("size", "batch_size", "seed", "style_size", "video_frames", "pool_size", "pool_refresh",
                  "pair_pool", "pairs_per_step")


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
        help=f"frames sampled from each content video, 0 = all (default {d['video_frames']})",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=d["pool_size"],
        metavar="N",
        help="content crops cut in advance and kept on the device as uint8, 1.25x --size square; "
        f"each step crops, zooms and flips them there (default {d['pool_size']})",
    )
    parser.add_argument(
        "--pool-refresh",
        type=int,
        default=d["pool_refresh"],
        metavar="STEPS",
        help="cut a fresh crop pool every STEPS steps (0 = never; default %(default)s)",
    )
    parser.add_argument(
        "--pair-pool",
        type=int,
        default=d["pair_pool"],
        metavar="N",
        help="real consecutive-frame crops (with DIS flow, computed once) kept on the device for the "
        f"temporal loss (default {d['pair_pool']})",
    )
    parser.add_argument(
        "--pairs-per-step",
        type=int,
        default=d["pairs_per_step"],
        metavar="N",
        help=f"real frame pairs in each step's temporal loss (default {d['pairs_per_step']})",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d["precision"],
        help="autocast precision: auto = bf16 on a GPU that has it, else fp16 with loss scaling; "
        "bf16 on a CPU with native bf16 (AVX512_BF16/AMX), else fp32 (default auto)",
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default=d["compile"],
        help="torch.compile the whole loss (TransformerNet, VGG-19 and every term) as one graph (about a "
        "minute once; then about 2x faster steps than eager bf16 on a 2-core CPU): "
        f"auto = on for CPU runs of at least {COMPILE_AUTO_MIN_STEPS} steps (default auto)",
    )
    parser.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help="start from this model's weights (bundled name or .pth) with a fresh optimizer: a new style "
        "from a trained one, or a new stage (e.g. larger crops) of the same; its provenance is kept",
    )
    parser.add_argument(
        "--lr-end",
        type=float,
        default=None,
        help="with --lr-decay-steps: the lr falls linearly from --lr to this over the last steps",
    )
    parser.add_argument("--lr-decay-steps", type=int, default=0, metavar="N",
                        help="length of the final lr decay (default 0: none)")
    parser.add_argument("--palette-weight", type=float, default=d["palette_weight"],
                        help="weight of the palette loss: sliced Wasserstein distance, in 8-bit levels, between the "
                        f"output's pixel colours and the painting's (default {d['palette_weight']:g})")
    parser.add_argument("--grid-weight", type=float, default=d["grid_weight"],
                        help="weight of the period-4 grid loss (per-tile phase pattern of the output's "
                        f"high-pass; counted with the TV part in the logs; default {d['grid_weight']:g})")
    parser.add_argument("--norm", choices=("fused", "torch"), default="fused",
                        help="instance norm: mpistyle's fused one (default) or torch's InstanceNorm2d, as "
                        "mpistyle 0.3 trained (for speed comparisons; the same weights either way)")
    parser.add_argument("--postfilter", choices=("none", "median3"), default="none",
                        help="filter on the output that the model file asks for at inference (and that "
                        "--score-on scores): median3 = 3x3 median, Johnson's default (default none)")
    parser.add_argument("--vgg-pool", choices=("max", "avg"), default="max",
                        help="pooling of the VGG-19 loss network (default max)")
    parser.add_argument(
        "--score-on",
        default=None,
        metavar="VIDEO",
        help="held-out video: score every checkpoint on its frames (texture and palette closeness to the "
        "painting, structure kept, period-4 grid) and keep the best model in OUTPUT.best.pth (nearest to "
        "passing every bar, then furthest toward the painting)",
    )
    parser.add_argument("--score-frames", type=int, default=d["score_frames"],
                        help="frames scored, spread over the video (default %(default)s)")
    parser.add_argument("--score-size", type=int, default=d["score_size"],
                        help="short side of scored frames (default %(default)s; `mpistyle quality` scores at 180)")
    parser.add_argument("--best", default=None, metavar="PATH", help="best model file (default OUTPUT.best.pth)")
    parser.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="keep tensors in NCHW layout (channels-last is faster on GPUs with tensor cores)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for initialisation and data order (default 0)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (this rank's node-local GPU if any, else CPU; the default, as for stylize), cpu, "
             "cuda (GPU = local rank) or cuda:N",
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


def pick_device(spec: str, comm: Comm) -> str:
    """``--device``, resolved as stylize resolves it (mpistyle.mpi.select_device), per node-local rank."""
    from mpistyle.mpi import select_device

    local = os.environ.get("MPI_LOCALRANKID",
                           os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("SLURM_LOCALID", "")))
    return select_device(spec, int(local) if local.isdigit() else comm.rank)


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
        device=pick_device(args.device, comm),
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        log_every=args.log_every,
        threads=args.threads,
        pool_size=args.pool_size,
        pool_refresh=args.pool_refresh,
        pair_pool=args.pair_pool,
        pairs_per_step=args.pairs_per_step,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        init=args.init,
        lr_end=args.lr_end,
        lr_decay_steps=args.lr_decay_steps,
        vgg_pool=args.vgg_pool,
        grid_weight=args.grid_weight,
        palette_weight=args.palette_weight,
        postfilter=args.postfilter,
        norm=args.norm,
        score_on=args.score_on,
        score_frames=args.score_frames,
        score_size=args.score_size,
        best=args.best,
    )
