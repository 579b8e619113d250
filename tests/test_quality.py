"""``mpistyle quality``: the four scores of a model's frames on a real clip, and the optimisation reference."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from mpistyle.errors import MpistyleError
from mpistyle.models import save_model
from mpistyle.nets import TransformerNet
from mpistyle.training import quality, reference, scores
from mpistyle.training.content import load_image

from .conftest import DATA, ROOT

CLIP = DATA / "bbb_640x272.mp4"
PAINTING = ROOT / "mpistyle" / "styles" / "starry-night.jpg"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_content_frames_are_every_kth_of_the_first_n():
    f = quality.content_frames(str(CLIP), 9, 4, 64)
    assert f.shape[0] == 3 and min(f.shape[1:3]) == 64 and f.dtype == np.uint8
    assert quality.content_frames(str(PAINTING), 30, 4, 64).shape[0] == 1  # an image is one frame
    with pytest.raises(MpistyleError, match="not found"):
        quality.content_frames("nope.mp4", 30, 4, 64)


def test_quality_scores_a_model_and_needs_a_painting_for_a_users_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = tmp_path / "mine.pth"
    save_model(TransformerNet(), str(model), {"style": "x"})
    with pytest.raises(MpistyleError, match="--style is needed"):
        quality.main(_args("--model", str(model), "--frame-source", str(CLIP), "--frames", "5", "--size", "64"))
    assert quality.main(_args("--model", str(model), "--model", "starry-night", "--style", str(PAINTING),
                              "--frame-source", str(CLIP), "--frames", "5", "--size", "64")) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith((str(model), "starry-night"))}
    assert set(rows) == {str(model), "starry-night"}
    for cells in rows.values():
        texture, palette, structure, grid = (float(x) for x in cells[:4])
        assert -5 < texture < 1 and -5 < palette < 1 and -1 <= structure <= 1 and grid >= 0
    # An untrained network keeps next to none of the picture: it fails the structure bar.
    assert "structure" in " ".join(rows[str(model)][4:])


def test_the_optimisation_reference_moves_toward_the_painting_and_keeps_the_picture():
    frame = quality.content_frames(str(CLIP), 1, 1, 64)[0]
    painting = load_image(str(PAINTING))
    stats = scores.Painting.of(painting)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = reference.stylize_by_optimisation(frame, painting, style_weight=1e4, steps=30)
    assert out.shape == frame.shape and out.dtype == np.uint8
    s = scores.style_scores([out], [frame], stats)
    assert s["texture"] > 0.2 and s["structure"] > 0.6, s
