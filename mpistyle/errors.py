"""User-facing errors: one clear line, no traceback, non-zero exit."""


class MpistyleError(Exception):
    """A problem the user can fix (bad input, bad option, full disk...).

    The CLI prints ``mpistyle: error: <message>`` and exits with ``exit_code``;
    the message must be a single line that names the problem.
    """

    exit_code = 2


class Interrupted(MpistyleError):
    """The run was stopped by a signal after making the buffer consistent; rerun to resume."""

    exit_code = 75  # EX_TEMPFAIL: the sbatch scripts requeue on it
