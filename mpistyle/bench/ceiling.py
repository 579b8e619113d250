"""``mpistyle bench --ceiling``: what the pipeline itself costs when the network costs almost nothing.

Every run is a real ``mpiexec -n R ... stylize CLIP --model IDENTITY.pth --threads 1 --width W --height
H --encode MODE [--decode MODE] --report R.json --restart`` with the identity 1x1 convolution
(:func:`mpistyle.models.write_identity_model`) and, by default, stylize's own ``--temporal flow``. Per run: frames/s,
rank 0's CPU time per frame and the bytes rank 0 received per frame.

CPU time is measured outside the code under test: each rank runs through a bootstrap script
(:data:`BOOTSTRAP`) that calls ``mpistyle.cli.main()`` and, on the way out (SystemExit included),
writes ``getrusage`` of itself and of its finished children (ffmpeg) to ``$MPISTYLE_BENCH_DIR``. So the
same measurement applies to any version, e.g. v0.2 side by side (``--baseline SRC`` or
``--baseline-ref REF``): that code cannot load the identity model, so the bootstrap replaces its
``mpistyle.models.load_model`` with one that returns the same identity module.

Received bytes: ``per_rank[0]["counts"]["recv_bytes"]`` when the report has it; otherwise computed as
v0.2 sends frames: every frame another rank computed reaches rank 0 as ``8 + W*H*3`` bytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MpistyleError
from .common import PACKAGE_DIR, SAMPLE_CLIP, load_average
from .format import fmt, table
from .scaling import ceiling_projection

logger = logging.getLogger(__name__)

DEFAULT_SIZES = ((640, 360), (1920, 1080))
DEFAULT_RANKS = (1, 2, 4, 8)
ENCODE_MODES = ("rank0", "segments")
DECODE_MODES = ("rank0", "each")
PREDICT_RANKS = (8, 64, 512)
LINK_GBPS = 10.0
# Frames of the test clip: several 64-frame fusion chains per partition at 2 ranks (warm-ups of up to
# 73 frames then weigh what they weigh in a long video), short enough for a matrix of runs; 1080p
# frames cost ~9x more each.
FRAMES_SMALL, FRAMES_LARGE = 384, 128
LARGE_PIXELS = 1280 * 720
FRAME_HEADER_BYTES = 8  # v0.2: each gathered frame message is an int64 index, then the RGB frame
IDENTITY_ENV = "MPISTYLE_BENCH_IDENTITY"
DIR_ENV = "MPISTYLE_BENCH_DIR"
RANK_ENV_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")

# Runs each rank in place of `mpistyle`. Self-contained (standard library + torch only): it must work
# with any version of mpistyle on PYTHONPATH.
BOOTSTRAP = r'''"""mpistyle bench --ceiling bootstrap: run mpistyle's CLI, then record this rank's CPU time."""
import json
import os
import resource
import sys
import time


def _cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _rank():
    for var in RANK_ENV_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


_t0 = time.perf_counter()
# Heavy imports first, timed apart: a fixed start-up cost that does not grow with the video.
for _name in ("numpy", "torch", "cv2", "h5py"):
    try:
        __import__(_name)
    except ImportError:
        pass
_startup_cpu = _cpu(resource.RUSAGE_SELF)
_record = {"rank": _rank(), "startup_cpu_s": _startup_cpu, "patched_load_model": False}
_code = 1
try:
    import mpistyle
    import mpistyle.models as _models

    _record["mpistyle_file"] = os.path.abspath(mpistyle.__file__)
    _record["mpistyle_version"] = getattr(mpistyle, "__version__", None)
    _mode = os.environ.get(IDENTITY_ENV, "")
    if _mode == "force" or (_mode == "auto" and not hasattr(_models, "PointwiseNet")):
        import torch

        class _Identity(torch.nn.Module):
            """The same 1x1 identity convolution as mpistyle.models.write_identity_model."""

            def __init__(self):
                super().__init__()
                self.pointwise = torch.nn.Conv2d(3, 3, kernel_size=1)
                with torch.no_grad():
                    self.pointwise.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
                    self.pointwise.bias.zero_()

            def forward(self, x):
                return self.pointwise(x)

        def _load_identity(spec, device="cpu"):
            return _Identity().eval().to(device)

        # stylize imports load_model from mpistyle.models at call time, so this reaches it.
        _models.load_model = _load_identity
        _record["patched_load_model"] = True
    from mpistyle.cli import main

    sys.argv[0] = "mpistyle"
    _code = main()
except SystemExit as exc:
    _code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    raise
finally:
    _record.update(exit=_code, self_cpu_s=_cpu(resource.RUSAGE_SELF),
                   children_cpu_s=_cpu(resource.RUSAGE_CHILDREN), process_wall_s=time.perf_counter() - _t0)
    _dir = os.environ.get(DIR_ENV)
    if _dir:
        _path = os.path.join(_dir, "cpu-rank%d.json" % _record["rank"])
        with open(_path + ".tmp", "w") as _fh:
            json.dump(_record, _fh)
        os.replace(_path + ".tmp", _path)
sys.exit(_code)
'''.replace("RANK_ENV_VARS", repr(RANK_ENV_VARS)).replace("IDENTITY_ENV", repr(IDENTITY_ENV)).replace(
    "DIR_ENV", repr(DIR_ENV))


@dataclass
class Version:
    """One code base under test: its label, the source root put first on PYTHONPATH, what it supports."""

    label: str
    source: str
    commit: str | None = None
    decode_flag: bool = False  # stylize accepts --decode


# --------------------------------------------------------------------------------------------
# arguments


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"640x360,1920x1080"`` -> [(640, 360), (1920, 1080)]; even sizes only (yuv420p)."""
    sizes = []
    for item in (t for t in text.replace(" ", "").split(",") if t):
        m = re.fullmatch(r"(\d+)[xX](\d+)", item)
        if not m or int(m[1]) < 2 or int(m[2]) < 2 or int(m[1]) % 2 or int(m[2]) % 2:
            raise ValueError(f"expected even sizes WxH separated by commas, got {item!r}")
        sizes.append((int(m[1]), int(m[2])))
    if not sizes:
        raise ValueError(f"expected sizes WxH, got {text!r}")
    return list(dict.fromkeys(sizes))


