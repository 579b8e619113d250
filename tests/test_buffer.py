"""The HDF5 buffer: create, write/commit, resume checks, crash safety, full disk."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from mpistyle.buffer import FrameBuffer, read_done
from mpistyle.errors import MpistyleError

SETTINGS = {"input": "abc", "model": "def", "temporal": "flow"}


def test_frames_count_as_done_only_after_commit(tmp_path) -> None:
    path = str(tmp_path / "b.h5")
    buf = FrameBuffer.open(path, 5, 4, 6, SETTINGS)
    frame = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    buf.write(2, frame)
    assert not read_done(path).any()
    assert buf.commit() == [2]
    assert read_done(path).tolist() == [False, False, True, False, False]
    np.testing.assert_array_equal(buf.read(2), frame)
    buf.close()
    with h5py.File(path) as f:
        assert f["frames"].chunks == (1, 4, 6, 3)
        assert f["frames"].shape == (5, 4, 6, 3)


def test_resume_reuses_matching_buffer_and_refuses_other_settings(tmp_path) -> None:
    path = str(tmp_path / "b.h5")
    buf = FrameBuffer.open(path, 3, 2, 2, SETTINGS)
    buf.write(0, np.full((2, 2, 3), 7, np.uint8))
    buf.commit()
    buf.close()
    again = FrameBuffer.open(path, 3, 2, 2, dict(SETTINGS))
    assert again.done.tolist() == [True, False, False]
    again.close()
    with pytest.raises(MpistyleError, match="different run.*model.*--restart"):
        FrameBuffer.open(path, 3, 2, 2, {**SETTINGS, "model": "other"})
    with pytest.raises(MpistyleError, match="different run"):
        FrameBuffer.open(path, 4, 2, 2, SETTINGS)
    fresh = FrameBuffer.open(path, 3, 2, 2, {**SETTINGS, "model": "other"}, restart=True)
    assert not fresh.done.any()
    fresh.close()


def test_garbage_file_as_buffer_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "b.h5"
    path.write_text("not hdf5")
    with pytest.raises(MpistyleError, match="not a readable mpistyle HDF5 buffer"):
        FrameBuffer.open(str(path), 3, 2, 2, SETTINGS)


def test_killed_writer_leaves_a_readable_buffer(tmp_path) -> None:
    """SIGKILL while writing: committed frames survive and the file still opens."""
    path = str(tmp_path / "b.h5")
    code = f"""
import numpy as np, os, signal
from mpistyle.buffer import FrameBuffer
buf = FrameBuffer.open({path!r}, 50, 64, 64, {SETTINGS!r})
for t in range(50):
    buf.write(t, np.full((64, 64, 3), t, np.uint8))
    if t % 5 == 4:
        buf.commit()
    if t == 22:
        os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    buf = FrameBuffer.open(path, 50, 64, 64, SETTINGS)
    assert buf.done.tolist() == [True] * 20 + [False] * 30
    for t in (0, 19):
        assert (buf.read(t) == t).all()
    buf.close()


def test_buffer_too_big_for_the_disk_fails_at_creation(small_tmpfs) -> None:
    path = os.path.join(small_tmpfs, "b.h5")
    with pytest.raises(MpistyleError, match="disk full"):
        FrameBuffer.open(path, 100, 180, 320, SETTINGS)  # 17 MB on a 2 MB file system
    assert os.listdir(small_tmpfs) == []  # nothing half-written left behind
