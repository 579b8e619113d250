"""User-facing errors and the exit statuses they end in: one clear line, no traceback, non-zero exit.

``EXIT_STATUSES`` is the one table of what every ``mpistyle`` subcommand and sbatch script exits with;
the documentation (docs/exit-codes) cites it, and the code uses the named constants below.
"""

from __future__ import annotations

import errno
from typing import NamedTuple

EX_OK = 0
EX_FAILURE = 1  # an unexpected failure (a bug, out of memory, a rank killed by the launcher...)
EX_USAGE = 2  # bad input or usage: argparse's own status, kept for every problem the user's command causes
EX_IOERR = 74  # sysexits.h EX_IOERR: the disk or file system failed (full, over quota, I/O error)
EX_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL: stopped by a signal after saving; the sbatch scripts requeue
EX_SIGINT = 130  # 128 + SIGINT: Ctrl-C where no orderly stop is set up


class ExitStatus(NamedTuple):
    code: int
    name: str
    meaning: str
    rerun: str  # what a rerun of the same command does


EXIT_STATUSES: tuple[ExitStatus, ...] = (
    ExitStatus(EX_OK, "done", "the command finished; stylize removed its buffer (unless --keep-buffer)", "-"),
    ExitStatus(EX_FAILURE, "failure", "an unexpected failure: an internal error, out of memory, or a rank that "
               "died (the launcher ends the others); the message names the rank", "resumes from the buffer"),
    ExitStatus(EX_USAGE, "bad input", "a problem with the command or its inputs: unknown option, missing or "
               "damaged video, a buffer made with other settings, permission denied", "fails again until fixed"),
    ExitStatus(EX_IOERR, "I/O failure", "the disk failed while writing the buffer, the spool, a checkpoint or "
               "the output: disk full (ENOSPC, EFBIG), over quota (EDQUOT) or an I/O error (EIO); the frames "
               "already committed to the buffer are kept", "resumes from the buffer once there is space"),
    ExitStatus(EX_TEMPFAIL, "interrupted", "stylize or train got SIGTERM, SIGUSR1 or SIGINT and stopped after "
               "saving (buffer or checkpoint); the sbatch scripts requeue the job on it", "resumes"),
    ExitStatus(EX_SIGINT, "Ctrl-C", "evaluate, quality, models or bench interrupted by SIGINT", "starts again"),
)

# errno values that mean the storage failed, not the user's command (EX_IOERR).
IO_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})
# The same failures as HDF5 and ffmpeg word them (they often carry no errno of their own).
IO_MARKERS = ("No space left on device", "Disk quota exceeded", "File too large", "Input/output error",
              "errno = 28", "errno = 122", "errno = 27")
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_DISK_FULL_MARKERS = tuple(m for m in IO_MARKERS if "Input/output" not in m)


class MpistyleError(Exception):
    """A problem the user can fix (bad input, bad option...).

    The CLI prints ``mpistyle: error: <message>`` and exits with ``exit_code``;
    the message must be a single line that names the problem.
    """

    exit_code = EX_USAGE


class IOFailure(MpistyleError):
    """The disk failed (full, over quota, I/O error): not the command's fault; rerun once it is fixed."""

    exit_code = EX_IOERR


class Interrupted(MpistyleError):
    """The run was stopped by a signal after making the buffer consistent; rerun to resume."""

    exit_code = EX_TEMPFAIL  # the sbatch scripts requeue on it


def is_io_failure(exc: BaseException) -> bool:
    """An OSError (or a message) that says the storage failed: full, over quota, an I/O error."""
    if isinstance(exc, OSError) and exc.errno in IO_ERRNOS:
        return True
    return isinstance(exc, OSError) and any(marker in str(exc) for marker in IO_MARKERS)


def io_failure(exc: OSError, what: str) -> IOFailure:
    """One line for a failed write of ``what`` (a path, or words naming it): ``disk full`` when it is."""
    text = str(exc)
    if exc.errno in _DISK_FULL_ERRNOS or any(m in text for m in _DISK_FULL_MARKERS):
        return IOFailure(f"disk full: cannot write {what} ({exc.strerror or _last(text)})")
    return IOFailure(f"I/O error: cannot write {what} ({exc.strerror or _last(text)})")


def write_failure(exc: OSError, what: str) -> MpistyleError:
    """A failed write of ``what``: the disk's fault (IOFailure, exit 74) or the path's (exit 2)."""
    if is_io_failure(exc):
        return io_failure(exc, what)
    return MpistyleError(f"cannot write {what}: {exc.strerror or exc}")


def exit_code_for(exc: BaseException) -> int:
    """The exit status a failure ends in (see EXIT_STATUSES)."""
    if isinstance(exc, MpistyleError):
        return exc.exit_code
    if is_io_failure(exc):
        return EX_IOERR
    return EX_FAILURE


def _last(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else "unknown error"
