"""Real-world inputs (issue 10): ffmpeg versions, variable frame rate, image sequences, codecs and
containers, the packet-counting probe. Every clip is made here with the ffmpeg at hand from the bundled
real clips (tests/data/ATTRIBUTION.md)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from mpistyle.errors import MpistyleError
from mpistyle.io import sequence
from mpistyle.io.encode import VideoEncoder
from mpistyle.io.ffmpeg import MIN_FFMPEG, _passthrough, ffmpeg_exe, ffmpeg_version, parse_ffmpeg_version
from mpistyle.io.media import iter_frames, open_writer, probe, read_all
from mpistyle.io.probe import _framecrc, audio_codec

from .conftest import BBB, SAMPLE, run_mpistyle


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                   check=True)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def streams(path: Path) -> str:
    """ffmpeg's report of a file's streams."""
    return subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True,
                          text=True).stderr


def container_seconds(path: Path) -> float:
    h, m, s = re.search(r"Duration: (\d+):(\d+):([\d.]+)", streams(path)).groups()
    return int(h) * 3600 + int(m) * 60 + float(s)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("mpistyle: error:")]


# ------------------------------------------------------------------------------------------ ffmpeg version


@pytest.mark.parametrize(("line", "version"), [
    ("ffmpeg version 4.2.2-static https://johnvansickle.com/ffmpeg/  Copyright (c) 2000-2019", (4, 2, 2)),
    ("ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright (c) 2000-2021 the FFmpeg developers", (4, 4, 2)),
    ("ffmpeg version 5.1.9-0+deb12u1 Copyright (c) 2000-2026 the FFmpeg developers", (5, 1, 9)),
    ("ffmpeg version 7.0.2-static https://johnvansickle.com/ffmpeg/  Copyright (c) 2000-2024", (7, 0, 2)),
    ("ffmpeg version n9.0.2-17-g2a571b6068-20260930 Copyright (c) 2000-2026", (9, 0, 2)),
    ("ffmpeg version 7.1 Copyright (c) 2000-2024 the FFmpeg developers", (7, 1, 0)),
    ("ffmpeg version N-112233-gabcdef0123 Copyright (c) 2000-2026 the FFmpeg developers", None),
])
def test_ffmpeg_version_parsing(line: str, version: tuple[int, int, int] | None) -> None:
    assert parse_ffmpeg_version(line) == version


def test_the_ffmpeg_in_use_is_supported() -> None:
    version = ffmpeg_version()
    assert version is None or version[:2] >= MIN_FFMPEG
    flag = _passthrough()[0]
    assert flag == ("-vsync" if version is not None and version[:2] < (5, 1) else "-fps_mode")


def test_too_old_ffmpeg_is_refused_in_one_line(tmp_path: Path) -> None:
    # No ffmpeg older than 4.4 ships for CI, so this stands in for one: it answers `-version` as the static
    # ffmpeg 4.2.2 of imageio-ffmpeg 0.5.1 does (and fails anything else, as that one would).
    old = tmp_path / "ffmpeg-4.2.2"
    old.write_text("#!/bin/sh\nif [ \"$2\" = -version ] || [ \"$1\" = -version ]; then\n"
                   "  echo 'ffmpeg version 4.2.2-static https://johnvansickle.com/ffmpeg/  Copyright (c) 2000-2019'\n"
                   "  exit 0\nfi\necho 'Error splitting the argument list: Option not found' >&2\nexit 1\n")
    old.chmod(0o755)
    proc = run_mpistyle(["stylize", str(BBB), "-o", str(tmp_path / "out.mp4")], ranks=2,
                        env={"IMAGEIO_FFMPEG_EXE": str(old)})
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "ffmpeg 4.2.2" in lines[0] and "4.4 or newer" in lines[0] and "IMAGEIO_FFMPEG_EXE" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.mp4").exists()


# ------------------------------------------------------------------------------------ variable frame rate


@pytest.fixture
def vfr_clip(tmp_path: Path) -> Path:
    """A real variable-rate clip with audio: 0.6 s at 10 fps (6 frames), then 0.6 s at 30 fps (18 frames)."""
    out = tmp_path / "phone.mp4"
    ffmpeg("-i", str(SAMPLE), "-filter_complex",
           "[0:v]scale=96:54,split[a][b];[a]trim=0:0.6,setpts=PTS-STARTPTS,fps=10[x];"
           "[b]trim=1:1.6,setpts=PTS-STARTPTS,fps=30[y];[x][y]concat=n=2:v=1:a=0[v];"
           "[0:a]atrim=0:1.2[s]", "-map", "[v]", "-map", "[s]", "-c:v", "libx264", "-preset", "ultrafast",
           "-c:a", "aac", _passthrough()[0], "vfr", str(out))
    return out


def test_variable_frame_rate_becomes_constant_with_the_same_duration(vfr_clip: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mpistyle.io.probe"):
        info = probe(str(vfr_clip))
    assert "variable frame rate" in caplog.text and "same duration" in caplog.text
    assert info.fps == 30
    assert info.n_frames == 36 and info.duration == pytest.approx(1.2)
    assert info.frame_map[:9] == (0, 0, 0, 1, 1, 1, 2, 2, 2)  # each 10 fps frame held for 3 slots
    assert info.frame_map[18:] == tuple(range(6, 24))  # the 30 fps part unchanged
    frames = read_all(str(vfr_clip), info=info)
    assert frames.shape == (36, 54, 96, 3)
    np.testing.assert_array_equal(frames[0], frames[2])
    assert not np.array_equal(frames[2], frames[3])
    assert all(not np.array_equal(frames[k], frames[k + 1]) for k in range(18, 35))
    tail = list(iter_frames(str(vfr_clip), start=4, info=info))  # a resume in the middle of a hold
    assert len(tail) == 32
    np.testing.assert_array_equal(np.stack(tail), frames[4:])


def test_variable_frame_rate_stylized_keeps_duration_and_audio(vfr_clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "styled.mp4"
    proc = run_mpistyle(["stylize", str(vfr_clip), "-o", str(out), "--no-progress", "--temporal", "none"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert "variable frame rate" in proc.stderr
    result = probe(str(out))
    assert (result.fps, result.n_frames, result.has_audio) == (30, 36, True)
    assert container_seconds(out) == pytest.approx(1.2, abs=0.034)  # was 24 frames at the average rate


# ------------------------------------------------------------------------------------------ image sequences


@pytest.fixture
def frames_dir(tmp_path: Path) -> Path:
    """10 real frames as PNG files 0001.png..0010.png (64x36)."""
    folder = tmp_path / "frames"
    folder.mkdir()
    ffmpeg("-i", str(BBB), "-vf", "scale=64:36", "-frames:v", "10", str(folder / "%04d.png"))
    return folder


def test_pattern_and_folder_inputs(frames_dir: Path) -> None:
    pattern = str(frames_dir / "%04d.png")
    for path in (pattern, str(frames_dir)):
        info = probe(path)
        assert (info.width, info.height, info.n_frames, info.fps, info.has_audio) == (64, 36, 10, 25, False)
        assert info.first_number == 1 and info.is_sequence
    assert probe(pattern, fps=Fraction(12)).fps == 12
    frames = read_all(pattern)
    expected = cv2.cvtColor(cv2.imread(str(frames_dir / "0004.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(frames[3], expected)
    np.testing.assert_array_equal(np.stack(list(iter_frames(str(frames_dir), start=6))), frames[6:])
    small = read_all(pattern, size=(32, 18))
    assert small.shape == (10, 18, 32, 3)
    assert psnr(small[5], frames[5].reshape(18, 2, 32, 2, 3).mean(axis=(1, 3))) > 40


def test_jpeg_folder_with_named_frames(tmp_path: Path) -> None:
    folder = tmp_path / "shot"
    folder.mkdir()
    ffmpeg("-i", str(BBB), "-vf", "scale=64:36", "-frames:v", "5", "-start_number", "7",
           str(folder / "shot_%03d.jpg"))
    info = probe(str(folder))
    assert (info.n_frames, info.first_number, info.width, info.height) == (5, 7, 64, 36)
    assert read_all(str(folder)).shape == (5, 36, 64, 3)


def _gap(d: Path) -> str:
    (d / "0005.png").unlink()
    return "gap: 5 missing"


def _mixed_sizes(d: Path) -> str:
    cv2.imwrite(str(d / "0003.png"), np.zeros((18, 32, 3), np.uint8))
    return "same size"


def _unreadable(d: Path) -> str:
    (d / "0004.png").write_bytes(b"not an image at all")
    return "not a readable PNG/JPEG image"


def _nothing(d: Path) -> str:
    for p in d.iterdir():
        p.unlink()
    return "matches no files"


@pytest.mark.parametrize("make", [_gap, _mixed_sizes, _unreadable, _nothing])
def test_bad_sequences_give_one_line(frames_dir: Path, make) -> None:
    phrase = make(frames_dir)
    with pytest.raises(MpistyleError) as err:
        probe(str(frames_dir / "%04d.png"))
    assert phrase in str(err.value) and "\n" not in str(err.value)
    assert str(frames_dir) in str(err.value)


def test_empty_folder_and_other_names(tmp_path: Path) -> None:
    with pytest.raises(MpistyleError, match="no PNG/JPEG frames"):
        probe(str(tmp_path))
    cv2.imwrite(str(tmp_path / "cover.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(MpistyleError, match="no frame number"):
        probe(str(tmp_path))
    with pytest.raises(MpistyleError, match="must end in"):
        probe(str(tmp_path / "%04d.tif"))


def test_damaged_frame_is_named_when_decoded(frames_dir: Path) -> None:
    damaged = frames_dir / "0008.png"
    damaged.write_bytes(damaged.read_bytes()[:60])  # header intact, picture data cut off
    info = probe(str(frames_dir))  # headers only: fine
    frames = iter_frames(str(frames_dir), info=info)
    got = [next(frames) for _ in range(7)]
    assert len(got) == 7
    with pytest.raises(MpistyleError, match=r"0008\.png: cannot decode"):
        next(frames)


def test_sequence_writer_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "0009.png").write_bytes(b"stale frame of an older, longer result")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    writer = open_writer(str(out / "%04d.png"), 30, 20, Fraction(25), n_frames=3)
    for frame in frames:
        writer.write(frame)
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["0009.png"]  # no new frame under a final name before close
    writer.close()
    assert sorted(p.name for p in out.iterdir()) == ["0001.png", "0002.png", "0003.png"]  # stale 0009 gone
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # temporary folder gone
    np.testing.assert_array_equal(cv2.imread(str(out / "0002.png"))[..., ::-1], frames[1])
    # An aborted run leaves the previous result as it was.
    writer = open_writer(str(out / "%04d.png"), 30, 20, Fraction(25))
    writer.write(frames[2])
    writer.abort()
    np.testing.assert_array_equal(cv2.imread(str(out / "0001.png"))[..., ::-1], frames[0])
    assert sorted(p.name for p in out.iterdir()) == ["0001.png", "0002.png", "0003.png"]


def test_folder_output_replaces_only_its_own_frames(tmp_path: Path) -> None:
    out = tmp_path / "result"
    frame = np.full((8, 10, 3), 200, np.uint8)
    with open_writer(str(out), 10, 8, Fraction(25), first_number=7) as writer:
        writer.write(frame)
        assert not out.exists()
    assert [p.name for p in out.iterdir()] == ["0007.png"]
    with open_writer(str(out) + "/", 10, 8, Fraction(25)) as writer:
        writer.write(frame)
    assert [p.name for p in out.iterdir()] == ["0001.png"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MpistyleError, match="directory exists and holds other files"):
        open_writer(str(out), 10, 8, Fraction(25))
    assert sequence.buffer_path_for(str(out)) == str(out) + ".mpistyle.h5"
    assert sequence.buffer_path_for(str(out / "f_%04d.png")) == str(out / "f_frames.png.mpistyle.h5")


def test_sequence_to_sequence_on_three_ranks(frames_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "styled"
    proc = run_mpistyle(["stylize", str(frames_dir / "%04d.png"), "-o", str(out), "--fps", "12",
                         "--no-progress", "--halo", "2"], ranks=3)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:04d}.png" for i in range(1, 11)]
    assert cv2.imread(str(out / "0010.png")).shape == (36, 64, 3)
    assert not list(tmp_path.glob("*.h5")) and not list(tmp_path.glob(".*"))  # buffer and temporaries gone


def test_sequence_to_video_uses_fps(frames_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "styled.mp4"
    proc = run_mpistyle(["stylize", str(frames_dir), "-o", str(out), "--fps", "12", "--no-progress",
                         "--temporal", "none"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    result = probe(str(out))
    assert (result.n_frames, result.fps, result.width, result.height) == (10, 12, 64, 36)


@pytest.mark.parametrize("case", ["nothing", "damaged"])
def test_bad_sequence_run_gives_one_line_and_keeps_the_buffer(frames_dir: Path, tmp_path: Path, case: str) -> None:
    out = tmp_path / "styled.mp4"
    pattern = str(frames_dir / ("f_%04d.png" if case == "nothing" else "%04d.png"))
    if case == "damaged":
        damaged = frames_dir / "0009.png"
        good = damaged.read_bytes()
        damaged.write_bytes(good[:60])
    proc = run_mpistyle(["stylize", pattern, "-o", str(out), "--no-progress", "--temporal", "none"], ranks=2)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()
    if case == "nothing":
        assert "matches no files" in lines[0]
        return
    assert "0009.png: cannot decode" in lines[0]
    buffer = Path(str(out) + ".mpistyle.h5")
    with h5py.File(buffer) as f:  # kept, with whatever was finished
        assert f["done"].shape == (10,)
    damaged.write_bytes(good)
    proc = run_mpistyle(["stylize", pattern, "-o", str(out), "--no-progress", "--temporal", "none"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert probe(str(out)).n_frames == 10


# ------------------------------------------------------------------------------- codecs, 10-bit, containers


def _bbb_reference(size: tuple[int, int] | None = None) -> np.ndarray:
    return read_all(str(BBB), size=size)


@pytest.mark.parametrize(("name", "args", "codec"), [
    ("hevc10.mp4", ["-c:v", "libx265", "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=error",
                    "-tag:v", "hvc1", "-c:a", "copy"], "hevc"),
    ("vp9.webm", ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-crf", "20", "-b:v", "0",
                  "-c:a", "libopus"], "vp9"),
    ("prores.mov", ["-c:v", "prores_ks", "-profile:v", "3", "-c:a", "pcm_s16le"], "prores"),
    ("h264_10bit.mkv", ["-c:v", "libx264", "-pix_fmt", "yuv420p10le", "-preset", "ultrafast", "-c:a", "copy"],
     "h264"),
])
def test_real_codecs_decode(tmp_path: Path, name: str, args: list[str], codec: str) -> None:
    clip = tmp_path / name
    ffmpeg("-i", str(BBB), *args, str(clip))
    assert f"Video: {codec}" in streams(clip)
    info = probe(str(clip))
    assert (info.width, info.height, info.n_frames, info.fps, info.has_audio) == (128, 72, 24, 25, True)
    assert info.frame_map is None
    assert psnr(read_all(str(clip), info=info), _bbb_reference()) > 30


def test_rotated_hevc_mov(tmp_path: Path) -> None:
    plain = tmp_path / "plain.mov"
    ffmpeg("-i", str(BBB), "-c:v", "libx265", "-x265-params", "log-level=error", "-an", str(plain))
    rotated = tmp_path / "rotated.mov"
    ffmpeg("-display_rotation", "-90", "-i", str(plain), "-c", "copy", str(rotated))
    info = probe(str(rotated))
    assert (info.width, info.height, info.n_frames) == (72, 128, 24)
    frames = read_all(str(rotated), info=info)
    turned = np.rot90(read_all(str(plain)), k=-1, axes=(1, 2))  # clockwise for a -90 display matrix
    assert np.abs(turned.astype(int) - frames).mean() < 1


@pytest.mark.parametrize(("ext", "vcodec", "acodec"), [(".mkv", "h264", "aac"), (".mov", "h264", "aac"),
                                                        (".webm", "vp9", "opus")])
def test_output_containers(tmp_path: Path, ext: str, vcodec: str, acodec: str) -> None:
    frames = _bbb_reference()
    out = tmp_path / f"out{ext}"
    with open_writer(str(out), 128, 72, Fraction(25), audio_from=str(BBB), preset="veryfast") as writer:
        assert isinstance(writer, VideoEncoder)
        for frame in frames:
            writer.write(frame)
    result = probe(str(out))
    assert (result.n_frames, result.fps, result.has_audio) == (24, 25, True)
    assert f"Video: {vcodec}" in streams(out) and audio_codec(str(out)) == acodec
    assert psnr(read_all(str(out)), frames) > 30
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_hevc_10bit_to_webm_on_two_ranks(tmp_path: Path) -> None:
    clip = tmp_path / "in.mkv"
    ffmpeg("-i", str(BBB), "-c:v", "libx265", "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=error",
           "-c:a", "copy", str(clip))
    out = tmp_path / "out.webm"
    proc = run_mpistyle(["stylize", str(clip), "-o", str(out), "--no-progress", "--temporal", "none"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    result = probe(str(out))
    assert (result.n_frames, result.fps, result.has_audio) == (24, 25, True)
    assert "Video: vp9" in streams(out) and audio_codec(str(out)) == "opus"


# ------------------------------------------------------------------------------------------- the probe


def test_probe_counts_packets_but_not_discarded_ones(tmp_path: Path) -> None:
    # A stream copy cut between keyframes: the GOP's head stays as packets the edit list hides (discarded),
    # and the cut end leaves a B-frame without its reference (a packet that decodes to nothing).
    cut = tmp_path / "cut.mp4"
    ffmpeg("-ss", "1.3", "-i", str(Path(BBB).parent / "bbb_640x272.mp4"), "-t", "1", "-c", "copy", str(cut))
    decoded = _framecrc(str(cut), copy=False).count
    info = probe(str(cut))
    assert decoded <= info.n_frames <= decoded + 2
    assert info.n_frames < len([ln for ln in subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-i", str(cut), "-map", "0:v", "-c", "copy", "-f", "framecrc", "-"],
        capture_output=True, text=True).stdout.splitlines() if not ln.startswith("#")])  # discards left out
    frames = read_all(str(cut), size=(64, 28), info=info)
    assert len(frames) == info.n_frames  # the promised count, whatever the decoder made of the stream


def test_probe_decodes_containers_without_reliable_packets(tmp_path: Path) -> None:
    ts = tmp_path / "clip.ts"
    ffmpeg("-i", str(BBB), "-c", "copy", str(ts))
    info = probe(str(ts))
    assert (info.n_frames, info.fps) == (24, 25)
    assert len(read_all(str(ts), info=info)) == 24


def test_decoder_holds_the_count_the_probe_promised(caplog) -> None:
    info = probe(str(BBB))
    more = dataclasses.replace(info, n_frames=info.n_frames + 2)  # 2 frames announced but undecodable
    with caplog.at_level(logging.WARNING, logger="mpistyle.io.decode"):
        frames = read_all(str(BBB), info=more)
    assert len(frames) == 26 and "could not be decoded" in caplog.text
    np.testing.assert_array_equal(frames[25], frames[23])
    far_more = dataclasses.replace(info, n_frames=40)
    with pytest.raises(MpistyleError, match="only 24 of the 40 frames"):
        read_all(str(BBB), info=far_more)


def test_fingerprints_identify_sequences(frames_dir: Path) -> None:
    first = sequence.fingerprint(str(frames_dir))
    assert sequence.fingerprint(str(frames_dir / "%04d.png")) == first
    cv2.imwrite(str(frames_dir / "0011.png"), np.zeros((36, 64, 3), np.uint8))
    assert sequence.fingerprint(str(frames_dir)) != first
    assert os.path.exists(frames_dir / "0011.png")
