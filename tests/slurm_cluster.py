"""A real single-node SLURM cluster for tests: started by bin/slurm-up in a temporary directory.

Used by tests/test_slurm.py through its module-scoped fixture. Jobs run the project's own sbatch
scripts with this interpreter's environment (MPISTYLE_VENV / MPISTYLE_CMD), so the ranks run the
mpistyle under test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SLURM_UP = REPO / "bin" / "slurm-up"
SLURM_DOWN = REPO / "bin" / "slurm-down"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
SBIN = ("/usr/sbin", "/sbin")


class ClusterError(RuntimeError):
    """The cluster could not be started or a job did not behave; the message says what to look at."""


def missing_slurm_commands() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return [c for c in ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "munged")
            if shutil.which(c, path=path) is None]


def job_environment(slurm_conf: str) -> dict[str, str]:
    """Environment for sbatch: this cluster, and mpistyle/mpiexec from the running interpreter."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["SLURM_CONF"] = slurm_conf
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", ""), *SBIN])
    if (Path(sys.prefix) / "bin" / "activate").exists():
        env["MPISTYLE_VENV"] = sys.prefix
    console = Path(bindir) / "mpistyle"
    env["MPISTYLE_CMD"] = str(console) if console.exists() else f"{sys.executable} -m mpistyle"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for key in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SRUN_"))]:
        del env[key]  # never inherit an enclosing allocation
    return env


class Cluster:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env: dict[str, str] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 300) -> None:
        # OMP_NUM_THREADS=1, as HPC shells often export it: the node must still get the hardware's CPUs.
        proc = subprocess.run([str(SLURM_UP), str(self.state_dir)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise ClusterError(f"bin/slurm-up failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        match = re.search(r"^export SLURM_CONF=(\S+)$", proc.stdout, re.M)
        if not match:
            raise ClusterError(f"bin/slurm-up printed no SLURM_CONF: {proc.stdout!r}")
        self.env = job_environment(match.group(1))

    def stop(self) -> None:
        subprocess.run([str(SLURM_DOWN), str(self.state_dir)], capture_output=True, text=True, timeout=120)

    # -- commands ------------------------------------------------------------------------------
    def run(self, *cmd: str, env: dict[str, str] | None = None, check: bool = True) -> str:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, env=env or self.env)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def submit(self, script: str, *args: str, sbatch: tuple[str, ...] = (), log: Path,
               env: dict[str, str] | None = None) -> str:
        """sbatch slurm/SCRIPT ARGS...; returns the job id."""
        job_env = {**self.env, "MPISTYLE_TEST_HOOKS": "1", **(env or {})}  # the harness opts in to test hooks
        out = self.run("sbatch", "--parsable", f"--output={log}", f"--chdir={log.parent}", *sbatch,
                       str(REPO / "slurm" / script), *args, env=job_env)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, states: set[str] = FINAL_STATES, timeout: float = 600,
             log: Path | None = None) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; a bounded wait with the log in the message."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        text = log.read_text(errors="replace")[-3000:] if log and log.exists() else "(no log)"
        raise ClusterError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s "
                           f"(state {info.get('JobState')}, reason {info.get('Reason')}); log:\n{text}")

    def wait_until(self, job_id: str, check: Callable[[], bool], what: str, timeout: float = 600,
                   log: Path | None = None) -> None:
        """Poll ``check`` (a state the job reports: a log line, the buffer) while the job is alive."""
        deadline = time.monotonic() + timeout
        while not check():
            state = self.job(job_id).get("JobState")
            text = log.read_text(errors="replace")[-3000:] if log and log.exists() else "(no log)"
            if state in FINAL_STATES:
                raise ClusterError(f"job {job_id} ended ({state}) before {what}; log:\n{text}")
            if time.monotonic() > deadline:
                raise ClusterError(f"no {what} in job {job_id} after {timeout:.0f} s; log:\n{text}")
            time.sleep(0.2)

    def wait_for_frames(self, job_id: str, buffer: Path, at_least: int = 1, timeout: float = 600) -> int:
        """Poll the job's HDF5 buffer until ``done`` has ``at_least`` frames; returns the count."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = done_frames(buffer)
            if n >= at_least:
                return n
            state = self.job(job_id).get("JobState")
            if state in FINAL_STATES:
                raise ClusterError(f"job {job_id} ended ({state}) before {at_least} frames were in {buffer}")
            time.sleep(0.1)
        raise ClusterError(f"no {at_least} done frames in {buffer} after {timeout:.0f} s")


def done_frames(buffer: Path) -> int:
    """Frames marked done in an mpistyle buffer that another process may be writing (0 if unreadable)."""
    try:
        # locking=False: rank 0 holds the file open for writing; we only peek at `done`.
        with h5py.File(buffer, "r", locking=False) as f:
            return int(np.count_nonzero(f["done"][...]))
    except (OSError, KeyError):
        return 0
