"""Test hooks (MPISTYLE_PAUSE_AT, MPISTYLE_FAULT) take effect only with the test harness's opt-in.

A variable left in a shell from testing is inherited by every later run, and by ``sbatch`` into a real
job, where a pause would stall the job for minutes and a fault would kill it. So a hook acts only when
``MPISTYLE_TEST_HOOKS=1`` is set too (``tests/conftest.py`` sets it for the test session only); without
it a set hook variable is ignored, with one warning line per process.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

OPT_IN_ENV = "MPISTYLE_TEST_HOOKS"
HOOK_ENVS = ("MPISTYLE_PAUSE_AT", "MPISTYLE_FAULT")


def enabled() -> bool:
    return os.environ.get(OPT_IN_ENV, "") == "1"


def hook_value(name: str) -> str:
    """The hook variable ``name``'s value when test hooks are enabled, else "" (:func:`warn_ignored` says so)."""
    return os.environ.get(name, "") if enabled() else ""


def warn_ignored() -> list[str]:
    """One warning line per hook variable that is set but ignored (the CLI calls it once, at start)."""
    ignored = [name for name in HOOK_ENVS if os.environ.get(name) and not enabled()]
    for name in ignored:
        logger.warning("ignoring %s=%s: a test hook, active only with %s=1", name, os.environ[name], OPT_IN_ENV)
    return ignored
