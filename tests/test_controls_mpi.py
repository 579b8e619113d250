"""The look controls end to end under real MPI: N ranks bit-identical to 1 rank for each control, the
chroma bound after temporal fusion, and a resume with other choices refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from mpistyle.io.media import read_all

from .conftest import BBB, run_mpistyle

# All three controls at once: every control's code path runs in each of the two runs (the machine the
# tests run on has 2 cores; a pair of runs per control would triple the time for the same paths).
FLAGS = ["--style-strength", "0.5", "--keep-colors", "--stroke-scale", "2"]
RANKS = 2


def _frames(buffer: Path) -> np.ndarray:
    with h5py.File(buffer, "r") as f:
        assert f["done"][...].all()
        return f["frames"][...]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_args) -> dict:
    """The 24-frame clip with the controls, on 1 rank and on N ranks (buffers kept)."""
    tmp = tmp_path_factory.mktemp("controls")
    out: dict = {}
    for ranks in (1, RANKS):
        video = tmp / f"n{ranks}.mp4"
        report = tmp / f"n{ranks}.json"
        run_mpistyle(["stylize", str(BBB), "-o", str(video), *model_args, *FLAGS, "--keep-buffer",
                      "--no-progress", "--report", str(report)], ranks=ranks, check=True, timeout=900)
        out[ranks] = {"video": video, "buffer": Path(str(video) + ".mpistyle.h5"),
                      "report": json.loads(report.read_text())}
    return out


def test_n_ranks_match_one_rank_with_the_controls(runs) -> None:
    one, many = runs[1], runs[RANKS]
    assert many["report"]["ranks"] == RANKS
    a, b = _frames(one["buffer"]), _frames(many["buffer"])
    differ = [t for t in range(len(a)) if not np.array_equal(a[t], b[t])]
    assert not differ, differ
    assert np.array_equal(read_all(str(one["video"])), read_all(str(many["video"])))


def test_controls_are_in_effect_and_recorded(runs) -> None:
    # painted detail (the default): the network runs at full size and at 1/K
    assert runs[1]["report"]["controls"] == {"style_strength": 0.5, "keep_colors": True, "stroke_scale": 2.0,
                                             "stroke_detail": "painted", "network_sizes": [[128, 72], [64, 36]]}
    with h5py.File(runs[1]["buffer"], "r") as f:
        settings = json.loads(f.attrs["settings"])
    assert (settings["style_strength"], settings["keep_colors"], settings["stroke_scale"],
            settings["stroke_detail"]) == (0.5, True, 2.0, "painted")
    # the look did change: not the source
    source = read_all(str(BBB)).astype(np.float32)
    assert np.abs(_frames(runs[1]["buffer"]) - source).mean() > 3.0


def test_keep_colors_chroma_bound_after_fusion(runs) -> None:
    """The fusion works on the final look: the fused frames keep the source's a* and b* too."""
    source = read_all(str(BBB))
    out = _frames(runs[RANKS]["buffer"])
    da, db = [], []
    for s, o in zip(source, out, strict=True):
        ls, lo = (cv2.cvtColor(x, cv2.COLOR_RGB2LAB).astype(np.float32) for x in (s, o))
        da.append(np.abs(lo[..., 1] - ls[..., 1]).mean())
        db.append(np.abs(lo[..., 2] - ls[..., 2]).mean())
    assert np.mean(da) <= 3.0 and np.mean(db) <= 3.0, (np.mean(da), np.mean(db))


@pytest.mark.parametrize(("flags", "key"), [
    (["--style-strength", "0.75", "--keep-colors", "--stroke-scale", "2"], "style_strength"),
    (["--style-strength", "0.5", "--stroke-scale", "2"], "keep_colors"),
    (["--style-strength", "0.5", "--keep-colors", "--stroke-scale", "auto"], "stroke_scale"),  # auto: 1 at 128x72
    ([*FLAGS, "--stroke-detail", "source"], "stroke_detail"),
    ([*FLAGS, "--fusion-texture", "blend"], "fusion_texture"),  # the fusion, like the look, is recorded
])
def test_resume_with_other_choices_is_refused(runs, model_args, flags, key) -> None:
    proc = run_mpistyle(["stylize", str(BBB), "-o", str(runs[1]["video"]), *model_args, *flags, "--keep-buffer",
                         "--no-progress"], ranks=RANKS, timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "was made for a different run" in lines[0] and key in lines[0], lines[0]
