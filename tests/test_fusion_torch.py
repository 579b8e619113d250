"""The torch fusion kernels against the OpenCV/NumPy reference, on real frames and flows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mpistyle.temporal.chains import TemporalFuser, TemporalSettings
from mpistyle.temporal.flow import FlowEstimator, certainty_mask, erode_mask, pair_flow, to_gray, warp
from mpistyle.temporal.kernels import FusionBackend, NumpyFusion, fuse, make_backend
from mpistyle.temporal.kernels_torch import TorchFusion

from .conftest import DATA

BIG = DATA / "bbb_640x272.mp4"
# Both devices are always collected: without a GPU the CUDA cases are reported as skipped, never left out.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device (bin/gpu-check runs it)"))]


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    from mpistyle.io.media import iter_frames

    return list(itertools.islice(iter_frames(str(BIG)), 6))


@pytest.fixture(scope="module")
def flows(frames) -> list[tuple[np.ndarray, np.ndarray]]:
    """(flow t -> t-1, flow t-1 -> t) for each consecutive pair: real DIS flows with real occlusions."""
    est = FlowEstimator()
    return [(est.flow(to_gray(frames[t]), to_gray(frames[t - 1])), est.flow(to_gray(frames[t - 1]), to_gray(frames[t])))
            for t in range(1, len(frames))]


def _stylized(frames: list[np.ndarray]) -> list[np.ndarray]:
    """A flickery per-frame 'stylization' of real frames: a colour gain and offset of its own per frame."""
    rng = np.random.default_rng(3)
    out = []
    for f in frames:
        gain, offset = rng.uniform(0.85, 1.15, 3), rng.uniform(-12, 12, 3)
        out.append(np.clip(f * gain + offset, 0, 255).astype(np.uint8)[:, ::-1].copy())
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_warp_uint8_matches_remap_on_real_flows(frames, flows, device):
    tf = TorchFusion(device)
    worst, differing = 0, 0
    for t, (back, _) in enumerate(flows, start=1):
        ref = warp(frames[t - 1], back)
        got = tf.to_host(tf.warp(tf.asarray(frames[t - 1]), tf.asarray(back)))
        assert got.dtype == np.uint8 and got.shape == ref.shape
        diff = np.abs(got.astype(int) - ref)
        worst, differing = max(worst, int(diff.max())), differing + int((diff > 0).sum())
    assert worst <= 1
    assert differing <= 1e-4 * frames[0].size * len(flows)  # OpenCV 5: float32 lerps, the same bits


@pytest.mark.parametrize("device", DEVICES)
def test_warp_float_matches_remap_bit_for_bit(flows, device):
    tf = TorchFusion(device)
    for back, fwd in flows:
        ref = warp(fwd, back)  # what certainty_mask samples: OpenCV's 1/32-px positions
        got = tf.to_host(tf.warp(tf.asarray(fwd), tf.asarray(back)))
        assert got.dtype == np.float32 and np.array_equal(got, ref)
    one = np.ascontiguousarray(flows[0][1][..., :1])
    assert tf.to_host(tf.warp(tf.asarray(one), tf.asarray(flows[0][0]))).shape == one.shape


def test_warp_exact_cases(frames):
    tf = TorchFusion()
    img = np.ascontiguousarray(frames[0][40:200, 300:540])
    zero = np.zeros(img.shape[:2] + (2,), np.float32)
    assert np.array_equal(tf.to_host(tf.warp(tf.asarray(img), tf.asarray(zero))), img)
    flow = zero.copy()
    flow[..., 0], flow[..., 1] = 5.0, -2.5  # beyond the right and top edges: replicated
    flow[:40, :60] = (-300.25, 900.75)  # far outside: the corner pixel
    assert np.array_equal(tf.to_host(tf.warp(tf.asarray(img), tf.asarray(flow))), warp(img, flow))
    with pytest.raises(ValueError, match="does not fit"):
        tf.warp(tf.asarray(img), tf.asarray(flow[:10]))
    with pytest.raises(ValueError, match="uint8 and float32"):
        tf.warp(tf.asarray(img.astype(np.int32)), tf.asarray(flow))


@pytest.mark.parametrize("device", DEVICES)
def test_mask_erosion_and_confidence_match_pair_flow(frames, flows, device):
    tf = TorchFusion(device)
    est = FlowEstimator()
    for t, (back, fwd) in enumerate(flows, start=1):
        for mb in (True, False):
            ref = certainty_mask(back, fwd, motion_boundaries=mb)
            got = tf.to_host(tf.certainty_mask(tf.asarray(back), tf.asarray(fwd), motion_boundaries=mb))
            assert got.dtype == np.float32 and np.array_equal(got, ref)
            assert 0.3 < ref.mean() < 1.0  # real motion: both trusted and rejected pixels
        ref_pair = pair_flow(est, to_gray(frames[t - 1]), to_gray(frames[t]))
        pair = tf.pair_from_flows(tf.asarray(back), tf.asarray(fwd))
        assert np.array_equal(tf.to_host(pair.mask), ref_pair.mask)
        assert float(pair.confidence) == ref_pair.confidence
        up = tf.upload_pair(ref_pair)
        assert up.confidence == ref_pair.confidence and torch.equal(up.mask, pair.mask)


def test_erode_matches_cv2_for_any_width():
    rng = np.random.default_rng(0)
    mask = (rng.random((37, 53)) > 0.1).astype(np.float32)
    tf = TorchFusion()
    for width in (1, 2, 3, 4, 7, 9):
        got = tf.to_host(tf.erode(tf.asarray(mask), width))
        ref = erode_mask(mask, width)
        assert np.array_equal(got, ref), width
    assert tf.to_host(tf.erode(tf.asarray(mask), 7)).mean() < 0.5 < mask.mean()  # erosion did something


def test_mask_exact_translation_and_motion_boundary():
    h, w = 40, 60
    fw = np.zeros((h, w, 2), np.float32)
    fw[..., 0] = 5.0
    tf = TorchFusion()
    m = tf.to_host(tf.certainty_mask(tf.asarray(fw), tf.asarray(-fw)))
    assert m[:, : w - 5].min() == 1.0 and m[:, w - 4:].max() == 0.0
    assert tf.to_host(tf.certainty_mask(tf.asarray(fw), tf.asarray(fw))).max() == 0.0
    mb = np.zeros((h, w, 2), np.float32)
    mb[:, 30:, 1] = 3.0
    with_mb = tf.to_host(tf.certainty_mask(tf.asarray(mb), tf.asarray(-mb)))
    assert with_mb[: h - 4, 29:31].max() == 0.0 and with_mb[: h - 4, :27].min() == 1.0
    with pytest.raises(ValueError, match="do not match"):
        tf.certainty_mask(tf.asarray(fw), tf.asarray(fw[:, :10]))


@pytest.mark.parametrize("device", DEVICES)
def test_fuse_matches_temporal_fuse(frames, flows, device):
    tf, npf = TorchFusion(device), NumpyFusion()
    sty = _stylized(frames)
    for t, (back, fwd) in enumerate(flows, start=1):
        mask = erode_mask(certainty_mask(back, fwd))
        warped = warp(sty[t - 1], back)
        for strength in (0.0, 0.3, 0.7, 0.95):
            ref = fuse(sty[t], warped, mask, strength)
            got = tf.to_host(tf.fuse(tf.asarray(sty[t]), tf.asarray(warped), tf.asarray(mask), strength))
            assert np.array_equal(got, ref)
            assert np.array_equal(npf.fuse(sty[t], warped, mask, strength), ref)
            blended = npf.blend(sty[t], warped, mask, strength)
            assert np.array_equal(np.clip(np.rint(blended), 0, 255).astype(np.uint8), ref)
            assert np.array_equal(tf.to_host(tf.blend(tf.asarray(sty[t]), tf.asarray(warped), tf.asarray(mask),
                                                      strength)), blended)
    with pytest.raises(ValueError, match="shapes differ"):
        tf.fuse(tf.asarray(sty[0]), tf.asarray(sty[1][:10]), tf.asarray(mask), 0.5)


def _torch_chain(tf: TorchFusion, frames: list[np.ndarray], sty: list[np.ndarray], pairs: list,
                 settings: TemporalSettings) -> list[np.ndarray]:
    """The recursion of TemporalFuser.step, with every per-frame kernel on the torch backend."""
    prev = None
    outs = []
    for t in range(len(frames)):
        s = tf.asarray(sty[t])
        if prev is None or pairs[t - 1].confidence < settings.scene_cut:
            out = s
        else:
            p = tf.upload_pair(pairs[t - 1])
            out = tf.fuse(s, tf.warp(prev, p.flow_back, settings.warp_interpolation), p.mask, settings.strength,
                          settings.keep_detail)
        prev = out
        outs.append(tf.to_host(out))
    return outs


@pytest.mark.parametrize("device", DEVICES)
def test_fused_sequence_matches_the_numpy_recursion_and_is_repeatable(frames, device):
    settings = TemporalSettings()
    sty = _stylized(frames)
    est = FlowEstimator()
    pairs = [pair_flow(est, to_gray(frames[t - 1]), to_gray(frames[t])) for t in range(1, len(frames))]
    fuser = TemporalFuser(settings)
    ref = [fuser.step(f, s, pair=p) for f, s, p in zip(frames, sty, [None, *pairs], strict=True)]
    tf = TorchFusion(device)
    first = _torch_chain(tf, frames, sty, pairs, settings)
    second = _torch_chain(TorchFusion(device), frames, sty, pairs, settings)
    for a, b, r in zip(first, second, ref, strict=True):
        assert np.array_equal(a, b)  # bit-identical run to run
        _assert_nearly_the_same_bits(a, r)  # the bilinear warp and the detail step give the same bits
    assert any(np.abs(r.astype(int) - s).mean() > 2 for r, s in zip(ref[1:], sty[1:], strict=True))  # fusion acted


def test_fuse_gated_is_a_scene_cut_without_a_sync(frames, flows):
    tf = TorchFusion()
    sty = _stylized(frames)
    back, fwd = flows[0]
    pair = tf.pair_from_flows(tf.asarray(back), tf.asarray(fwd))
    s, warped = tf.asarray(sty[1]), tf.warp(tf.asarray(sty[0]), pair.flow_back)
    kept, cut = tf.fuse_gated(s, warped, pair.mask, pair.confidence, 0.7, scene_cut=1.0)
    assert bool(cut) and torch.equal(kept, s)
    fused, cut = tf.fuse_gated(s, warped, pair.mask, pair.confidence, 0.7, scene_cut=0.25)
    assert not bool(cut) and torch.equal(fused, tf.fuse(s, warped, pair.mask, 0.7)) and not torch.equal(fused, s)
    # float64 comparison, as the NumPy recursion: a threshold equal to the float32 confidence is no cut
    conf = float(pair.confidence)
    assert not bool(tf.fuse_gated(s, warped, pair.mask, pair.confidence, 0.7, scene_cut=conf)[1])


def test_backends_share_one_interface():
    assert isinstance(make_backend("numpy"), FusionBackend)
    tb = make_backend("torch", "cpu")
    assert isinstance(tb, FusionBackend) and tb.name == "torch"
    with pytest.raises(ValueError, match="unknown fusion backend"):
        make_backend("opencl")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the same tests run on CPU above)")
def test_cuda_gives_the_cpu_bits(frames, flows):
    cpu, gpu = TorchFusion("cpu"), TorchFusion("cuda")
    back, fwd = flows[0]
    pa = cpu.pair_from_flows(cpu.asarray(back), cpu.asarray(fwd))
    pb = gpu.pair_from_flows(gpu.asarray(back), gpu.asarray(fwd))
    assert pb.mask.device.type == "cuda" and np.array_equal(cpu.to_host(pa.mask), gpu.to_host(pb.mask))
    wa = cpu.to_host(cpu.warp(cpu.asarray(frames[0]), pa.flow_back))
    wb = gpu.to_host(gpu.warp(gpu.asarray(frames[0]), pb.flow_back))
    assert np.array_equal(wa, wb)


@pytest.mark.parametrize("texture", ["blend", "keep"])
def test_temporal_fuser_on_the_torch_backend_gives_the_reference_bits(texture: str) -> None:
    """TemporalFuser with anchored chains and a scene cut: the torch backend (as a GPU rank uses it, here on
    the CPU) returns exactly the frames of the NumPy/OpenCV reference, and the same state. With the texture
    kept (the default), OpenCV's bicubic warp rounds about one value in 300,000 the other way (its SIMD
    arithmetic), and the recursion carries that: the frames then agree within a few grey levels in a handful
    of pixels (a resume on another device type is refused anyway: the buffer records it)."""
    from mpistyle.io.media import read_all
    from mpistyle.partition import Anchors
    from mpistyle.temporal.kernels import make_backend

    big = read_all(str(BIG))[:6]
    cut = read_all(str(DATA / "carphone_clip.mp4"), size=(big.shape[2], big.shape[1]))[:4]
    frames = np.concatenate([big, cut])  # a scene cut at frame 6
    rng = np.random.default_rng(3)
    stylized = [np.clip(f.astype(np.int16) + rng.integers(-20, 21, f.shape), 0, 255).astype(np.uint8) for f in frames]
    settings = TemporalSettings(texture=texture)
    anchors = Anchors(every=4, lead=2)
    ref = TemporalFuser(settings, anchors=anchors)
    dev = TemporalFuser(settings, anchors=anchors, backend=make_backend("torch", "cpu"))
    for t, (src, sty) in enumerate(zip(frames, stylized, strict=True)):
        a, b = ref.step(src, sty, t=t), dev.step(src, sty, t=t)
        assert isinstance(b, np.ndarray) and b.dtype == np.uint8
        if texture == "blend":
            assert np.array_equal(a, b), t
        else:
            _assert_nearly_the_same_bits(a, b)
    if texture == "blend":
        assert np.array_equal(ref.state[1], dev.state[1])


def _assert_nearly_the_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    """The cubic warp's rare rounding differences, as the recursion carries them: few values, few levels."""
    diff = np.abs(a.astype(int) - b)
    assert diff.max() <= 4 and (diff > 0).sum() <= 1e-4 * diff.size, (diff.max(), (diff > 0).sum())


