"""Training: perceptual losses, loss decrease, checkpoint/resume, saved format, MPI data parallelism."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mpistyle import losses
from mpistyle.errors import MpistyleError
from mpistyle.models import TransformerNet, model_info, save_model
from mpistyle.train import (
    Comm,
    TrainConfig,
    Trainer,
    load_checkpoint,
    rank_slice,
    warp_affine,
)

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "tests" / "data" / "carphone_clip.mp4"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """A striped 'painting' and two smooth content photos (synthetic, so the test needs no data)."""
    d = tmp_path_factory.mktemp("img")
    yy, xx = np.mgrid[0:48, 0:64].astype(np.float32)
    style = np.stack(
        [127 + 127 * np.sin(xx / 2.0 + yy / 3.0), 127 + 120 * np.cos(yy / 1.5), np.full_like(xx, 40.0)],
        axis=-1,
    )
    paths = {"style": str(d / "style.png")}
    cv2.imwrite(paths["style"], np.clip(style, 0, 255).astype(np.uint8)[..., ::-1])
    rng = np.random.default_rng(0)
    for i in range(2):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = cv2.resize(small, (80, 60), interpolation=cv2.INTER_CUBIC)
        paths[f"c{i}"] = str(d / f"c{i}.png")
        cv2.imwrite(paths[f"c{i}"], img)
    return paths


def _cfg(images: dict[str, str], out: Path, **kw) -> TrainConfig:
    base = dict(
        style=images["style"],
        content=[images["c0"], images["c1"]],
        output=str(out),
        size=32,
        batch_size=2,
        steps=4,
        lr=1e-2,
        style_size=32,
        checkpoint_every=2,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------------------------
# losses


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


def test_tv_loss_zero_on_flat_image_and_positive_on_edges():
    flat = torch.full((2, 3, 8, 8), 50.0)
    assert losses.tv_loss(flat).item() == 0.0
    edge = flat.clone()
    edge[:, :, :, 4:] = 60.0
    assert losses.tv_loss(edge).item() == pytest.approx(3 * 8 * 10.0)


def test_style_content_losses_identity_is_zero(images):
    style = cv2.cvtColor(cv2.imread(images["style"]), cv2.COLOR_BGR2RGB)
    content = cv2.cvtColor(cv2.imread(images["c0"]), cv2.COLOR_BGR2RGB)[:48, :64]
    same = losses.style_content_losses(style, style, content)
    other = losses.style_content_losses(content, style, content)
    assert same["style"] < 1e-6 * max(1.0, other["style"])
    assert other["content"] == 0.0 and same["content"] > 0
    assert other["style"] > 0


def test_quality_report_prints_table(images, tmp_path, capsys):
    torch.manual_seed(0)
    model = tmp_path / "m.pth"
    save_model(TransformerNet(), str(model), {"style": "style.png"})
    parser = argparse.ArgumentParser()
    losses.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            str(model),
            "--style",
            images["style"],
            "--frame-source",
            str(CLIP),
            "--frames",
            "2",
            "--size",
            "32",
        ]
    )
    assert losses.main(args) == 0
    out = capsys.readouterr().out
    assert "source frames" in out and "untrained TransformerNet" in out and str(model) in out
    rows = [ln for ln in out.splitlines() if str(model) in ln and "frames" not in ln]
    assert len(rows) == 1 and len(rows[0].split()) == 3


# ----------------------------------------------------------------------------------------------
# training


def test_training_lowers_the_loss(images, tmp_path):
    tr = Trainer(_cfg(images, tmp_path / "m.pth", steps=6, checkpoint_every=0))
    before = [tr.batch_loss(s) for s in range(3)]
    hist = tr.run()
    after = [tr.batch_loss(s) for s in range(3)]
    assert len(hist) == 6
    assert sum(after) < 0.8 * sum(before)
    assert hist[-1]["style"] < hist[0]["style"]


def test_resume_continues_exactly(images, tmp_path):
    full = Trainer(_cfg(images, tmp_path / "full.pth", steps=4))
    full.run()
    part = Trainer(_cfg(images, tmp_path / "part.pth", steps=2))
    part.run()
    ck = load_checkpoint(str(tmp_path / "part.ckpt"))
    assert ck["step"] == 2
    resumed = Trainer(_cfg(images, tmp_path / "part.pth", steps=4, resume=True))
    assert resumed.step == 2
    resumed.run()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["total"] for h in full.history] == [h["total"] for h in resumed.history]
    sa, sb = full.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_resume_refuses_changed_settings(images, tmp_path):
    Trainer(_cfg(images, tmp_path / "m.pth", steps=2)).run()
    with pytest.raises(MpistyleError, match="size"):
        Trainer(_cfg(images, tmp_path / "m.pth", steps=4, size=36, resume=True))


def test_saved_model_is_a_plain_fast_neural_style_state_dict(images, tmp_path):
    out = tmp_path / "style.pth"
    Trainer(_cfg(images, out, steps=2)).run()
    net = TransformerNet()
    net.load_state_dict(torch.load(out, weights_only=True))  # strict, as other tools load it
    info = model_info(str(out))
    assert info["style"] == "style.png" and info["steps"] == 2
    assert info["settings"]["size"] == 32 and info["settings"]["style_weight"] == 1.0
    assert "mpistyle_version" in info
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_temporal_loss_with_simulated_motion_and_real_pairs(images, tmp_path):
    x = torch.rand(2, 3, 16, 16)
    same, mask = warp_affine(x, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]] * 2))
    assert torch.allclose(same, x, atol=1e-5) and mask.min() == 1.0
    # A shift of 4 px (0.5 in affine_grid units on 16 px) moves content and marks the entered band invalid.
    moved, mask = warp_affine(x, torch.tensor([[[1.0, 0, 0.5], [0, 1.0, 0]]] * 2))
    assert torch.allclose(moved[..., :12], x[..., 4:], atol=1e-5)
    assert mask[..., :11].min() == 1.0 and mask[..., 13:].max() == 0.0

    cfg = _cfg(
        images,
        tmp_path / "t.pth",
        content=[images["c0"], str(CLIP)],
        video_frames=2,
        temporal_weight=5.0,
        steps=2,
    )
    tr = Trainer(cfg)
    assert len(tr.data.pairs) == 2
    hist = tr.run()
    assert all(h["temporal"] > 0 for h in hist)


def test_errors_are_one_line(images, tmp_path):
    with pytest.raises(MpistyleError, match="image not found"):
        Trainer(_cfg(images, tmp_path / "m.pth", style=str(tmp_path / "none.png")))
    with pytest.raises(MpistyleError, match="content path not found"):
        Trainer(_cfg(images, tmp_path / "m.pth", content=[str(tmp_path / "nothing")]))
    with pytest.raises(MpistyleError, match="multiple of 4"):
        Trainer(_cfg(images, tmp_path / "m.pth", size=30))


def test_rank_slices_cover_the_batch():
    for n in (1, 2, 3, 4):
        for size in range(1, n + 1):
            parts = [rank_slice(n, r, size) for r in range(size)]
            idx = [i for s in parts for i in range(s.start, s.stop)]
            assert idx == list(range(n)) and all(s.stop > s.start for s in parts)


def _mpiexec() -> str:
    cand = Path(sys.executable).parent / "mpiexec"
    return str(cand) if cand.exists() else "mpiexec"


def test_two_mpi_ranks_follow_the_one_rank_curve(images, tmp_path):
    def run(n: int, name: str) -> list[dict[str, float]]:
        out = tmp_path / f"{name}.pth"
        cmd = [
            sys.executable,
            "-m",
            "mpistyle.train",
            "--style",
            images["style"],
            "--content",
            images["c0"],
            images["c1"],
            "-o",
            str(out),
            "--size",
            "32",
            "--batch-size",
            "2",
            "--steps",
            "3",
            "--lr",
            "1e-3",
            "--style-size",
            "32",
            "--seed",
            "3",
            "--threads",
            "1",
            "--log-every",
            "1",
        ]
        if n > 1:
            cmd = [_mpiexec(), "-n", str(n)] + cmd
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-2000:]
        # rank 0 alone logs and writes
        assert res.stderr.count("step 1/3") == 1
        return load_checkpoint(str(tmp_path / f"{name}.ckpt"))["history"]

    one, two = run(1, "one"), run(2, "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        for key in ("content", "style", "total", "tv"):
            assert b[key] == pytest.approx(a[key], rel=1e-3)


def test_comm_without_mpiexec_is_one_rank():
    c = Comm()
    assert c.size == 1 and c.rank == 0
    buf = np.arange(4, dtype=np.float32)
    assert np.array_equal(c.allreduce_sum(buf.copy()), buf)


def test_signal_saves_a_checkpoint_and_exits_75_then_resume_finishes(images, tmp_path):
    """SLURM's USR1/TERM: every rank stops after the same step, the checkpoint is saved, exit 75."""
    import signal
    import time

    out = tmp_path / "sig.pth"
    mpistyle = str(Path(sys.executable).parent / "mpistyle")
    base = [mpistyle, "train", "--style", images["style"], "--content", images["c0"], images["c1"],
            "-o", str(out),
            "--size", "32", "--batch-size", "2", "--steps", "400", "--style-size", "32", "--seed", "3",
            "--threads", "1", "--log-every", "1", "--checkpoint-every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([_mpiexec(), "-n", "2", *base], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stderr:  # wait until training really runs
        if line.startswith("step 2/"):
            break
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 75, rest[-2000:]
    assert time.monotonic() - start < 60
    assert "interrupted" in rest and "Traceback" not in rest
    stopped_at = load_checkpoint(str(tmp_path / "sig.ckpt"))["step"]
    assert 2 <= stopped_at < 400
    res = subprocess.run([_mpiexec(), "-n", "2", *base[:-6], "--steps", str(stopped_at + 2), "--resume",
                          "--threads", "1", "--log-every", "1"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_checkpoint(str(tmp_path / "sig.ckpt"))["step"] == stopped_at + 2
