"""A stop signal at every phase of a stylize run, under a real `mpiexec -n 2` and a real SLURM.

Phases: startup (before torch and mpi4py are imported), setup (probe, model, buffer), compute, the
final encode and the audio mux. Each test holds the run at the phase with the test hook
MPISTYLE_PAUSE_AT=PHASE (the rank prints ``paused at PHASE`` and waits for a stop signal), so the
signal lands exactly there on any machine, fast or slow: no test races the job. The outcome must be
exit 75 with every finished frame committed to the HDF5 buffer, or a clean completion; never exit 2
(bad input) and never a dead encoder.

Under mpiexec the signal goes to every process below the launcher except MPICH's proxies: the ranks
and their ffmpeg children, as SLURM signals every process of a step. Under SLURM it goes to the batch
shell (``scancel --batch --signal=USR1``, what ``--signal=B:USR1@120`` does before the time limit)
or to the whole step (``scancel --signal=USR1``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpistyle.io.media import probe

from .conftest import BBB, ROOT, tool
from .slurm_cluster import Cluster, done_frames

BUFFER_SUFFIX = ".mpistyle.h5"
N_FRAMES = 24  # tests/data/bbb_clip.mp4, with audio
# Bound for each wait (these runs take well under a minute on the 2-core machine). A test's waits add up
# to less than pytest-timeout's 600 s (the thread method ends the whole session), so a slow test fails
# alone, with what it waited for. The SLURM tests have their own mark: the session's cluster may start
# in the first of them (Cluster.start: 300 s at most) and they wait up to four times.
WAIT_S = 120.0
SLURM_LIMIT_S = 300 + 4 * WAIT_S + 60


# ------------------------------------------------------------------------------------------------ helpers


def wait_for(what: str, check, alive=None, timeout: float = WAIT_S) -> None:
    """Poll ``check()`` until true; fail at once when ``alive()`` says the run ended first."""
    deadline = time.monotonic() + timeout
    while not check():
        if alive is not None and not alive():
            pytest.fail(f"the run ended before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s")
        time.sleep(0.1)


def paused(log: Path, phase: str, ranks: int) -> bool:
    text = log.read_text(errors="replace") if log.exists() else ""
    return len(set(re.findall(rf"rank (\d+): paused at {phase} ", text))) >= ranks


def children_of(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; no procps needed)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def comm_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def blocked_signals(pid: int) -> set[int]:
    """The signals a process blocks (SigBlk of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


def pending_signals(pid: int) -> set[int]:
    """Signals sent to a process and held back by its mask (SigPnd + ShdPnd of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = 0
    for field in ("SigPnd", "ShdPnd"):
        mask |= int(re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


def ffmpeg_pids(marker: str) -> list[int]:
    """ffmpeg processes whose command line mentions ``marker`` (our output directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "ffmpeg" in cmdline.split("\0")[0] and marker in cmdline:
                pids.append(int(entry.name))
    return pids


class MpiRun:
    """`mpiexec -n 2 mpistyle ARGS` with its stderr in a file the test can read while it runs."""

    def __init__(self, log: Path, args: list[str], env: dict[str, str]) -> None:
        self.log = log
        cmd = [tool("mpiexec"), "-n", "2", tool("mpistyle"), *args]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=str(ROOT),
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **env})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_ranks(self, sig: signal.Signals) -> list[int]:
        """``sig`` to the ranks and their children (ffmpeg), not to mpiexec or its proxies."""
        targets = [p for p in children_of(self.proc.pid) if comm_of(p) != "hydra_pmi_proxy"]
        assert targets, "no rank processes found"
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return targets

    def finish(self, timeout: float = WAIT_S) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return rc, self.log.read_text(errors="replace")


def stylize(tmp: Path, out: Path, extra: list[str], env: dict[str, str], name: str = "run") -> MpiRun:
    """`mpiexec -n 2 mpistyle stylize` of the 24-frame clip with audio."""
    return MpiRun(tmp / f"{name}.log", ["stylize", str(BBB), "-o", str(out), "--no-progress", *extra], env)


