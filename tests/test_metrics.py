"""PSNR, Lai et al.'s warping error and the `evaluate` command, on the real clips."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from mpistyle.errors import MpistyleError
from mpistyle.io.media import iter_frames, read_all
from mpistyle.metrics import (
    _fit,
    add_arguments,
    evaluate,
    format_table,
    main,
    psnr,
    seam_report,
    structure_kept,
    warping_errors,
)

from .conftest import BBB, CARPHONE, DATA


@pytest.fixture(scope="module")
def carphone() -> np.ndarray:
    return read_all(str(CARPHONE))


def test_psnr():
    a = np.full((4, 5, 3), 100, np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)  # MSE 1 -> 48.13 dB
    assert psnr(a, a + 10) < psnr(a, a + 1)
    # no uint8 wrap-around: 0 vs 255 is the worst case, 0 dB
    assert psnr(np.zeros_like(a), np.full_like(a, 255)) == pytest.approx(0.0)


def test_static_video_has_zero_error(carphone):
    frames = [carphone[0]] * 5
    errs = warping_errors(frames, frames)
    assert errs.shape == (4,)
    assert np.all(errs == 0.0)


def test_pixels_entering_the_frame_are_not_counted():
    """A camera pan over a real frame: the consistent output scores ~0 (entering pixels masked)."""
    big = next(iter_frames(str(DATA / "bbb_640x272.mp4")))
    frames = [np.ascontiguousarray(big[40:200, 100 + 8 * i:340 + 8 * i]) for i in range(4)]
    errs = warping_errors(frames, frames)
    assert np.all(errs < 2e-5), errs  # without the occlusion mask the new 8-px strip costs ~5e-4


def test_flicker_raises_the_error_and_generators_stream(carphone):
    clean = warping_errors(iter(carphone), (f for f in carphone))
    assert clean.shape == (len(carphone) - 1,)
    rng = np.random.default_rng(0)
    noisy = [np.clip(f.astype(int) + rng.integers(-20, 21, size=3), 0, 255).astype(np.uint8) for f in carphone]
    flick = warping_errors(carphone, noisy)
    assert np.all(flick > clean)
    # a brightness jump of d grey levels everywhere costs about (d/255)^2 in the masked MSE
    bright = list(carphone)
    bright[6] = np.clip(bright[6].astype(int) + 30, 0, 255).astype(np.uint8)
    jump = warping_errors(carphone, bright)
    assert jump[5] > clean[5] + 0.5 * (30 / 255) ** 2 and jump[6] > clean[6] + 0.5 * (30 / 255) ** 2
    assert np.allclose(np.delete(jump, [5, 6]), np.delete(clean, [5, 6]))
    # Farneback is another estimate of the same motion: on the clean clip its errors match DIS's, measured
    # (2026-12) 1.10x in the mean and 0.85-1.95x per pair, and it still tells the flicker apart (every
    # noisy pair >= 3.6x its clean error). A wrong flow or a lost occlusion mask does not stay this close.
    far = warping_errors(carphone, carphone, flow_method="farneback")
    assert far.mean() == pytest.approx(clean.mean(), rel=0.25), (far.mean(), clean.mean())
    assert np.all((far > 0.5 * clean) & (far < 2.5 * clean)), far / clean
    assert np.all(warping_errors(carphone, noisy, flow_method="farneback") > 2 * far)


def test_length_or_size_mismatch_is_a_user_error(carphone):
    with pytest.raises(MpistyleError, match="ends after"):
        warping_errors(carphone, carphone[:-1])
    with pytest.raises(MpistyleError, match="ends after"):
        warping_errors(carphone[:-1], carphone)
    with pytest.raises(MpistyleError, match="output is"):
        warping_errors(carphone, [f[:-2] for f in carphone])


def test_fit_crops_padding_and_resizes():
    src = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    padded = np.zeros((6, 8, 3), np.uint8)
    padded[:5, :7] = src
    assert np.array_equal(_fit(padded, 5, 7), src)
    assert _fit(np.zeros((10, 14, 3), np.uint8), 5, 7).shape == (5, 7, 3)


def test_evaluate_bbb_against_itself():
    res = evaluate(str(BBB), str(BBB), boundaries=[8, 16])
    json.dumps(res)  # JSON-able
    assert res["frames"] == 24 and len(res["per_pair"]) == 23
    per = np.array(res["per_pair"])
    assert res["warping_error"] == pytest.approx(per.mean())
    assert res["boundary_pairs"]["indices"] == [7, 15]
    assert res["boundary_pairs"]["mean"] == pytest.approx(per[[7, 15]].mean())
    assert res["interior_mean"] == pytest.approx(np.delete(per, [7, 15]).mean())
    assert 0 < res["warping_error"] < 2e-3  # the source itself is temporally consistent
    table = format_table(res)
    assert "boundary" in table and "interior" in table and f"{res['interior_mean'] * 1e3:.4f}" in table
    # --partitions 3 on 24 frames is the pipeline's split 0-7 | 8-15 | 16-23
    assert evaluate(str(BBB), str(BBB), partitions=3)["boundary_pairs"]["indices"] == [7, 15]


def test_evaluate_rejects_bad_input(tmp_path):
    with pytest.raises(MpistyleError):
        evaluate(str(BBB), str(BBB), boundaries=[24])
    with pytest.raises(MpistyleError):
        evaluate(str(BBB), str(BBB), boundaries=[0])
    with pytest.raises(MpistyleError):
        evaluate(str(BBB), str(CARPHONE))  # 24 vs 12 frames
    with pytest.raises(MpistyleError):
        evaluate(str(tmp_path / "missing.mp4"), str(BBB))


def test_main_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args([str(BBB), str(BBB), "--partitions", "2", "--json", str(out)])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "boundary pairs [12]" in printed
    saved = json.loads(out.read_text())
    assert saved["boundary_pairs"]["indices"] == [11] and saved["frames"] == 24
    args = parser.parse_args([str(BBB), str(BBB), "--boundaries", "5,10", "--json", "-", "--flow", "farneback"])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["boundary_pairs"]["boundaries"] == [5, 10]
    args = parser.parse_args([str(BBB), str(BBB), "--json", str(tmp_path / "no" / "such" / "r.json")])
    with pytest.raises(MpistyleError, match="does not exist"):
        main(args)
    for bad in (["--partitions", "0"], ["--boundaries", "a,b"], ["--boundaries", "3", "--partitions", "2"]):
        with pytest.raises(SystemExit):
            parser.parse_args([str(BBB), str(BBB), *bad])


def test_seam_report_finds_the_lowest_frame_and_counts_identical_ones():
    rng = np.random.default_rng(0)
    ref = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
    other = [f.copy() for f in ref]
    other[3][0, 0, 0] ^= 1  # one grey level in one pixel: 66.2 dB
    other[1][:4] = 0
    rep = seam_report(iter(ref), iter(other))
    assert rep["lowest_at"] == 1 and rep["identical_frames"] == 3 and rep["frames"] == 5
    assert math.isinf(seam_report(ref, ref)["lowest_psnr"])
    with pytest.raises(MpistyleError, match="differ in length"):
        seam_report(ref, other[:4])


def _write_sequence(folder, frames) -> str:
    import cv2

    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i + 1:04d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))  # lossless
    return str(folder)


def test_evaluate_reports_the_added_flicker_over_the_sources_floor(tmp_path, carphone):
    """Issue 30: E_source, E_output, E_per-frame and (E_out - E_src) / (E_pf - E_src) on real frames.

    The "per-frame" video jitters each frame's colour; the "output" jitters by a third as much, so its
    added flicker is well inside (0, 1); the figures must equal the plain warping errors of the three videos.
    """
    frames = carphone[:8]
    rng = np.random.default_rng(1)
    jitter = rng.uniform(-1, 1, (len(frames), 1, 1, 3)) * 24
    per_frame = [np.clip(f + j, 0, 255).astype(np.uint8) for f, j in zip(frames, jitter, strict=True)]
    output = [np.clip(f + j / 3, 0, 255).astype(np.uint8) for f, j in zip(frames, jitter, strict=True)]
    src_p = _write_sequence(tmp_path / "src", list(frames))
    pf_p, out_p = _write_sequence(tmp_path / "pf", per_frame), _write_sequence(tmp_path / "out", output)
    res = evaluate(src_p, out_p, per_frame_path=pf_p, long_gap=5)
    fl = res["flicker"]
    assert fl["pairs"] == len(frames) - 1 and fl["pairs_skipped"] == 0
    e_src = warping_errors(frames, frames).mean()
    e_out, e_pf = warping_errors(frames, output).mean(), warping_errors(frames, per_frame).mean()
    assert fl["e_source"] == pytest.approx(e_src, rel=1e-9)
    assert fl["e_output"] == pytest.approx(e_out, rel=1e-9)
    assert fl["e_per_frame"] == pytest.approx(e_pf, rel=1e-9)
    assert fl["added_flicker"] == pytest.approx((e_out - e_src) / (e_pf - e_src), rel=1e-9)
    assert 0.02 < fl["added_flicker"] < 0.5 and fl["adds_flicker"]
    # long-term: pairs (0, 5), (1, 6), (2, 7), flow computed between them directly
    assert fl["long_pairs"] + fl["long_pairs_skipped"] == 3 and fl["long_pairs"] >= 1
    assert fl["e10_per_frame"] > fl["e10_output"] > 0
    # a colour jitter keeps the edges (the Sobel magnitude ignores an offset except where it clips)
    assert fl["kept_output"] > 0.9 and fl["kept_per_frame"] > 0.9
    kept = [structure_kept(a, b) for a, b in zip(frames, output, strict=True)]
    assert fl["kept_output"] == pytest.approx(np.mean(kept))
    assert res["warping_error"] == pytest.approx(e_out, rel=1e-9)  # the old figure is unchanged
    table = format_table(res)
    assert f"{fl['added_flicker']:.3f}" in table and "E_source" in table
    with pytest.raises(MpistyleError, match="per-frame video ends after 2 frames"):
        short = _write_sequence(tmp_path / "s3", list(frames[:3]))
        evaluate(short, short, per_frame_path=_write_sequence(tmp_path / "pf2", per_frame[:2]))
