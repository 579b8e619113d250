"""Shared fixtures: real clips, real mpiexec, real model files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
BBB = DATA / "bbb_clip.mp4"  # 24 frames, 128x72, 25 fps, AAC audio
CARPHONE = DATA / "carphone_clip.mp4"  # 12 frames, 176x144, 29.97 fps, silent
SAMPLE = ROOT / "mpistyle" / "data" / "sample.mp4"  # 75 frames, 320x180, with audio

# The test hooks (MPISTYLE_PAUSE_AT, MPISTYLE_FAULT) act only with this opt-in; set for this session and
# the processes it starts, never in the user's shell (mpistyle/testhooks.py).
os.environ["MPISTYLE_TEST_HOOKS"] = "1"


def tool(name: str) -> str:
    """A command from this interpreter's environment (the venv's mpiexec and mpistyle)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: install the project (pip install -e '.[mpich,dev]')")
    return found


def run_mpistyle(args: list[str], ranks: int | None = None, timeout: float = 240, env: dict | None = None,
                 check: bool = False) -> subprocess.CompletedProcess:
    """Run the real CLI, under `mpiexec -n ranks` when ranks is given."""
    cmd = [tool("mpistyle"), *args]
    if ranks is not None:
        cmd = [tool("mpiexec"), "-n", str(ranks), *cmd]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def model_args() -> list[str]:
    """The bundled default model (what users get); the tests run on it."""
    from mpistyle.models import bundled_models

    assert bundled_models(), "no bundled model in mpistyle/weights/"
    return []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MiB file system (tmpfs), to fill up. Needs root (CI runs as root)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"cannot mount a tmpfs (root needed): {proc.stderr.strip()}"
    try:
        yield str(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process tests use one torch thread: the machine has 2 cores and MPI tests run beside them."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real single-node SLURM (bin/slurm-up) for the session's sbatch tests; stopped at the end."""
    from .slurm_cluster import Cluster, missing_slurm_commands

    missing = missing_slurm_commands()
    if missing:
        pytest.fail(f"SLURM is not installed here (missing: {', '.join(missing)}): run `bin/slurm-up` as root "
                    "once (it installs slurmctld, slurmd, slurm-client and munge with apt-get)")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    try:
        yield c
    finally:
        c.stop()
