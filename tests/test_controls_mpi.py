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

CONTROLS = {
    "style-strength": (["--style-strength", "0.5"], 2),
    "keep-colors": (["--keep-colors"], 2),
    "stroke-scale": (["--stroke-scale", "2"], 3),
}


def _frames(buffer: Path) -> np.ndarray:
    with h5py.File(buffer, "r") as f:
        assert f["done"][...].all()
        return f["frames"][...]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_args) -> dict:
    """The 24-frame clip with each control, on 1 rank and on N ranks (buffers kept)."""
    tmp = tmp_path_factory.mktemp("controls")
    out: dict = {}
    for name, (flags, n) in CONTROLS.items():
        for ranks in (1, n):
            video = tmp / f"{name}-n{ranks}.mp4"
            report = tmp / f"{name}-n{ranks}.json"
            run_mpistyle(["stylize", str(BBB), "-o", str(video), *model_args, *flags, "--keep-buffer",
                          "--no-progress", "--report", str(report)], ranks=ranks, check=True, timeout=600)
            out[name, ranks] = {"video": video, "buffer": Path(str(video) + ".mpistyle.h5"),
                                "report": json.loads(report.read_text())}
    return out


@pytest.mark.parametrize("name", list(CONTROLS))
def test_n_ranks_match_one_rank_for_each_control(runs, name) -> None:
    n = CONTROLS[name][1]
    one, many = runs[name, 1], runs[name, n]
    assert many["report"]["ranks"] == n
    a, b = _frames(one["buffer"]), _frames(many["buffer"])
    differ = [t for t in range(len(a)) if not np.array_equal(a[t], b[t])]
    assert not differ, differ
    assert np.array_equal(read_all(str(one["video"])), read_all(str(many["video"])))


def test_controls_are_in_effect(runs) -> None:
    assert runs["style-strength", 1]["report"]["controls"]["style_strength"] == 0.5
    assert runs["stroke-scale", 1]["report"]["controls"]["network_size"] == [64, 36]
    with h5py.File(runs["keep-colors", 1]["buffer"], "r") as f:
        settings = json.loads(f.attrs["settings"])
    assert (settings["keep_colors"], settings["style_strength"], settings["stroke_scale"]) == (True, 1.0, 1.0)


def test_keep_colors_chroma_bound_after_fusion(runs) -> None:
    """The fusion works on the final look: the fused frames keep the source's a* and b* too."""
    source = read_all(str(BBB))
    out = _frames(runs["keep-colors", 2]["buffer"])
    da, db = [], []
    for s, o in zip(source, out, strict=True):
        ls, lo = (cv2.cvtColor(x, cv2.COLOR_RGB2LAB).astype(np.float32) for x in (s, o))
        da.append(np.abs(lo[..., 1] - ls[..., 1]).mean())
        db.append(np.abs(lo[..., 2] - ls[..., 2]).mean())
    assert np.mean(da) <= 3.0 and np.mean(db) <= 3.0, (np.mean(da), np.mean(db))


@pytest.mark.parametrize(("run", "flags", "key"), [
    ("style-strength", ["--style-strength", "0.75"], "style_strength"),
    ("style-strength", ["--style-strength", "0.5", "--keep-colors"], "keep_colors"),
    ("keep-colors", ["--keep-colors", "--stroke-scale", "auto"], None),  # auto is 1 at 128x72: the same run
    ("keep-colors", ["--keep-colors", "--stroke-scale", "2"], "stroke_scale"),
])
def test_resume_with_other_choices_is_refused(runs, model_args, run, flags, key) -> None:
    target = runs[run, 1]
    proc = run_mpistyle(["stylize", str(BBB), "-o", str(target["video"]), *model_args, *flags, "--keep-buffer",
                         "--no-progress"], ranks=2, timeout=600)
    if key is None:  # the same choices: it resumes (nothing left to do) and succeeds
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "was made for a different run" in lines[0] and key in lines[0], lines[0]
