"""Tests for mpistyle.io (video files: probe, decode, encode) on the real clips (see tests/data/ATTRIBUTION.md)."""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import mpistyle
from mpistyle.errors import MpistyleError
from mpistyle.io.encode import VideoEncoder
from mpistyle.io.ffmpeg import _ffmpeg_failure, ffmpeg_exe
from mpistyle.io.media import iter_frames, probe, read_all
from mpistyle.io.probe import output_size, snap_fps

DATA = Path(__file__).parent / "data"
SAMPLE = Path(mpistyle.__file__).parent / "data" / "sample.mp4"
BBB = DATA / "bbb_clip.mp4"  # 128x72, 25 fps, 24 frames, AAC audio
CARPHONE = DATA / "carphone_clip.mp4"  # 176x144, 29.97 fps, 12 frames, silent
BBB_WIDE = DATA / "bbb_640x272.mp4"  # 640x272, 25 fps, 132 frames, silent


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                   check=True)


def encode(path: Path, frames: np.ndarray, fps: Fraction, **kwargs) -> None:
    with VideoEncoder(str(path), frames.shape[2], frames.shape[1], fps, **kwargs) as enc:
        for frame in frames:
            enc.write(frame)


# ----------------------------------------------------------------------------------------------- probe


@pytest.mark.parametrize(("path", "size", "n", "fps", "audio"), [
    (SAMPLE, (320, 180), 75, Fraction(25), True),
    (BBB, (128, 72), 24, Fraction(25), True),
    (CARPHONE, (176, 144), 12, Fraction(30000, 1001), False),
    (BBB_WIDE, (640, 272), 132, Fraction(25), False),
])
def test_probe_committed_clips(path: Path, size: tuple[int, int], n: int, fps: Fraction, audio: bool) -> None:
    info = probe(str(path))
    assert (info.width, info.height) == size
    assert info.n_frames == n
    assert info.fps == fps and isinstance(info.fps, Fraction)
    assert info.has_audio is audio
    assert info.duration == pytest.approx(n / float(fps))
    assert info.path == str(path)


@pytest.mark.parametrize(("printed", "exact"), [
    ("23.98", Fraction(24000, 1001)), ("23.976", Fraction(24000, 1001)), ("29.97", Fraction(30000, 1001)),
    ("59.94", Fraction(60000, 1001)), ("119.88", Fraction(120000, 1001)), ("25", Fraction(25)),
    ("30", Fraction(30)), ("12.5", Fraction(25, 2)), ("24", Fraction(24)),
])
def test_snap_fps(printed: str, exact: Fraction) -> None:
    assert snap_fps(printed) == exact


def _empty(tmp: Path) -> Path:
    (p := tmp / "empty.mp4").write_bytes(b"")
    return p


def _text(tmp: Path) -> Path:
    (p := tmp / "notes.mp4").write_text("this is not a video\n")
    return p


def _truncated(tmp: Path) -> Path:
    (p := tmp / "truncated.mp4").write_bytes(BBB.read_bytes()[:2048])
    return p


def _corrupt(tmp: Path) -> Path:
    # Container intact, every coded frame zeroed: a video stream that decodes to no frames at all.
    data = bytearray(BBB.read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4:at], "big")
    data[at + 4:at - 4 + size] = bytes(size - 8)
    (p := tmp / "corrupt.mp4").write_bytes(bytes(data))
    return p


def _audio_only(tmp: Path) -> Path:
    p = tmp / "audio_only.mp4"
    ffmpeg("-i", str(BBB), "-vn", "-c:a", "copy", str(p))
    return p


def _directory(tmp: Path) -> Path:
    (p := tmp / "folder.mp4").mkdir()
    return p


def _missing(tmp: Path) -> Path:
    return tmp / "missing.mp4"


@pytest.mark.parametrize(("make", "phrase"), [
    (_empty, "empty file"), (_text, "not a readable video"), (_truncated, "not a readable video"),
    (_corrupt, "no decodable video frames"), (_audio_only, "audio only"), (_directory, "directory"),
    (_missing, "no such file"),
])
def test_probe_rejects_bad_input(tmp_path: Path, make, phrase: str) -> None:
    path = make(tmp_path)
    with pytest.raises(MpistyleError) as err:
        probe(str(path))
    message = str(err.value)
    assert phrase in message
    assert str(path) in message
    assert "\n" not in message


