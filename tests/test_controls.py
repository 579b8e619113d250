"""The look controls (issue 29) as pure functions, on real frames and the bundled default model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from mpistyle import controls as C
from mpistyle.cli import _stylize_options, build_parser
from mpistyle.errors import MpistyleError
from mpistyle.io.decode import iter_video_frames

from .conftest import DATA

S_VALUES = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """Two Big Buck Bunny frames, 2 s in, at 224x96 (the clip's aspect)."""
    it = iter_video_frames(str(DATA / "bbb_640x272.mp4"), size=(224, 96), start=50)
    out = np.stack([next(it), next(it)])
    it.close()
    return out


@pytest.fixture(scope="module")
def stylizer():
    from mpistyle.engine import Stylizer
    from mpistyle.models import load_model, resolve_model

    return Stylizer(load_model(resolve_model(None), "cpu"), torch.device("cpu"), precision="fp32")


@pytest.fixture(scope="module")
def painting() -> np.ndarray:
    from mpistyle.models import DEFAULT_MODEL

    img = cv2.cvtColor(cv2.imread(str(DATA.parent.parent / "mpistyle" / "styles" / f"{DEFAULT_MODEL}.jpg")),
                       cv2.COLOR_BGR2RGB)
    scale = 512 / max(img.shape[:2])  # issue 28: the painting at 512 px on its long side
    return cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)


def _run(frames: np.ndarray, stylizer, controls: C.Controls) -> np.ndarray:
    with torch.inference_mode():
        return C.apply_controls(torch.from_numpy(frames), stylizer.forward_tensor, controls).numpy()


def _grams(img: np.ndarray, vgg) -> list[torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        feats = vgg(x)
    out = []
    for f in feats.values():
        f = f[0].reshape(f.shape[1], -1)
        out.append(f @ f.T / f.shape[1])
    return out


def _gram_distance(img: np.ndarray, target: list[torch.Tensor], vgg) -> float:
    return float(np.mean([float(torch.linalg.norm(a - b) / torch.linalg.norm(b))
                          for a, b in zip(_grams(img, vgg), target, strict=True)]))


def _edges(img: np.ndarray) -> np.ndarray:
    y = cv2.GaussianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32), (5, 5), 0)
    m = np.hypot(cv2.Sobel(y, cv2.CV_32F, 1, 0), cv2.Sobel(y, cv2.CV_32F, 0, 1))
    return (m - m.mean()) / (m.std() + 1e-6)


def _structure(out: np.ndarray, src: np.ndarray) -> float:
    return float((_edges(out) * _edges(src)).mean())


def test_style_strength_ends_are_source_and_stylized(frames, stylizer) -> None:
    plain = stylizer(frames)
    assert np.array_equal(_run(frames, stylizer, C.Controls(style_strength=0.0)), frames)
    assert np.array_equal(_run(frames, stylizer, C.Controls(style_strength=1.0)), plain)


def test_style_strength_is_monotonic_on_real_frames(frames, stylizer, painting) -> None:
    """Issue 28's texture closeness (VGG-19 Gram distance to the painting, relu1_1..relu5_1, as a ratio to
    the source's) rises strictly with S, the frame moves away from the source strictly, and the source's
    edges are not kept better. (A pixel blend fails the first: it dips below 0 at S = 0.25.)"""
    from mpistyle.training.losses import VGG19Features

    vgg = VGG19Features(("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"))
    target = _grams(painting, vgg)
    base = [_gram_distance(f, target, vgg) for f in frames]
    texture, away, kept = [], [], []
    for s in S_VALUES:
        out = _run(frames, stylizer, C.Controls(style_strength=s))
        texture.append(np.mean([1 - _gram_distance(o, target, vgg) / d for o, d in zip(out, base, strict=True)]))
        away.append(float(np.abs(out.astype(np.float32) - frames).mean()))
        kept.append(np.mean([_structure(o, f) for o, f in zip(out, frames, strict=True)]))
    assert all(b > a for a, b in zip(texture, texture[1:], strict=False)), texture
    assert all(b > a for a, b in zip(away, away[1:], strict=False)), away
    assert all(b <= a + 1e-6 for a, b in zip(kept, kept[1:], strict=False)), kept


