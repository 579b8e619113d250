"""No seams on real footage (issue 9): N ranks give the 1-rank output, bit for bit, under real MPI.

The clip is built at test time from the real clips in tests/data: a fast camera pan across Big Buck
Bunny (a moving crop of the 640x272 clip), a hard cut to carphone two frames after the 2-rank
boundary, and a cut back to Big Buck Bunny right after the second 3-rank boundary. At 76 frames it
crosses the first fusion anchor (64, its chain starting at 54), so partition warm-ups, chain
switches and scene cuts inside warm-ups are all exercised.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpistyle.io.ffmpeg import ffmpeg_exe
from mpistyle.io.media import probe
from mpistyle.metrics import seam_report
from mpistyle.partition import partition_bounds

from .conftest import BBB, CARPHONE, DATA, run_mpistyle

N_FRAMES = 76
CUTS = (40, 52)


def _frames(buffer: Path) -> np.ndarray:
    with h5py.File(buffer, "r") as f:
        assert f["done"][...].all()
        return f["frames"][...]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("seams") / "pan_cut.mp4"
    # 9 px/frame across and 3 down at 640x272 (4.5 and 1.5 px at 128x72, after halving and more)
    graph = ("[0:v]trim=end_frame=40,crop=256:144:'min(n*9,384)':'min(n*3,128)',scale=128:72,setsar=1,"
             "setpts=N/(25*TB)[a];[1:v]scale=128:72,setsar=1,setpts=N/(25*TB)[b];[2:v]setsar=1,setpts=N/(25*TB)[c];"
             "[a][b][c]concat=n=3:v=1,fps=25[v]")
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(DATA / "bbb_640x272.mp4"), "-i", str(CARPHONE),
                    "-i", str(BBB), "-filter_complex", graph, "-map", "[v]", "-c:v", "libx264", "-crf", "12",
                    "-pix_fmt", "yuv420p", str(path)], check=True)
    info = probe(str(path))
    assert (info.width, info.height, info.n_frames) == (128, 72, N_FRAMES)
    return path


def _stylize(clip: Path, out: Path, ranks: int, *extra: str, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    return run_mpistyle(["stylize", str(clip), "-o", str(out), "--keep-buffer", "--threads", "1",
                         "--report", str(out) + ".json", *extra], ranks=ranks, env=env, check=check)


@pytest.fixture(scope="module")
def reference_run(clip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "n1.mp4"
    _stylize(clip, out, 1, "--encode", "segments")
    report = json.loads(Path(str(out) + ".json").read_text())
    assert report["per_rank"][0]["counts"].get("scene_cuts", 0) >= len(CUTS)  # the cuts are real cuts
    return out


@pytest.fixture(scope="module")
def reference(reference_run) -> np.ndarray:
    return _frames(Path(str(reference_run) + ".mpistyle.h5"))


def _assert_same(reference: np.ndarray, frames: np.ndarray) -> None:
    seams = seam_report(reference, frames)
    assert seams["lowest_psnr"] >= 50.0, (seams["lowest_psnr"], seams["lowest_at"])
    # The design's guarantee is stronger than the bound: every frame is bit-identical.
    assert seams["identical_frames"] == N_FRAMES, [i for i, p in enumerate(seams["per_frame"]) if not math.isinf(p)]


@pytest.mark.parametrize("ranks", [2, 3])
def test_static_ranks_equal_one_rank_on_every_frame(clip, reference, tmp_path, ranks) -> None:
    out = tmp_path / f"n{ranks}.mp4"
    _stylize(clip, out, ranks)
    _assert_same(reference, _frames(Path(str(out) + ".mpistyle.h5")))
    report = json.loads(Path(str(out) + ".json").read_text())
    assert sum(r["counts"].get("network_frames", 0) for r in report["per_rank"]) == N_FRAMES  # no re-stylizing


def test_dynamic_schedule_equals_one_rank(clip, reference, tmp_path) -> None:
    out = tmp_path / "dyn.mp4"
    _stylize(clip, out, 3, "--schedule", "dynamic", "--chunks", "4")
    _assert_same(reference, _frames(Path(str(out) + ".mpistyle.h5")))
    report = json.loads(Path(str(out) + ".json").read_text())
    assert report["boundaries"] == [64]  # chunks start at anchors: each warms up over the lead only
    assert sum(r["counts"].get("halo_network_frames", 0) for r in report["per_rank"]) == 10


def test_resume_with_another_rank_count_equals_one_rank(clip, reference, reference_run, tmp_path) -> None:
    """A run that fails inside the lead window of anchor 64 resumes on 3 ranks: the stored outputs
    there are not the whole state, so the resumed runs warm up from the chain start instead. The
    frames and the encoded segments (block [0, 64) was already encoded by rank 0) equal 1 rank's."""
    out = tmp_path / "resumed.mp4"
    proc = _stylize(clip, out, 2, env={"MPISTYLE_FAULT": "1:58:raise"}, check=False)
    assert proc.returncode == 1, proc.stderr  # the documented status of a failure (not 2: bad input, 75: stop)
    assert "mpistyle: error: rank 1:" in proc.stderr and "injected fault at frame 58" in proc.stderr
    with h5py.File(str(out) + ".mpistyle.h5", "r") as f:
        done = f["done"][...]
    # Rank 1 stored 38..57 before its fault at 58 (its part is committed on the way out). Rank 0's
    # own partition may be part done: a failure on any rank stops every rank's work.
    assert done[38:58].all() and not done[58:].any()
    _stylize(clip, out, 3)
    buffer = Path(str(out) + ".mpistyle.h5")
    _assert_same(reference, _frames(buffer))
    with h5py.File(buffer, "r") as f:  # one logical dataset over the parts of both runs
        assert f["frames"].is_virtual and len(f["frames"].virtual_sources()) >= 3
    assert len(list(Path(str(buffer) + ".parts").glob("frames-*.h5"))) >= 3
    assert out.read_bytes() == reference_run.read_bytes()


