"""Rank-to-rank plumbing shared by every stage: message tags, stop propagation, helper threads."""

from __future__ import annotations

import logging
import threading
from typing import Any

from ..errors import MpistyleError, exit_code_for, io_failure, is_io_failure
from ..mpi import StopFlag, poll_until

logger = logging.getLogger(__name__)

TAG_SRC, TAG_PROG, TAG_HALO, TAG_STOP, TAG_FIN, TAG_REQ, TAG_GIVE = 101, 102, 103, 105, 106, 107, 108


class Stopped(Exception):
    """Unwinds a rank's work loop when a stop was requested."""


class Messenger:
    """Stop propagation and request bookkeeping for one rank."""

    def __init__(self, comm: Any, stop: StopFlag) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.stop = stop
        self.error: tuple[str, int] | None = None  # (message, exit code) of a failure on this rank
        self.peer_failure: str = ""
        self._stop_sent = False
        self._stop_reqs: list[Any] = []

    def fail(self, message: str, code: int = 1) -> None:
        if self.error is None:
            self.error = (message, code)
        self.stop.set("error")

    def poll_stop_messages(self) -> None:
        """Receive stop notices from peers (main thread only)."""
        while self.comm.iprobe(source=mpi_any_source(), tag=TAG_STOP):
            src, reason = self.comm.recv(source=mpi_any_source(), tag=TAG_STOP)
            if reason.startswith("error:") and not self.peer_failure:
                self.peer_failure = f"rank {src} failed: {reason[6:].strip()}"
            self.stop.set(f"rank {src}: {reason}")

    def broadcast_stop(self) -> None:
        """Tell every other rank to stop, once."""
        if self._stop_sent or self.size == 1:
            return
        self._stop_sent = True
        reason = f"error: {self.error[0]}" if self.error else self.stop.reason or "stop"
        for dest in range(self.size):
            if dest != self.rank:
                self._stop_reqs.append(self.comm.isend((self.rank, reason), dest=dest, tag=TAG_STOP))

    def interrupted(self) -> bool:
        self.poll_stop_messages()
        if self.stop:
            self.broadcast_stop()
            return True
        return False

    def wait(self, req: Any, interruptible: bool = True) -> None:
        if not poll_until(req.Test, self.interrupted if interruptible else None):
            raise Stopped()

    def finish_stop_messages(self) -> None:
        poll_until(lambda: all(r.Test() for r in self._stop_reqs), timeout=10.0)


def mpi_any_source() -> int:
    from ..mpi import mpi

    return mpi().ANY_SOURCE


class ReportingThread(threading.Thread):
    """A helper thread whose failure is reported to the rank's main thread (which stops the job)."""

    msgr: Messenger

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - reported to the main thread
            self.msgr.fail(describe(exc), exit_code_for(exc))  # e.g. 2: a damaged frame, 74: a full spool disk

    def _run(self) -> None:
        raise NotImplementedError


def mpi_status() -> Any:
    from ..mpi import mpi

    return mpi().Status()


def describe(exc: BaseException) -> str:
    if isinstance(exc, MpistyleError):
        return str(exc)
    if isinstance(exc, OSError) and is_io_failure(exc):
        return str(io_failure(exc, exc.filename or "a file"))
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller --batch or --scale)"
    logger.debug("internal error", exc_info=exc)
    return f"internal error: {type(exc).__name__}: {exc}"
