"""The parallel-HDF5 buffer layout (``--buffer-layout mpio``) under real MPI ranks.

It needs h5py built with MPI, which pip's wheel is not: ``bin/install-parallel-hdf5`` builds a second
environment (.venv-phdf5) against Debian's libhdf5-mpich, run with Debian's mpiexec.mpich. The README's
test command (bin/run-tests) installs it; without it these tests fail with a line that says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from .conftest import BBB, ROOT, run_mpistyle

PHDF5_VENV = Path(os.environ.get("MPISTYLE_PHDF5_VENV", str(ROOT / ".venv-phdf5")))
MPIEXEC = os.environ.get("MPISTYLE_PHDF5_MPIEXEC", "/usr/bin/mpiexec.mpich")


def _env() -> dict[str, str]:
    """The parallel environment alone: nothing of the main venv (its MPICH wheel must not load)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "LD_PRELOAD")
           and not k.startswith("MPI4PY_")}
    env["PATH"] = os.pathsep.join([str(PHDF5_VENV / "bin"), *(p for p in env.get("PATH", "").split(os.pathsep)
                                                              if not p.startswith(sys.prefix))])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _available() -> bool:
    python = PHDF5_VENV / "bin" / "python"
    if not (python.exists() and shutil.which(MPIEXEC)):
        return False
    probe = subprocess.run([str(python), "-c", "import h5py, mpi4py.MPI; assert h5py.get_config().mpi"],
                           env=_env(), capture_output=True, timeout=120)
    return probe.returncode == 0


@pytest.fixture(autouse=True, scope="module")
def _parallel_environment() -> None:
    if not _available():
        pytest.fail(f"no parallel-h5py environment at {PHDF5_VENV}: run bin/install-parallel-hdf5 (bin/run-tests "
                    "does it)", pytrace=False)


def _mpi(ranks: int, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([MPIEXEC, "-n", str(ranks), *args], env={**_env(), **(env or {})}, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=400)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_ranks_write_one_file_independently(tmp_path: Path) -> None:
    worker = str(ROOT / "tests" / "mpio_buffer_worker.py")
    proc = _mpi(3, str(PHDF5_VENV / "bin" / "python"), worker, str(tmp_path / "b.h5"))
    assert "mpio buffer ok 30" in proc.stdout
    # only committed frames count: rank 1 (10 frames) stops after 5, committed in threes: 3 count, 7 do not
    proc = _mpi(3, str(PHDF5_VENV / "bin" / "python"), worker, str(tmp_path / "c.h5"), "5")
    assert "mpio buffer ok 23" in proc.stdout


@pytest.fixture(scope="module")
def parts_run(tmp_path_factory, model_args) -> Path:
    """The same job with the per-rank parts layout (the main environment's serial h5py)."""
    out = tmp_path_factory.mktemp("parts") / "out.mp4"
    run_mpistyle(["stylize", str(BBB), "-o", str(out), *model_args, "--keep-buffer", "--no-progress"], ranks=2,
                 check=True)
    return out


def _frames(buffer: Path) -> np.ndarray:
    with h5py.File(buffer, "r") as f:
        assert f["done"][...].all()
        return f["frames"][...]


def test_stylize_writes_one_parallel_file_and_matches_the_parts_layout(tmp_path, parts_run) -> None:
    out = tmp_path / "out.mp4"
    report = tmp_path / "r.json"
    _mpi(3, str(PHDF5_VENV / "bin" / "mpistyle"), "stylize", str(BBB), "-o", str(out), "--keep-buffer",
         "--no-progress", "--report", str(report))
    buffer = Path(str(out) + ".mpistyle.h5")
    with h5py.File(buffer, "r") as f:
        assert f.attrs["layout"] == "mpio" and not f["frames"].is_virtual
    assert not Path(str(buffer) + ".parts").exists()
    assert np.array_equal(_frames(buffer), _frames(Path(str(parts_run) + ".mpistyle.h5")))
    assert out.read_bytes() == parts_run.read_bytes()  # segments: the same bytes for 2 and 3 ranks
    root = json.loads(report.read_text())["per_rank"][0]
    assert root["counts"]["recv_bytes"] < 2000  # no frame data to rank 0


def test_failure_and_resume_on_another_rank_count(tmp_path, parts_run) -> None:
    out = tmp_path / "out.mp4"
    args = [str(PHDF5_VENV / "bin" / "mpistyle"), "stylize", str(BBB), "-o", str(out), "--keep-buffer",
            "--no-progress"]
    proc = _mpi(2, *args, env={"MPISTYLE_FAULT": "1:20:raise"}, check=False)
    assert proc.returncode == 1 and "injected fault at frame 20" in proc.stderr, proc.stderr
    buffer = Path(str(out) + ".mpistyle.h5")
    with h5py.File(buffer, "r") as f:  # the file survives the failure and holds rank 1's committed frames
        done = f["done"][...].astype(bool)
    assert done[12:20].all() and not done[20:].any()
    proc = _mpi(3, *args)
    assert "resuming" in proc.stderr
    assert np.array_equal(_frames(buffer), _frames(Path(str(parts_run) + ".mpistyle.h5")))
    assert out.read_bytes() == parts_run.read_bytes()
