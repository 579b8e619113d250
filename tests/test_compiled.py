"""The compiled network: when it is used, one package for every rank, the cache across jobs, bad caches.

Compiling costs 20-50 s on the development machine: one compilation for the whole module (the 1-rank
run, which fills the cache the 2-rank run then reads).

Each run's own limit is RUN_S; a test whose runs add up past pytest-timeout's 600 s carries its own mark
(the thread method ends the whole session), so a slow test fails alone.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mpistyle import compiled
from mpistyle.engine import Stylizer
from mpistyle.models import load_model

from .conftest import BBB, run_mpistyle

RUN_S = 400  # one stylize run here, a cold compilation included
FIXTURE_S = 2 * RUN_S  # compiled_runs: the 1-rank run and the 2-rank run
SLACK_S = 120


class OneRank:
    """A communicator of one rank (what the compile job needs of mpi4py's)."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's name
        return 0

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj):
        return [obj]

    def barrier(self) -> None:
        pass


def test_decide_follows_the_option_the_resumed_buffer_and_the_break_even():
    cpu = torch.device("cpu")
    assert compiled.decide("on", cpu, 1, 72, 128, None) == (True, "--compile on")
    assert compiled.decide("off", cpu, 10**6, 720, 1280, 1)[0] is False
    assert compiled.decide("auto", cpu, 1, 72, 128, 1, stored=True)[0] is True  # a resume keeps it
    assert compiled.decide("auto", cpu, 10**6, 720, 1280, 1, stored=False)[0] is False
    # Worked by hand from the first guesses: 640x272 = 0.17408 Mpixel, 0.28 s/Mpixel -> 0.0487424 s saved
    # a frame; 25 s / 0.0487424 s = 512.9 frames cold, 1.5 s / 0.0487424 s = 30.8 warm, 1025.8 at 2 threads.
    assert compiled.break_even_frames(272, 640, threads=1, cached=False) == pytest.approx(512.90, abs=0.01)
    assert compiled.break_even_frames(272, 640, threads=1, cached=True) == pytest.approx(30.77, abs=0.01)
    assert compiled.break_even_frames(272, 640, threads=2) == pytest.approx(1025.80, abs=0.01)
    # Recorded figures: 10 s to compile, 0.5 s/Mpixel -> 10 / 0.08704 = 114.9 frames at 640x272.
    measured = compiled.Figures(compile_cold_s=10.0, compile_warm_s=1.0, saving_s_per_mpixel=0.5,
                                measured=("compile_cold_s",))
    assert compiled.break_even_frames(272, 640, figures=measured) == pytest.approx(114.89, abs=0.01)
    if compiled.cpu_supports_bf16():
        assert compiled.decide("auto", cpu, 513, 272, 640, 1)[0] is True
        assert compiled.decide("auto", cpu, 512, 272, 640, 1)[0] is False
        on, why = compiled.decide("auto", cpu, 115, 272, 640, 1, figures=measured)
        assert on and "break-even 115 (measured here)" in why
        assert compiled.decide("auto", cpu, 114, 272, 640, 1, figures=measured)[0] is False
    else:
        assert compiled.decide("auto", cpu, 10**9, 272, 640, 1)[0] is False
    assert compiled.decide("auto", cpu, 10**9, 720, 1280, 1, transformer=False)[0] is False
    with pytest.raises(Exception, match="--compile"):
        compiled.decide("sometimes", cpu, 1, 1, 1, 1)


def test_figures_are_recorded_read_back_and_a_bad_record_is_ignored(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "cache"))
    assert compiled.read_figures("cpu") == compiled.Figures()  # nothing recorded: the first guesses
    compiled.record_figures("cpu", compile_cold_s=12.5, saving_s_per_mpixel=None)
    compiled.record_figures("cpu", compile_warm_s=0.75)
    got = compiled.read_figures("cpu")
    assert (got.compile_cold_s, got.compile_warm_s) == (12.5, 0.75)
    assert got.saving_s_per_mpixel == compiled.SAVING_S_PER_MPIXEL  # not measured: the first guess
    assert got.measured == ("compile_cold_s", "compile_warm_s")
    Path(compiled.figures_path("cpu")).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="mpistyle.compiled"):
        assert compiled.read_figures("cpu") == compiled.Figures()
    assert "ignoring the recorded compile figures" in caplog.text


def test_auto_decides_the_same_for_any_rank_count_and_cache_state():
    """Compiled and eager frames differ in the last bits: 1 rank and N ranks must take the same path. The
    decision sees the whole video's frames, and a thread count only where the user fixed it."""
    cpu = torch.device("cpu")
    frames = 10**6
    # Threads that follow the node's cores and the rank count (None): never compiled by auto.
    assert compiled.decide("auto", cpu, frames, 272, 640, None)[0] is False
    assert compiled.decide("auto", cpu, frames, 272, 640, 2)[0] is False
    if compiled.cpu_supports_bf16():
        assert compiled.decide("auto", cpu, frames, 272, 640, 1)[0] is True
    import inspect

    assert "cached" not in inspect.signature(compiled.decide).parameters
    assert "frames_per_rank" not in inspect.signature(compiled.decide).parameters


