"""Constants and small helpers every bench module shares: clips, rank lists, the launcher, the load."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys

from ..errors import MpistyleError

logger = logging.getLogger(__name__)

# mpistyle/ (this file is mpistyle/bench/common.py)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_CLIP = os.path.join(PACKAGE_DIR, "data", "sample.mp4")
CHECKOUT_CLIP = os.path.join("tests", "data", "bbb_640x272.mp4")
SCALING_RANKS = (1, 8, 16, 32, 64, 128, 256, 512)
LONG_VIDEO_FRAMES = 10_000
# Phases timed on each rank's main thread (they add up to its work time, minus untimed bookkeeping).
MAIN_PHASES = ("network", "wait_flow", "fuse", "send", "wait_halo", "wait_source")
# Phases of helper threads (flow on every rank; decode/write/encode on rank 0): they overlap the above.
HELPER_PHASES = ("flow", "decode", "write", "encode", "segment_encode", "join")
# Output modes the bench compares (stylize --encode); "both" runs each multi-rank pipeline in each.
ENCODE_MODES = ("rank0", "segments")
# End-to-end rate of one GPU rank that issue 8 targets: how many such ranks fit under rank 0's ceiling.
GPU_RANK_FPS = 300.0
TARGETS = {"ratio": 1.15, "speedup_2": 1.85, "s_per_frame_2": 0.34,
           # issue 21: the stylize run's network time per frame against 0.3's eager forward of the same model
           "network_vs_eager": 0.45,
           # issue 21: a 1-rank stylize, as a whole process, against decoding plus 0.3's eager forward
           "process_vs_decode_eager": 1.0}


def default_video() -> str:
    """The 640x272 test clip when run from a checkout, else the sample clip shipped in the package."""
    package = PACKAGE_DIR
    for candidate in (os.path.join(os.getcwd(), CHECKOUT_CLIP),
                      os.path.join(os.path.dirname(package), CHECKOUT_CLIP)):
        if os.path.isfile(candidate):
            return candidate
    return SAMPLE_CLIP


def parse_rank_counts(text: str) -> list[int]:
    """``"2,4,2"`` -> [2, 4] (sorted, unique, positive)."""
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rank counts, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"rank counts must be positive integers, got {text!r}")
    return sorted(set(values))


def parse_ranks(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] (sorted, unique, 1 always included: speed-ups are relative to it)."""
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rank counts, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"rank counts must be positive integers, got {text!r}")
    return sorted(set(values) | {1})


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def mpi_size_from_env() -> int:
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def find_tool(name: str) -> str | None:
    """A console script of this Python environment (mpiexec from the mpich wheel, mpistyle), else from PATH."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(local, os.X_OK):
        return local
    return shutil.which(name)


def find_mpiexec(explicit: str | None) -> str:
    if explicit:
        found = shutil.which(explicit)
        if not found:
            raise MpistyleError(f"mpiexec not found: {explicit}")
        return found
    found = find_tool("mpiexec")
    if not found:
        raise MpistyleError("mpiexec not found: install an MPI (pip install mpich) or pass --mpiexec PATH")
    return found


def cut_video(path: str, frames: int, directory: str) -> str:
    """The first ``frames`` frames of ``path`` as a new near-lossless H.264 file (audio dropped)."""
    from ..io.ffmpeg import ffmpeg_exe

    out = os.path.join(directory, f"clip-{frames}.mp4")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", path,
           "-map", "0:V:0", "-frames:v", str(frames), "-an", "-sn", "-dn",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "10", "-pix_fmt", "yuv420p", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise MpistyleError(f"cannot cut {path} to {frames} frames: {last}")
    return out


def load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return float("nan")