def test_keep_colors_keeps_the_source_chroma(frames, stylizer) -> None:
    """OpenCV 8-bit CIELAB: mean |da*| and |db*| against the source at most 3; lightness from the style."""
    # (A per-channel clip of the out-of-gamut colours gave |db*| 4.6 on these frames.)
    stylized = stylizer(frames)
    out = _run(frames, stylizer, C.Controls(keep_colors=True))
    for o, s, y in zip(out, frames, stylized, strict=True):
        lab_o, lab_s, lab_y = (cv2.cvtColor(x, cv2.COLOR_RGB2LAB).astype(np.float32) for x in (o, s, y))
        assert np.abs(lab_o[..., 1] - lab_s[..., 1]).mean() <= 3.0
        assert np.abs(lab_o[..., 2] - lab_s[..., 2]).mean() <= 3.0
        # the lightness is the style's (moved toward the source's only where that chroma cannot have it)
        assert np.abs(lab_o[..., 0] - lab_y[..., 0]).mean() < 0.5 * np.abs(lab_o[..., 0] - lab_s[..., 0]).mean()


def test_lab_matches_opencv(frames) -> None:
    rgb = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    lab = C.rgb_to_lab(rgb).permute(0, 2, 3, 1).numpy()
    want = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2LAB) for f in frames]).astype(np.float32)
    # OpenCV's 8-bit path is a fixed-point approximation of the same formulas: close on average, a few
    # levels at most
    assert np.abs(lab - want).mean() <= 0.5
    assert np.abs(lab - want).max() <= 3.0
    back = C.lab_to_rgb(C.rgb_to_lab(rgb))
    assert (back - rgb).abs().max() <= 0.5


