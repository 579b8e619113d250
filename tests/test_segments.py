"""Per-rank segment encoding and rank 0's join: exact frame count, fps, audio, holes filled from the buffer."""

from __future__ import annotations

import json
import os
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpistyle.errors import MpistyleError
from mpistyle.io.ffmpeg import ffmpeg_exe
from mpistyle.io.media import probe, read_all
from mpistyle.metrics import psnr
from mpistyle.stylize.segments import (
    SegmentWriter,
    finished_segments,
    join_output,
    segment_dir,
    tile,
    uses_segments,
)

from .conftest import BBB, CARPHONE, run_mpistyle


def test_segments_are_used_for_h264_outputs_on_several_ranks() -> None:
    assert uses_segments("out.mp4", 2, "auto", "cuda")
    assert not uses_segments("out.mp4", 1, "auto", "cuda")
    assert not uses_segments("out.mp4", 8, "auto", "cpu")  # CPU ranks: one encoder, byte-identical to 1 rank
    assert uses_segments("out.mkv", 1, "segments")
    assert not uses_segments("out.mp4", 8, "rank0")
    assert not uses_segments("frames/%04d.png", 8, "auto", "cuda")  # image sequences: rank 0 writes them
    assert not uses_segments("out.webm", 8, "auto", "cuda")  # VP9: no H.264 segments
    with pytest.raises(MpistyleError, match="H.264 container"):
        uses_segments("out.webm", 2, "segments")
    with pytest.raises(MpistyleError, match="unknown encode mode"):
        uses_segments("out.mp4", 2, "fast")


def test_tile_covers_every_frame_once_and_marks_holes() -> None:
    segs = [(0, 4, "a"), (4, 4, "b"), (10, 5, "c")]
    assert tile(segs, 16) == [(0, 4, "a"), (4, 4, "b"), (8, 2, None), (10, 5, "c"), (15, 1, None)]
    assert tile([], 3) == [(0, 3, None)]
    # an overlapping or overlong segment is never used: the tiling stays exact
    assert tile([(0, 4, "a"), (2, 4, "x"), (6, 9, "y")], 8) == [(0, 4, "a"), (4, 4, None)]


def _clip_frames(n: int = 12) -> np.ndarray:
    return read_all(str(CARPHONE))[:n]


def test_writer_starts_a_segment_at_every_gap_and_join_fills_the_holes(tmp_path: Path) -> None:
    frames = _clip_frames(12)
    h, w = frames.shape[1:3]
    directory = tmp_path / ".out.segments"
    directory.mkdir()
    writer = SegmentWriter(str(directory), w, h, Fraction(30000, 1001), crf=18, threads=1)
    writer.start()
    for t in [0, 1, 2, 3, 6, 7, 8]:  # 4-5 and 9-11 were done "before" (resume): rank 0 fills them
        writer.put(t, frames[t])
    writer.close()
    assert writer.finished == [(0, 4), (6, 3)]
    assert [(f, c) for f, c, _ in finished_segments(str(directory))] == [(0, 4), (6, 3)]
    out = tmp_path / "out.mp4"
    counts = join_output(str(directory), str(out), 12, w, h, Fraction(30000, 1001), lambda t: frames[t],
                         audio_from=None, crf=18, threads=1)
    assert counts == {"segments": 4, "frames_from_ranks": 7, "frames_encoded_on_rank0": 5}
    info = probe(str(out))
    assert info.n_frames == 12 and info.fps == Fraction(30000, 1001)
    decoded = read_all(str(out))
    assert min(psnr(a, b) for a, b in zip(decoded, frames, strict=True)) > 30  # frames in the right order
    assert not directory.exists()  # removed once the output is written