@pytest.mark.parametrize("device", DEVICES)
def test_cubic_warp_matches_opencv_on_real_flows(frames, flows, device):
    tf = TorchFusion(device)
    worst, differing = 0, 0
    for t, (back, _) in enumerate(flows, start=1):
        ref = warp(frames[t - 1], back, "cubic")
        got = tf.to_host(tf.warp(tf.asarray(frames[t - 1]), tf.asarray(back), "cubic"))
        assert got.dtype == np.uint8 and got.shape == ref.shape
        diff = np.abs(got.astype(int) - ref)
        worst, differing = max(worst, int(diff.max())), differing + int((diff > 0).sum())
    assert worst <= 1 and differing <= 1e-5 * frames[0].size * len(flows)
    # the bicubic warp is sharper than the bilinear one: more of the frame's detail survives
    sharpness = [np.abs(np.diff(warp(frames[0], flows[0][0], k).astype(np.float32), axis=1)).mean()
                 for k in ("linear", "cubic")]
    assert sharpness[1] > sharpness[0]
    with pytest.raises(ValueError, match="interpolation"):
        tf.warp(tf.asarray(frames[0]), tf.asarray(flows[0][0]), "lanczos")


@pytest.mark.parametrize("device", DEVICES)
def test_detail_kept_gives_the_reference_bits(frames, flows, device):
    """The detail step alone: exact window sums, the same float32 operations: the same bits as NumPy."""
    from mpistyle.temporal.detail import keep_detail

    tf = TorchFusion(device)
    sty = _stylized(frames)
    for t, (back, fwd) in enumerate(flows, start=1):
        mask = certainty_mask(back, fwd)
        warped = warp(sty[t - 1], back, "cubic")
        ref = fuse(sty[t], warped, mask, 0.7, True)
        got = tf.to_host(tf.fuse(tf.asarray(sty[t]), tf.asarray(warped), tf.asarray(mask), 0.7, True))
        assert np.array_equal(got, ref)
        plain = fuse(sty[t], warped, mask, 0.7)
        assert np.array_equal(keep_detail(plain, sty[t], mask, 0.7), ref)
        assert np.array_equal(ref[mask == 0], sty[t][mask == 0])  # rejected flow: the stylization exactly
        assert (ref != plain).any()
