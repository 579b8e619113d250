"""MPI plumbing: world setup, local rank, threads and device per rank, polling waits, stop flag.

MPI is confined here and in ``stylize/``/``training/train.py``. Waits are polling loops (Test + short
sleep) rather than blocking calls: MPICH's blocking waits spin a core, which would steal the
core from the network on a one-core-per-rank layout, and a polling loop can notice a stop request.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
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
    fixed = fixed_threads(requested)
    if fixed is not None:
        return fixed
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_size))


def fixed_threads(requested: int | None = None) -> int | None:
    """The thread count per rank when the user fixed it (``--threads``, SLURM_CPUS_PER_TASK), else None:
    then it follows the node's cores and the rank count (:func:`threads_per_rank`)."""
    if requested:
        return max(1, requested)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    return max(1, int(slurm)) if slurm and slurm.isdigit() else None


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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PAUSE_ENV = "MPISTYLE_PAUSE_AT"
PAUSE_LIMIT_S = 600.0

# Process-wide record of stop signals. The CLI installs the handler first thing, before torch and
# mpi4py are imported, so a signal that lands during start-up is kept here and the run that starts
# later stops at once (exit 75) instead of the process dying of an unhandled SIGUSR1.
_pending_signal = ""  # a signal no StopFlag has taken yet
_seen_signals: list[str] = []  # every stop signal this process got (pause_point waits for one)
_active: StopFlag | None = None


def _on_stop_signal(signum: int, _frame: Any) -> None:
    global _pending_signal
    name = signal.Signals(signum).name
    _seen_signals.append(name)
    if _active is not None:
        _active.on_signal(name)
    elif not _pending_signal:
        _pending_signal = name


def install_stop_handlers() -> None:
    """Catch SIGTERM/SIGUSR1/SIGINT from now on; a run's StopFlag picks up any that came earlier."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)


def restore_default_signals() -> None:
    """For commands without a stop path: default actions back, and a signal that came early acts now."""
    global _pending_signal
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    name, _pending_signal = _pending_signal, ""
    if name:
        signal.raise_signal(signal.Signals[name])


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

    def on_signal(self, name: str) -> None:
        if not self.signal_name:
            self.signal_name = name
        self.set(f"received {name}")

    def install_signal_handlers(self) -> None:
        """Make this the flag stop signals set; a signal that came before (start-up) sets it now."""
        global _active, _pending_signal
        install_stop_handlers()
        _active = self
        name, _pending_signal = _pending_signal, ""
        if name:
            logger.debug("stop signal %s arrived during start-up", name)
            self.on_signal(name)


def _rank_from_env() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def pause_point(phase: str, stop: StopFlag | None = None) -> None:
    """Test hook: with MPISTYLE_PAUSE_AT=PHASE[,PHASE...] (and MPISTYLE_TEST_HOOKS=1) wait here until a
    stop signal arrives.

    A test reads the ``paused at PHASE`` line, sends its signal at exactly this point, and the
    program carries on with the stop pending. Pauses only in a SLURM job's first run, so a requeued
    run goes through, and never longer than PAUSE_LIMIT_S.
    """
    from mpistyle.testhooks import hook_value

    phases = hook_value(PAUSE_ENV)
    if phase not in phases.split(",") or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        return

    def stopped() -> bool:
        return bool(_seen_signals) or (stop is not None and bool(stop))

    if stopped():
        return
    sys.stderr.write(f"mpistyle: rank {_rank_from_env()}: paused at {phase} until a stop signal ({PAUSE_ENV})\n")
    sys.stderr.flush()
    deadline = time.monotonic() + PAUSE_LIMIT_S
    # Polling, not Event.wait: the signal handler sets the event, and must never wait for a lock we hold.
    while not stopped() and time.monotonic() < deadline:
        time.sleep(0.05)


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
