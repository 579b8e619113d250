"""The project's sbatch scripts on a real single-node SLURM (bin/slurm-up, the session's `cluster` fixture).

Covers: a CPU job through srun, cancel midway + resubmit resuming from the HDF5 buffer (mpiexec),
the time-limit warning path (USR1 to the batch script -> ranks exit 75 -> the job requeues itself and
finishes), a job array over a folder, training, and bad input ending the job without a requeue.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import imageio_ffmpeg

from .conftest import BBB, CARPHONE
from .slurm_cluster import REPO, Cluster

SCRIPTS = ["stylize-cpu.sbatch", "stylize-gpu.sbatch", "stylize-array.sbatch", "train.sbatch"]
COMMON_MARK = "# ---- common part:"
BUFFER_SUFFIX = ".mpistyle.h5"  # mpistyle's default buffer: OUTPUT + this (same path after a requeue)


def frame_count(path: Path) -> int:
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


def read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def test_common_part_is_identical_in_every_script() -> None:
    """The launch/signal/requeue code is copied into each script (SLURM runs a copy of the script, so
    it cannot source a neighbour reliably); the copies must not drift apart."""
    tails = {name: (REPO / "slurm" / name).read_text().partition(COMMON_MARK)[2] for name in SCRIPTS}
    assert all(tails.values()), f"a script lacks the '{COMMON_MARK}' block"
    reference = tails[SCRIPTS[0]]
    assert [n for n, t in tails.items() if t != reference] == []


def test_node_has_the_hardware_cpus_though_omp_num_threads_is_1(cluster: Cluster) -> None:
    """The cluster was started with OMP_NUM_THREADS=1 exported (see Cluster.start), which `nproc` obeys."""
    node = dict(re.findall(r"(\w+)=(\S*)", cluster.run("scontrol", "-o", "show", "node")))
    assert int(node["CPUTot"]) == os.sysconf("SC_NPROCESSORS_ONLN") >= 2


def test_cpu_job_stylizes_video_through_srun(cluster: Cluster, tmp_path: Path, model_args: list[str]) -> None:
    out, log = tmp_path / "out.mp4", tmp_path / "job.log"
    job = cluster.submit("stylize-cpu.sbatch", str(BBB), str(out), *model_args, "--no-progress",
                         sbatch=("--ntasks=2", "--cpus-per-task=1"), log=log,
                         env={"MPISTYLE_LAUNCHER": "srun"})
    info = cluster.wait(job, log=log)
    text = read(log)
    assert info["JobState"] == "COMPLETED", text
    assert "srun --mpi=pmi2 --ntasks=2" in text
    assert re.search(r"INFO: stylizing 24 frames at 128x72 on 2 ranks with '[\w-]+' \(CPU, (bf16|fp32)\)", text), text
    assert frame_count(out) == 24
    assert not Path(f"{out}{BUFFER_SUFFIX}").exists()  # removed after a successful run


def paused_at_compute(log: Path) -> bool:
    """Both ranks hold after their first frame (MPISTYLE_PAUSE_AT=compute) until a stop signal."""
    return len(set(re.findall(r"rank (\d+): paused at compute ", read(log)))) == 2


def test_cancelled_job_resumes_from_buffer_when_resubmitted(cluster: Cluster, tmp_path: Path,
                                                            model_args: list[str]) -> None:
    out, log1, log2 = tmp_path / "out.mp4", tmp_path / "first.log", tmp_path / "second.log"
    buffer, report = Path(f"{out}{BUFFER_SUFFIX}"), tmp_path / "report.json"
    args = (str(BBB), str(out), *model_args, "--no-progress", "--report", str(report))
    env = {"MPISTYLE_LAUNCHER": "mpiexec"}
    sbatch = ("--ntasks=2", "--cpus-per-task=1")

    # The first run holds after each rank's first frame, so the cancel lands mid-run on any machine.
    job = cluster.submit("stylize-cpu.sbatch", *args, sbatch=sbatch, log=log1,
                         env={**env, "MPISTYLE_PAUSE_AT": "compute"})
    cluster.wait_until(job, lambda: paused_at_compute(log1), "both ranks paused at compute", log=log1)
    cluster.wait_for_frames(job, buffer)
    cluster.run("scancel", job)  # SIGTERM to the batch script and the ranks, SIGKILL after KillWait
    info = cluster.wait(job, log=log1)
    first = read(log1)
    assert info["JobState"] == "CANCELLED", first
    assert info["Restarts"] == "0", "a cancelled job must not requeue itself"
    assert "stopped by SIGTERM (cancelled" in first
    assert not out.exists()
    assert buffer.exists()

    job = cluster.submit("stylize-cpu.sbatch", *args, sbatch=sbatch, log=log2, env=env)
    info = cluster.wait(job, log=log2)
    second = read(log2)
    assert info["JobState"] == "COMPLETED", second
    resumed = re.search(r"resuming from .*: (\d+) of 24 frames already done", second)
    assert resumed and 0 < int(resumed.group(1)) < 24, second
    assert frame_count(out) == 24
    assert json.loads(report.read_text())["frames_computed"] == 24 - int(resumed.group(1))


def test_usr1_warning_requeues_the_job_and_it_finishes(cluster: Cluster, tmp_path: Path,
                                                        model_args: list[str]) -> None:
    """What --signal=B:USR1@120 does before the time limit, sent by hand: the batch script forwards
    the stop, the ranks save the buffer and exit 75, the script requeues, the rerun resumes."""
    out, log = tmp_path / "out.mp4", tmp_path / "job.log"
    buffer = Path(f"{out}{BUFFER_SUFFIX}")
    # The pause holds the first run mid-work; a requeued run (SLURM_RESTART_COUNT > 0) does not pause.
    job = cluster.submit("stylize-cpu.sbatch", str(BBB), str(out), *model_args, "--no-progress",
                         sbatch=("--ntasks=2", "--cpus-per-task=1"), log=log, env={"MPISTYLE_PAUSE_AT": "compute"})
    cluster.wait_until(job, lambda: paused_at_compute(log), "both ranks paused at compute", log=log)
    cluster.wait_for_frames(job, buffer)
    cluster.run("scancel", "--batch", "--signal=USR1", job)  # to the batch shell only, as B:USR1@120 does
    info = cluster.wait(job, log=log)
    text = read(log)
    assert info["JobState"] == "COMPLETED", text
    assert info["Restarts"] == "1", text
    assert "got SIGUSR1" in text
    assert "interrupted: received SIGUSR1" in text
    assert f"requeued job {job}" in text
    assert re.search(r"resuming from .*: \d+ of 24 frames already done", text), text
    assert frame_count(out) == 24


def test_array_job_stylizes_each_video_of_a_folder(cluster: Cluster, tmp_path: Path,
                                                   model_args: list[str]) -> None:
    videos, results = tmp_path / "in", tmp_path / "out"
    videos.mkdir()
    shutil.copy(BBB, videos / "b.mp4")
    shutil.copy(CARPHONE, videos / "a.mp4")
    (videos / "notes.txt").write_text("not a video")
    job = cluster.submit("stylize-array.sbatch", str(videos), str(results), *model_args, "--no-progress",
                         sbatch=("--array=0-2", "--ntasks=1", "--cpus-per-task=1"),
                         log=tmp_path / "array-%a.log")
    logs = [tmp_path / f"array-{i}.log" for i in range(3)]
    states = [cluster.wait(f"{job}_{i}", log=logs[i])["JobState"] for i in range(3)]
    assert states == ["COMPLETED"] * 3, [read(p) for p in logs]
    # Sorted order: task 0 is a.mp4 (carphone, 12 frames), task 1 b.mp4 (24); task 2 has no video.
    assert frame_count(results / "a_styled.mp4") == 12
    assert frame_count(results / "b_styled.mp4") == 24
    assert "nothing to do" in read(logs[2])
    assert sorted(p.name for p in results.iterdir()) == ["a_styled.mp4", "b_styled.mp4"]


def test_train_job_writes_a_model(cluster: Cluster, tmp_path: Path) -> None:
    model, log = tmp_path / "style.pth", tmp_path / "train.log"
    style = REPO / "mpistyle" / "styles" / "udnie.jpg"
    job = cluster.submit("train.sbatch", str(style), str(BBB), str(model), "--steps", "2", "--size", "64",
                         "--batch-size", "2", sbatch=("--ntasks=2", "--cpus-per-task=1"), log=log,
                         env={"MPISTYLE_DEVICE": "cpu"})
    info = cluster.wait(job, log=log)
    text = read(log)
    assert info["JobState"] == "COMPLETED", text
    assert "--resume" in text  # a requeued training continues from its checkpoint
    assert model.stat().st_size > 100_000


def test_bad_input_fails_without_requeue(cluster: Cluster, tmp_path: Path) -> None:
    """Exit status 2 ends the job: no requeue loop on a file that will never be readable. Runs the GPU
    script with its GPU request switched off (no GPUs here), which also checks that script's wiring."""
    log = tmp_path / "job.log"
    job = cluster.submit("stylize-gpu.sbatch", str(tmp_path / "missing.mp4"), str(tmp_path / "out.mp4"),
                         sbatch=("--gres=none", "--ntasks-per-node=2", "--cpus-per-task=1"), log=log,
                         env={"MPISTYLE_DEVICE": "cpu"})
    info = cluster.wait(job, log=log)
    text = read(log)
    assert info["JobState"] == "FAILED", text
    assert info["ExitCode"] == "2:0"
    assert info["Restarts"] == "0"
    assert "mpistyle: error:" in text and "missing.mp4" in text
    assert "not requeued" in text
    assert "Traceback" not in text