LONG_FRAMES = 190  # 3 ranks: [0, 64), [64, 127), [127, 190); rank 2 warms up over [54, 127), 73 frames


@pytest.fixture(scope="module")
def long_clip(clip, tmp_path_factory) -> Path:
    """The pan-and-cut clip played 2.5 times: three fusion chains, and a 3-rank boundary (127) whose
    warm-up reaches back over two ranks' frames to the chain start 54 (the longest a warm-up gets)."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-stream_loop", "2", "-i", str(clip), "-frames:v",
                    str(LONG_FRAMES), "-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p", str(path)], check=True)
    assert probe(str(path)).n_frames == LONG_FRAMES
    return path


@pytest.fixture(scope="module")
def long_reference(long_clip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("long_ref") / "n1.mp4"
    _stylize(long_clip, out, 1)
    return out


def _flat(order: list[list[int]]) -> list[int]:
    return [t for first, stop in order for t in range(first, stop)]


@pytest.mark.parametrize("ranks", [2, 3])
def test_long_clip_no_rank_waits_for_its_neighbours_warm_up(long_clip, long_reference, tmp_path, ranks) -> None:
    """Issue 20, as an order of events (no timings): every rank stylizes its successor's warm-up frames
    before anything else, and a rank's network stops for its own warm-up only once it has nothing
    else it may stylize. Frames and file equal 1 rank's, with no extra network pass."""
    out = tmp_path / f"n{ranks}.mp4"
    _stylize(long_clip, out, ranks)
    reference = _frames(Path(str(long_reference) + ".mpistyle.h5"))
    assert np.array_equal(reference, _frames(Path(str(out) + ".mpistyle.h5")))
    assert out.read_bytes() == long_reference.read_bytes()  # --encode auto: the same file for any rank count
    report = json.loads(Path(str(out) + ".json").read_text())
    per_rank = report["per_rank"]
    assert [r["counts"]["network_frames"] for r in per_rank] == [r["frames"] for r in per_rank]
    assert sum(r["frames"] for r in per_rank) == LONG_FRAMES
    bounds = partition_bounds(LONG_FRAMES, ranks)
    for r, (first, stop) in zip(per_rank, bounds, strict=True):
        trace = r["trace"]
        order = _flat(trace["order"])
        assert sorted(order) == list(range(first, stop))  # each of its frames once, none of another rank's
        exports = trace["exports"]
        assert order[:len(exports)] == exports, (r["rank"], trace["order"])
        assert trace["ahead_limit"] >= 64 + 10 - 1  # a whole warm-up fits in the spool
        # What the network may do before the warm-up is there: the exports, then its own frames up to the
        # limit. A wait (where one happens: tests/test_schedule_order.py forces one) comes only after them,
        # read off the order at the number of passes done when it began.
        may = exports + [t for t in range(first, stop) if t not in exports][:trace["ahead_limit"]]
        for wait in trace["halo_waits"]:
            assert order[:wait["network"]] == may, (r["rank"], wait, trace["order"])
    # Hand-worked: rank k's run starts at its bound s and warms up from the chain start of s (anchor
    # 64, lead 10: 54); the frames of the warm-up are exported by the ranks that own them.
    if ranks == 2:  # [0, 95), [95, 190)
        assert per_rank[1]["trace"]["imports"] == list(range(54, 95))
        assert per_rank[0]["trace"]["exports"] == list(range(54, 95))
        assert per_rank[0]["trace"]["imports"] == [] and per_rank[1]["trace"]["exports"] == []
    if ranks == 3:  # [0, 64), [64, 127), [127, 190): the longest warm-up, rank 2's, reaches back over two ranks
        assert per_rank[1]["trace"]["imports"] == list(range(54, 64))
        assert per_rank[2]["trace"]["imports"] == list(range(54, 127))
        assert per_rank[0]["trace"]["exports"] == list(range(54, 64))
        assert per_rank[1]["trace"]["exports"] == list(range(64, 127))


def test_long_clip_dynamic_schedule_hands_out_anchored_chunks(long_clip, long_reference, tmp_path) -> None:
    """Dynamic chunks start at anchors (0, 64, 128): three chunks, each after the first warming up
    over the 10-frame lead with its own network passes; the frames equal 1 rank's."""
    out = tmp_path / "dyn.mp4"
    _stylize(long_clip, out, 2, "--schedule", "dynamic", "--chunks", "3")
    reference = _frames(Path(str(long_reference) + ".mpistyle.h5"))
    assert np.array_equal(reference, _frames(Path(str(out) + ".mpistyle.h5")))
    report = json.loads(Path(str(out) + ".json").read_text())
    per_rank = report["per_rank"]
    assert report["boundaries"] == [64, 128]
    assert sum(r["counts"].get("chunks", 0) for r in per_rank) == 3
    assert sum(r["counts"].get("halo_network_frames", 0) for r in per_rank) == 2 * 10
    assert sum(r["counts"]["network_frames"] for r in per_rank) == LONG_FRAMES + 2 * 10