def test_iter_frames_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(MpistyleError, match="audio only"):
        iter_frames(str(_audio_only(tmp_path)))
    with pytest.raises(MpistyleError, match="start frame"):
        iter_frames(str(BBB), start=-1)


def test_probe_reports_size_after_rotation(tmp_path: Path) -> None:
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-display_rotation", "90", "-i", str(BBB), "-c", "copy", str(rotated))
    info = probe(str(rotated))
    frames = read_all(str(rotated))
    assert (info.width, info.height) == (72, 128)
    assert frames.shape == (24, 128, 72, 3)
    # Same pixels, turned a quarter (counter-clockwise for a +90 display matrix).
    turned = np.rot90(read_all(str(BBB)), axes=(1, 2))
    assert np.abs(turned.astype(int) - frames).mean() < 1


# -------------------------------------------------------------------------------------------- decoding


def test_read_all_matches_probe() -> None:
    for path in (BBB, CARPHONE):
        info = probe(str(path))
        frames = read_all(str(path))
        assert frames.shape == (info.n_frames, info.height, info.width, 3)
        assert frames.dtype == np.uint8
        assert frames[0].flags.c_contiguous and frames[0].flags.writeable
        assert frames.std() > 10  # real picture content, not a blank decode


@pytest.mark.parametrize("start", [1, 7, 23, 24, 40])
def test_iter_frames_start_is_exact(start: int) -> None:
    full = read_all(str(BBB))
    tail = list(iter_frames(str(BBB), start=start))
    assert len(tail) == max(0, len(full) - start)
    for got, want in zip(tail, full[start:], strict=True):
        np.testing.assert_array_equal(got, want)


def test_iter_frames_scales() -> None:
    frames = list(iter_frames(str(BBB_WIDE), size=(160, 68)))
    full = read_all(str(BBB_WIDE))
    assert len(frames) == 132
    assert frames[0].shape == (68, 160, 3)
    # Area-downscaled frames agree with a 4x4 block mean of the full-size decode.
    blocks = full[10].reshape(68, 4, 160, 4, 3).mean(axis=(1, 3))
    assert psnr(frames[10], blocks) > 35


def test_iter_frames_close_kills_ffmpeg() -> None:
    frames = iter_frames(str(BBB_WIDE))
    first = next(frames)
    proc = frames.gi_frame.f_locals["proc"]
    assert first.shape == (272, 640, 3)
    assert proc.poll() is None  # still streaming the other 131 frames
    frames.close()
    assert proc.poll() is not None


# -------------------------------------------------------------------------------------------- output size


def test_output_size() -> None:
    info = probe(str(SAMPLE))  # 320x180
    assert output_size(info) == (320, 180)
    assert output_size(info, width=160) == (160, 90)
    assert output_size(info, height=100) == (178, 100)  # 177.8 -> nearest even
    assert output_size(info, width=97, height=71) == (98, 72)
    assert output_size(info, scale=0.5) == (160, 90)
    assert output_size(info, scale=0.3) == (96, 54)
    for bad in ({"width": 0}, {"height": -4}, {"width": 9000}, {"scale": 0.0}, {"scale": -1.0},
                {"scale": 0.001}, {"scale": 40.0}, {"width": 64, "scale": 2.0}, {"width": 100.5}):
        with pytest.raises(MpistyleError):
            output_size(info, **bad)


# -------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("source", [BBB, CARPHONE])
def test_round_trip_keeps_count_fps_size_audio(tmp_path: Path, source: Path) -> None:
    info = probe(str(source))
    frames = read_all(str(source))
    out = tmp_path / "out.mp4"
    encode(out, frames, info.fps, audio_from=str(source), preset="veryfast", threads=1)
    result = probe(str(out))
    assert (result.width, result.height, result.fps, result.n_frames) == (
        info.width, info.height, info.fps, info.n_frames)
    assert result.has_audio is info.has_audio
    assert psnr(read_all(str(out)), frames) > 30
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temporaries left behind


