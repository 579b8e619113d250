"""Cluster-grade behaviour under real MPI: kill and resume, signals, failing or killed ranks, full disk."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpistyle.io.media import probe
from mpistyle.metrics import psnr

from .conftest import BBB, ROOT, SAMPLE, tool

BUFFER_SUFFIX = ".mpistyle.h5"


def _start(args: list[str], ranks: int, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """mpiexec -n RANKS mpistyle ARGS; stderr to ``log`` when given (readable while it runs), else a pipe."""
    cmd = [tool("mpiexec"), "-n", str(ranks), tool("mpistyle"), *args]
    err = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 - the child holds it
    try:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=str(ROOT),
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    finally:
        if log is not None:
            err.close()


# The sample at half size (160x90): resume, rank-count and failure logic do not depend on the
# frame size, and a quarter of the pixels keeps these real 2- and 3-rank runs short.
HALF = ["--scale", "0.5"]
PAUSE = {"MPISTYLE_PAUSE_AT": "compute"}  # each rank holds after its first frame until a stop signal


def _wait_until_paused(log: Path, proc: subprocess.Popen, ranks: int, timeout: float = 300) -> None:
    """Both ranks report the pause: the run cannot finish before the test acts, however fast it is."""
    deadline = time.monotonic() + timeout
    while len(set(re.findall(r"rank (\d+): paused at compute ", log.read_text(errors="replace")))) < ranks:
        assert proc.poll() is None, f"ended before pausing: {log.read_text(errors='replace')}"
        assert time.monotonic() < deadline, "no pause"
        time.sleep(0.2)


def _done_count(buffer: Path) -> int:
    try:
        with h5py.File(buffer, "r", locking=False) as f:
            return int(f["done"][...].sum())
    except (OSError, KeyError):
        return 0


def _wait_for_frames(buffer: Path, proc: subprocess.Popen, at_least: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _done_count(buffer) < at_least:
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.2)


def _frames(buffer: Path) -> np.ndarray:
    with h5py.File(buffer, "r") as f:
        return f["frames"][...]


def _processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line mentions ``marker`` (a zombie's is empty: it holds no file)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry.name))
    return found


def _kill_until_gone(marker: str, timeout: float = 60) -> None:
    """SIGKILL every process that mentions ``marker`` until none is left: a rank still alive could write to
    the buffer after the test has read it."""
    deadline = time.monotonic() + timeout
    while left := _processes_mentioning(marker):
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"still running after SIGKILL: {left}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_args) -> dict:
    """The sample clip (75 frames) stylized in one go with 2 ranks: the reference for resumes."""
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "ref.mp4"
    proc = _start(["stylize", str(SAMPLE), "-o", str(out), *model_args, *HALF, "--keep-buffer", "--no-progress"], 2)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    return {"out": out, "frames": _frames(Path(str(out) + BUFFER_SUFFIX))}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_stops_cleanly_and_rerun_resumes_identically(tmp_path, uninterrupted, model_args, sig) -> None:
    out = tmp_path / "out.mp4"
    buffer = Path(str(out) + BUFFER_SUFFIX)
    args = ["stylize", str(SAMPLE), "-o", str(out), *model_args, *HALF, "--keep-buffer", "--no-progress"]
    log = tmp_path / "stopped.log"
    proc = _start(args, 2, env=PAUSE, log=log)
    _wait_until_paused(log, proc, 2)
    _wait_for_frames(buffer, proc, 1)
    proc.send_signal(sig)  # mpiexec forwards it to every rank
    proc.communicate(timeout=120)
    err = log.read_text()
    assert proc.returncode == 75, err
    assert "interrupted" in err and "rerun the same command to resume" in err and "Traceback" not in err
    assert not out.exists()
    done_before = _done_count(buffer)
    assert 0 < done_before < 75

    report = tmp_path / "resume.json"
    proc = _start([*args, "--report", str(report)], 2)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    assert "resuming" in err
    computed = json.loads(report.read_text())["frames_computed"]
    assert computed == 75 - done_before  # nothing recomputed
    assert np.array_equal(_frames(buffer), uninterrupted["frames"])  # identical to the uninterrupted run
    assert probe(str(out)).n_frames == 75


def test_resume_with_a_different_number_of_ranks(tmp_path, uninterrupted, model_args) -> None:
    out = tmp_path / "out.mp4"
    buffer = Path(str(out) + BUFFER_SUFFIX)
    args = ["stylize", str(SAMPLE), "-o", str(out), *model_args, *HALF, "--keep-buffer", "--no-progress"]
    log = tmp_path / "killed.log"
    proc = _start(args, 2, env=PAUSE, log=log)
    _wait_until_paused(log, proc, 2)
    _wait_for_frames(buffer, proc, 1)
    proc.kill()  # SIGKILL to mpiexec: no chance to clean up at all
    proc.communicate(timeout=60)
    _kill_until_gone(str(out))  # the ranks (and their encoders), orphaned by the killed launcher
    done_before = _done_count(buffer)
    assert 1 <= done_before < 75
    proc = _start(args, 3)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    frames = _frames(buffer)
    differ = [t for t in range(len(frames)) if not np.array_equal(frames[t], uninterrupted["frames"][t])]
    assert not differ, [(t, psnr(frames[t], uninterrupted["frames"][t])) for t in differ]


def test_changed_settings_do_not_reuse_the_buffer(tmp_path, model_args) -> None:
    out = tmp_path / "out.mp4"
    args = ["stylize", str(BBB), "-o", str(out), *model_args, "--keep-buffer", "--no-progress"]
    proc = _start(args, 2)
    assert proc.wait(timeout=300) == 0
    proc = _start([*args, "--temporal-strength", "0.5"], 2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("mpistyle: error: buffer") and "--restart" in err
    proc = _start([*args, "--temporal-strength", "0.5", "--restart"], 2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def test_exception_on_one_rank_ends_every_rank_with_its_message(tmp_path, model_args) -> None:
    out = tmp_path / "out.mp4"
    proc = _start(["stylize", str(SAMPLE), "-o", str(out), *model_args, *HALF, "--no-progress"], 3,
                  env={"MPISTYLE_FAULT": "1:30:raise"})
    _, err = proc.communicate(timeout=300)  # a hang fails here (and pytest-timeout bounds the test)
    assert proc.returncode == 1
    assert "mpistyle: error: rank 1:" in err and "injected fault at frame 30" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert _done_count(Path(str(out) + BUFFER_SUFFIX)) > 0  # what was computed is kept


def test_killed_rank_ends_the_job_without_hanging(tmp_path, model_args) -> None:
    out = tmp_path / "out.mp4"
    proc = _start(["stylize", str(SAMPLE), "-o", str(out), *model_args, *HALF, "--no-progress"], 3,
                  env={"MPISTYLE_FAULT": "2:55:kill"})
    out_text, err = proc.communicate(timeout=240)  # a hang fails here
    # MPICH's launcher exits with the signal that killed the rank (9), never what a success (0), bad
    # input (2), a disk error (74) or a stop (75) returns.
    assert proc.returncode == signal.SIGKILL, (proc.returncode, err[-2000:])
    said = (out_text + err).upper()  # the launcher names the dead process and its signal
    assert "KILLED" in said or "SIGNAL 9" in said
    assert not out.exists()


def test_full_output_disk_keeps_every_frame_for_the_rerun(tmp_path, small_tmpfs, model_args) -> None:
    buffer = tmp_path / "buf.h5"
    filler = Path(small_tmpfs) / "filler"
    filler.write_bytes(b"\0" * (2 * 1024 * 1024 - 12 * 1024))  # leave ~12 KB free
    out = Path(small_tmpfs) / "out.mp4"
    proc = _start(["stylize", str(BBB), "-o", str(out), *model_args, "--buffer", str(buffer), "--no-progress"], 2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 74, err  # EX_IOERR: the disk failed, not the command (mpistyle.errors)
    last = err.strip().splitlines()[-1]
    assert "disk full" in last and "rerun to encode" in last, err
    assert not out.exists() and sorted(os.listdir(small_tmpfs)) == ["filler"]
    assert _done_count(buffer) == 24
    filler.unlink()
    proc = _start(["stylize", str(BBB), "-o", str(out), *model_args, "--buffer", str(buffer), "--no-progress",
                   "--report", str(tmp_path / "r.json")], 2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["frames_computed"] == 0
    assert probe(str(out)).n_frames == 24


def test_buffer_that_does_not_fit_fails_before_any_work(tmp_path, small_tmpfs, model_args) -> None:
    out = tmp_path / "out.mp4"
    proc = _start(["stylize", str(SAMPLE), "-o", str(out), *model_args,
                   "--buffer", str(Path(small_tmpfs) / "b.h5")], 2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 74, err  # EX_IOERR: the same setup error on every rank
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]]
    assert "disk full" in err and os.listdir(small_tmpfs) == []


def test_full_scratch_disk_exits_74_and_the_rerun_resumes(tmp_path, small_tmpfs, model_args) -> None:
    """The frame spool (--scratch) fills up mid-run: one line, EX_IOERR on every rank, the buffer kept;
    the rerun with room for the spool computes only the frames still missing."""
    buffer = tmp_path / "buf.h5"
    filler = Path(small_tmpfs) / "filler"
    filler.write_bytes(b"\0" * (2 * 1024 * 1024 - 40 * 1024))  # ~40 KB free: one 128x72 frame is 27 KB
    out = tmp_path / "out.mp4"
    args = ["stylize", str(BBB), "-o", str(out), *model_args, "--buffer", str(buffer), "--no-progress"]
    proc = _start([*args, "--scratch", small_tmpfs], 2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 74, err
    errors = [line for line in err.splitlines() if line.startswith("mpistyle: error:")]
    assert errors and all("disk full: cannot write the frame spool in " + small_tmpfs in e for e in errors), err
    assert "Traceback" not in err and not out.exists()
    assert buffer.exists()
    done = _done_count(buffer)
    proc = _start([*args, "--report", str(tmp_path / "r.json")], 2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["frames_computed"] == 24 - done


def test_test_hooks_without_the_harness_opt_in_are_ignored_with_one_warning(tmp_path, model_args) -> None:
    """A hook variable left in a user's shell (no MPISTYLE_TEST_HOOKS=1) neither pauses nor fails a run:
    each rank says once that it ignores it (one line per rank), and the job completes (a pause would hold
    it 600 s, the fault would end it with exit 1)."""
    out = tmp_path / "out.mp4"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPISTYLE_PAUSE_AT": "startup,setup,compute,encode,mux",
           "MPISTYLE_FAULT": "1:3:raise"}
    env.pop("MPISTYLE_TEST_HOOKS")
    proc = subprocess.run([tool("mpiexec"), "-n", "2", tool("mpistyle"), "stylize", str(BBB), "-o", str(out),
                           *model_args, "--no-progress"], capture_output=True, text=True, cwd=str(ROOT), env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "paused at" not in proc.stderr and "injected fault" not in proc.stderr
    for hook in ("MPISTYLE_PAUSE_AT", "MPISTYLE_FAULT"):
        lines = [ln for ln in proc.stderr.splitlines() if f"ignoring {hook}=" in ln]
        assert len(lines) == 2 and all("MPISTYLE_TEST_HOOKS=1" in ln for ln in lines), proc.stderr
    assert probe(str(out)).n_frames == 24
def _stored_outputs(buffer: Path) -> dict[int, tuple[str, int]]:
    """Network outputs a run stored (and not yet used) for frames not done, read as a resume reads them."""
    from mpistyle.rawbuffer import scan_raw

    with h5py.File(buffer, "r", locking=False) as f:
        digest, done = str(f.attrs["settings_digest"]), np.asarray(f["done"][...], dtype=bool)
        shape = tuple(f["frames"].shape[1:])
    return scan_raw(str(buffer), digest, shape, done)[0]


def _copy_buffer(buffer: Path, into: Path) -> None:
    import shutil

    into.mkdir()
    shutil.copy2(buffer, into / buffer.name)
    for suffix in (".parts", ".raw"):
        shutil.copytree(str(buffer) + suffix, str(into / buffer.name) + suffix)


def test_kill_keeps_the_outputs_stylized_ahead_for_any_rank_count(tmp_path, uninterrupted, model_args) -> None:
    """Issue 32: kill -9 both ranks once each has stylized ahead and fused its first frame (the pause it
    reports); every output the network made is then in the buffer, so the resume, on 3 ranks or on 1,
    stylizes only what the network had not done yet, and its frames equal the uninterrupted run's."""
    out = tmp_path / "out.mp4"
    buffer = Path(str(out) + BUFFER_SUFFIX)
    args = ["stylize", str(SAMPLE), "-o", str(out), *model_args, *HALF, "--keep-buffer", "--no-progress"]
    log = tmp_path / "killed.log"
    proc = _start(["-v", *args], 2, env=PAUSE, log=log)
    _wait_until_paused(log, proc, 2)
    stored = _stored_outputs(buffer)
    assert stored, "nothing stored ahead at the pause"
    proc.kill()  # SIGKILL to mpiexec, then to every rank: no chance to clean up at all
    proc.communicate(timeout=60)
    _kill_until_gone(str(out))
    done = np.asarray(h5py.File(buffer, "r", locking=False)["done"][...], dtype=bool)
    stored = _stored_outputs(buffer)
    # What the network had done by the kill, from the killed run's own log (one line per batch)
    stylized = {int(t) for line in re.findall(r"network: frames \[([\d, ]+)\]", log.read_text())
                for t in line.split(", ")}
    batch = max(len(m.split(",")) for m in re.findall(r"network: frames \[([\d, ]+)\]", log.read_text()))
    assert set(np.flatnonzero(done)) | set(stored) <= stylized
    lost = stylized - set(np.flatnonzero(done)) - set(stored)
    assert len(lost) <= 2 * batch, sorted(lost)  # at most the batch in the network on each rank
    assert len(stored) >= 10 and not done.all()
    to_do = 75 - int(done.sum()) - len(stored)
    copy = tmp_path / "copy"
    _copy_buffer(buffer, copy)

    for ranks, target in ((3, out), (1, copy / "out.mp4")):
        report = tmp_path / f"resume{ranks}.json"
        proc = _start([*args[:3], str(target), *args[4:], "--report", str(report)], ranks)
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err
        said = re.search(r"\((\d+) to do; (\d+) more stylized before the stop, to fuse\)", err)
        assert said and (int(said.group(1)), int(said.group(2))) == (to_do, len(stored)), err
        assert to_do <= 75 - len(stylized) + 2 * batch  # redone: not stylized at the kill + a batch per rank
        rep = json.loads(report.read_text())
        assert rep["outputs_inherited"] == len(stored)
        own = sum(r["counts"]["network_frames"] - r["counts"].get("halo_network_frames", 0) for r in rep["per_rank"])
        assert own == to_do  # the network ran exactly on the frames not stored
        target_buffer = Path(str(target) + BUFFER_SUFFIX)
        assert np.array_equal(_frames(target_buffer), uninterrupted["frames"]), ranks
        assert list(Path(str(target_buffer) + ".raw").iterdir()) == []  # consumed outputs are deleted
