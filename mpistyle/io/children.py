"""Child processes (ffmpeg) that outlive the signals mpistyle handles itself.

Slurm delivers a job's time-limit warning (``--signal=USR1@T``) and ``scancel``'s TERM to every
process of the step, children included, and a terminal's Ctrl-C reaches the whole foreground
process group. An ffmpeg that dies of such a signal would turn "stop and save" into an encoder
failure. So children start with SIGTERM, SIGUSR1 and SIGINT *blocked* (the signal mask survives
``exec``, and unlike an ignored signal, ffmpeg installing its own SIGTERM handler does not undo a
block): a child ends only when mpistyle closes its input or kills it.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGUSR1, signal.SIGINT})


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while a child is forked (it inherits the mask).

    A signal that arrives meanwhile stays pending and is delivered to us when the block ends.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def popen(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` for a child that ignores our stop signals, in a session of its own."""
    kwargs.setdefault("start_new_session", True)
    with _stop_signals_blocked():
        return subprocess.Popen(list(cmd), **kwargs)


def run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, ...)`` with the child shielded as in :func:`popen`."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    with popen(cmd, **kwargs) as proc:
        try:
            out, err = proc.communicate()
        except BaseException:  # interrupted (e.g. KeyboardInterrupt): never leave the child behind
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