def test_the_key_names_everything_the_package_depends_on():
    sty = Stylizer(load_model(None), torch.device("cpu"), precision="bf16")
    key = compiled.artifact_key(sty, (1, 72, 128, 3))
    assert {"torch", "mpistyle", "network", "shape", "cpu", "weights"} <= set(key)
    other = compiled.artifact_key(Stylizer(load_model("great-wave"), torch.device("cpu"), "bf16"), (1, 72, 128, 3))
    assert compiled.key_digest(key) != compiled.key_digest(other)  # the weights are in the package
    assert compiled.key_digest(key) != compiled.key_digest(compiled.artifact_key(sty, (1, 72, 132, 3)))


def _job_with(cache: Path, data: bytes, shape, monkeypatch, caplog) -> tuple[Stylizer, dict]:
    """A one-rank compile job whose cache holds ``data``; compiling again fails (no 30 s compile here)."""
    monkeypatch.setenv(compiled.CACHE_ENV, str(cache))

    def no_compiler(*_args, **_kwargs):
        raise RuntimeError("no C++ compiler in this test")

    monkeypatch.setattr(compiled, "compile_package", no_compiler)
    sty = Stylizer(load_model(None), torch.device("cpu"), precision="bf16")
    key = compiled.artifact_key(sty, shape)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"{compiled.key_digest(key)}.pt2").write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="mpistyle.compiled"):
        info = compiled.start_compile(OneRank(), sty, shape).finish(OneRank())
    return sty, info


def test_a_corrupt_cache_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog):
    sty, info = _job_with(tmp_path / "cache", b"PK\x03\x04 not a package", (1, 24, 32, 3), monkeypatch, caplog)
    assert info["cache"] == "bad" and not info["compiled"] and "no C++ compiler" in info["error"]
    assert sty.compiled is None and sty.network == "fused-bf16-cl"  # every rank runs eagerly
    text = caplog.text
    assert "ignoring the compiled-network cache" in text and "compiled network is not available" in text


