"""``mpistyle bench`` arguments and ``main``: runs the measurements and prints/writes the result."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import tempfile
from typing import Any

from .. import __version__
from ..errors import MpistyleError, write_failure
from . import ceiling
from .common import (
    CHECKOUT_CLIP,
    ENCODE_MODES,
    GPU_RANK_FPS,
    LONG_VIDEO_FRAMES,
    SCALING_RANKS,
    TARGETS,
    cut_video,
    default_video,
    find_mpiexec,
    load_average,
    mpi_size_from_env,
    parse_rank_counts,
    positive_int,
)
from .format import format_report
from .measure import NETWORK_SIZES, NETWORK_THREADS, measure_flow, measure_forward, measure_fusion, measure_networks
from .pipeline import encode_jobs, measured_costs, overhead_breakdown, rank0_cost, run_pipeline, summarize, work_seconds
from .scaling import encode_projection, scaling_model

logger = logging.getLogger(__name__)

def _targets(summary: dict[str, Any], forward: dict[str, Any] | None = None,
             one: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = [{"name": "pipeline/forward (1 rank, work_s)", "kind": "max", "target": TARGETS["ratio"],
            "value": summary["ratio"], "met": summary["ratio"] <= TARGETS["ratio"]}]
    if forward is not None and one is not None and forward.get("eager_per_frame_s"):
        rep = one["report"]
        net = sum(p["times_s"].get("network", 0.0) for p in rep["per_rank"])
        n = sum((p["counts"] or {}).get("network_frames", 0) for p in rep["per_rank"])
        if n:
            ratio = net / n / forward["eager_per_frame_s"]
            out.append({"name": "stylize network s/frame / 0.3 eager forward", "kind": "max",
                        "target": TARGETS["network_vs_eager"], "value": ratio,
                        "met": ratio <= TARGETS["network_vs_eager"]})
        frames = int(rep["frames"])
        if frames == forward["frames"]:  # the whole clip was timed: decode + eager forward of every frame
            budget = forward["decode_s"] + frames * forward["eager_per_frame_s"]
            ratio = one["process_s"] / budget
            out.append({"name": f"1-rank stylize process / (decode + 0.3 eager forward), {frames} frames",
                        "kind": "max", "target": TARGETS["process_vs_decode_eager"], "value": ratio,
                        "met": ratio <= TARGETS["process_vs_decode_eager"]})
    two = next((r for r in summary["runs"] if r["ranks"] == 2), None)
    if two is not None:
        out.append({"name": "2-rank speed-up (wall_s)", "kind": "min", "target": TARGETS["speedup_2"],
                    "value": two["speedup_wall"], "met": two["speedup_wall"] >= TARGETS["speedup_2"]})
        spf = two["s_per_frame_wall"]
        out.append({"name": "2-rank s/frame (wall_s)", "kind": "max", "target": TARGETS["s_per_frame_2"],
                    "value": spf, "met": spf <= TARGETS["s_per_frame_2"]})
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mpistyle bench [VIDEO]``."""
    parser.add_argument("video", nargs="?", default=None, metavar="VIDEO",
                        help=f"clip to measure on (default {CHECKOUT_CLIP} in a checkout, else the packaged "
                             "sample)")
    parser.add_argument("--ranks", type=parse_rank_counts, default=None, metavar="N1,N2,...",
                        help="rank counts to run the pipeline with (default 1,2, and 1 is always included; "
                             "--ceiling: default 1,2,4,8)")
    parser.add_argument("--threads-per-rank", type=positive_int, default=1, metavar="T",
                        help="torch/OpenCV threads per rank, also for the forward measurement (default 1)")
    parser.add_argument("--frames", type=positive_int, default=None, metavar="N",
                        help="cut the clip to its first N frames first (default: the whole clip); --ceiling: "
                             f"frames of every test clip (default {ceiling.FRAMES_SMALL} up to 720p, "
                             f"{ceiling.FRAMES_LARGE} above)")
    parser.add_argument("--forward-frames", type=positive_int, default=None, metavar="K",
                        help="time the bare forward pass on the first K frames only (default: every frame of the "
                             "clip; a long clip's pipeline runs need not wait for as many bare passes)")
    parser.add_argument("-m", "--model", default=None,
                        help="bundled model name or .pth file (default: the bundled default)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="network precision, as for stylize (default auto)")
    parser.add_argument("--device", default="auto",
                        help="auto (the local GPU if any, else CPU; default), cpu, cuda or cuda:N")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="stylize --compile for the pipeline runs; the forward pass takes the path the 1-rank "
                             "run takes (default auto)")
    parser.add_argument("--repeat", type=positive_int, default=1, metavar="R",
                        help="repeat each measurement R times and keep the fastest (default 1)")
    parser.add_argument("--compare-frames", type=positive_int, default=4, metavar="K",
                        help="frames on which reduced precision is compared with fp32 (default 4)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the full result as JSON here")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="also write each run's plots (timeline, warping error, strip) in DIR/ranks-N/")
    parser.add_argument("--long-frames", type=positive_int, default=LONG_VIDEO_FRAMES, metavar="F",
                        help=f"video length for the scaling model (default {LONG_VIDEO_FRAMES})")
    parser.add_argument("--flow-pairs", type=positive_int, default=24, metavar="P",
                        help="pairs for the flow throughput figure at 1 thread and at all CPUs (default 24)")
    parser.add_argument("--encode", type=_encode_list, default=None, metavar="MODE[,MODE]",
                        help="stylize --encode for the pipeline runs: both (default) runs every multi-rank count "
                             "with segments (stylize's default there) and again with rank0, to measure rank 0's "
                             "serial cost in each; auto, rank0 or segments: one run per rank count. --ceiling: "
                             "a list of rank0,segments (default both)")
    parser.add_argument("--gpu-rank-fps", type=float, default=GPU_RANK_FPS, metavar="FPS",
                        help="end-to-end frames/s of one GPU rank, for how many GPU ranks fit under rank 0's "
                             f"measured ceiling (default {GPU_RANK_FPS:.0f})")
    parser.add_argument("--mpiexec", default=None, help="MPI launcher (default: the environment's mpiexec)")
    parser.add_argument("--launcher-args", type=shlex.split, default=[], metavar="ARGS",
                        help="more launcher options for the pipeline runs, e.g. --launcher-args='-bind-to core' "
                             "(MPICH): every rank, with its flow, encoder and decoder threads, on a core of its own, "
                             "as on a cluster node; unbound, one rank's helper threads use the idle cores")
    g = parser.add_argument_group(
        "network paths",
        "The network alone, per frame, on CPU: eager (torch's instance norm under autocast: mpistyle 0.3), fused "
        "(mpistyle's eager path), compiled (the package stylize --compile runs; compiled here once, then from "
        "the cache) and openvino (where it is installed), each with its PSNR against fp32 eager. Part of every "
        "bench run; --networks runs it alone.")
    g.add_argument("--networks", action="store_true", help="measure the network paths only (no pipeline runs)")
    g.add_argument("--network-sizes", type=_sizes_or_none, default=",".join(f"{w}x{h}" for w, h in NETWORK_SIZES),
                   metavar="WxH[,WxH]", help="frame sizes of the network table (default 640x272,1280x720; none: "
                                             "no table)")
    g.add_argument("--network-threads", type=parse_rank_counts, default=list(NETWORK_THREADS), metavar="T1,T2",
                   help="torch threads of the network table (default 1,2)")
    g.add_argument("--network-frames", type=positive_int, default=3, metavar="K",
                   help="frames per timed round in the network table (default 3)")
    g.add_argument("--no-openvino", action="store_true", help="leave OpenVINO out of the network table")
    g = parser.add_argument_group(
        "pipeline ceiling (--ceiling)",
        "Real stylize runs with an identity 1x1 network, so the pipeline's own cost shows: frames/s, rank 0's "
        "CPU time per frame (its process and ffmpeg children) and bytes received per frame; optionally side by "
        "side with another version of the code. VIDEO (default: the packaged sample) is looped and scaled "
        "into each test clip; --ranks, --frames, --encode, --device, --threads-per-rank, --gpu-rank-fps and "
        "--json apply.")
    g.add_argument("--ceiling", action="store_true", help="run the pipeline-ceiling bench instead")
    g.add_argument("--sizes", type=_sizes, default=",".join(f"{w}x{h}" for w, h in ceiling.DEFAULT_SIZES),
                   metavar="WxH[,WxH]", help="frame sizes (default 640x360,1920x1080)")
    g.add_argument("--decode", type=_decode_list, default="rank0,each", metavar="MODE[,MODE]",
                   help="stylize --decode modes, rank0 and/or each, where the code under test has --decode "
                        "(default rank0,each; code without it runs rank0 only)")
    g.add_argument("--long-factor", type=positive_int, default=1, metavar="K",
                   help="--ceiling: also run every job on a clip K times longer and report rank 0's marginal CPU "
                        "per frame between the two (what a long video costs per frame, without fixed costs); "
                        "the ratios and the scaling model then use it")
    g.add_argument("--ceiling-temporal", choices=("none", "flow"), default="flow",
                   help="stylize --temporal in the ceiling runs (default flow, stylize's default: warm-ups and "
                        "their flow and fusion on the critical path; none: no flow, no fusion)")
    g.add_argument("--baseline", default=None, metavar="SRC",
                   help="also run the source tree SRC (its root, holding mpistyle/), first on PYTHONPATH")
    g.add_argument("--baseline-ref", default=None, metavar="REF",
                   help="also run commit REF of this checkout (extracted with git archive into a temp dir), "
                        "e.g. 6cdba49 for v0.2")
    g.add_argument("--baseline-label", default=None, metavar="NAME",
                   help="name of the baseline in the tables (default base@COMMIT, or baseline)")
    g.add_argument("--link-gbps", type=_positive_float, default=ceiling.LINK_GBPS, metavar="G",
                   help=f"rank 0's network link for the scaling model, Gb/s (default {ceiling.LINK_GBPS:g})")


