"""decode_range (mpistyle/seek.py): a seeked partition is bit-identical to the full decode at those indices.

Real clips (tests/data, the packaged sample) and clips built here from them with the codec features that
make seeking hard: B-frames, open GOPs, HEVC, a non-zero start time, an edit list, rotation, VP9.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import mpistyle
from mpistyle.errors import MpistyleError
from mpistyle.io import children, seek
from mpistyle.io.ffmpeg import _passthrough, ffmpeg_encoders, ffmpeg_exe
from mpistyle.io.media import probe, read_all

DATA = Path(__file__).parent / "data"
SAMPLE = Path(mpistyle.__file__).parent / "data" / "sample.mp4"
WIDE = DATA / "bbb_640x272.mp4"
SIZE = (160, 90)
OPEN_GOP = ["-c:v", "libx264", "-preset", "veryfast", "-bf", "3",
            "-x264-params", "open-gop=1:keyint=12:min-keyint=12:scenecut=0"]


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                   check=True)


def keyframes(path: Path) -> list[int]:
    """Display indices of the keyframes of a full decode (showinfo's iskey)."""
    res = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:V:0",
                          "-vf", "showinfo", *_passthrough(), "-f", "null", "-"],
                         capture_output=True, text=True, check=True)
    flags = re.findall(r"\] n:\s*\d+ pts:.*?\biskey:([01])", res.stderr)
    return [i for i, f in enumerate(flags) if f == "1"]