@pytest.mark.parametrize("fps", [Fraction(25), Fraction(30000, 1001)])
def test_join_of_uneven_segments_keeps_duration_rate_and_order(tmp_path: Path, fps: Fraction) -> None:
    """Segments of 1 and 2 frames have no B-frame delay, longer ones do: the join must still be exact."""
    frames = _clip_frames(12)
    h, w = frames.shape[1:3]
    directory = tmp_path / "segs"
    directory.mkdir()
    t = 0
    for size in (1, 2, 3, 6):
        writer = SegmentWriter(str(directory), w, h, fps, crf=18, threads=1)
        writer.start()
        for k in range(t, t + size):
            writer.put(k, frames[k])
        writer.close()
        t += size
    out = tmp_path / "out.mp4"
    join_output(str(directory), str(out), 12, w, h, fps, lambda t: frames[t], audio_from=None, crf=18, threads=1)
    header = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(out)], capture_output=True, text=True).stderr
    hours, minutes, seconds = re.search(r"Duration: (\d+):(\d+):([\d.]+)", header).groups()
    assert abs(float(seconds) + 60 * int(minutes) - float(12 / fps)) < 0.011  # the header's duration: 12 frames
    info = probe(str(out))
    assert info.n_frames == 12 and info.fps == fps
    decoded = read_all(str(out))
    assert min(psnr(a, b) for a, b in zip(decoded, frames, strict=True)) > 30


def test_aborted_writer_leaves_no_partial_segment(tmp_path: Path) -> None:
    frames = _clip_frames(4)
    h, w = frames.shape[1:3]
    writer = SegmentWriter(str(tmp_path), w, h, Fraction(25), crf=18, threads=1)
    writer.start()
    for t in range(4):
        writer.put(t, frames[t])
    writer.close(abort=True)
    assert finished_segments(str(tmp_path)) == []
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".mp4")]


def _buffer_frames(buffer: Path) -> np.ndarray:
    with h5py.File(buffer, "r") as f:
        assert f["done"][...].all()
        return f["frames"][...]


@pytest.mark.parametrize(("ranks", "extra"), [(1, []), (2, []), (3, ["--schedule", "dynamic", "--chunks", "5"])])
def test_segment_encode_keeps_frames_fps_and_audio(tmp_path: Path, model_args, ranks, extra) -> None:
    out = tmp_path / "out.mp4"
    report = tmp_path / "r.json"
    run_mpistyle(["stylize", str(BBB), "-o", str(out), *model_args, "--encode", "segments", "--keep-buffer",
                  "--report", str(report), *extra], ranks=ranks, check=True)
    src, info = probe(str(BBB)), probe(str(out))
    assert info.n_frames == src.n_frames == 24
    assert info.fps == src.fps
    assert info.has_audio
    assert not Path(segment_dir(str(out))).exists()
    per_rank = json.loads(report.read_text())["per_rank"]
    # static: one segment per rank; dynamic: one per chunk (chunks start at the 64-frame fusion anchors,
    # so these 24 frames are a single chunk)
    assert sum(r["counts"].get("segments", 0) for r in per_rank) == (1 if extra else ranks)
    assert all(r["counts"].get("segment_failures", 0) == 0 for r in per_rank)
    # the video holds the buffer's frames, in order (H.264 at crf 18 on 128x72: well above 30 dB)
    stylized = _buffer_frames(Path(str(out) + ".mpistyle.h5"))
    assert min(psnr(a, b) for a, b in zip(read_all(str(out)), stylized, strict=True)) > 30


def test_rerun_on_a_complete_buffer_encodes_everything_on_rank0(tmp_path: Path, model_args) -> None:
    out = tmp_path / "out.mp4"
    run_mpistyle(["stylize", str(BBB), "-o", str(out), *model_args, "--keep-buffer", "--encode", "segments"],
                 ranks=2, check=True)
    stylized = _buffer_frames(Path(str(out) + ".mpistyle.h5"))
    out.unlink()
    # every frame is done: nothing is computed, rank 0 encodes the whole buffer as "holes" and joins
    proc = run_mpistyle(["stylize", str(BBB), "-o", str(out), *model_args, "--encode", "segments"], ranks=2,
                        check=True)
    assert "0 frames encoded by the ranks, 24 by rank 0" in proc.stderr
    info = probe(str(out))
    assert info.n_frames == 24 and info.has_audio
    assert min(psnr(a, b) for a, b in zip(read_all(str(out)), stylized, strict=True)) > 30
