"""Report plots (warping error, timeline, strip) are real PNGs that show what they claim; temporal metrics."""

from __future__ import annotations

import matplotlib.colors as mcolors
import matplotlib.image as mpimg
import numpy as np
import pytest

from mpistyle import report
from mpistyle.errors import MpistyleError
from mpistyle.metrics import evaluate

from .conftest import BBB, CARPHONE

PER_RANK = [
    {"rank": 0, "frames": 12, "events": [["wait_source", 0.0, 0.1], ["network", 0.1, 0.5],
                                          ["flow", 0.12, 0.15], ["fuse", 0.5, 0.52], ["send", 0.52, 0.53],
                                          ["network", 0.53, 0.9]]},
    {"rank": 1, "frames": 12, "events": [["wait_halo", 0.0, 0.3], ["network", 0.3, 0.7], ["fuse", 0.7, 0.72],
                                          ["wait_flow", 0.72, 0.75], ["network", 0.75, 1.1]]},
]


def _png(path) -> np.ndarray:
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas
    return image


def _where(image: np.ndarray, colour: str, tol: float = 0.02) -> np.ndarray:
    rgb = np.array(mcolors.to_rgb(colour), dtype=np.float32)
    return np.abs(image[..., :3] - rgb).max(axis=-1) < tol


def _has_colour(image: np.ndarray, colour: str) -> bool:
    return bool(_where(image, colour).any())


def test_timeline_draws_a_lane_per_rank_with_phase_colours(tmp_path) -> None:
    path = tmp_path / "timeline.png"
    report.plot_timeline(PER_RANK, str(path))
    image = _png(path)
    plot_area = image[:, : int(image.shape[1] * 0.75)]  # the legend sits to the right of it
    for phase in ("network", "wait_halo", "fuse", "flow"):
        assert _has_colour(plot_area, report.PHASE_COLOURS[phase]), phase
    # Rank 0 (top lane) has no wait_halo span: it only appears on rank 1's lane, below rank 0's network.
    halo_rows = np.nonzero(_where(plot_area, report.PHASE_COLOURS["wait_halo"]).any(axis=1))[0]
    net_rows = np.nonzero(_where(plot_area, report.PHASE_COLOURS["network"]).any(axis=1))[0]
    assert net_rows.min() < halo_rows.min() <= net_rows.max()


def test_timeline_without_events_still_writes(tmp_path) -> None:
    path = tmp_path / "empty.png"
    report.plot_timeline([{"rank": 0}, {"rank": 1, "events": []}], str(path))
    image = mpimg.imread(str(path))
    assert image.shape[0] > 50


def test_warping_error_plot_marks_boundaries(tmp_path) -> None:
    path = tmp_path / "we.png"
    per_pair = [0.001] * 11 + [0.004] + [0.001] * 11
    report.plot_warping_error(per_pair, [12], str(path), title="test")
    image = _png(path)
    assert _has_colour(image, "#d62728")  # the boundary line and marker
    path2 = tmp_path / "we2.png"
    report.plot_warping_error(per_pair, [], str(path2))
    assert not _has_colour(mpimg.imread(str(path2)), "#d62728")


def test_strip_shows_source_above_stylized(tmp_path) -> None:
    path = tmp_path / "strip.png"
    report.plot_strip(str(BBB), str(BBB), str(path), n=3)
    image = _png(path)
    assert image.shape[1] > image.shape[0]  # a row of 3 wide frames, two rows: wider than tall
    with pytest.raises(MpistyleError, match="outside"):
        report.plot_strip(str(BBB), str(BBB), str(tmp_path / "bad.png"), frames=[0, 99])


def test_temporal_metrics_split_boundary_and_interior() -> None:
    metrics = report.temporal_metrics(str(BBB), str(BBB), [12])
    per_pair = np.array(metrics["per_pair"])
    assert per_pair.size == 23 and (per_pair >= 0).all()
    assert metrics["boundaries"] == [12]
    assert metrics["boundary_mean"] == pytest.approx(per_pair[11])
    assert metrics["interior_mean"] == pytest.approx(np.delete(per_pair, 11).mean())
    assert metrics["warping_error"] == pytest.approx(per_pair.mean())
    assert metrics["warping_error"] == pytest.approx(evaluate(str(BBB), str(BBB))["warping_error"])


def _same_image(a, b) -> bool:
    return bool(np.array_equal(mpimg.imread(str(a)), mpimg.imread(str(b))))


def test_write_plots_uses_report_data_or_computes_it(tmp_path, monkeypatch) -> None:
    rep = {"ranks": 2, "halo": 10, "boundaries": [6], "per_rank": PER_RANK}
    title = "Temporal warping error per frame pair (2 ranks, halo 10)"
    paths = report.write_plots(rep, str(CARPHONE), str(CARPHONE), str(tmp_path / "computed"))
    assert [p.rsplit("/", 1)[1] for p in paths] == list(report.PLOT_FILES)
    for p in paths:
        _png(p)
    # Without errors in the report they are computed from the videos: the plot is the one of those errors.
    computed = report.temporal_metrics(str(CARPHONE), str(CARPHONE), [6])["per_pair"]
    report.plot_warping_error(computed, [6], str(tmp_path / "computed.png"), title=title)
    assert _same_image(paths[0], tmp_path / "computed.png")
    report.plot_timeline(PER_RANK, str(tmp_path / "timeline.png"))
    assert _same_image(paths[1], tmp_path / "timeline.png")
    # With the errors in the report (as temporal_metrics returns them) nothing is recomputed, and the plot
    # is the one of the report's errors (three pairs, where the 12-frame video has eleven).
    given = [0.001, 0.002, 0.003]
    rep["temporal_metrics"] = {"per_pair": given}

    def no_recompute(*_args, **_kwargs):
        raise AssertionError("warping errors recomputed although the report has them")

    report.plot_warping_error(given, [6], str(tmp_path / "given.png"), title=title)
    monkeypatch.setattr(report, "temporal_metrics", no_recompute)
    paths = report.write_plots(rep, str(CARPHONE), str(CARPHONE), str(tmp_path / "given"))
    _png(paths[0])
    assert _same_image(paths[0], tmp_path / "given.png")
    assert not _same_image(paths[0], tmp_path / "computed.png")


def test_plot_into_missing_directory_is_one_line(tmp_path) -> None:
    with pytest.raises(MpistyleError, match="does not exist"):
        report.plot_warping_error([0.1, 0.2], [], str(tmp_path / "nope" / "x.png"))


def test_progress_lines_follow_the_network_while_commits_lag(caplog, monkeypatch) -> None:
    """A plain progress line (no terminal) gives a finite ETA from the network's frames while no frame is
    committed yet (commits wait for a fusion chain's warm-up), and from the commits once they lead."""
    import logging

    from mpistyle.stylize import gather

    clock = iter([0.0, 10.0, 20.0, 30.0])
    monkeypatch.setattr(gather.time, "monotonic", lambda: next(clock))
    r = gather.ProgressReporter(80, 0, True, every_s=5.0)
    with caplog.at_level(logging.INFO, logger="mpistyle.stylize.gather"):
        r.update(network=20, committed=0)  # t=10: 20 frames stylized in 10 s, 60 to go at 2 frames/s
        r.update(network=40, committed=60)  # t=20: 60 committed in 20 s, 20 to go at 3 frames/s
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines[0].endswith("0/80 frames committed (0%), 2.00 frames/s, ETA 30 s"), lines
    assert lines[1].endswith("60/80 frames committed (75%), 3.00 frames/s, ETA 7 s"), lines