def windows(n: int, keys: list[int]) -> list[tuple[int, int]]:
    """(first, count): the start, on/just after/just before a keyframe, mid-GOP, up to the last frame."""
    key = next((k for k in keys if k >= 8), n // 2)
    nxt = next((k for k in keys if k > key), n - 1)
    found = {(0, 3), (key, 3), (key + 1, 2), (key - 1, 3), ((key + nxt) // 2, 4), (n - 5, 5), (n - 1, 1)}
    return sorted((f, c) for f, c in found if 0 <= f and c > 0 and f + c <= n)


@pytest.fixture(autouse=True)
def _seek_small_clips(monkeypatch) -> None:
    # The test clips are short: seek from frame 1 on (the default waits for 32) so the seek path runs.
    monkeypatch.setattr(seek, "MIN_SEEK_FRAME", 1)


@pytest.fixture
def exact_calls(monkeypatch) -> list[tuple[int, int]]:
    """Record each (first, count) that went to the exact decode-and-drop path."""
    calls: list[tuple[int, int]] = []
    real = seek._exact

    def spy(path, first, count, size, info) -> Iterator[np.ndarray]:
        calls.append((first, count))
        return real(path, first, count, size, info)

    monkeypatch.setattr(seek, "_exact", spy)
    return calls


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Clips (72 frames of bbb_640x272, 192x80) with B-frames, open GOPs, offsets, rotation, VP9."""
    d = tmp_path_factory.mktemp("seek")
    src = ["-i", str(WIDE), "-frames:v", "72", "-vf", "scale=192:80", "-an"]
    out = {"open_gop": d / "open_gop.mp4"}
    ffmpeg(*src, *OPEN_GOP, str(out["open_gop"]))
    out["b_pyramid"] = d / "b_pyramid.mp4"  # H.264 with 8 B-frames in a pyramid: a long decode-to-display delay
    ffmpeg(*src, "-c:v", "libx264", "-bf", "8", "-b_strategy", "2", "-x264-params",
           "b-pyramid=normal:keyint=16:min-keyint=16:scenecut=0", str(out["b_pyramid"]))
    out["offset"] = d / "offset.mp4"  # start time 1.5 s
    ffmpeg("-i", str(out["open_gop"]), "-c", "copy", "-output_ts_offset", "1.5", str(out["offset"]))
    out["edit_list"] = d / "edit_list.mp4"  # cut mid-GOP by stream copy: an edit list hides 5 frames
    ffmpeg("-ss", "0.2", "-i", str(out["open_gop"]), "-c", "copy", str(out["edit_list"]))
    out["mkv"] = d / "open_gop.mkv"  # matroska indexes by presentation time
    ffmpeg("-i", str(out["open_gop"]), "-c", "copy", str(out["mkv"]))
    out["rotated"] = d / "rotated.mp4"  # a phone's rotation matrix: frames come out upright (80x192)
    ffmpeg("-display_rotation", "90", "-i", str(out["open_gop"]), "-c", "copy", str(out["rotated"]))
    out["vp9"] = d / "vp9.webm"  # keyframe every 12, hidden alt-ref frames (mpistyle needs VP9 for .webm anyway)
    ffmpeg(*src, "-c:v", "libvpx-vp9", "-g", "12", "-crf", "40", "-b:v", "0", "-deadline", "realtime",
           "-cpu-used", "8", "-auto-alt-ref", "1", "-lag-in-frames", "8", str(out["vp9"]))
    return out


@pytest.fixture(scope="module")
def hevc(tmp_path_factory) -> Path:
    """HEVC with open GOPs (CRA pictures) and a B-pyramid: libx265 is required, never replaced by H.264."""
    assert "libx265" in ffmpeg_encoders(), (f"{ffmpeg_exe()} has no libx265 encoder: the HEVC seek case needs one "
                                            "(imageio-ffmpeg's and Debian's ffmpeg have it)")
    path = tmp_path_factory.mktemp("seek-hevc") / "hevc.mp4"
    ffmpeg("-i", str(WIDE), "-frames:v", "72", "-vf", "scale=192:80", "-an", "-c:v", "libx265", "-preset", "veryfast",
           "-x265-params", "log-level=error:bframes=4:b-pyramid=1:keyint=12:min-keyint=12:open-gop=1:scenecut=0",
           str(path))
    header = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    assert "Video: hevc" in header, header
    return path


def check_windows(path: Path, exact_calls: list[tuple[int, int]], size: tuple[int, int] | None = SIZE) -> None:
    info = probe(str(path))
    assert info.frame_map is None
    full = read_all(str(path), size, info=info)
    assert len(full) == info.n_frames
    for first, count in windows(info.n_frames, keyframes(path)):
        got = list(seek.decode_range(str(path), first, count, size, info=info))
        assert len(got) == count, (first, count)
        for i, frame in enumerate(got):
            assert frame.dtype == np.uint8 and frame.shape == full[0].shape and frame.flags.c_contiguous
            assert np.array_equal(frame, full[first + i]), (path.name, first, count, i)
    # Every window from frame 4 on (past the first seek margin) went through the seek, not the fallback.
    assert all(first < seek.SEEK_MARGINS[0] for first, _ in exact_calls), exact_calls


@pytest.mark.parametrize("path", [DATA / "bbb_clip.mp4", WIDE, DATA / "carphone_clip.mp4", SAMPLE],
                         ids=lambda p: p.name)
def test_real_clips(path: Path, exact_calls) -> None:
    check_windows(path, exact_calls)


@pytest.mark.parametrize("name", ["open_gop", "hevc", "b_pyramid", "offset", "edit_list", "mkv", "rotated", "vp9"])
def test_built_clips(built: dict[str, Path], name: str, exact_calls, request) -> None:
    check_windows(request.getfixturevalue("hevc") if name == "hevc" else built[name], exact_calls)


def test_rotated_native_size(built: dict[str, Path], exact_calls) -> None:
    path = built["rotated"]
    info = probe(str(path))
    assert (info.width, info.height) == (80, 192)
    full = read_all(str(path), info=info)
    assert np.array_equal(np.stack(list(seek.decode_range(str(path), 30, 10, info=info))), full[30:40])
    assert not exact_calls


def test_edit_list_hides_frames(built: dict[str, Path]) -> None:
    assert probe(str(built["edit_list"])).n_frames == 67


def test_partitions_concatenate_to_the_full_decode(built: dict[str, Path], exact_calls) -> None:
    path = built["open_gop"]
    info = probe(str(path))
    full = read_all(str(path), SIZE, info=info)
    bounds = [0, 23, 48, info.n_frames]  # 3 contiguous parts, boundaries mid-GOP and just after a keyframe
    parts = [list(seek.decode_range(str(path), a, b - a, SIZE, info=info))
             for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert np.array_equal(np.stack([f for part in parts for f in part]), full)
    assert exact_calls == [(0, 23)]


def test_off_grid_frame_falls_back_to_the_exact_path(built: dict[str, Path], monkeypatch, exact_calls) -> None:
    # Frame 0 half a frame off: every seeked frame lies between two slots; the grid check refuses them all.
    path = built["open_gop"]
    real = seek._frame_zero

    def shifted(p: str):
        pts, tb, container = real(p)
        return pts + int(1 / (tb * 50)), tb, container

    monkeypatch.setattr(seek, "_frame_zero", shifted)
    info = probe(str(path))
    full = read_all(str(path), SIZE, info=info)
    assert np.array_equal(np.stack(list(seek.decode_range(str(path), 30, 6, SIZE, info=info))), full[30:36])
    assert exact_calls == [(30, 6)]


def test_gap_midway_switches_to_the_exact_path(built: dict[str, Path], monkeypatch, exact_calls) -> None:
    # ffmpeg's report of frame 33 goes missing: frames 30-32 come from the seek, 33-35 from the exact path.
    path = built["open_gop"]
    pts0, tb, _ = seek._frame_zero(str(path))
    lost = pts0 + 33 * int(1 / (tb * 25))

    class Lossy(list):
        def append(self, entry) -> None:
            if entry[0] != lost:
                super().append(entry)

    class Stderr(seek._Stderr):
        def __init__(self, stream) -> None:
            super().__init__(stream)
            with self._cond:
                self.frames = Lossy(self.frames)

    monkeypatch.setattr(seek, "_Stderr", Stderr)
    info = probe(str(path))
    full = read_all(str(path), SIZE, info=info)
    assert np.array_equal(np.stack(list(seek.decode_range(str(path), 30, 6, SIZE, info=info))), full[30:36])
    assert exact_calls == [(33, 3)]


def test_late_landing_retries_then_falls_back(built: dict[str, Path], monkeypatch, exact_calls) -> None:
    # A negative margin seeks past ``first``: decoding starts at the next keyframe; no keyframe before first.
    path = built["open_gop"]
    info = probe(str(path))
    full = read_all(str(path), SIZE, info=info)
    monkeypatch.setattr(seek, "SEEK_MARGINS", (-10, 4))  # late, then a working margin
    assert np.array_equal(np.stack(list(seek.decode_range(str(path), 30, 6, SIZE, info=info))), full[30:36])
    assert not exact_calls
    monkeypatch.setattr(seek, "SEEK_MARGINS", (-10,))  # late and nothing else to try: the exact path
    assert np.array_equal(np.stack(list(seek.decode_range(str(path), 30, 6, SIZE, info=info))), full[30:36])
    assert exact_calls == [(30, 6)]


def test_closing_early_stops_ffmpeg(exact_calls, monkeypatch) -> None:
    started: list[subprocess.Popen] = []
    real = children.popen

    def spy(cmd, **kwargs) -> subprocess.Popen:
        proc = real(cmd, **kwargs)
        started.append(proc)
        return proc

    info = probe(str(WIDE))
    monkeypatch.setattr(children, "popen", spy)
    frames = seek.decode_range(str(WIDE), 100, 30, SIZE, info=info)
    first = next(frames)
    seeks = [p for p in started if "-ss" in p.args]
    assert len(seeks) == 1, [p.args for p in started]
    ffmpeg_proc = seeks[0]
    # 29 frames (1.2 MB) are still to come through a 64 KiB pipe: ffmpeg cannot have finished by itself.
    assert ffmpeg_proc.poll() is None
    frames.close()
    assert ffmpeg_proc.returncode == -signal.SIGKILL  # killed and reaped by close(), not left running
    assert ffmpeg_proc.stdout.closed
    assert not exact_calls
    assert np.array_equal(first, read_all(str(WIDE), SIZE, info=info)[100])


def test_image_sequence(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    ffmpeg("-i", str(SAMPLE), "-frames:v", "12", "-vf", "scale=64:36", str(folder / "%04d.png"))
    info = probe(str(folder))
    assert info.is_sequence
    full = read_all(str(folder), SIZE, info=info)
    assert np.array_equal(np.stack(list(seek.decode_range(str(folder), 5, 7, SIZE, info=info))), full[5:])


def test_variable_frame_rate_uses_the_exact_path(tmp_path: Path, exact_calls) -> None:
    out = tmp_path / "phone.mp4"  # 0.6 s at 10 fps, then 0.6 s at 30 fps
    ffmpeg("-i", str(SAMPLE), "-filter_complex",
           "[0:v]scale=96:54,split[a][b];[a]trim=0:0.6,setpts=PTS-STARTPTS,fps=10[x];"
           "[b]trim=1:1.6,setpts=PTS-STARTPTS,fps=30[y];[x][y]concat=n=2:v=1:a=0[v]", "-map", "[v]",
           "-c:v", "libx264", "-preset", "ultrafast", _passthrough()[0], "vfr", str(out))
    info = probe(str(out))
    assert info.frame_map is not None
    full = read_all(str(out), info=info)
    assert np.array_equal(np.stack(list(seek.decode_range(str(out), 10, 20, info=info))), full[10:30])
    assert exact_calls == [(10, 20)]


@pytest.mark.parametrize(("first", "count", "message"), [
    (-1, 2, "first frame must be >= 0"), (0, -1, "frame count must be >= 0"),
    (70, 6, "past the end"), (1.5, 2, "first frame must be an integer"), (True, 2, "must be an integer")])
def test_bad_arguments(first, count, message) -> None:
    info = probe(str(SAMPLE))
    with pytest.raises(MpistyleError, match=message) as err:
        seek.decode_range(str(SAMPLE), first, count, info=info)
    assert "\n" not in str(err.value)


def test_empty_range() -> None:
    assert list(seek.decode_range(str(SAMPLE), 75, 0)) == []
