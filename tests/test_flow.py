"""Optical flow, warping and the forward-backward certainty mask, on real frames."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from mpistyle.errors import MpistyleError
from mpistyle.io.media import iter_frames, read_all
from mpistyle.metrics import psnr
from mpistyle.temporal.flow import FlowEstimator, certainty_mask, pair_flow, to_gray, warp

from .conftest import BBB, CARPHONE, DATA

BIG = DATA / "bbb_640x272.mp4"
SHIFT = (3.5, -2.25)  # (dx, dy): sub-pixel on purpose


@pytest.fixture(scope="module")
def big_frames() -> list[np.ndarray]:
    return list(itertools.islice(iter_frames(str(BIG)), 6))


@pytest.fixture(scope="module")
def textured(big_frames) -> np.ndarray:
    """A real 160x240 RGB crop (grass, rocks, sky edge)."""
    return np.ascontiguousarray(big_frames[0][40:200, 300:540])


def _shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """dst(x) = img(x - d): the content moves by d."""
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


@pytest.mark.parametrize("method,preset", [("dis", "ultrafast"), ("dis", "fast"), ("dis", "medium"),
                                           ("farneback", "fast")])
def test_flow_recovers_shift_and_warp_undoes_it(textured, method, preset):
    src = textured
    dst = _shift(src, *SHIFT)
    est = FlowEstimator(method, preset)
    flow = est.flow(to_gray(src), to_gray(dst))
    assert flow.dtype == np.float32 and flow.shape == src.shape[:2] + (2,)
    inner = (slice(16, -16), slice(16, -16))
    med = np.median(flow[inner], axis=(0, 1))
    assert abs(med[0] - SHIFT[0]) < 0.15 and abs(med[1] - SHIFT[1]) < 0.15, med
    # src(x) ~ dst(x + flow(x)): warping dst back must reproduce src away from the borders.
    back = warp(dst, flow)
    assert back.dtype == np.uint8 and back.shape == src.shape
    assert psnr(back[inner], src[inner]) > 30.0
    assert psnr(back[inner], src[inner]) > psnr(dst[inner], src[inner]) + 10.0


def test_flow_is_deterministic_and_estimators_agree(big_frames):
    a, b = to_gray(big_frames[2]), to_gray(big_frames[3])
    est = FlowEstimator("dis", "fast")
    first = est.flow(a, b)
    est.flow(b, a)  # an unrelated call in between must not leak into the next result
    assert np.array_equal(first, est.flow(a, b))
    assert np.array_equal(first, FlowEstimator("dis", "fast").flow(a, b))


def test_unknown_method_or_preset_is_a_user_error():
    with pytest.raises(MpistyleError, match="flow method"):
        FlowEstimator("raft")
    with pytest.raises(MpistyleError, match="preset"):
        FlowEstimator("dis", "slow")


def test_flow_of_different_sizes_is_a_user_error():
    est = FlowEstimator()
    with pytest.raises(MpistyleError, match="different sizes"):
        est.flow(np.zeros((32, 32), np.uint8), np.zeros((32, 40), np.uint8))


def test_to_gray():
    frames = read_all(str(CARPHONE))
    g = to_gray(frames[0])
    assert g.dtype == np.uint8 and g.shape == frames.shape[1:3]
    assert np.array_equal(to_gray(g), g)
    # luma weights: pure green is brighter than pure blue
    px = np.array([[[0, 255, 0], [0, 0, 255]]], np.uint8)
    lum = to_gray(px)
    assert lum[0, 0] > lum[0, 1]


def test_warp_exact_cases(textured):
    img = textured
    zero = np.zeros(img.shape[:2] + (2,), np.float32)
    assert np.array_equal(warp(img, zero), img)
    flow = zero.copy()
    flow[..., 0] = 5.0  # out(x) = img(x + 5): content moves left by 5 px
    out = warp(img, flow)
    assert np.array_equal(out[:, :-5], img[:, 5:])
    # border replicate: samples beyond the right edge take the last column
    assert np.array_equal(out[:, -5:], np.repeat(img[:, -1:], 5, axis=1))
    # float32 images (e.g. flow fields) keep their dtype and channel count
    f = np.random.default_rng(0).normal(size=img.shape[:2] + (2,)).astype(np.float32)
    wf = warp(f, flow)
    assert wf.dtype == np.float32 and wf.shape == f.shape
    assert np.allclose(wf[:, :-5], f[:, 5:])
    one = warp(f[..., :1].copy(), flow)
    assert one.shape == f[..., :1].shape


def test_mask_exact_translation():
    h, w = 40, 60
    fw = np.zeros((h, w, 2), np.float32)
    fw[..., 0] = 5.0
    bw = -fw
    m = certainty_mask(fw, bw)
    assert m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
    assert m[:, : w - 5].min() == 1.0  # x + 5 <= w - 1: consistent, stays in the frame
    assert m[:, w - 4:].max() == 0.0  # x + 5 leaves the frame
    # an inconsistent backward flow (should be -5, is +5) is rejected everywhere
    assert certainty_mask(fw, fw).max() == 0.0
    # a small inconsistency is tolerated (|w + w^|^2 <= 0.01(...) + 0.5)
    assert certainty_mask(fw, bw + 0.4)[:, : w - 6].min() == 1.0


def test_mask_motion_boundaries():
    h, w = 40, 60
    fw = np.zeros((h, w, 2), np.float32)
    fw[:, 30:, 1] = 3.0  # right half moves down: a motion boundary at x = 29.5
    bw = np.zeros_like(fw)
    bw[:, 30:, 1] = -3.0  # consistent except where x+w lands across the edge (none: motion is vertical)
    with_mb = certainty_mask(fw, bw, motion_boundaries=True)
    without = certainty_mask(fw, bw, motion_boundaries=False)
    assert without[: h - 4, 28:32].min() == 1.0
    assert with_mb[: h - 4, 29:31].max() == 0.0
    assert with_mb[: h - 4, :27].min() == 1.0 and with_mb[: h - 4, 33:].min() == 1.0


def test_estimated_mask_on_real_translation(textured):
    src, dst = to_gray(textured), to_gray(_shift(textured, 6.0, 0.0))
    est = FlowEstimator("dis", "fast")
    fw, bw = est.flow(src, dst), est.flow(dst, src)
    m = certainty_mask(fw, bw)
    assert m[8:-8, 8:-14].mean() > 0.95  # interior of a pure translation is trusted
    assert m[:, -5:].mean() < 0.05  # these pixels move out of the frame


def test_occluding_square_disocclusion_is_masked(textured):
    """A textured square moves 8 px right over a static real background."""
    bg = to_gray(textured)
    patch = to_gray(read_all(str(CARPHONE))[0][30:90, 50:110])

    def frame(x0: int) -> np.ndarray:
        f = bg.copy()
        f[50:110, x0:x0 + 60] = patch
        return f

    prev, cur = frame(60), frame(68)
    pf = pair_flow(FlowEstimator("dis", "fast"), prev, cur)
    # Columns 60..67 of the current frame show background the square covered before: no source.
    assert pf.mask[55:105, 60:68].mean() < 0.2
    assert pf.mask[60:100, 80:120].mean() > 0.9  # inside the moving square
    assert pf.mask[5:40, 10:230].mean() > 0.8  # static background away from the square
    assert np.allclose(np.median(pf.flow_back[60:100, 80:120], axis=(0, 1)), (-8.0, 0.0), atol=0.3)


def test_pair_flow_on_real_frames(big_frames):
    est = FlowEstimator()
    prev, cur = big_frames[3], big_frames[5]
    pf = pair_flow(est, to_gray(prev), to_gray(cur))
    assert pf.flow_back.shape == prev.shape[:2] + (2,) and pf.mask.dtype == np.float32
    assert set(np.unique(pf.mask)) <= {0.0, 1.0}
    assert 0.6 < pf.confidence <= 1.0 and pf.confidence == pytest.approx(float(pf.mask.mean()))
    # flow_back carries the previous frame onto the current one where the mask trusts it
    warped = warp(prev, pf.flow_back)
    keep = pf.mask > 0
    err_warped = np.abs(warped.astype(int) - cur)[keep].mean()
    err_still = np.abs(prev.astype(int) - cur)[keep].mean()
    assert err_warped < 0.7 * err_still
    # the default mask is the forward-backward check itself (issue 30); a min-filter only removes pixels
    assert np.array_equal(pf.mask, certainty_mask(pf.flow_back, est.flow(to_gray(prev), to_gray(cur))))
    eroded = pair_flow(est, to_gray(prev), to_gray(cur), min_filter=7)
    assert np.all(eroded.mask <= pf.mask) and pf.confidence > eroded.confidence


def test_confidence_collapses_across_a_cut():
    a = read_all(str(BBB))[5]
    b = cv2.resize(read_all(str(CARPHONE))[5], (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
    pf = pair_flow(FlowEstimator(), to_gray(a), to_gray(b))
    assert pf.confidence < 0.15


def test_tiny_and_strided_frames(big_frames):
    gray = to_gray(big_frames[0])
    tiny = np.ascontiguousarray(gray[100:106, 200:210])  # smaller than DIS's patches: padded internally
    for method in ("dis", "farneback"):
        f = FlowEstimator(method).flow(tiny, tiny)
        assert f.shape == (6, 10, 2) and np.abs(f).max() < 0.5
    view = gray[::2, ::2]  # a strided view, as a caller might pass
    est = FlowEstimator()
    assert np.array_equal(est.flow(view, view), est.flow(np.ascontiguousarray(view), np.ascontiguousarray(view)))