def test_audio_is_trimmed_to_the_video(tmp_path: Path) -> None:
    frames = read_all(str(BBB))[:10]
    out = tmp_path / "short.mp4"
    encode(out, frames, Fraction(25), audio_from=str(SAMPLE), preset="ultrafast")  # 3 s of audio
    result = probe(str(out))
    assert result.n_frames == 10 and result.has_audio
    report = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(out)], capture_output=True,
                            text=True).stderr
    hours, minutes, seconds = report.split("Duration: ")[1].split(",")[0].split(":")
    assert float(seconds) < 0.6 and hours == minutes == "00"


def test_ntsc_rate_round_trips_exactly(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
    out = tmp_path / "ntsc.mkv"
    encode(out, frames, Fraction(24000, 1001), preset="ultrafast")
    result = probe(str(out))
    assert (result.fps, result.n_frames, result.has_audio) == (Fraction(24000, 1001), 5, False)


def test_odd_size_is_padded_to_even(tmp_path: Path) -> None:
    frames = read_all(str(BBB), size=(97, 71))
    assert frames.shape == (24, 71, 97, 3)
    out = tmp_path / "odd.mp4"
    encode(out, frames, Fraction(25), audio_from=str(BBB))
    result = probe(str(out))
    assert (result.width, result.height, result.n_frames, result.has_audio) == (98, 72, 24, True)
    decoded = read_all(str(out))
    assert psnr(decoded[:, :71, :97], frames) > 30  # picture kept in the top-left corner
    assert decoded[:, 71, :, :].mean() < 10 and decoded[:, :, 97, :].mean() < 10  # black padding


def test_abort_leaves_no_file_and_keeps_the_old_output(tmp_path: Path) -> None:
    frames = read_all(str(BBB))
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    enc = VideoEncoder(str(out), 128, 72, Fraction(25), audio_from=str(BBB))
    for frame in frames[:5]:
        enc.write(frame)
    enc.abort()
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    fresh = tmp_path / "fresh.mp4"
    with pytest.raises(RuntimeError), VideoEncoder(str(fresh), 128, 72, Fraction(25)) as enc:
        enc.write(frames[0])
        raise RuntimeError("stylization failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_dead_ffmpeg_becomes_a_clean_error(tmp_path: Path) -> None:
    frames = read_all(str(BBB))
    out = tmp_path / "out.mp4"
    enc = VideoEncoder(str(out), 128, 72, Fraction(25))
    enc.write(frames[0])
    enc._proc.kill()  # simulate ffmpeg dying mid-run
    enc._proc.wait()
    with pytest.raises(MpistyleError, match="ffmpeg stopped while encoding") as err:
        for _ in range(200):  # enough data to overflow any pipe buffer
            enc.write(frames[1])
        enc.close()
    assert str(out) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_no_frames_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MpistyleError, match="no frames"), \
            VideoEncoder(str(tmp_path / "out.mp4"), 64, 64, Fraction(25)):
        pass
    assert list(tmp_path.iterdir()) == []


def test_encoder_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(MpistyleError, match="does not exist"):
        VideoEncoder(str(tmp_path / "nowhere" / "out.mp4"), 64, 64, Fraction(25))
    with pytest.raises(MpistyleError, match="unsupported output format"):
        VideoEncoder(str(tmp_path / "out.avi"), 64, 64, Fraction(25))
    with pytest.raises(MpistyleError, match="no such file"):
        VideoEncoder(str(tmp_path / "out.mp4"), 64, 64, Fraction(25),
                           audio_from=str(tmp_path / "x.mp4"))
    with pytest.raises(MpistyleError, match="preset"):
        VideoEncoder(str(tmp_path / "out.mp4"), 64, 64, Fraction(25), preset="warp")
    enc = VideoEncoder(str(tmp_path / "out.mp4"), 64, 64, Fraction(25))
    with pytest.raises(ValueError, match="uint8"):
        enc.write(np.zeros((64, 64, 3), dtype=np.float32))
    enc.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("message", ["av_interleaved_write_frame(): No space left on device",
                                     "Error writing trailer: Disk quota exceeded"])
def test_full_disk_message(message: str) -> None:
    err = _ffmpeg_failure("/scratch/out.mp4", "ffmpeg failed while encoding",
                                ["[mp4 @ 0x1] some context", message, "Conversion failed!"])
    assert str(err) == "disk full while writing /scratch/out.mp4"
    assert err.exit_code == 74  # EX_IOERR, not the bad-input 2