@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory, model_args) -> dict:
    """BBB (24 frames, 128x72) with --compile on: -n 2 (cold cache: rank 0 compiles while both ranks decode),
    then a plain process (cache hit)."""
    tmp = tmp_path_factory.mktemp("compiled")
    env = {compiled.CACHE_ENV: str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    runs = {}
    for ranks in (2, None):
        out = tmp / f"n{ranks or 1}.mp4"
        report = tmp / f"n{ranks or 1}.json"
        proc = run_mpistyle(["stylize", str(BBB), "-o", str(out), *model_args, "--compile", "on", "--keep-buffer",
                             "--report", str(report), "--no-progress"], ranks=ranks, env=env, check=True,
                            timeout=RUN_S)
        runs[ranks or 1] = {"out": out, "buffer": Path(str(out) + ".mpistyle.h5"), "log": proc.stderr,
                            "report": json.loads(report.read_text())}
    runs["cache"] = tmp / "cache"
    runs["env"] = env
    return runs


@pytest.mark.timeout(FIXTURE_S + SLACK_S)
def test_compiled_frames_are_identical_on_two_ranks_and_the_cache_is_reused(compiled_runs):
    one, two = compiled_runs[1]["report"]["network"], compiled_runs[2]["report"]["network"]
    # The eager recipe this CPU runs (fused-bf16-cl with native bf16, an fp32 one without), compiled.
    expected = "compiled/" + Stylizer(load_model(None), torch.device("cpu"), precision="auto").network
    assert one["path"] == two["path"] == expected and one["compiled"] and two["compiled"]
    assert two["cache"] == "miss" and one["cache"] == "hit"  # compiled once, by the first job's rank 0
    assert one["check_psnr_db"] >= 50  # the compiled network against the eager one (54-60 dB measured)
    # The machine's figures for --compile auto, measured by these runs: the cold one's whole compile, the
    # warm one's cache read (rank 0's work as each report gives it).
    figures = json.loads(next(compiled_runs["cache"].glob("figures-*.json")).read_text())
    assert figures["compile_cold_s"] == pytest.approx(two["root_s"])
    assert figures["compile_warm_s"] == pytest.approx(one["root_s"])
    with h5py.File(compiled_runs[1]["buffer"], "r") as a, h5py.File(compiled_runs[2]["buffer"], "r") as b:
        assert a["done"][...].all() and b["done"][...].all()
        assert np.array_equal(a["frames"][...], b["frames"][...])
        assert json.loads(a.attrs["settings"])["network"] == expected
    assert len(list(compiled_runs["cache"].glob("*.pt2"))) == 1
    # The source frames flowed while rank 0 compiled (tens of seconds; decoding 24 small frames takes well
    # under one): on the cold-cache run every rank had all its frames when the package arrived. Hand-worked:
    # rank 0 decodes its own frames 0..11; rank 1's run starts at 12 and warms up from 0, so it needs 0..23.
    cold = compiled_runs[2]["report"]
    assert [r["counts"]["source_frames_ready_at_start"] for r in cold["per_rank"]] == [12, 24]


@pytest.mark.timeout(FIXTURE_S + RUN_S + SLACK_S)
def test_a_resume_takes_the_buffers_path(compiled_runs, model_args):
    """A buffer made compiled is not resumed eagerly (frames would differ in the last bits)."""
    proc = run_mpistyle(["stylize", str(BBB), "-o", str(compiled_runs[1]["out"]), *model_args, "--compile", "off",
                         "--no-progress"], env=compiled_runs["env"], timeout=RUN_S)
    assert proc.returncode == 2 and "different network" in proc.stderr  # a settings mismatch: a user error


@pytest.mark.timeout(FIXTURE_S + SLACK_S)
def test_an_incompatible_cache_is_ignored_with_a_warning(compiled_runs, tmp_path, monkeypatch, caplog):
    """A valid package of another frame size, under this size's key: found out, ignored, not fatal."""
    package = next(compiled_runs["cache"].glob("*.pt2")).read_bytes()
    sty, info = _job_with(tmp_path / "cache", package, (1, 24, 32, 3), monkeypatch, caplog)
    assert info["cache"] == "bad" and not info["compiled"] and sty.compiled is None
    assert "ignoring the compiled-network cache" in caplog.text


@pytest.mark.timeout(2 * RUN_S + SLACK_S)
def test_a_failed_compilation_runs_eagerly_and_the_buffer_records_the_eager_path(tmp_path, model_args):
    """No working C++ compiler (CXX=/bin/false, empty cache): rank 0's compilation fails after the buffer
    was opened and the frames were already flowing; the job runs eagerly, the buffer is made again for
    the eager path, and the frames equal those of a plain --compile off run."""
    env = {compiled.CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "CXX": "/bin/false"}
    out, report = tmp_path / "failed.mp4", tmp_path / "failed.json"
    run_mpistyle(["stylize", str(BBB), "-o", str(out), *model_args, "--compile", "on", "--keep-buffer",
                  "--report", str(report), "--no-progress"], ranks=2, env=env, check=True, timeout=RUN_S)
    net = json.loads(report.read_text())["network"]
    assert not net["compiled"] and not net["path"].startswith("compiled/") and "compilation failed" in net["why"]
    eager = tmp_path / "eager.mp4"
    run_mpistyle(["stylize", str(BBB), "-o", str(eager), *model_args, "--compile", "off", "--keep-buffer",
                  "--no-progress"], env={"OMP_NUM_THREADS": "1"}, check=True, timeout=RUN_S)
    with h5py.File(str(out) + ".mpistyle.h5", "r") as a, h5py.File(str(eager) + ".mpistyle.h5", "r") as b:
        assert json.loads(a.attrs["settings"])["network"] == net["path"] == json.loads(b.attrs["settings"])["network"]
        assert a["done"][...].all() and np.array_equal(a["frames"][...], b["frames"][...])


@pytest.mark.timeout(FIXTURE_S + RUN_S + SLACK_S)
def test_a_resume_of_compiled_frames_stops_when_it_cannot_compile(compiled_runs, tmp_path, model_args):
    """A buffer of compiled frames is never continued eagerly: without a compiler the rerun fails with one
    clear line, and the buffer is left as it was."""
    buffer = tmp_path / "again.mp4.mpistyle.h5"
    shutil.copy(compiled_runs[1]["buffer"], buffer)
    shutil.copytree(str(compiled_runs[1]["buffer"]) + ".parts", str(buffer) + ".parts")  # the frames' files

    def contents() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in [buffer, *Path(str(buffer) + ".parts").iterdir()]}

    before = contents()
    assert len(before) > 1
    env = {compiled.CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "CXX": "/bin/false"}
    proc = run_mpistyle(["stylize", str(BBB), "-o", str(tmp_path / "again.mp4"), *model_args, "--no-progress"],
                        ranks=2, env=env, timeout=RUN_S)
    assert proc.returncode == 2 and "made by the compiled network" in proc.stderr and "Traceback" not in proc.stderr
    assert contents() == before and not (tmp_path / "again.mp4").exists()