@pytest.fixture
def runs() -> Iterator[list[MpiRun]]:
    """Never leave a paused run behind when a test fails."""
    started: list[MpiRun] = []
    yield started
    for run in started:
        if run.alive():
            for pid in children_of(run.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            run.proc.kill()
            run.proc.wait()


def assert_stopped_cleanly(rc: int, err: str, sig: signal.Signals, buffer: Path, out: Path) -> int:
    """Exit 75, one 'interrupted' line naming the signal, no output, the buffer consistent."""
    assert rc == 75, err
    assert f"mpistyle: interrupted: received {sig.name}" in err, err
    assert "rerun the same command" in err
    assert "Traceback" not in err and "mpistyle: error" not in err, err
    assert not out.exists()
    assert buffer.exists()
    return done_frames(buffer)


def resume(tmp: Path, out: Path, runs: list[MpiRun]) -> dict:
    """Rerun the same command without a pause: it must finish from the buffer."""
    report = tmp / "resume.json"
    run = stylize(tmp, out, ["--report", str(report)], {}, name="resume")
    runs.append(run)
    rc, err = run.finish()
    assert rc == 0, err
    assert probe(str(out)).n_frames == N_FRAMES
    return json.loads(report.read_text())


# ------------------------------------------------------------------------------------------- children


def encoder_command(out: Path) -> list[str]:
    """A real ffmpeg that encodes raw frames from its stdin, as mpistyle's encoders do."""
    from mpistyle.io.ffmpeg import ffmpeg_exe

    return [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
            "-s", "16x16", "-framerate", "25", "-i", "pipe:0", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(out)]


def test_children_hold_stop_signals_and_end_only_when_their_input_ends(tmp_path: Path) -> None:
    from mpistyle.io import children

    out = tmp_path / "c.mp4"
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    proc = children.popen(encoder_command(out), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask_before  # our own mask is untouched
        assert os.getsid(proc.pid) == proc.pid  # a session of its own: a terminal's Ctrl-C is ours alone
        stops = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}
        assert stops <= blocked_signals(proc.pid)
        for sig in stops:
            os.kill(proc.pid, sig)
        wait_for("the signals held by ffmpeg", lambda: stops <= pending_signals(proc.pid), lambda: proc.poll() is None)
        proc.stdin.write(bytes(16 * 16 * 3 * 5))
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert probe(str(out)).n_frames == 5


STEP_PROGRAM = """
import re, signal, subprocess, sys, time
from pathlib import Path
from mpistyle.io import children

got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
proc = children.popen(sys.argv[2:], stdin=subprocess.PIPE)
print(f"ffmpeg {proc.pid} is running", flush=True)
def pending(pid):
    text = Path(f"/proc/{pid}/status").read_text()
    return any(int(re.search(rf"^{f}:\\s*([0-9a-f]+)$", text, re.M).group(1), 16) & (1 << 9)
               for f in ("SigPnd", "ShdPnd"))
deadline = time.monotonic() + float(sys.argv[1])
while not (got and proc.poll() is None and pending(proc.pid)) and time.monotonic() < deadline:
    if proc.poll() is not None:
        break
    time.sleep(0.05)
print(f"step process got SIGUSR1: {bool(got)}; ffmpeg alive with SIGUSR1 pending: {proc.poll() is None}", flush=True)
if proc.poll() is None:
    proc.stdin.write(bytes(16 * 16 * 3 * 5))
    proc.stdin.close()
print(f"ffmpeg exit status {proc.wait()}", flush=True)
"""


@pytest.mark.timeout(SLURM_LIMIT_S)
def test_children_in_a_slurm_step_survive_scancel_usr1(cluster: Cluster, tmp_path: Path) -> None:
    """SLURM signals every process of a step, children included: the ffmpeg gets USR1 and lives on."""
    program, out, log = tmp_path / "step.py", tmp_path / "c.mp4", tmp_path / "step.log"
    program.write_text(STEP_PROGRAM)
    wrap = " ".join(["srun", "-n", "1", sys.executable, str(program), str(WAIT_S), *encoder_command(out)])
    job = cluster.run("sbatch", "--parsable", f"--output={log}", "-n", "1", "-c", "1", "--wrap", wrap).strip()
    cluster.wait_until(job, lambda: "is running" in job_log(log), "the step's ffmpeg", log=log, timeout=WAIT_S)
    cluster.run("scancel", "--signal=USR1", job)  # the job's steps, not the batch shell
    info = cluster.wait(job, log=log, timeout=WAIT_S)
    text = job_log(log)
    assert info["JobState"] == "COMPLETED", text
    assert "step process got SIGUSR1: True; ffmpeg alive with SIGUSR1 pending: True" in text, text
    assert "ffmpeg exit status 0" in text, text
    assert probe(str(out)).n_frames == 5


# ------------------------------------------------------------------------------------- mpiexec -n 2


@pytest.mark.parametrize("phase,sig", [("startup", signal.SIGUSR1), ("startup", signal.SIGTERM),
                                       ("setup", signal.SIGUSR1), ("setup", signal.SIGTERM)])
def test_mpi_stop_before_work_exits_75(tmp_path: Path, runs: list[MpiRun], phase: str,
                                       sig: signal.Signals) -> None:
    """Startup is before the CLI imports torch and mpi4py; setup is the collective probe/model/buffer."""
    out = tmp_path / "out.mp4"
    buffer = Path(f"{out}{BUFFER_SUFFIX}")
    run = stylize(tmp_path, out, [], {"MPISTYLE_PAUSE_AT": phase})
    runs.append(run)
    wait_for(f"both ranks paused at {phase}", lambda: paused(run.log, phase, 2), run.alive)
    run.signal_ranks(sig)
    rc, err = run.finish()
    assert assert_stopped_cleanly(rc, err, sig, buffer, out) == 0


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_mpi_stop_while_computing_keeps_the_finished_frames(tmp_path: Path, runs: list[MpiRun],
                                                             sig: signal.Signals) -> None:
    out = tmp_path / "out.mp4"
    buffer = Path(f"{out}{BUFFER_SUFFIX}")
    run = stylize(tmp_path, out, [], {"MPISTYLE_PAUSE_AT": "compute"})
    runs.append(run)
    # Each rank holds after its first finished frame; rank 0 commits what reached it meanwhile.
    wait_for("both ranks paused while computing", lambda: paused(run.log, "compute", 2), run.alive)
    wait_for("a committed frame", lambda: done_frames(buffer) >= 1, run.alive)
    run.signal_ranks(sig)  # the encoders get it too, as in a SLURM step
    rc, err = run.finish()
    done = assert_stopped_cleanly(rc, err, sig, buffer, out)
    assert 1 <= done < N_FRAMES
    assert "ffmpeg" not in err  # no encoder died of the signal: mpistyle stopped them
    assert resume(tmp_path, out, runs)["frames_computed"] == N_FRAMES - done


@pytest.mark.parametrize("phase,encode", [("encode", "rank0"), ("mux", "rank0"), ("encode", "auto")])
def test_mpi_stop_during_final_encode_or_audio_mux_completes(tmp_path: Path, runs: list[MpiRun],
                                                             phase: str, encode: str) -> None:
    """Every frame is computed: a stop here finishes the file (the encoder and the mux survive it).
    rank0: one encoder on rank 0, alive since the start; auto: the ranks' segments, joined by rank 0."""
    out = tmp_path / "out.mp4"
    buffer = Path(f"{out}{BUFFER_SUFFIX}")
    run = stylize(tmp_path, out, ["--encode", encode], {"MPISTYLE_PAUSE_AT": phase})
    runs.append(run)
    wait_for(f"rank 0 paused at {phase}", lambda: paused(run.log, phase, 1), run.alive)
    assert done_frames(buffer) == N_FRAMES
    if encode == "rank0" and phase == "encode":
        encoders = ffmpeg_pids(str(tmp_path))
        assert len(encoders) == 1
        assert {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT} <= blocked_signals(encoders[0])
    run.signal_ranks(signal.SIGUSR1)
    rc, err = run.finish()
    assert rc == 0, err
    assert "Traceback" not in err and "mpistyle: error" not in err, err
    info = probe(str(out))
    assert info.n_frames == N_FRAMES and info.has_audio
    assert not buffer.exists()


def test_mpi_stop_after_the_encoder_was_killed_exits_75_and_rerun_encodes(tmp_path: Path,
                                                                          runs: list[MpiRun]) -> None:
    """A child that dies anyway during a stop (SIGKILL) must not turn the stop into exit 2."""
    out = tmp_path / "out.mp4"
    buffer = Path(f"{out}{BUFFER_SUFFIX}")
    run = stylize(tmp_path, out, ["--encode", "rank0"], {"MPISTYLE_PAUSE_AT": "encode"})
    runs.append(run)
    wait_for("rank 0 paused at encode", lambda: paused(run.log, "encode", 1), run.alive)
    encoders = ffmpeg_pids(str(tmp_path))
    assert len(encoders) == 1
    os.kill(encoders[0], signal.SIGKILL)
    run.signal_ranks(signal.SIGUSR1)
    rc, err = run.finish()
    assert rc == 75, err
    assert "mpistyle: interrupted: received SIGUSR1" in err and "killed by signal 9" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert done_frames(buffer) == N_FRAMES  # all committed: the rerun only encodes
    assert resume(tmp_path, out, runs)["frames_computed"] == 0


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_mpi_train_stopped_during_startup_saves_a_checkpoint_and_exits_75(tmp_path: Path, runs: list[MpiRun],
                                                                          sig: signal.Signals) -> None:
    """`mpistyle train` keeps its stop path: a signal before torch is even imported still ends in a
    checkpoint and exit 75 (the ranks agree after the first step)."""
    from mpistyle.training.train import load_checkpoint

    model = tmp_path / "m.pth"
    run = MpiRun(tmp_path / "train.log",
                 ["train", "--style", str(ROOT / "mpistyle/styles/udnie.jpg"), "--content", str(BBB), "-o", str(model),
                  "--size", "32", "--style-size", "32", "--batch-size", "2", "--steps", "400", "--threads", "1",
                  "--checkpoint-every", "0", "--device", "cpu",
                  # The stop path is the subject, not the compiler: a cold compile of the loss takes longer on
                  # a CPU without native bf16 than the run's waits allow.
                  "--compile", "off"], {"MPISTYLE_PAUSE_AT": "startup"})
    runs.append(run)
    wait_for("both ranks paused at startup", lambda: paused(run.log, "startup", 2), run.alive)
    run.signal_ranks(sig)
    rc, err = run.finish()
    assert rc == 75, err
    assert "interrupted" in err and "checkpoint saved" in err and "Traceback" not in err, err
    assert 1 <= load_checkpoint(str(tmp_path / "m.ckpt"))["step"] < 400


# ------------------------------------------------------------------------------------------- SLURM


def submit_paused(cluster: Cluster, tmp: Path, phase: str, *extra: str) -> tuple[str, Path, Path]:
    out, log = tmp / "out.mp4", tmp / "job.log"
    job = cluster.submit("stylize-cpu.sbatch", str(BBB), str(out), "--no-progress", *extra,
                         sbatch=("--ntasks=2", "--cpus-per-task=1"), log=log,
                         env={"MPISTYLE_LAUNCHER": "srun", "MPISTYLE_PAUSE_AT": phase})
    return job, out, log


def job_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


SLURM_STOPS = {
    "batch": ("scancel", "--batch", "--signal=USR1"),  # what --signal=B:USR1@120 does
    "step": ("scancel", "--signal=USR1"),  # every process of the job's steps: ranks and ffmpeg
}


@pytest.mark.timeout(SLURM_LIMIT_S)
@pytest.mark.parametrize("phase", ["startup", "setup", "compute"])
@pytest.mark.parametrize("target", ["batch", "step"])
def test_slurm_usr1_before_the_end_requeues_and_finishes(cluster: Cluster, tmp_path: Path, phase: str,
                                                         target: str) -> None:
    job, out, log = submit_paused(cluster, tmp_path, phase)
    cluster.wait_until(job, lambda: paused(log, phase, 2), f"both ranks paused at {phase}", log=log,
                       timeout=WAIT_S)
    if phase == "compute":
        cluster.wait_for_frames(job, Path(f"{out}{BUFFER_SUFFIX}"), timeout=WAIT_S)
    cluster.run(*SLURM_STOPS[target], job)
    info = cluster.wait(job, log=log, timeout=WAIT_S)
    text = job_log(log)
    assert info["JobState"] == "COMPLETED", text
    assert info["Restarts"] == "1", text
    assert "interrupted: received SIGUSR1" in text, text
    assert f"requeued job {job}" in text
    assert "not requeued" not in text and "Traceback" not in text and "mpistyle: error" not in text, text
    if target == "batch":
        assert "got SIGUSR1" in text
    assert probe(str(out)).n_frames == N_FRAMES


@pytest.mark.timeout(SLURM_LIMIT_S)
@pytest.mark.parametrize("phase", ["encode", "mux"])
@pytest.mark.parametrize("target", ["batch", "step"])
def test_slurm_usr1_during_final_encode_or_mux_completes(cluster: Cluster, tmp_path: Path, phase: str,
                                                         target: str) -> None:
    """The issue's failure: USR1 to the whole step used to kill ffmpeg and fail the job with exit 2."""
    job, out, log = submit_paused(cluster, tmp_path, phase, "--encode", "rank0")  # rank 0's encoder runs throughout
    cluster.wait_until(job, lambda: paused(log, phase, 1), f"rank 0 paused at {phase}", log=log, timeout=WAIT_S)
    if phase == "encode":
        encoders = ffmpeg_pids(str(tmp_path))  # started by slurmstepd's tasks: this is the step's encoder
        assert len(encoders) == 1
        assert {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT} <= blocked_signals(encoders[0])
    cluster.run(*SLURM_STOPS[target], job)
    info = cluster.wait(job, log=log, timeout=WAIT_S)
    text = job_log(log)
    assert info["JobState"] == "COMPLETED", text
    assert info["Restarts"] == "0", text
    assert f"done: {out}" in text
    assert "Traceback" not in text and "mpistyle: error" not in text, text
    info = probe(str(out))
    assert info.n_frames == N_FRAMES and info.has_audio


@pytest.mark.timeout(SLURM_LIMIT_S)
def test_slurm_usr1_to_the_batch_shell_before_the_launcher_requeues_and_finishes(cluster: Cluster,
                                                                                tmp_path: Path) -> None:
    """The warning as soon as the job runs, before the script has started the launcher: the script holds
    there (MPISTYLE_PAUSE_AT=launch) until the signal comes, so this path runs on any machine. Nothing is
    started and nothing to save: run 1 requeues at once, run 2 does all the work. (The warning while the
    ranks start is test_slurm_usr1_before_the_end_requeues_and_finishes[batch-startup].)"""
    out, log = tmp_path / "out.mp4", tmp_path / "job.log"
    job = cluster.submit("stylize-cpu.sbatch", str(BBB), str(out), "--no-progress",
                         sbatch=("--ntasks=2", "--cpus-per-task=1"), log=log,
                         env={"MPISTYLE_LAUNCHER": "srun", "MPISTYLE_PAUSE_AT": "launch"})
    cluster.wait_until(job, lambda: "run 1] paused at launch" in job_log(log), "the script paused before the launcher",
                       log=log, timeout=WAIT_S)
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = cluster.wait(job, log=log, timeout=WAIT_S)
    text = job_log(log)
    assert info["JobState"] == "COMPLETED", text
    assert info["Restarts"] == "1", text
    assert "run 1] got SIGUSR1" in text and f"run 1] stopped with work saved; requeued job {job}" in text, text
    assert "run 1] on " not in text, text  # run 1 never started the launcher
    assert "run 2] paused" not in text and f"run 2] done: {out}" in text, text
    assert "not requeued" not in text and "Traceback" not in text and "mpistyle: error" not in text, text
    assert probe(str(out)).n_frames == N_FRAMES


def test_slurm_preemption_requeues_and_finishes(cluster: Cluster, tmp_path: Path) -> None:
    """A job in the higher-tier partition "urgent" (bin/slurm-up: preempt/partition_prio, PreemptMode=CANCEL)
    takes the whole node: slurmctld sends SIGTERM to the batch script and the ranks, which save the
    buffer; the script sees the preemption (a PreemptTime) and requeues; the rerun resumes and finishes.
    (PREEMPTED is not a final state here: the requeued job runs again.)"""
    # mpiexec: SLURM signals the batch step's every process (script, launcher, ranks) at once. (With srun, a
    # requeued run has the same job and step ids; ranks that KillWait killed on this loaded machine left
    # MPICH shared memory of that name behind, and the next run's MPI_Init failed on it.)
    out, log = tmp_path / "out.mp4", tmp_path / "job.log"
    job = cluster.submit("stylize-cpu.sbatch", str(BBB), str(out), "--no-progress",
                         sbatch=("--ntasks=2", "--cpus-per-task=1"), log=log,
                         env={"MPISTYLE_LAUNCHER": "mpiexec", "MPISTYLE_PAUSE_AT": "compute"})
    cluster.wait_until(job, lambda: paused(log, "compute", 2), "both ranks paused at compute", log=log)
    cluster.wait_for_frames(job, Path(f"{out}{BUFFER_SUFFIX}"))
    urgent = cluster.run("sbatch", "--parsable", "--partition=urgent", "--exclusive", "--ntasks=1",
                         f"--output={tmp_path / 'urgent.log'}", "--wrap=true").strip().split(";")[0]
    info = cluster.wait(job, states={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, log=log, timeout=WAIT_S)
    text = job_log(log)
    assert cluster.wait(urgent, timeout=WAIT_S)["JobState"] == "COMPLETED"
    assert info["JobState"] == "COMPLETED", text
    assert info["Restarts"] == "1", text
    # The script requeues as soon as the TERM comes: SLURM kills it KillWait seconds later, maybe before
    # the ranks have saved and exited.
    assert "DUE TO PREEMPTION" in text and "run 1] preempted (JobState=" in text, text
    assert f"requeued job {job}; the ranks save their work meanwhile" in text, text
    resumed = re.search(r"resuming from .*: (\d+) of 24 frames already done", text)
    assert resumed and int(resumed.group(1)) > 0, text  # the rerun kept the frames saved at the preemption
    assert "not requeued" not in text and "Traceback" not in text and "mpistyle: error" not in text, text
    assert probe(str(out)).n_frames == N_FRAMES
