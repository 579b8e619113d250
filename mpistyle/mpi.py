"""MPI plumbing: world setup, local rank, threads and device per rank, polling waits, stop flag.

MPI is confined here and in ``pipeline.py``/``train.py``. Waits are polling loops (Test + short
sleep) rather than blocking calls: MPICH's blocking waits spin a core, which would steal the
core from the network on a one-core-per-rank layout, and a polling loop can notice a stop request.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_MPI: Any = None


def mpi() -> Any:
    """Import mpi4py.MPI lazily, asking for MPI_THREAD_MULTIPLE (helper threads do MPI calls)."""
    global _MPI
    if _MPI is None:
        import mpi4py

        mpi4py.rc.thread_level = "multiple"
        from mpi4py import MPI

        _MPI = MPI
    return _MPI


def world() -> Any:
    return mpi().COMM_WORLD


def local_rank_and_size(comm: Any) -> tuple[int, int]:
    """Rank and number of ranks on this node (shared-memory split of the communicator)."""
    node = comm.Split_type(mpi().COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def threads_per_rank(local_size: int, requested: int | None = None) -> int:
    """Cores this rank may use: explicit request, SLURM_CPUS_PER_TASK, else node cores / local ranks."""
    if requested:
        return max(1, requested)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit():
        return max(1, int(slurm))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_size))


def configure_threads(n: int) -> None:
    """Bind torch and OpenCV to ``n`` threads so ranks on a node never oversubscribe it."""
    import cv2
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    cv2.setNumThreads(n)


def select_device(spec: str, local_rank: int) -> str:
    """``auto``: this rank's local GPU if any, else CPU. ``cuda``: GPU by local rank (one rank per GPU)."""
    import torch

    from .errors import MpistyleError

    if spec == "cpu":
        return "cpu"
    has_cuda = torch.cuda.is_available()
    if spec == "auto":
        spec = "cuda" if has_cuda else "cpu"
        if spec == "cpu":
            return "cpu"
    if spec.startswith("cuda"):
        if not has_cuda:
            raise MpistyleError("--device cuda was asked for but no CUDA GPU is visible to this process")
        if spec == "cuda":
            # SLURM/launchers often restrict CUDA_VISIBLE_DEVICES per task; then index 0 is ours.
            index = local_rank % torch.cuda.device_count()
            spec = f"cuda:{index}"
        torch.cuda.set_device(torch.device(spec))
        return spec
    raise MpistyleError(f"unknown device '{spec}' (use auto, cpu, cuda or cuda:N)")


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM's pre-timeout warning) or by a peer's stop message."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""
        self.signal_name = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self.signal_name = signal.Signals(signum).name
            self.set(f"received {self.signal_name}")

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, handler)


def poll_until(done: Callable[[], bool], interrupt: Callable[[], bool] | None = None,
               timeout: float | None = None, interval: float = 0.0005) -> bool:
    """Poll ``done`` until true. Returns False when ``interrupt`` fires or the timeout passes."""
    deadline = None if timeout is None else time.monotonic() + timeout
    sleep = interval
    while not done():
        if interrupt is not None and interrupt():
            return False
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(sleep)
        sleep = min(sleep * 1.5, 0.005)  # back off to 5 ms: cheap on CPU, still prompt
    return True
