"""Picture scores (structure, period-4 grid, PSNR) and the grid loss: synthetic frames with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpistyle.training import scores
from mpistyle.training.losses import grid_loss


def _photo(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth random 'photograph' (no period-4 content to speak of)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _with_grid(img: np.ndarray, amp: float) -> np.ndarray:
    pattern = np.array([[1, -1, 1, -1], [-1, 1, -1, 1], [1, 1, -1, -1], [-1, -1, 1, 1]], np.float32)
    h, w = img.shape[:2]
    tile = np.tile(pattern, (h // 4, w // 4))[..., None] * amp
    return np.clip(img.astype(np.float32) + tile * np.array([1.0, 0.0, 0.0]), 0, 255).round().astype(np.uint8)


def test_grid_amplitude_finds_a_period_4_pattern_of_known_rms():
    img = _photo()
    assert scores.grid_amplitude(img) < 0.5
    # A +-5 pattern on the red channel has RMS 5.
    assert scores.grid_amplitude(_with_grid(img, 5.0)) == pytest.approx(5.0, abs=0.6)


def test_structure_and_psnr():
    img = _photo()
    assert scores.structure(img, img) == pytest.approx(1.0)
    assert scores.structure(_with_grid(img, 5.0), img) > 0.9  # a fine grid hardly moves the edges
    assert scores.structure(_photo(seed=1), img) < 0.5
    assert scores.psnr(img, img) == float("inf")
    s = scores.picture_scores([img, _photo(seed=1)], [img, img])
    assert set(s) == {"structure", "grid", "psnr"}
    assert scores.passes({"structure": 0.75, "grid": 0.8, "psnr": 14.0}) == {
        "structure": True, "grid": True, "psnr": True}
    assert scores.shortfall({"structure": 0.75, "grid": 0.8, "psnr": 14.0}) == 0.0
    assert scores.shortfall({"structure": 0.6, "grid": 2.0, "psnr": 14.0}) == pytest.approx(2.0)


def test_median3_halves_a_grid_and_keeps_the_picture():
    img = _photo()
    g = _with_grid(img, 6.0)
    m = scores.median3(g)
    assert m.shape == g.shape and m.dtype == np.uint8
    assert scores.grid_amplitude(m) < 0.6 * scores.grid_amplitude(g)
    assert scores.structure(m, img) > 0.95


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
    assert np.array_equal(got, scores.median3(img))
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
    assert np.array_equal(b[0], scores.median3(a[0]))
    again = TransformerNet()
    again.load_state_dict(torch.load(tmp_path / "median3.pth", weights_only=True))  # still a plain state dict
