"""The exit-status table (mpistyle.errors) and how failures map onto it."""

from __future__ import annotations

import errno
import os

import pytest

from mpistyle.cli import build_parser
from mpistyle.errors import (
    EX_FAILURE,
    EX_IOERR,
    EX_TEMPFAIL,
    EX_USAGE,
    EXIT_STATUSES,
    Interrupted,
    IOFailure,
    MpistyleError,
    exit_code_for,
    io_failure,
    write_failure,
)


def test_the_table_has_one_row_per_status_and_names_the_constants():
    codes = [row.code for row in EXIT_STATUSES]
    assert codes == sorted(set(codes))
    assert {EX_FAILURE, EX_USAGE, EX_IOERR, EX_TEMPFAIL} <= set(codes)
    assert (IOFailure.exit_code, Interrupted.exit_code, MpistyleError.exit_code) == (74, 75, 2)


@pytest.mark.parametrize(("err", "code"), [(errno.ENOSPC, 74), (errno.EDQUOT, 74), (errno.EFBIG, 74),
                                           (errno.EIO, 74), (errno.EACCES, 1), (errno.ENOENT, 1)])
def test_oserrors_map_to_io_failure_only_when_the_storage_failed(err: int, code: int):
    assert exit_code_for(OSError(err, os.strerror(err), "/scratch/x")) == code


def test_hdf5_words_a_full_disk_without_an_errno():
    exc = OSError("Can't write data (file write failed: time = Sun Dec  6, filename = 'b.h5', errno = 28, "
                  "error message = 'No space left on device')")
    assert exit_code_for(exc) == 74
    assert str(io_failure(exc, "buffer b.h5")).startswith("disk full: cannot write buffer b.h5 (")
    assert str(io_failure(OSError(errno.EIO, "Input/output error"), "x")) == \
        "I/O error: cannot write x (Input/output error)"


def test_stylize_help_lists_every_status_it_can_end_in():
    sub = build_parser()._subparsers._group_actions[0].choices["stylize"]  # noqa: SLF001
    for code in (0, 1, 2, 74, 75):
        assert f"{code} " in sub.description


def test_a_failed_write_is_the_disks_fault_or_the_paths():
    full = write_failure(OSError(errno.ENOSPC, "No space left on device"), "r.json")
    assert full.exit_code == 74 and str(full) == "disk full: cannot write r.json (No space left on device)"
    readonly = write_failure(OSError(errno.EROFS, "Read-only file system"), "r.json")
    assert readonly.exit_code == 2 and str(readonly) == "cannot write r.json: Read-only file system"
