"""Stored network outputs (issue 32): what a kill leaves is exact, slots are reused safely, disk is bounded."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mpistyle.buffer import remove_buffer
from mpistyle.errors import MpistyleError
from mpistyle.rawbuffer import RawFile, raw_dir, read_raw, remove_raw_except, scan_raw
from mpistyle.stylize.spool import OutputSpool

SHAPE = (16, 24, 3)


def _out(t: int) -> np.ndarray:
    """A distinct output per frame, every byte of it (a slot holding another frame's bytes shows)."""
    rng = np.random.default_rng(t)
    return rng.integers(0, 256, SHAPE, dtype=np.uint8)


def test_a_kill_at_any_write_leaves_only_exact_outputs(tmp_path) -> None:
    """SIGKILL a writer after every step of a run that reuses its slots many times: each time, every entry a
    resume would read holds exactly its frame's output, and the outputs put last are all there."""
    buffer = str(tmp_path / "b.h5")
    for kill_at in (3, 17):  # early, and after every slot was reused several times
        remove_buffer(buffer)
        code = f"""
import os, signal, numpy as np
from mpistyle.rawbuffer import RawFile
from mpistyle.stylize.spool import OutputSpool
def out(t):
    return np.random.default_rng(t).integers(0, 256, {SHAPE!r}, dtype=np.uint8)
committed = {{0: 0}}
spool = OutputSpool({SHAPE!r}, RawFile({buffer!r}, 0, 4, {SHAPE!r}, "d"))
spool.watch(lambda: dict(committed), lambda: True, lambda: False)
for t in range(0, 40, 2):  # 20 batches of 2 through 4 slots: every slot reused
    spool.put_many([(t, out(t)), (t + 1, out(t + 1))])
    if t // 2 == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    for u in (t, t + 1):
        spool.pop(u)
    committed[0] = t + 2  # the store committed both frames
"""
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == -9, proc.stderr
        done = np.zeros(40, dtype=bool)
        found, names = scan_raw(buffer, "d", SHAPE, done)
        last = 2 * kill_at
        assert {last, last + 1} <= set(found)  # the batch put before the kill is there
        for t, frame in read_raw(buffer, found):
            assert np.array_equal(frame, _out(t)), (kill_at, t)
        done[:last] = True  # what the store had committed: a resume ignores those
        assert set(scan_raw(buffer, "d", SHAPE, done)[0]) == {last, last + 1}


def test_entries_are_released_only_once_their_frames_are_committed(tmp_path) -> None:
    buffer = str(tmp_path / "b.h5")
    committed = {10: 10}
    spool = OutputSpool(SHAPE, RawFile(buffer, 1, 6, SHAPE, "d"))
    spool.watch(lambda: dict(committed), lambda: True, lambda: False)
    spool.put_many([(t, _out(t)) for t in range(10, 14)])
    assert np.array_equal(spool.pop(10), _out(10)) and 10 not in spool
    assert np.array_equal(spool.peek(12), _out(12)) and 12 in spool
    spool.put_many([(14, _out(14)), (15, _out(15))])  # all 6 slots in use now
    # frame 10 is fused but not committed: its output is still what a resume finds
    assert set(scan_raw(buffer, "d", SHAPE, np.zeros(20, bool))[0]) == set(range(10, 16))
    committed[10] = 11
    spool.put_many([(16, _out(16))])  # takes frame 10's slot, now free
    found = scan_raw(buffer, "d", SHAPE, np.zeros(20, bool))[0]
    assert set(found) == set(range(11, 17))
    assert all(np.array_equal(frame, _out(t)) for t, frame in read_raw(buffer, found))
    assert spool.peak == 6 and len(spool) == 6
    spool.close()  # outputs still wait: the file is kept for a resume
    assert len(os.listdir(raw_dir(buffer))) == 1


def test_a_full_file_keeps_outputs_in_memory_and_a_finished_rank_deletes_its_file(tmp_path) -> None:
    buffer = str(tmp_path / "b.h5")
    committed = {0: 0}
    spool = OutputSpool(SHAPE, RawFile(buffer, 0, 2, SHAPE, "d"))
    spool.watch(lambda: dict(committed), lambda: True, lambda: False)
    spool.put_many([(t, _out(t)) for t in range(3)])  # 2 slots: the third waits in memory
    assert len(spool) == 3 and spool.stored == 2
    for t in range(3):
        assert np.array_equal(spool.pop(t), _out(t))
    committed[0] = 3
    spool.close()
    assert os.listdir(raw_dir(buffer)) == []


def test_a_resume_takes_over_the_outputs_and_deletes_the_old_files(tmp_path) -> None:
    buffer = str(tmp_path / "b.h5")
    old = OutputSpool(SHAPE, RawFile(buffer, 0, 8, SHAPE, "d"))
    old.put_many([(t, _out(t)) for t in range(5)])
    other = RawFile(buffer, 0, 2, (8, 8, 3), "d")  # another frame size: never read
    stale = RawFile(buffer, 0, 2, SHAPE, "other settings")
    done = np.zeros(10, dtype=bool)
    done[0] = True  # frame 0 was committed before the kill: its output is not taken over
    found, names = scan_raw(buffer, "d", SHAPE, done)
    assert set(found) == {1, 2, 3, 4} and len(names) == 3
    new = OutputSpool(SHAPE, RawFile(buffer, 1, 8, SHAPE, "d"))
    new.load(read_raw(buffer, {t: found[t] for t in (3, 4)}))
    assert new.inherited == 2 and 3 in new and 4 in new and 2 not in new
    assert remove_raw_except(buffer, [new.raw.name]) == 3
    assert os.listdir(raw_dir(buffer)) == [new.raw.name]
    assert np.array_equal(new.pop(3), _out(3))
    for f in (old.raw, other, stale):
        f.close()


def test_a_raw_file_too_big_for_the_disk_fails_at_creation(small_tmpfs) -> None:
    buffer = os.path.join(small_tmpfs, "b.h5")
    with pytest.raises(MpistyleError, match="disk full"):
        RawFile(buffer, 0, 100, (180, 320, 3), "d")  # 17 MB on a 2 MB file system
    assert os.listdir(raw_dir(buffer)) == []
