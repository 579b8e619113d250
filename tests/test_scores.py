"""Picture scores of issue 28 (texture, palette, structure, grid) and the grid loss: real and synthetic
frames with known answers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from mpistyle.training import scores
from mpistyle.training.content import load_image, read_video_frames
from mpistyle.training.losses import grid_loss

from .conftest import DATA


def _photo(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth random 'photograph' (no period-4 content to speak of)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _with_grid(img: np.ndarray, amp: float) -> np.ndarray:
    pattern = np.array([[1, -1, 1, -1], [-1, 1, -1, 1], [1, 1, -1, -1], [-1, -1, 1, 1]], np.float32)
    h, w = img.shape[:2]
    tile = np.tile(pattern, (h // 4, w // 4))[..., None] * amp
    return np.clip(img.astype(np.float32) + tile * np.array([1.0, 0.0, 0.0]), 0, 255).round().astype(np.uint8)


def test_grid_levels_finds_a_period_4_pattern():
    img = _photo()
    assert scores.grid_levels(img) < 0.5
    # A +-5 pattern (RMS 5) on the red channel; the 5x5 box of the high-pass lets about all of it through.
    assert scores.grid_levels(_with_grid(img, 5.0)) == pytest.approx(5.0, abs=1.2)
    assert scores.grid_levels(_with_grid(img, 10.0)) > 1.8 * scores.grid_levels(_with_grid(img, 5.0))


def test_structure_kept():
    img = _photo()
    assert scores.structure_kept(img, img) == pytest.approx(1.0)
    assert scores.structure_kept(_with_grid(img, 5.0), img) > 0.9  # a fine grid hardly moves the edges
    assert scores.structure_kept(_photo(seed=1), img) < 0.5
    assert scores.structure_kept(np.full_like(img, 7), img) == 0.0
    with pytest.raises(ValueError):
        scores.structure_kept(img[:64], img)


@pytest.fixture(scope="module")
def bunny_and_painting():
    frame = cv2.resize(read_video_frames(str(DATA / "bbb_640x272.mp4"))[10], (320, 136), interpolation=cv2.INTER_AREA)
    painting = load_image(str(scores.__file__).replace("training/scores.py", "styles/starry-night.jpg"))
    return frame, painting, scores.Painting.of(painting)


def test_texture_and_palette_closeness_run_from_the_source_to_the_painting(bunny_and_painting):
    frame, painting, stats = bunny_and_painting
    assert scores.texture_closeness(frame, frame, stats) == pytest.approx(0.0, abs=1e-9)
    assert scores.palette_closeness(frame, frame, stats) == pytest.approx(0.0, abs=1e-9)
    # The painting itself, cut to the frame's size, is near 1 on both.
    h, w = frame.shape[:2]
    as_frame = cv2.resize(painting, (w, h), interpolation=cv2.INTER_AREA)
    assert scores.texture_closeness(as_frame, frame, stats) > 0.4  # 0.52: squeezed to the frame, not 512 px
    assert scores.palette_closeness(as_frame, frame, stats) > 0.8
    # A darkened frame (the 0.4 styles' fault) moves away from the painting's palette; a frame blended
    # partly made of the painting lands between the source and the painting.
    dark = (frame.astype(np.float32) * 0.3).astype(np.uint8)
    assert scores.palette_closeness(dark, frame, stats) < 0.0
    # Half of the pixels the painting's, half the frame's: a colour mixture about halfway (a pixel average
    # is not: it pulls every colour to the middle).
    half = frame.copy()
    half[:, : w // 2] = as_frame[:, : w // 2]
    assert 0.2 < scores.palette_closeness(half, frame, stats) < scores.palette_closeness(as_frame, frame, stats)
    s = scores.style_scores([as_frame, frame], [frame, frame], stats)
    assert set(s) == {"texture", "palette", "structure", "grid"}
    assert s["palette"] == pytest.approx(scores.palette_closeness(as_frame, frame, stats) / 2)


def test_bars_and_shortfall():
    good = {"texture": 0.5, "palette": 0.3, "structure": 0.75, "grid": 0.8}
    assert all(scores.passes(good).values()) and scores.shortfall(good) == 0.0
    bad = {"texture": 0.35, "palette": 0.3, "structure": 0.65, "grid": 1.5}
    assert scores.passes(bad) == {"texture": False, "palette": True, "structure": False, "grid": False}
    assert scores.shortfall(bad) == pytest.approx(1.0 + 1.0 + 1.0)


def test_grid_loss_sees_the_pattern_and_its_gradient_removes_it():
    img = torch.from_numpy(_photo(128, 128)).permute(2, 0, 1)[None].float()
    gridded = torch.from_numpy(_with_grid(_photo(128, 128), 6.0)).permute(2, 0, 1)[None].float()
    clean, dirty = float(grid_loss(img)), float(grid_loss(gridded))
    assert dirty > 20 * max(clean, 1.0)
    x = gridded.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=10.0)
    for _ in range(30):
        opt.zero_grad()
        grid_loss(x).backward()
        opt.step()
    assert float(grid_loss(x)) < 0.1 * dirty
    assert float(grid_loss(torch.zeros(1, 3, 16, 16))) == 0.0  # smaller than a tile: nothing to measure


def test_engine_median3_is_opencvs_and_a_model_file_asks_for_it(tmp_path):
    from mpistyle import engine, models
    from mpistyle.nets import TransformerNet

    img = _with_grid(_photo(), 6.0)
    t = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    got = engine.median3(t)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, cv2.medianBlur(img, 3))
    assert np.array_equal(engine.median3(t.float())[0].permute(1, 2, 0).numpy().astype(np.uint8), got)
    torch.manual_seed(0)
    net = TransformerNet()
    for post in ("none", "median3"):
        models.save_model(net, str(tmp_path / f"{post}.pth"), {"postfilter": post}, half=False)
    plain, filtered = models.load_model(str(tmp_path / "none.pth")), models.load_model(str(tmp_path / "median3.pth"))
    assert plain.postfilter == "none" and filtered.postfilter == "median3"
    frames = _photo(64, 96)[None]
    a = engine.Stylizer(plain, torch.device("cpu"), "fp32")(frames)
    b = engine.Stylizer(filtered, torch.device("cpu"), "fp32")(frames)
    assert np.array_equal(b[0], cv2.medianBlur(np.ascontiguousarray(a[0]), 3))
    again = TransformerNet()
    again.load_state_dict(torch.load(tmp_path / "median3.pth", weights_only=True))  # still a plain state dict


def test_checkpoint_selection_prefers_passing_then_the_look():
    near = {"texture": 0.44, "palette": 0.5, "structure": 0.75, "grid": 0.5}
    passing = {"texture": 0.46, "palette": 0.3, "structure": 0.71, "grid": 0.5}
    richer = {"texture": 0.5, "palette": 0.4, "structure": 0.72, "grid": 0.5}
    for rec in (near, passing, richer):
        rec["shortfall"] = scores.shortfall(rec)
    assert scores.better(near, None) and scores.better(near, {"structure": 0.9, "psnr": 14.0})
    assert scores.better(passing, near) and not scores.better(near, passing)
    assert scores.better(richer, passing) and not scores.better(passing, richer)
