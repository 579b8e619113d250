"""Perceptual and temporal losses, and the one-way import structure."""

from __future__ import annotations

import ast
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mpistyle.errors import MpistyleError
from mpistyle.training import losses

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "tests" / "data" / "carphone_clip.mp4"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """A striped 'painting' and a smooth content photo (synthetic, so the test needs no data)."""
    d = tmp_path_factory.mktemp("img")
    yy, xx = np.mgrid[0:48, 0:64].astype(np.float32)
    style = np.stack(
        [127 + 127 * np.sin(xx / 2.0 + yy / 3.0), 127 + 120 * np.cos(yy / 1.5), np.full_like(xx, 40.0)],
        axis=-1,
    )
    paths = {"style": str(d / "style.png"), "c0": str(d / "c0.png")}
    cv2.imwrite(paths["style"], np.clip(style, 0, 255).astype(np.uint8)[..., ::-1])
    small = np.random.default_rng(0).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    cv2.imwrite(paths["c0"], cv2.resize(small, (80, 60), interpolation=cv2.INTER_CUBIC))
    return paths


def test_imports_run_one_way():
    """The modules train runs on never import it (lazily either): train imports them, not the reverse."""
    # Lazy imports inside functions count too: read every import statement.
    for name in ("training/losses.py", "training/content.py", "training/scores.py", "training/quality.py",
                 "training/reference.py", "training/recipe.py", "training/parallel.py", "models.py", "nets.py",
                 "engine.py"):
        tree = ast.parse((ROOT / "mpistyle" / name).read_text())
        package = ["mpistyle", *Path(name).parent.parts]  # what a relative import (level 1) starts from
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom):
                base = ".".join(package[:len(package) - n.level + 1]) if n.level else ""
                pkg = ".".join(part for part in (base, n.module) if part)
                imported |= {pkg} | {f"{pkg}.{a.name}" for a in n.names}
        assert "mpistyle.training.train" not in imported, name


def test_vgg_caffe_preprocessing_and_truncation():
    vgg = losses.VGG19Features(["relu1_2"])
    convs = [m for m in vgg.body if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2  # stops at the deepest requested layer
    rgb = torch.zeros(1, 3, 4, 4)
    rgb[:, 0] = 200.0  # red
    out = vgg(rgb)
    assert set(out) == {"relu1_2"} and out["relu1_2"].shape == (1, 64, 4, 4)
    # The first conv must see BGR minus the caffe means: recompute it by hand.
    bgr = torch.zeros(1, 3, 4, 4)
    bgr[:, 2] = 200.0
    bgr -= torch.tensor(losses.CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    first = vgg.body[1](vgg.body[0](rgb.flip(1) - vgg.mean))
    assert torch.allclose(first, torch.relu(convs[0](bgr)), atol=1e-4)
    assert not any(p.requires_grad for p in vgg.parameters())
    with pytest.raises(MpistyleError, match="unknown VGG-19 layer"):
        losses.VGG19Features(["relu9_9"])


def test_gram_is_normalised_by_chw():
    f = torch.ones(1, 2, 3, 4)
    assert torch.allclose(losses.gram(f), torch.full((1, 2, 2), 12.0 / 24.0))


def test_gram_stays_float32_and_finite_under_fp16_autocast():
    # Caffe-scale activations: the sums over H*W overflow fp16 (max 65504) if computed there.
    f = torch.full((1, 4, 64, 64), 300.0)
    with torch.autocast("cpu", dtype=torch.float16):
        g = losses.gram(f.half())
        c = losses.content_loss({"a": f.half()}, {"a": torch.zeros_like(f).half()}, ["a"])
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    assert torch.allclose(g, torch.full((1, 4, 4), 300.0**2 * 64 * 64 / (4 * 64 * 64)))
    assert c.dtype == torch.float32 and c.item() == pytest.approx(300.0**2)


def test_tv_loss_zero_on_flat_image_and_positive_on_edges():
    flat = torch.full((2, 3, 8, 8), 50.0)
    assert losses.tv_loss(flat).item() == 0.0
    edge = flat.clone()
    edge[:, :, :, 4:] = 60.0
    assert losses.tv_loss(edge).item() == pytest.approx(3 * 8 * 10.0)


def test_warp_affine_moves_content_and_masks_what_enters():
    x = torch.rand(2, 3, 16, 16)
    same, mask = losses.warp_affine(x, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]] * 2))
    assert torch.allclose(same, x, atol=1e-5) and mask.min() == 1.0
    # A shift of 4 px (0.5 in affine_grid units on 16 px) moves content and marks the entered band invalid.
    moved, mask = losses.warp_affine(x, torch.tensor([[[1.0, 0, 0.5], [0, 1.0, 0]]] * 2))
    assert torch.allclose(moved[..., :12], x[..., 4:], atol=1e-5)
    assert mask[..., :11].min() == 1.0 and mask[..., 13:].max() == 0.0


def test_masked_mse_ignores_masked_pixels_and_warp_by_grid_follows_flow():
    from mpistyle.training.content import flow_to_grid

    a, b = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    b[..., 0] = 10.0
    mask = torch.ones(1, 1, 4, 4)
    assert losses.masked_mse(a, b, mask).item() == pytest.approx(100.0 / 4)
    mask[..., 0] = 0.0
    assert losses.masked_mse(a, b, mask).item() == 0.0
    # A flow of +1 px in x: the warped image at x is the source at x+1.
    img = torch.arange(16.0).view(1, 1, 4, 4)
    flow = np.zeros((4, 4, 2), np.float32)
    flow[..., 0] = 1.0
    warped = losses.warp_by_grid(img, flow_to_grid(flow))
    assert torch.allclose(warped[..., :3], img[..., 1:])


def test_random_affines_are_small_motions_and_seeded():
    a = losses.random_affines(3, 32, np.random.default_rng(1))
    b = losses.random_affines(3, 32, np.random.default_rng(1))
    assert a.shape == (3, 2, 3) and torch.equal(a, b)
    assert (a[:, :, 2].abs() <= 0.1 + 1e-6).all()
    scale = torch.sqrt(a[:, 0, 0] ** 2 + a[:, 1, 0] ** 2)
    assert ((scale > 0.9) & (scale < 1.1)).all()


def test_style_content_losses_identity_is_zero(images):
    style = cv2.cvtColor(cv2.imread(images["style"]), cv2.COLOR_BGR2RGB)
    content = cv2.cvtColor(cv2.imread(images["c0"]), cv2.COLOR_BGR2RGB)[:48, :64]
    same = losses.style_content_losses(style, style, content)
    other = losses.style_content_losses(content, style, content)
    assert same["style"] < 1e-6 * max(1.0, other["style"])
    assert other["content"] == 0.0 and same["content"] > 0
    assert other["style"] > 0