def parse_modes(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """``"rank0,segments"`` -> ["rank0", "segments"] (``both`` = all of ``allowed``)."""
    items = [t for t in text.replace(" ", "").split(",") if t]
    if items == ["both"]:
        return list(allowed)
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"{what}: expected a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return list(dict.fromkeys(items))


def default_frames(width: int, height: int) -> int:
    """Test clip length for a frame size: 96 frames up to 720p, 48 above."""
    return FRAMES_LARGE if width * height > LARGE_PIXELS else FRAMES_SMALL


# --------------------------------------------------------------------------------------------
# inputs: clips, the identity model, the bootstrap, the baseline tree


def make_clip(source: str, width: int, height: int, frames: int, directory: str) -> str:
    """``frames`` frames of ``source``, looped as needed, scaled to WxH, near-lossless H.264 (no audio)."""
    from ..io.ffmpeg import ffmpeg_exe

    out = os.path.join(directory, f"clip-{width}x{height}-{frames}.mp4")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-stream_loop", "-1",
           "-i", source, "-map", "0:V:0", "-frames:v", str(frames), "-vf", f"scale={width}:{height}", "-an",
           "-sn", "-dn", "-c:v", "libx264", "-preset", "veryfast", "-crf", "10", "-pix_fmt", "yuv420p", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise MpistyleError(f"cannot make a {width}x{height} clip of {frames} frames from {source}: {last}")
    return out


def write_bootstrap(directory: str) -> str:
    path = os.path.join(directory, "bench_boot.py")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(BOOTSTRAP)
    return path


def baseline_from_ref(ref: str, directory: str, repo: str | None = None) -> tuple[str, str]:
    """Extract commit ``ref`` of the git checkout holding this package into ``directory`` (git archive).

    Returns (source root, full commit hash).
    """
    repo = repo or os.path.dirname(PACKAGE_DIR)
    git = shutil.which("git")
    if not git:
        raise MpistyleError("--baseline-ref needs git")
    proc = subprocess.run([git, "-C", repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise MpistyleError(f"--baseline-ref {ref}: not a commit of the git checkout {repo}")
    commit = proc.stdout.strip()
    os.makedirs(directory, exist_ok=True)
    archive = subprocess.Popen([git, "-C", repo, "archive", "--format=tar", commit], stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", directory], stdin=archive.stdout, capture_output=True, text=True)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0:
        raise MpistyleError(f"cannot extract {commit[:12]} into {directory}: {untar.stderr.strip()[:200]}")
    return directory, commit


def check_source(source: str) -> str:
    """A source root holding ``mpistyle/cli.py`` (what ``--baseline`` takes)."""
    root = os.path.abspath(source)
    if not os.path.isfile(os.path.join(root, "mpistyle", "cli.py")):
        raise MpistyleError(f"--baseline {source}: no mpistyle/cli.py there (expected a source tree's root)")
    return root


def _env(version: Version, bench_dir: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = version.source + (os.pathsep + old if old else "")  # the version's code first
    env[IDENTITY_ENV] = "auto"  # the bootstrap patches load_model only where the code lacks PointwiseNet
    env["PYTHONUNBUFFERED"] = "1"
    if bench_dir:
        env[DIR_ENV] = bench_dir
    return env


def supports_decode(version: Version) -> bool:
    """Whether this version's ``stylize`` takes ``--decode`` (asks its own --help)."""
    proc = subprocess.run([sys.executable, "-m", "mpistyle", "stylize", "--help"], capture_output=True, text=True,
                          env=_env(version), stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise MpistyleError(f"{version.label}: `mpistyle stylize --help` failed from {version.source}: "
                            f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return "--decode" in proc.stdout


# --------------------------------------------------------------------------------------------
# one run


def run_job(mpiexec: str, version: Version, bootstrap: str, clip: str, model: str, ranks: int, width: int,
            height: int, encode: str, decode: str, temporal: str, threads: int, device: str,
            directory: str) -> dict[str, Any]:
    """One ``mpiexec -n ranks python BOOT.py stylize ...`` run: its report and every rank's CPU record."""
    run_dir = tempfile.mkdtemp(prefix=f"{version.label}-{width}x{height}-n{ranks}-{encode}-{decode}-".replace(
        "/", "_"), dir=directory)
    out = os.path.join(run_dir, "out.mp4")
    report_path = os.path.join(run_dir, "report.json")
    cmd = [mpiexec, "-n", str(ranks), sys.executable, bootstrap, "-q", "stylize", clip, "-o", out,
           "--model", model, "--threads", str(threads), "--width", str(width), "--height", str(height),
           "--encode", encode, "--temporal", temporal, "--device", device, "--report", report_path,
           "--restart", "--no-progress"]
    if version.decode_flag:
        cmd += ["--decode", decode]
    elif decode != "rank0":
        raise ValueError(f"{version.label} has no --decode: only rank0 decode")
    logger.info("%s: %s", version.label, " ".join(cmd))
    load_before = load_average()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(version, run_dir), stdin=subprocess.DEVNULL)
    process_s = time.perf_counter() - start
    if proc.returncode != 0 or not os.path.isfile(report_path):
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise MpistyleError(f"{version.label}: the {ranks}-rank {width}x{height} run (--encode {encode}, decode "
                            f"{decode}) failed (exit {proc.returncode}): {why}")
    with open(report_path, encoding="utf-8") as fh:
        report = json.load(fh)
    cpu = {}
    for r in range(ranks):
        try:
            with open(os.path.join(run_dir, f"cpu-rank{r}.json"), encoding="utf-8") as fh:
                cpu[r] = json.load(fh)
        except (OSError, ValueError):
            logger.warning("%s: no CPU record of rank %d (rank env var not set?)", version.label, r)
    if 0 not in cpu:
        raise MpistyleError(f"{version.label}: the bootstrap wrote no CPU record for rank 0 in {run_dir}")
    ran = os.path.dirname(os.path.dirname(cpu[0].get("mpistyle_file", "")))
    if os.path.realpath(ran) != os.path.realpath(version.source):
        raise MpistyleError(f"{version.label}: the run imported mpistyle from {ran}, not {version.source}")
    row = ceiling_row(report, cpu[0], process_s)
    row.update(version=version.label, encode=encode, decode=decode, load_before=load_before,
               load_after=load_average(), cpu_ranks={str(r): c for r, c in cpu.items()},
               patched_load_model=bool(cpu[0].get("patched_load_model")))
    shutil.rmtree(run_dir, ignore_errors=True)  # 1080p outputs and buffers add up over a matrix
    return row


def rank0_received_bytes(report: dict[str, Any]) -> tuple[int, str]:
    """Bytes of MPI messages rank 0 received in a run: (bytes, "report" or "computed").

    Newer reports count them (``per_rank[0]["counts"]["recv_bytes"]``). Otherwise computed the way
    v0.2 gathers: every frame another rank computed reaches rank 0 as an 8-byte index plus W*H*3 bytes.
    """
    entries = report.get("per_rank") or []
    root = next((e for e in entries if e.get("rank", 0) == 0), {})
    counted = (root.get("counts") or {}).get("recv_bytes")
    if counted is not None:
        return int(counted), "report"
    frame = FRAME_HEADER_BYTES + int(report["width"]) * int(report["height"]) * 3
    others = sum(int(e.get("frames") or 0) for e in entries if e.get("rank", 0) != 0)
    return others * frame, "computed"


def ceiling_row(report: dict[str, Any], cpu0: dict[str, Any], process_s: float) -> dict[str, Any]:
    """Per-frame figures of one run (pure): frames/s, rank 0's CPU ms/frame, rank 0's received KB/frame.

    CPU = user + sys of rank 0's process and its finished children (ffmpeg decoder/encoders) over
    the video's frames; ``cpu_ms_per_frame_net`` leaves out the bootstrap's timed imports (a fixed
    cost that long videos amortise).
    """
    frames = int(report["frames"])
    if frames < 1:
        raise ValueError("a report without frames")
    wall = float(report["wall_s"])
    total = float(cpu0["self_cpu_s"]) + float(cpu0["children_cpu_s"])
    net = total - float(cpu0.get("startup_cpu_s", 0.0))
    recv, source = rank0_received_bytes(report)
    return {
        "width": int(report["width"]),
        "height": int(report["height"]),
        "ranks": int(report["ranks"]),
        "frames": frames,
        "wall_s": wall,
        "process_s": process_s,
        "fps": frames / wall if wall > 0 else math.inf,
        "rank0_cpu_s": total,
        "rank0_self_cpu_s": float(cpu0["self_cpu_s"]),
        "rank0_children_cpu_s": float(cpu0["children_cpu_s"]),
        "rank0_startup_cpu_s": float(cpu0.get("startup_cpu_s", 0.0)),
        "cpu_ms_per_frame": total / frames * 1e3,
        "cpu_ms_per_frame_net": net / frames * 1e3,
        "recv_bytes": recv,
        "recv_source": source,
        "recv_kb_per_frame": recv / frames / 1e3,
    }


def with_marginal(short: dict[str, Any], long: dict[str, Any]) -> dict[str, Any]:
    """The long run's row plus the marginal cost per frame between two clip lengths (pure).

    Every rank pays fixed costs (MPI and torch start-up, model load, probe, the join's ffmpeg start)
    that a short clip spreads over few frames; the difference between a clip of F frames and one of
    K x F frames leaves only what each extra frame costs rank 0: the serial stream a long video sees.
    """
    extra = long["frames"] - short["frames"]
    if extra <= 0:
        raise ValueError("the long clip must have more frames")
    marginal = (long["rank0_cpu_s"] - short["rank0_cpu_s"]) / extra * 1e3
    recv = (long["recv_bytes"] - short["recv_bytes"]) / extra
    row = {**long, "short_frames": short["frames"], "marginal_cpu_ms_per_frame": marginal,
           "marginal_recv_kb_per_frame": recv / 1e3}
    # Rank 0 is also a worker: its share of the parallel work shrinks as 1/N. What it does on top of a
    # typical rank (the median of the others, per extra frame) is the serial stream that caps the job.
    def per_rank(cpu: dict[str, Any]) -> dict[str, float]:
        return {str(k): float(v["self_cpu_s"]) + float(v["children_cpu_s"]) for k, v in (cpu or {}).items()}

    a, b = per_rank(short.get("cpu_ranks", {})), per_rank(long.get("cpu_ranks", {}))
    others = sorted((b[k] - a[k]) / extra * 1e3 for k in b if k in a and k != "0")
    if others:
        median = others[len(others) // 2] if len(others) % 2 else (others[len(others) // 2 - 1]
                                                                     + others[len(others) // 2]) / 2
        row["worker_marginal_ms"] = median
        row["excess_cpu_ms_per_frame"] = marginal - median
    else:  # one rank: everything it does is serial
        row["excess_cpu_ms_per_frame"] = marginal
    return row


def cost_ms(row: dict[str, Any]) -> float:
    """Rank 0's CPU per frame a long video approaches: the marginal figure when measured, else the net one."""
    return float(row.get("marginal_cpu_ms_per_frame", row["cpu_ms_per_frame_net"]))


def serial_ms(row: dict[str, Any]) -> float:
    """Rank 0's serial cost per frame: its marginal CPU beyond a typical rank's when measured (never below
    0.01 ms: noise), else the net CPU per frame (an upper bound: it includes rank 0's own share)."""
    if "excess_cpu_ms_per_frame" in row:
        return max(float(row["excess_cpu_ms_per_frame"]), 0.01)
    return cost_ms(row)


# --------------------------------------------------------------------------------------------
# derived figures (pure)


def ratios(rows: Iterable[dict[str, Any]], baseline: str, new: str) -> list[dict[str, Any]]:
    """Baseline's rank-0 CPU per frame over the new code's, per size, rank count, encode and new decode mode."""
    rows = list(rows)
    base = {(r["width"], r["height"], r["ranks"], r["encode"]): r for r in rows
            if r["version"] == baseline and r["decode"] == "rank0"}
    out = []
    for r in rows:
        if r["version"] != new:
            continue
        b = base.get((r["width"], r["height"], r["ranks"], r["encode"]))
        if b is None:
            continue
        out.append({"width": r["width"], "height": r["height"], "ranks": r["ranks"], "encode": r["encode"],
                    "decode": r["decode"], "baseline_cpu_ms_per_frame": b["cpu_ms_per_frame"],
                    "new_cpu_ms_per_frame": r["cpu_ms_per_frame"],
                    "ratio": b["cpu_ms_per_frame"] / r["cpu_ms_per_frame"] if r["cpu_ms_per_frame"] > 0 else math.inf,
                    "ratio_net": (b["cpu_ms_per_frame_net"] / r["cpu_ms_per_frame_net"]
                                  if r["cpu_ms_per_frame_net"] > 0 else math.inf),
                    **({"baseline_marginal_ms": cost_ms(b), "new_marginal_ms": cost_ms(r),
                        "ratio_marginal": cost_ms(b) / cost_ms(r) if cost_ms(r) > 0 else math.inf,
                        "baseline_serial_ms": serial_ms(b), "new_serial_ms": serial_ms(r),
                        "ratio_serial": serial_ms(b) / serial_ms(r)}
                       if "marginal_cpu_ms_per_frame" in r else {})})
    return out


def projections(rows: Iterable[dict[str, Any]], link_gbps: float = LINK_GBPS, gpu_rank_fps: float = 300.0,
                ranks: Sequence[int] = PREDICT_RANKS, encode: str = "segments") -> list[dict[str, Any]]:
    """The scaling model per version, size and decode mode, from its largest ``encode`` run (pure).

    Rank 0's serial cost per frame is its CPU time per frame without the start-up imports (the
    figure a long video approaches); received bytes per frame as measured (or computed).
    """
    largest: dict[tuple[str, int, int, str], dict[str, Any]] = {}
    for r in rows:
        if r["encode"] != encode:
            continue
        key = (r["version"], r["width"], r["height"], r["decode"])
        if key not in largest or r["ranks"] > largest[key]["ranks"]:
            largest[key] = r
    out = []
    for (version, width, height, decode), r in largest.items():
        recv = (r["marginal_recv_kb_per_frame"] * 1e3 if "marginal_recv_kb_per_frame" in r
                else r["recv_bytes"] / r["frames"])
        proj = ceiling_projection(serial_ms(r) / 1e3, max(recv, 0.0), link_gbps, gpu_rank_fps, ranks)
        out.append({"version": version, "width": width, "height": height, "decode": decode, "encode": encode,
                    "measured_at_ranks": r["ranks"], **proj})
    return out


def json_safe(value: Any) -> Any:
    """``value`` with infinities and NaN as None: strict JSON readers (jq, browsers) refuse ``Infinity``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# text


def format_ceiling(result: dict[str, Any]) -> str:
    """The table of runs, the baseline ratios and the scaling model's figures."""
    versions = result["versions"]
    lines = ["mpistyle bench --ceiling: the pipeline with an identity 1x1 network "
             f"(stylize --temporal {result['temporal']} --threads {result['threads']}, device {result['device']}; "
             f"{result['host']['cpus']} CPUs, load {result['host']['load_start']} at start, "
             f"{result['host']['load_end']} at end)"]
    if result.get("command"):
        lines.append(f"  reproduce: {result['command']}")
    for v in versions:
        extra = f" commit {v['commit']}" if v.get("commit") else ""
        lines.append(f"  {v['label']}: {v['source']}{extra}; --decode {'yes' if v['decode_flag'] else 'no'}")
    lines += ["", "runs (CPU = rank 0 + its ffmpeg children, user+sys, per frame of the video; 'net' leaves out "
                  "the start-up imports; KB received: * = computed as 8 + W*H*3 per frame from other ranks):"]
    body = [[r["version"], f"{r['width']}x{r['height']}", str(r["ranks"]), r["encode"], r["decode"],
             str(r["frames"]), fmt(r["fps"], ".1f"), fmt(r["cpu_ms_per_frame"], ".1f"),
             fmt(r["cpu_ms_per_frame_net"], ".1f"),
             fmt(r["recv_kb_per_frame"], ".0f") + ("*" if r["recv_source"] == "computed" else "")]
            for r in result["rows"]]
    if any("marginal_cpu_ms_per_frame" in r for r in result["rows"]):
        for row, r in zip(body, result["rows"], strict=True):
            row += [fmt(r.get("marginal_cpu_ms_per_frame", math.nan), ".2f"),
                    fmt(r.get("excess_cpu_ms_per_frame", math.nan), ".2f")]
    lines += table(["version", "size", "ranks", "encode", "decode", "frames", "frames/s", "r0 CPU ms/f",
                    "net ms/f", "r0 recv KB/f",
                    *(["marginal ms/f", "serial ms/f"] if any("marginal_cpu_ms_per_frame" in r for r in result["rows"])
                      else [])],
                   body)
    for f in result.get("failures") or []:
        lines.append(f"  FAILED: {f['version']} {f['width']}x{f['height']} {f['ranks']} rank(s) "
                     f"{f['encode']}/{f['decode']}: {f['error']}")
    if result.get("ratios"):
        lines += ["", f"rank-0 CPU per frame, {result['baseline_label']} / {result['new_label']} "
                      "(> 1: the new code costs rank 0 less; total / net):"]
        by_size: dict[str, list[str]] = {}
        for q in result["ratios"]:
            by_size.setdefault(f"{q['width']}x{q['height']}", []).append(
                f"{q['ranks']} rank(s) {q['encode']}/{q['decode']}: {fmt(q['ratio'], '.2f')}x / "
                f"{fmt(q['ratio_net'], '.2f')}x" + (f" / marginal {fmt(q['ratio_marginal'], '.1f')}x / serial "
                                                      f"{fmt(q['ratio_serial'], '.1f')}x"
                                                      if "ratio_marginal" in q else ""))
        lines += [f"  {size}: " + "; ".join(items) for size, items in by_size.items()]
    if result.get("projections"):
        p0 = result["projections"][0]
        lines += ["", f"scaling model (bench.scaling.ceiling_projection): rate(P) = min(P x {p0['gpu_rank_fps']:.0f} "
                      f"f/s per GPU rank, 1 / rank-0 serial s/frame, {p0['link_gbps']:g} Gb/s / rank-0 received "
                      "bytes/frame); serial = the largest --encode segments run's rank-0 CPU per frame beyond a "
                      "typical rank's (marginal, with --long-factor), else its net CPU per frame:"]
        body = [[p["version"], f"{p['width']}x{p['height']}", p["decode"], str(p["measured_at_ranks"]),
                 fmt(p["serial_s"] * 1e3, ".2f"), fmt(p["recv_bytes_per_frame"] / 1e3, ".0f"),
                 fmt(p["serial_fps"], ".0f"), fmt(p["link_fps"], ".0f"), fmt(p["usable_gpu_ranks"], ".2f"),
                 *(fmt(x["fps"], ".0f") + f" ({x['bound']})" for x in p["predicted"])]
                for p in result["projections"]]
        lines += table(["version", "size", "decode", "from ranks", "serial ms/f", "recv KB/f", "serial f/s",
                        "link f/s", "usable GPU ranks",
                        *(f"f/s @{x['ranks']} GPU ranks" for x in p0["predicted"])], body)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command


def run(args: Any, mpiexec: str) -> dict[str, Any]:
    """Run the matrix of ``args`` (see :func:`mpistyle.bench.cli.add_arguments`); returns the result."""
    from ..models import write_identity_model

    sizes = parse_sizes(args.sizes)
    encodes = parse_modes(args.encode, ENCODE_MODES, "--encode")
    decodes = parse_modes(args.decode, DECODE_MODES, "--decode")
    ranks = sorted(set(args.ranks or DEFAULT_RANKS))
    source_clip = args.video or SAMPLE_CLIP
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if max(ranks) * args.threads_per_rank > cpus:
        logger.warning("%d ranks x %d threads exceed the %d CPUs: those runs are oversubscribed",
                       max(ranks), args.threads_per_rank, cpus)
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="mpistyle-ceiling-") as tmp:
        new = Version("new", os.path.dirname(PACKAGE_DIR))
        versions = [new]
        if args.baseline and args.baseline_ref:
            raise MpistyleError("give --baseline or --baseline-ref, not both")
        if args.baseline:
            versions.append(Version(args.baseline_label or "baseline", check_source(args.baseline)))
        elif args.baseline_ref:
            src, commit = baseline_from_ref(args.baseline_ref, os.path.join(tmp, "baseline"))
            versions.append(Version(args.baseline_label or f"base@{commit[:7]}", src, commit))
            logger.info("baseline: %s = commit %s, extracted to %s", args.baseline_ref, commit, src)
        if len({v.label for v in versions}) < len(versions):
            raise MpistyleError(f"--baseline-label must differ from {new.label!r}")
        for v in versions:
            v.decode_flag = supports_decode(v)
            if "each" in decodes and not v.decode_flag:
                logger.warning("%s has no --decode: rank0 decode only", v.label)
        model = write_identity_model(os.path.join(tmp, "identity.pth"))
        bootstrap = write_bootstrap(tmp)
        rows: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        for width, height in sizes:
            frames = args.frames or default_frames(width, height)
            clip = make_clip(source_clip, width, height, frames, tmp)
            factor = getattr(args, "long_factor", 1)
            long_clip = make_clip(source_clip, width, height, frames * factor, tmp) if factor > 1 else None
            for n in ranks:
                for encode in encodes:
                    for v in versions:  # versions interleaved: they share the machine's slow and fast moments
                        for decode in decodes:
                            if decode != "rank0" and not v.decode_flag:
                                continue
                            try:
                                r = run_job(mpiexec, v, bootstrap, clip, model, n, width, height, encode, decode,
                                            args.ceiling_temporal, args.threads_per_rank, args.device, tmp)
                                if long_clip is not None:  # the same job on a longer clip: the marginal cost
                                    r = with_marginal(r, run_job(mpiexec, v, bootstrap, long_clip, model, n, width,
                                                                 height, encode, decode, args.ceiling_temporal,
                                                                 args.threads_per_rank, args.device, tmp))
                            except MpistyleError as exc:  # keep the rest of a long matrix; listed in the result
                                logger.warning("%s", exc)
                                failures.append({"version": v.label, "width": width, "height": height, "ranks": n,
                                                 "encode": encode, "decode": decode, "error": str(exc)})
                                continue
                            rows.append(r)
                            logger.info("%s %dx%d n=%d %s/%s: %.1f f/s, rank 0 %.1f ms CPU/frame, %.0f KB/frame",
                                        v.label, width, height, n, encode, decode, r["fps"], r["cpu_ms_per_frame"],
                                        r["recv_kb_per_frame"])
            os.unlink(clip)
            if long_clip is not None:
                os.unlink(long_clip)
    if not rows:
        raise MpistyleError(f"every ceiling run failed; the first: {failures[0]['error']}" if failures
                            else "no ceiling run to do (check --decode against the code's options)")
    baseline_label = versions[1].label if len(versions) > 1 else None
    return {
        "mode": "ceiling",
        "versions": [{"label": v.label, "source": v.source, "commit": v.commit, "decode_flag": v.decode_flag}
                     for v in versions],
        "new_label": new.label,
        "baseline_label": baseline_label,
        "sizes": [f"{w}x{h}" for w, h in sizes],
        "ranks": ranks,
        "encode": encodes,
        "decode": decodes,
        "temporal": args.ceiling_temporal,
        "threads": args.threads_per_rank,
        "device": args.device,
        "source_clip": source_clip,
        "host": {"cpus": cpus, "load_start": load_start, "load_end": load_average()},
        "rows": rows,
        "failures": failures,
        "ratios": ratios(rows, baseline_label, new.label) if baseline_label else [],
        "projections": projections(rows, args.link_gbps, args.gpu_rank_fps),
    }
