"""The HDF5 buffer: per-run part files, the virtual main file, resume checks, crash safety, full disk."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from mpistyle.buffer import (
    FrameBuffer,
    Part,
    PartWriter,
    check_free_space,
    frame_map,
    parts_dir,
    read_done,
    remove_buffer,
    settings_digest,
)
from mpistyle.errors import IOFailure, MpistyleError

SETTINGS = {"input": "abc", "model": "def", "temporal": "flow"}
DIGEST = settings_digest(SETTINGS)


def _frame(t: int, h: int = 4, w: int = 6) -> np.ndarray:
    return np.full((h, w, 3), t, dtype=np.uint8)


def test_frames_count_as_done_only_after_commit(tmp_path) -> None:
    path = str(tmp_path / "b.h5")
    buf = FrameBuffer.open(path, 5, 4, 6, SETTINGS)
    buf.write_index([(1, 4)])
    part = PartWriter(path, 1, 4, 4, 6, DIGEST)
    frame = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    part.write(2, frame)
    assert not read_done(path).any()
    assert part.commit() == [2]
    assert read_done(path).tolist() == [False, False, True, False, False]  # through the virtual main file
    with h5py.File(path, "r", locking=False) as f:
        np.testing.assert_array_equal(f["frames"][2], frame)
        assert f["frames"].shape == (5, 4, 6, 3) and f["frames"].is_virtual
    part.close()
    with h5py.File(os.path.join(parts_dir(path), "frames-000000001-000000004.h5")) as f:
        assert f["frames"].chunks == (1, 4, 6, 3)  # one chunk per frame, all allocated at creation
    buf.rescan()
    assert buf.done.tolist() == [False, False, True, False, False]
    np.testing.assert_array_equal(buf.read(2), frame)
    buf.close()


def test_parts_of_several_writers_read_as_one_dataset(tmp_path) -> None:
    """Three ranks' runs, then a resume with two other runs: one logical ``frames``/``done`` for h5py."""
    path = str(tmp_path / "b.h5")
    buf = FrameBuffer.open(path, 12, 4, 6, SETTINGS)
    runs = [(0, 4), (4, 8), (8, 12)]
    buf.write_index(runs)
    writers = [PartWriter(path, a, b, 4, 6, DIGEST) for a, b in runs]
    for w, done_upto in zip(writers, (4, 6, 9), strict=True):  # a kill: each rank got this far
        for t in range(w.first, done_upto):
            w.write(t, _frame(t))
        w.commit()
        w.close()
    buf.close()
    again = FrameBuffer.open(path, 12, 4, 6, dict(SETTINGS))
    assert np.flatnonzero(~again.done).tolist() == [6, 7, 9, 10, 11]
    resumed = [(6, 8), (9, 12)]  # what a 2-rank plan of the missing frames gives
    again.write_index(resumed)
    for a, b in resumed:
        w = PartWriter(path, a, b, 4, 6, DIGEST)
        for t in range(a, b):
            w.write(t, _frame(t))
        w.commit()
        w.close()
    again.rescan()
    assert again.complete()
    with h5py.File(path, "r") as f:  # a user's plain h5py: the settings, and every frame where it belongs
        assert f["done"][...].all()
        assert [int(f["frames"][t, 0, 0, 0]) for t in range(12)] == list(range(12))
        assert "flow" in f.attrs["settings"]
    assert [int(again.read(t)[0, 0, 0]) for t in range(12)] == list(range(12))
    again.close()


def test_frame_map_prefers_the_part_where_a_frame_is_done() -> None:
    old = Part(0, 8, "x", np.array([True] * 5 + [False] * 3))
    mapping = frame_map([old], 10, planned=[(5, 10)])
    assert [tuple(m) for m in mapping] == [(0, 8)] * 5 + [(5, 10)] * 5
    assert (frame_map([], 3, [])[:, 0] == -1).all()


def test_resume_reuses_matching_buffer_and_refuses_other_settings(tmp_path) -> None:
    path = str(tmp_path / "b.h5")
    buf = FrameBuffer.open(path, 3, 2, 2, SETTINGS)
    w = PartWriter(path, 0, 3, 2, 2, DIGEST)
    w.write(0, np.full((2, 2, 3), 7, np.uint8))
    w.commit()
    w.close()
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
    assert os.listdir(parts_dir(path)) == []  # the old run's parts went with it
    fresh.close()


def test_part_of_another_run_is_ignored(tmp_path) -> None:
    path = str(tmp_path / "b.h5")
    FrameBuffer.open(path, 4, 2, 2, SETTINGS).close()
    w = PartWriter(path, 0, 4, 2, 2, "some-other-digest")
    for t in range(4):
        w.write(t, _frame(t, 2, 2))
    w.commit()
    w.close()
    assert not FrameBuffer.open(path, 4, 2, 2, SETTINGS).done.any()


def test_garbage_file_as_buffer_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "b.h5"
    path.write_text("not hdf5")
    with pytest.raises(MpistyleError, match="not a readable mpistyle HDF5 buffer"):
        FrameBuffer.open(str(path), 3, 2, 2, SETTINGS)


def test_v02_single_file_buffer_asks_for_restart(tmp_path) -> None:
    path = str(tmp_path / "b.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("frames", shape=(3, 2, 2, 3), dtype="u1")
        f.create_dataset("done", data=np.zeros(3, bool))
        f.attrs["format_version"] = 1
    with pytest.raises(MpistyleError, match="not an mpistyle buffer of this version; pass --restart"):
        FrameBuffer.open(path, 3, 2, 2, SETTINGS)


def test_killed_writer_leaves_a_readable_buffer(tmp_path) -> None:
    """SIGKILL while writing: committed frames survive and the buffer still opens."""
    path = str(tmp_path / "b.h5")
    FrameBuffer.open(path, 50, 64, 64, SETTINGS).close()
    code = f"""
import numpy as np, os, signal
from mpistyle.buffer import PartWriter
w = PartWriter({path!r}, 0, 50, 64, 64, {DIGEST!r})
for t in range(50):
    w.write(t, np.full((64, 64, 3), t, np.uint8))
    if t % 5 == 4:
        w.commit()
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
    # the next run's writer for the same run reopens the part and keeps what it holds
    w = PartWriter(path, 0, 50, 64, 64, DIGEST)
    w.close()
    assert FrameBuffer.open(path, 50, 64, 64, SETTINGS).done.sum() == 20


def test_part_too_big_for_the_disk_fails_at_creation(small_tmpfs) -> None:
    path = os.path.join(small_tmpfs, "b.h5")
    FrameBuffer.open(path, 100, 180, 320, SETTINGS).close()
    with pytest.raises(IOFailure, match="disk full"):  # exit 74 (EX_IOERR), not bad input
        PartWriter(path, 0, 100, 180, 320, DIGEST)  # 17 MB on a 2 MB file system
    assert os.listdir(parts_dir(path)) == []  # nothing half-written left behind
    with pytest.raises(IOFailure, match="disk full.*needs"):
        check_free_space(path, 100, 180 * 320 * 3)
    remove_buffer(path)
    assert os.listdir(small_tmpfs) == []