def test_stroke_scale_runs_the_network_small_and_restores_detail(frames) -> None:
    """With an identity 'network', K = 3 must give back the source closely: the guided restoration puts
    back the detail the small frame lost (much better than upscaling the small frame alone)."""
    seen = []

    def identity(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x

    out = _run(frames, type("Net", (), {"forward_tensor": staticmethod(identity)}),
               C.Controls(stroke_scale=3.0, stroke_detail="source"))
    assert out.shape == frames.shape
    assert seen == [(2, 32, 75, 3)]
    src = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    small = C.downscale(src, (32, 75))
    bilinear = C.upscale(small, (96, 224)).permute(0, 2, 3, 1).numpy()
    err_restored = np.abs(out.astype(np.float32) - frames).mean()
    err_bilinear = np.abs(bilinear - frames).mean()
    assert err_restored < 0.6 * err_bilinear, (err_restored, err_bilinear)


def test_painted_detail_takes_big_strokes_from_the_small_pass_and_fine_ones_from_the_full_pass(frames) -> None:
    """Two scales: the network runs at 1/K and at full size; below a Gaussian of sigma K the output is the
    small pass's (upscaled), above it the full pass's. A 'network' that paints a big stroke only at the small
    size and fine stripes only at full size shows both in the output."""
    seen = []

    def painter(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        y = x.permute(0, 3, 1, 2).float()
        if x.shape[1] == frames.shape[1]:  # full size: fine vertical stripes of period 2 over the source
            y = y + 40.0 * (torch.arange(y.shape[-1]) % 2 * 2 - 1).float()
        else:  # small: a bright left half (a 'big stroke')
            y = y + 60.0 * (torch.arange(y.shape[-1]) < y.shape[-1] // 2).float()
        return C.to_uint8(y)

    net = type("Net", (), {"forward_tensor": staticmethod(painter)})
    out = _run(frames, net, C.Controls(stroke_scale=3.0))
    assert sorted(seen) == [(2, 32, 75, 3), (2, 96, 224, 3)]
    diff = out.astype(np.float32) - frames
    # the big stroke: the left half brighter than the right (the full pass has no such step)
    assert diff[:, :, 20:90].mean() - diff[:, :, 134:204].mean() > 40
    # the fine stripes: the full pass's period-2 detail survives (the small pass cannot carry it)
    assert np.abs(np.diff(diff[:, :, 20:204].mean(axis=(0, 1, 3)))).mean() > 40
    # with the source's detail the network runs at 1/K only, and no stripes appear
    seen.clear()
    src_out = _run(frames, net, C.Controls(stroke_scale=3.0, stroke_detail="source"))
    assert seen == [(2, 32, 75, 3)]
    assert np.abs(np.diff((src_out.astype(np.float32) - frames)[:, :, 20:204].mean(axis=(0, 1, 3)))).mean() < 10


@pytest.mark.parametrize("detail", C.STROKE_DETAILS)
def test_stroke_scale_gives_the_same_bits_with_any_thread_count(frames, stylizer, detail) -> None:
    """N ranks run with fewer threads each than 1 rank: the controls' result must not depend on it."""
    controls = C.Controls(stroke_scale=2.0, stroke_detail=detail, keep_colors=True, style_strength=0.6)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(_run(frames, stylizer, controls))
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(outs[0], outs[1])


def test_the_cli_and_the_options_offer_the_controls_stroke_details() -> None:
    """cli.py spells the choices out (it must not import torch to build the parser): kept in step here."""
    from mpistyle.stylize.options import StylizeOptions

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["stylize"]
    action = next(a for a in sub._actions if a.dest == "stroke_detail")
    assert tuple(action.choices) == C.STROKE_DETAILS and action.default == C.STROKE_DETAIL
    assert StylizeOptions(input="in.mp4", output="out.mp4").stroke_detail == C.STROKE_DETAIL


def test_network_sizes_for_each_detail() -> None:
    assert C.Controls().network_sizes(1080, 1920) == [(1080, 1920)]
    assert C.Controls(stroke_scale=3.0).network_sizes(1080, 1920) == [(1080, 1920), (360, 640)]
    assert C.Controls(stroke_scale=3.0, stroke_detail="source").network_sizes(1080, 1920) == [(360, 640)]


def test_gaussian_blur_matches_opencv(frames) -> None:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    got = C.gaussian_blur(x, 3.0).permute(0, 2, 3, 1).numpy()
    want = np.stack([cv2.GaussianBlur(f.astype(np.float32), (19, 19), 3.0, borderType=cv2.BORDER_REFLECT_101)
                     for f in frames])
    assert np.abs(got - want).max() < 0.01


def test_stroke_scale_auto() -> None:
    assert C.resolve_stroke_scale("auto", 360, 640) == 1.0
    assert C.resolve_stroke_scale("auto", 272, 640) == 1.0
    assert C.resolve_stroke_scale("auto", 1080, 1920) == 3.0
    assert C.resolve_stroke_scale("auto", 2160, 3840) == 6.0
    assert C.resolve_stroke_scale(2.5, 2160, 3840) == 2.5
    assert C.network_size(1080, 1920, 3.0) == (360, 640)


@pytest.mark.parametrize("bad", ["-0.1", "1.5", "nan", "strong"])
def test_bad_style_strength_is_refused(bad) -> None:
    with pytest.raises(ValueError):
        C.parse_style_strength(bad)


@pytest.mark.parametrize("bad", ["0.5", "0", "big", "100"])
def test_bad_stroke_scale_is_refused(bad) -> None:
    with pytest.raises(ValueError):
        C.parse_stroke_scale(bad)


def test_deprecated_strength_alias_warns_in_one_line(capsys) -> None:
    parser = build_parser()
    args = parser.parse_args(["stylize", "in.mp4", "-o", "out.mp4", "--strength", "0.4"])
    opts = _stylize_options(args)
    assert opts.temporal.strength == 0.4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--strength is deprecated" in err[0] and "--temporal-strength" in err[0]
    args = parser.parse_args(["stylize", "in.mp4", "-o", "out.mp4", "--temporal-strength", "0.4"])
    assert _stylize_options(args).temporal.strength == 0.4
    assert capsys.readouterr().err == ""
    args = parser.parse_args(["stylize", "in.mp4", "-o", "out.mp4", "--strength", "0.4", "--temporal-strength", "0.5"])
    with pytest.raises(MpistyleError, match="deprecated name of --temporal-strength"):
        _stylize_options(args)


def test_help_explains_each_control() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["stylize"]
    text = " ".join(sub.format_help().split())
    for flag in ("--style-strength S", "--keep-colors", "--stroke-scale K|auto", "--stroke-detail",
                 "a second, full-size network pass", "--temporal-strength", "deprecated alias of --temporal-strength"):
        assert flag in text, flag


def test_a_compiled_network_takes_the_full_size_and_the_small_pass_runs_eagerly(frames, stylizer) -> None:
    """Painted detail runs the network at two sizes; the compiled one is for the largest (run.py sizes the
    batch and the compilation by Controls.network_sizes), and the 1/K pass goes to the eager network."""
    import copy

    from mpistyle.engine import ControlledStylizer

    st = copy.copy(stylizer)  # the module's stylizer stays uncompiled
    calls = []

    def fake_compiled(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return stylizer.framenet(x)

    controls = C.Controls(stroke_scale=2.0)
    (h, w), small = controls.network_sizes(frames.shape[1], frames.shape[2])
    st.use_compiled(fake_compiled, (len(frames), h, w, 3))
    out = ControlledStylizer(st, controls)(frames)
    assert calls == [(len(frames), h, w, 3)]  # only the full-size pass went to the compiled network
    assert np.array_equal(out, _run(frames, stylizer, controls))
    assert small == (48, 112)
