"""Per-rank threads and device choice (pure parts of mpistyle.mpi)."""

from __future__ import annotations

import os

import pytest
import torch

from mpistyle.errors import MpistyleError
from mpistyle.mpi import StopFlag, poll_until, select_device, threads_per_rank


def test_threads_split_the_node_between_its_ranks(monkeypatch) -> None:
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert threads_per_rank(1) == cores
    assert threads_per_rank(2) == max(1, cores // 2)
    assert threads_per_rank(cores * 4) == 1  # never zero
    assert threads_per_rank(2, requested=3) == 3


def test_slurm_allocation_wins(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "7")
    assert threads_per_rank(16) == 7


def test_device_choice() -> None:
    assert select_device("cpu", 0) == "cpu"
    if not torch.cuda.is_available():
        assert select_device("auto", 3) == "cpu"
        with pytest.raises(MpistyleError, match="CUDA"):
            select_device("cuda", 0)
    with pytest.raises(MpistyleError, match="unknown device"):
        select_device("tpu", 0)


def test_poll_until_stops_on_interrupt_and_timeout() -> None:
    stop = StopFlag()
    stop.set("test")
    assert poll_until(lambda: False, interrupt=lambda: bool(stop)) is False
    assert poll_until(lambda: False, timeout=0.05) is False
    assert poll_until(lambda: True) is True


def test_cli_makes_idle_openmp_threads_sleep_unless_the_user_chose(tmp_path) -> None:
    """Spinning OpenMP threads starve the rank's other threads on a shared core (the network ran 9-11x
    slower with 2 threads on a busy 2-core machine): the CLI sets OMP_WAIT_POLICY before torch loads."""
    import subprocess
    import sys

    code = ("import os, sys; from mpistyle.cli import main; main(['models']); "
            "import torch; sys.stderr.write('policy=' + os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "policy=PASSIVE" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert "policy=ACTIVE" in proc.stderr, proc.stderr