# The options each kind of bench run reads (``mpistyle bench --ceiling`` ignores the network table's, ...).
_CEILING_OPTIONS = ("ranks", "frames", "encode", "decode", "device", "threads_per_rank", "gpu_rank_fps", "sizes",
                    "long_factor", "ceiling_temporal", "baseline", "baseline_ref", "baseline_label", "link_gbps",
                    "mpiexec")
_NETWORK_OPTIONS = ("model", "device", "repeat", "network_sizes", "network_threads", "network_frames",
                    "no_openvino")
_OUTPUT_OPTIONS = ("json", "plots")  # where the results go, not what is measured
_CEILING_ONLY = ("sizes", "decode", "long_factor", "ceiling_temporal", "baseline", "baseline_ref", "baseline_label",
                 "link_gbps")


def reproduce_command(args: argparse.Namespace, video: str | None = None) -> str:
    """``mpistyle bench ...`` with every option the run used, defaults written out, so that rerunning the
    printed line measures the same thing even after a default changes (``--ceiling-temporal`` went from
    none to flow). Printed beside every table and kept in the JSON as ``command``."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    if args.ceiling:
        words, wanted = ["mpistyle", "bench", "--ceiling"], set(_CEILING_OPTIONS)
    elif args.networks:
        words, wanted = ["mpistyle", "bench", "--networks"], set(_NETWORK_OPTIONS)
    else:
        words = ["mpistyle", "bench"]
        wanted = {a.dest for a in parser._actions} - set(_CEILING_ONLY) - set(_OUTPUT_OPTIONS)  # noqa: SLF001
        wanted -= {"ceiling", "networks"}
    video = video or args.video
    if video:
        words.append(shlex.quote(video))
    for action in parser._actions:  # noqa: SLF001 - the bench's own parser, built just above
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest not in wanted or value in (None, False, []):
            continue
        option = action.option_strings[-1]  # the long form
        if value is True:
            words.append(option)
            continue
        if isinstance(value, (list, tuple)):
            text = shlex.join(value) if action.dest == "launcher_args" else ",".join(map(str, value))
        else:
            text = f"{value:g}" if isinstance(value, float) else str(value)
        # An argument that starts with "-" (launcher options) must be attached: --launcher-args='-bind-to core'
        words.append(f"{option}={shlex.quote(text)}" if text.startswith("-") else f"{option} {shlex.quote(text)}")
    return " ".join(words)


def _encode_list(text: str) -> str:
    items = [t for t in text.replace(" ", "").split(",") if t]
    if not items or any(t not in ("both", "auto", *ENCODE_MODES) for t in items):
        raise argparse.ArgumentTypeError(f"expected both, auto, rank0 or segments (--ceiling: a list), got {text!r}")
    return ",".join(items)


def _decode_list(text: str) -> str:
    try:
        return ",".join(ceiling.parse_modes(text, ceiling.DECODE_MODES, "--decode"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sizes(text: str) -> str:
    try:
        return ",".join(f"{w}x{h}" for w, h in ceiling.parse_sizes(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sizes_or_none(text: str) -> str:
    return "none" if text.strip().lower() == "none" else _sizes(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive and finite: {text}")
    return value


def _run_row(run: dict[str, Any], one: dict[str, Any]) -> dict[str, Any]:
    """One run of a given --encode mode, for comparing modes at the same rank count."""
    rep = run["report"]
    work = work_seconds(rep)
    return {"ranks": run["ranks"], "encode": run["encode"], "work_s": work, "wall_s": float(rep["wall_s"]),
            "s_per_frame_work": work / int(rep["frames"]), "speedup": work_seconds(one["report"]) / work,
            "process_s": run["process_s"], "cpu_s": run.get("cpu_s")}


def check_writable(path: str | None, what: str) -> None:
    if path:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise MpistyleError(f"cannot write the {what} {path}: directory {parent} does not exist")


def main(args: argparse.Namespace) -> int:
    """Run ``mpistyle bench``: print the tables; write the JSON."""
    from ..io.media import probe
    from ..models import resolve_model

    if mpi_size_from_env() > 1:
        raise MpistyleError("run `mpistyle bench` as a plain process, not under mpiexec: it starts mpiexec "
                            "itself")
    if args.ceiling:
        return _main_ceiling(args)
    if args.networks:
        return _main_networks(args)
    args.ranks = sorted(set(args.ranks or [1, 2]) | {1})  # speed-ups are relative to the 1-rank run
    args.encode = args.encode or "both"
    if "," in args.encode:
        raise MpistyleError(f"--encode {args.encode}: one mode (a list is for --ceiling)")
    video = args.video or default_video()
    check_writable(args.json, "JSON result")
    if args.plots:
        check_writable(args.plots, "plot directory")
    info = probe(video)
    model_path = resolve_model(args.model)
    mpiexec = find_mpiexec(args.mpiexec)
    threads = args.threads_per_rank
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.device in ("cpu", "auto") and max(args.ranks) * threads > cpus:
        logger.warning("%d ranks x %d threads exceed the %d CPUs: those runs are oversubscribed",
                       max(args.ranks), threads, cpus)
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="mpistyle-bench-") as tmp:
        clip = video
        if args.frames is not None and args.frames < info.n_frames:
            clip = cut_video(video, args.frames, tmp)
            info = probe(clip)
        jobs = encode_jobs(args.ranks, args.encode)
        primary = {n: mode for n, mode in reversed(jobs)}  # a rank count's first job
        by_mode: dict[str, dict[int, dict[str, Any]]] = {}  # fastest run of each (mode, ranks)
        repeats: dict[str, list[dict[str, Any]]] = {}

        def pipelines(_: int) -> None:  # one round of pipeline runs after each forward pass
            for n, mode in jobs:
                run = run_pipeline(mpiexec, n, clip, model_path, threads, args.precision, args.device, tmp,
                                   extra=("--encode", mode, "--compile", args.compile),
                                   launcher_args=args.launcher_args)
                run["encode"] = mode
                key = str(n) if primary[n] == mode else f"{n}-{mode}"
                repeats.setdefault(key, []).append(
                    {k: run[k] for k in ("process_s", "cpu_s", "load_before", "load_after")} | {
                        "wall_s": run["report"]["wall_s"], "work_s": work_seconds(run["report"])})
                best = by_mode.setdefault(mode, {})
                if n not in best or work_seconds(run["report"]) < work_seconds(best[n]["report"]):
                    if n in best:
                        remove_quietly(best[n]["output"])
                    best[n] = run
                else:
                    remove_quietly(run["output"])

        logger.info("forward pass: %d frames at %dx%d", info.n_frames, info.width, info.height)
        forward_frames = min(info.n_frames, args.forward_frames or info.n_frames)
        forward = measure_forward(clip, model_path, args.device, args.precision, threads, forward_frames,
                                  repeat=args.repeat, compare_frames=args.compare_frames,
                                  after_pass=pipelines, compile=args.compile)
        logger.info("flow alone: %d pairs at 1 thread and at %d threads", args.flow_pairs, cpus)
        flow = measure_flow(clip, cpus, pairs=args.flow_pairs)
        fusion = measure_fusion(clip, args.device)
        networks = _networks(args, video, model_path)
        runs = {n: by_mode[mode][n] for n, mode in primary.items()}
        if args.plots:
            from ..report import write_plots

            for n, run in runs.items():
                write_plots(run["report"], clip, run["output"], os.path.join(args.plots, f"ranks-{n}"))
        summary = summarize(forward, runs)
        measured = measured_costs(summary, runs)
        if flow["threads_1"]["pairs_per_s"] > 0:  # a warm-up step's flow: one pair on a free core (the run's
            measured["flow_s"] = 1.0 / flow["threads_1"]["pairs_per_s"]  # pool clock overlaps the network)
        costs = {mode: rank0_cost(mode_runs[max(mode_runs)]["report"], mode)
                 for mode, mode_runs in by_mode.items()}  # the largest run: rank 0 serves the most ranks
        result: dict[str, Any] = {
            "mpistyle": __version__,
            "video": video,
            "clip_cut_to": args.frames if clip != video else None,
            "frames": info.n_frames,
            "width": runs[1]["report"]["width"],
            "height": runs[1]["report"]["height"],
            "model": model_path,
            "device": args.device,
            "precision": forward["precision"],
            "threads_per_rank": threads,
            "launcher_args": args.launcher_args,
            "command": reproduce_command(args, video),
            "host": {"cpus": cpus, "load_start": load_start, "load_end": load_average()},
            "forward": forward,
            "flow": flow,
            "fusion": fusion,
            "networks": networks,
            "summary": summary,
            "overhead_1rank": overhead_breakdown(forward["per_frame_s"], runs[1]["report"]),
            "targets": _targets(summary, forward, runs[1]),
            "measured": measured,
            "scaling": scaling_model(measured, SCALING_RANKS, frames=args.long_frames),
            "encode": args.encode,
            "encode_runs": {mode: {str(n): _run_row(run, runs[1]) for n, run in sorted(mode_runs.items())}
                            for mode, mode_runs in by_mode.items()},
            "rank0_cost": costs,
            "encode_scaling": {mode: encode_projection(measured, cost, SCALING_RANKS, frames=args.long_frames,
                                                       gpu_rank_fps=args.gpu_rank_fps)
                               for mode, cost in costs.items()},
            "repeats": repeats,
            "reports": {str(n): run["report"] for n, run in runs.items()},
            "extra_reports": {f"{n}-{mode}": run["report"] for mode, mode_runs in by_mode.items()
                              for n, run in mode_runs.items() if primary[n] != mode},
        }
    for n, run in runs.items():  # (the other mode's runs share these settings)
        if run["report"].get("precision") != forward["precision"]:
            logger.warning("the %d-rank run used %s but the forward pass %s", n,
                           run["report"].get("precision"), forward["precision"])
    print(format_report(result))
    write_result(args.json, result)
    return 0


def _networks(args: argparse.Namespace, video: str, model_path: str) -> dict[str, Any] | None:
    if args.network_sizes == "none":
        return None
    if args.device not in ("auto", "cpu") or (args.device == "auto" and _cuda_available()):
        return None  # the table is the CPU's
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.network_sizes.split(",")]
    logger.info("network paths at %s, %s thread(s)", args.network_sizes, ",".join(map(str, args.network_threads)))
    return measure_networks(video, model_path, sizes, args.network_threads, frames=args.network_frames,
                            repeat=max(3, args.repeat), openvino=not args.no_openvino)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _main_networks(args: argparse.Namespace) -> int:
    """``mpistyle bench --networks``: the network-paths table alone."""
    from ..models import resolve_model
    from .format import format_networks

    check_writable(args.json, "JSON result")
    video = args.video or default_video()
    model_path = resolve_model(args.model)
    networks = _networks(args, video, model_path)
    if networks is None:
        raise MpistyleError("--networks measures the CPU paths at --network-sizes: run it with --device cpu")
    result = {"mpistyle": __version__, "video": video, "model": model_path, "networks": networks,
              "command": reproduce_command(args, video),
              "host": {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                       "load_start": load_average()}}
    print(format_networks(result))
    write_result(args.json, result)
    return 0


def _main_ceiling(args: argparse.Namespace) -> int:
    """``mpistyle bench --ceiling``: print the table; write the JSON."""
    check_writable(args.json, "JSON result")
    if args.video and not os.path.isfile(args.video):
        raise MpistyleError(f"input not found: {args.video}")
    args.encode = args.encode or "both"
    if "auto" in args.encode.split(","):
        raise MpistyleError("--ceiling --encode takes rank0 and/or segments")
    args.ranks = sorted(set(args.ranks or ceiling.DEFAULT_RANKS))  # as ceiling.run takes them: the command says so
    result = ceiling.run(args, find_mpiexec(args.mpiexec))
    result["command"] = reproduce_command(args)
    print(ceiling.format_ceiling(result))
    write_result(args.json, ceiling.json_safe(result))
    return 0


def write_result(path: str | None, result: dict[str, Any]) -> None:
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)
            fh.write("\n")
    except OSError as exc:
        raise write_failure(exc, path) from None


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
