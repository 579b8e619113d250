"""`mpistyle bench`: it runs end to end under real mpiexec and its numbers are consistent with each other.

No speed thresholds: only that the figures are positive, finite and derived as documented.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys

import pytest

from mpistyle import bench
from mpistyle.bench import ceiling, common, pipeline, scaling
from mpistyle.errors import MpistyleError

from .conftest import BBB, ROOT, run_mpistyle

SYNTHETIC = {  # per-frame costs in seconds, roughly those of a 640x272 frame on one core
    "network_s": 0.6, "flow_s": 0.01, "fuse_s": 0.005, "send_s": 0.0005, "decode_s": 0.002,
    "write_s": 0.003, "encode_s": 0.006, "startup_s": 3.0, "halo": 10, "halo_wait_s": 0.2,
    "frame_bytes": 640 * 272 * 3, "root_cpu_s": 0.02,
}


# The bench fixture's limit is longer than pytest-timeout's 600 s (whose thread method ends the whole
# session): the tests that use it carry their own mark, so a slow bench fails its test alone.
BENCH_S = 900
BENCH_MARK = pytest.mark.timeout(BENCH_S + 120)


def _finite_positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory, model_args) -> tuple[dict, str]:
    """The bench's runs, once for the module (up to BENCH_S: the first test to use it carries that mark)."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    # --encode both (the default): the 2-rank pipeline runs with segments and again with rank0.
    proc = run_mpistyle(["bench", str(BBB), "--ranks", "1,2", "--frames", "6", "--compare-frames", "2",
                         "--repeat", "2", "--json", str(out), "--network-sizes", "none",
                         "--launcher-args=-bind-to core", *model_args], timeout=BENCH_S, check=True)
    return json.loads(out.read_text()), proc.stdout


def test_bench_networks_table_compares_the_paths(tmp_path, model_args) -> None:
    """--networks: every path's time per frame and PSNR against fp32 eager (one small compilation)."""
    out = tmp_path / "networks.json"
    proc = run_mpistyle(["bench", str(BBB), "--networks", "--network-sizes", "64x48", "--network-threads", "1",
                         "--network-frames", "1", "--no-openvino", "--json", str(out), *model_args],
                        env={"MPISTYLE_CACHE_DIR": str(tmp_path / "cache")}, timeout=400, check=True)
    networks = json.loads(out.read_text())["networks"]
    rows = networks["rows"]
    assert [(r["width"], r["height"], r["threads"]) for r in rows] == [(64, 48, 1)]
    paths = rows[0]["paths"]
    assert set(paths) == {"eager", "fused", "compiled"}
    for name, p in paths.items():
        assert _finite_positive(p["s_per_frame"])
        assert p["ratio"] == pytest.approx(p["s_per_frame"] / paths["eager"]["s_per_frame"])
        if networks["precision"] == "fp32" and name == "eager":
            # A CPU without native bf16: the eager path is the fp32 reference itself (PSNR None: equal).
            assert p["psnr_db"] is None
        elif networks["precision"] == "fp32":
            assert p["psnr_db"] is None or p["psnr_db"] >= 50
        else:  # bf16 against fp32: never equal, within 50 dB (54-60 dB measured)
            assert p["psnr_db"] is not None and p["psnr_db"] >= 50, (name, p)
    assert "network paths on CPU" in proc.stdout and "compiled package: cache miss" in proc.stdout


@BENCH_MARK
def test_bench_measures_what_it_says(bench_result) -> None:
    result, stdout = bench_result
    assert result["frames"] == 6 and result["clip_cut_to"] == 6
    assert (result["width"], result["height"]) == (128, 72)
    assert result["threads_per_rank"] == 1
    assert result["launcher_args"] == ["-bind-to", "core"]  # each rank on a core of its own
    fwd = result["forward"]
    assert fwd["frames"] == 6 and _finite_positive(fwd["per_frame_s"])
    assert fwd["min_s"] <= fwd["median_s"] <= fwd["max_s"]
    assert fwd["min_s"] <= fwd["per_frame_s"] <= fwd["max_s"]
    assert _finite_positive(fwd["cpu_per_frame_s"])
    runs = result["summary"]["runs"]
    assert [r["ranks"] for r in runs] == [1, 2]
    for run in runs:
        report = result["reports"][str(run["ranks"])]
        assert report["ranks"] == run["ranks"] and report["outcome"] == "done"
        assert report["frames"] == 6 and sum(p["frames"] for p in report["per_rank"]) == 6
        assert len(run["per_rank"]) == run["ranks"]
    for key in ("pipeline/forward", "speedup", "scaling model", "targets", "0.3's eager path beside it"):
        assert key in stdout
    assert _finite_positive(fwd["eager_per_frame_s"]) and _finite_positive(fwd["decode_s"])
    names = [t["name"] for t in result["targets"]]
    assert "stylize network s/frame / 0.3 eager forward" in names
    assert any(n.startswith("1-rank stylize process / (decode + 0.3 eager forward)") for n in names)


@BENCH_MARK
def test_bench_reports_flow_pool_and_fusion(bench_result) -> None:
    result, stdout = bench_result
    flow = result["flow"]
    assert (flow["width"], flow["height"]) == (128, 72) and flow["pairs"] == 24
    one, every = flow["threads_1"], flow["threads_all"]
    assert one["workers"] == 1 and every["workers"] == result["host"]["cpus"]
    for r in (one, every):
        assert r["pairs"] == 24 and _finite_positive(r["pairs_per_s"])
        assert r["pairs_per_s"] == pytest.approx(r["pairs"] / r["seconds"])
    assert flow["speedup"] == pytest.approx(every["pairs_per_s"] / one["pairs_per_s"])
    fusion = result["fusion"]
    assert fusion["frames"] == 5 and fusion["device"] == "cpu"  # 6 frames: 5 pairs
    assert _finite_positive(fusion["numpy_ms"]) and _finite_positive(fusion["torch_ms"])
    assert "pairs/s at 1 thread" in stdout and f"pool of {every['workers']} threads" in stdout
    assert "torch on cpu" in stdout


@BENCH_MARK
def test_bench_numbers_are_consistent(bench_result) -> None:
    result, _ = bench_result
    summary = result["summary"]
    fwd = result["forward"]["per_frame_s"]
    one = summary["runs"][0]
    for run in summary["runs"]:
        for key in ("process_s", "wall_s", "work_s", "s_per_frame_wall", "s_per_frame_work", "speedup",
                    "efficiency", "speedup_wall", "efficiency_wall"):
            assert _finite_positive(run[key]), (key, run[key])
        assert run["setup_s"] >= 0 and _finite_positive(run["cpu_s"])
        assert run["work_s"] <= run["wall_s"] <= run["process_s"]
        assert 0 <= run["wait_halo_max_fraction"] < 1
        assert run["s_per_frame_work"] == pytest.approx(run["work_s"] / run["frames"])
        assert run["s_per_frame_wall"] == pytest.approx(run["wall_s"] / run["frames"])
        assert run["speedup"] == pytest.approx(one["work_s"] / run["work_s"])
        assert run["speedup_wall"] == pytest.approx(one["wall_s"] / run["wall_s"])
        assert run["efficiency"] == pytest.approx(run["speedup"] / run["ranks"])
        assert run["efficiency_wall"] == pytest.approx(run["speedup_wall"] / run["ranks"])
        assert run["speedup_process"] == pytest.approx(one["process_s"] / run["process_s"])
    assert summary["ratio"] == pytest.approx(one["work_s"] / one["frames"] / fwd)
    assert summary["ratio_wall"] == pytest.approx(one["wall_s"] / one["frames"] / fwd)
    assert _finite_positive(summary["ratio"])
    network1 = one["per_rank"][0]["times_s"]["network"]
    assert summary["ratio_in_run"] == pytest.approx(one["work_s"] / network1)
    for run in summary["runs"]:
        assert 0 < run["network_fraction"] <= 1
    # --repeat 2: forward passes and pipeline rounds alternate; the fastest of each is kept.
    assert len(result["forward"]["passes"]) == 2
    assert result["forward"]["per_frame_s"] == pytest.approx(min(result["forward"]["passes"]))
    for run in summary["runs"]:
        reps = result["repeats"][str(run["ranks"])]
        assert len(reps) == 2 and run["work_s"] == pytest.approx(min(r["work_s"] for r in reps))
    # The overhead breakdown adds up to the 1-rank time beyond frames x forward.
    ob = result["overhead_1rank"]
    assert ob["total"] == pytest.approx(one["work_s"] - one["frames"] * fwd)
    assert sum(v for k, v in ob.items() if k != "total") == pytest.approx(ob["total"])
    names = [t["name"] for t in result["targets"]]
    assert len(names) == 5 and all(isinstance(t["met"], bool) for t in result["targets"])


@BENCH_MARK
def test_bench_precision_check_and_scaling(bench_result) -> None:
    result, _ = bench_result
    chk = result["forward"]["precision_check"]
    assert chk["frames"] == 2 and chk["reduced"] in ("bf16", "fp16")
    if chk["max_abs_diff"] == 0:  # reduced precision equal to fp32 on these frames
        assert chk["psnr_min_db"] is None and chk["mean_abs_diff"] == 0
    else:  # a difference in the last bits: within 50 dB, and the mean no larger than the largest
        assert chk["psnr_min_db"] >= 50 and 0 < chk["mean_abs_diff"] <= chk["max_abs_diff"]
    rows = result["scaling"]
    assert [r["ranks"] for r in rows] == list(common.SCALING_RANKS)
    overhead = [r["overhead_fraction"] for r in rows]
    assert all(0 <= x < 1 for x in overhead)
    assert overhead == sorted(overhead)
    # fusion is on in the bench's runs: the model counts warm-ups back to the chain start
    assert result["measured"]["every"] == 64


@BENCH_MARK
def test_bench_measures_rank0_cost_in_both_encode_modes(bench_result) -> None:
    result, stdout = bench_result
    assert result["encode"] == "both"
    costs = result["rank0_cost"]
    assert set(costs) == {"rank0", "segments"}
    # Primary 2-rank run: segments (stylize's default there); the rank0 run is the extra one.
    segments_report, rank0_report = result["reports"]["2"], result["extra_reports"]["2-rank0"]
    root_times = next(e for e in segments_report["per_rank"] if e["rank"] == 0)["times_s"]
    assert root_times["join"] > 0 and root_times.get("encode", 0.0) == 0.0  # shutdown reports the join
    assert "join" not in next(e for e in rank0_report["per_rank"] if e["rank"] == 0)["times_s"]
    for mode, report in (("segments", segments_report), ("rank0", rank0_report)):
        cost = costs[mode]
        # Rank 0's own measured times in the report, per frame of the video (worked here, not by rank0_cost).
        times = next(e for e in report["per_rank"] if e["rank"] == 0)["times_s"]
        for part in ("write", "encode", "join"):
            assert cost[f"{part}_s"] == pytest.approx(times.get(part, 0.0) / 6), part
        assert cost["mode"] == mode and cost["ranks"] == 2 and cost["frames"] == 6
        assert cost["serial_s"] == pytest.approx(sum(cost[k] for k in ("decode_s", "encode_s", "join_s")))
        assert _finite_positive(cost["write_s"])
        # --decode auto on 2 ranks: every rank decodes its own frames, so no decode is rank 0's serial work
        assert report["decode"] == "each" and cost["decode_s"] == 0.0
    assert costs["rank0"]["join_s"] == 0.0 and _finite_positive(costs["rank0"]["encode_s"])
    assert costs["rank0"]["segment_encode_s"] == 0.0 and costs["rank0"]["segments"] == 0
    assert costs["segments"]["encode_s"] == 0.0 and _finite_positive(costs["segments"]["join_s"])
    # 6 frames are one 64-frame block, straddling the 2 partitions: encoded from the buffer by rank 1
    assert _finite_positive(costs["segments"]["segment_encode_s"]) and costs["segments"]["segments"] == 1
    # The model for each mode runs on that mode's measured rank-0 cost.
    for mode, proj in result["encode_scaling"].items():
        model_in = proj["model_input"]
        assert model_in["root_serial_s"] == costs[mode]["serial_s"]
        assert model_in["segment_encode_s"] == costs[mode]["segment_encode_s"]
        assert [r["ranks"] for r in proj["scaling"]] == list(common.SCALING_RANKS)
        assert proj["s0"] == pytest.approx(costs[mode]["serial_s"] + proj["link_s"]) and proj["link_s"] > 0
        assert proj["ceiling_fps"] == pytest.approx(1 / proj["s0"])
        assert proj["gpu_ranks_to_wall"] == pytest.approx(proj["ceiling_fps"] / common.GPU_RANK_FPS)
        assert proj["scaling"][-1]["root_serial_s"] == pytest.approx(10_000 * proj["s0"])
    for mode in ("rank0", "segments"):  # the default (segments) on every rank count, rank0 beside it on several
        assert [r["ranks"] for r in result["encode_runs"][mode].values()] == ([2] if mode == "rank0" else [1, 2])
    assert len(result["repeats"]["2-rank0"]) == 2
    assert "rank 0's serial cost per frame, measured" in stdout and "GPU ranks @300 f/s" in stdout


def _report(times: list[dict], frames: list[int], counts: list[dict] | None = None) -> dict:
    counts = counts or [{} for _ in times]
    return {"frames": sum(frames), "ranks": len(times),
            "per_rank": [{"rank": r, "frames": f, "times_s": t, "counts": c}
                         for r, (t, f, c) in enumerate(zip(times, frames, counts, strict=True))]}


def test_rank0_cost_splits_rank0_serial_stream() -> None:
    seg = _report([{"decode": 1.0, "write": 2.0, "join": 0.5, "segment_encode": 3.0, "network": 50.0},
                   {"segment_encode": 5.0, "network": 50.0}], [40, 60], [{"segments": 1, "segment_frames": 40},
                                                             {"segments": 2, "segment_frames": 60}])
    cost = pipeline.rank0_cost(seg, "segments")
    assert cost["decode_s"] == pytest.approx(0.01) and cost["write_s"] == pytest.approx(0.02)
    assert cost["encode_s"] == 0.0 and cost["join_s"] == pytest.approx(0.005)
    assert cost["serial_s"] == pytest.approx(0.015)  # network, rank 0's own writes and the ranks' encoders are not
    assert cost["segment_encode_s"] == pytest.approx(8.0 / 100) and cost["segments"] == 3
    one = pipeline.rank0_cost(_report([{"decode": 1.0, "write": 2.0, "encode": 4.0}, {}], [50, 50]), "rank0")
    assert one["serial_s"] == pytest.approx(0.05) and one["segment_encode_s"] == 0.0


def test_scaling_model_uses_measured_rank0_cost() -> None:
    ranks = [1, 8, 64, 512]
    measured = {**SYNTHETIC, "frame_bytes": 0}
    default = scaling.scaling_model(measured, ranks, frames=1000)
    # A measured root_serial_s replaces the estimate from decode/write/encode and root_cpu_s.
    for s0 in (0.001, 0.05):
        rows = scaling.scaling_model({**measured, "root_serial_s": s0}, ranks, frames=1000)
        assert all(r["root_serial_s"] == pytest.approx(1000 * s0) for r in rows)
    assert default[0]["root_serial_s"] == pytest.approx(1000 * SYNTHETIC["root_cpu_s"])
    # Each rank's own segment encoder is per-rank compute, not serial.
    seg = scaling.scaling_model({**measured, "root_serial_s": 0.001, "segment_encode_s": 0.1}, ranks, frames=1000)
    base = scaling.scaling_model({**measured, "root_serial_s": 0.001}, ranks, frames=1000)
    for a, b in zip(seg, base, strict=True):
        assert a["compute_s"] == pytest.approx(b["compute_s"] + 1000 * 0.1 / a["ranks"])


def test_encode_projection_ceiling_and_ranks_to_wall() -> None:
    measured = {"network_s": 0.5, "flow_s": 0.0, "fuse_s": 0.0, "frame_bytes": 0, "halo": 0}
    cost = {"mode": "segments", "ranks": 4, "decode_s": 0.0008, "write_s": 0.0005, "encode_s": 0.0, "join_s": 0.0007,
            "serial_s": 0.002, "segment_encode_s": 0.0}
    proj = scaling.encode_projection(measured, cost, [1, 8, 512], frames=1000, gpu_rank_fps=300.0)
    assert proj["ceiling_fps"] == pytest.approx(500.0)
    assert proj["ceiling_overlapped_fps"] == pytest.approx(1 / 0.0015)  # decode overlaps write
    assert proj["gpu_ranks_to_wall"] == pytest.approx(500.0 / 300.0)
    assert proj["cpu_ranks_to_wall"] == pytest.approx(0.5 / 0.002)
    # s0 = 0.002 s, c = 0.5 s, no startup, no warm-up: T(1) = 1000 x 0.502, T(8) = 1000 x 0.5 / 8 + 2
    assert [r["total_s"] for r in proj["scaling"][:2]] == pytest.approx([502.0, 64.5])
    slower = scaling.encode_projection(measured, {**cost, "serial_s": 0.02}, [1, 8, 512], frames=1000)
    assert slower["ceiling_fps"] < proj["ceiling_fps"]
    assert slower["scaling"][-1]["total_s"] > proj["scaling"][-1]["total_s"]


def test_encode_jobs_primary_run_first() -> None:
    assert pipeline.encode_jobs([1, 2, 4], "both") == [(1, "segments"), (2, "segments"), (2, "rank0"),
                                                     (4, "segments"), (4, "rank0")]
    assert pipeline.encode_jobs([1, 2], "auto") == [(1, "segments"), (2, "segments")]
    assert pipeline.encode_jobs([1, 2], "segments") == [(1, "segments"), (2, "segments")]


def test_scaling_model_overhead_grows_with_ranks() -> None:
    ranks = [1, 2, 8, 16, 32, 64, 128, 256, 512]
    for measured in (SYNTHETIC, {**SYNTHETIC, "halo": 0, "halo_wait_s": 0.0},
                     {**SYNTHETIC, "decode_s": 0.0, "write_s": 0.0, "encode_s": 0.0, "frame_bytes": 0,
                      "root_cpu_s": 0.0}):
        rows = scaling.scaling_model(measured, ranks, frames=10_000)
        for key in ("overhead_fraction", "overhead_fraction_balanced"):
            values = [r[key] for r in rows]
            assert all(b >= a for a, b in zip(values, values[1:], strict=False)), (key, values)
        assert all(r["total_balanced_s"] <= r["total_s"] + 1e-9 for r in rows)  # balancing never hurts
        speedups = [r["speedup"] for r in rows]
        assert all(b >= a for a, b in zip(speedups, speedups[1:], strict=False))


def test_rank0_cost_with_decode_each_leaves_the_decode_out_of_the_serial_stream() -> None:
    """--decode each: rank 0 decodes its own frames only, parallel work like any rank's."""
    report = {**_report([{"decode": 3.0, "write": 1.0, "join": 0.5}, {"decode": 3.0}], [50, 50]), "decode": "each"}
    cost = pipeline.rank0_cost(report, "segments")
    assert cost["decode_s"] == 0.0 and cost["serial_s"] == pytest.approx(0.5 / 100)
    assert pipeline.rank0_cost({**report, "decode": "rank0"}, "segments")["serial_s"] == pytest.approx(3.5 / 100)


def test_scaling_model_takes_the_measured_cost_per_rank_frame() -> None:
    """rank_s (the 1-rank run's work per frame on a core of its own) replaces the sum of the helper
    threads' clocks, which overlap the network and each other."""
    measured = {"network_s": 0.1, "flow_s": 0.16, "fuse_s": 0.01, "frame_bytes": 0, "root_serial_s": 0.0,
                "halo": 0, "rank_s": 0.16}
    rows = scaling.scaling_model(measured, [1, 4], frames=1000)
    assert [r["total_s"] for r in rows] == pytest.approx([160.0, 40.0])
    assert scaling.scaling_model({**measured, "rank_s": None}, [1], frames=1000)[0]["total_s"] == pytest.approx(270.0)


def test_scaling_model_worked_by_hand() -> None:
    """1000 frames, n = 0.5 s, flow + fuse = 0.02 s, s0 = 0.002 s, startup 2 s, anchors every 64, lead 10.
    2 ranks: the boundary 500 warms up from its chain start 438 (62 steps); 4 ranks: 250 from 182 (68)."""
    measured = {"network_s": 0.5, "flow_s": 0.01, "fuse_s": 0.01, "send_s": 0.0, "frame_bytes": 0,
                "root_serial_s": 0.002, "startup_s": 2.0, "halo": 10, "every": 64, "halo_wait_s": 0.0}
    rows = scaling.scaling_model(measured, [1, 2, 4], frames=1000)
    assert [r["halo_s"] for r in rows] == pytest.approx([0.0, 62 * 0.02, 68 * 0.02])
    assert [r["total_s"] for r in rows] == pytest.approx([2 + 1000 * 0.522, 2 + 260 + 2 + 1.24, 2 + 130 + 2 + 1.36])
    assert rows[1]["speedup"] == pytest.approx(524.0 / 265.24)
    # The measured wait beyond the schedule's adds on the critical path once per run
    waited = scaling.scaling_model({**measured, "halo_wait_s": 3.0}, [2], frames=1000)[0]
    assert waited["total_s"] == pytest.approx(265.24 + 3.0)


@pytest.mark.parametrize(("frames", "ranks", "policy", "limit", "makespan", "waits"), [
    (192, 2, "exports-first", 74, 96, [0, 0]),  # rank 0 sends [54, 96) first; rank 1 never stops
    (192, 2, "0.3", 20, 172, [0, 76]),  # 0.3: rank 0 reached [54, 96) last; rank 1 ran 20 ahead, then waited
    (1000, 4, "exports-first", 74, 250, [0, 0, 0, 0]),
    (1000, 4, "0.3", 20, 418, [0, 168, 0, 36]),  # rank 1: 62 exports + 20 ahead, waits until 250; rank 3: 20 of 56
])
def test_network_schedule_critical_path_in_passes(frames, ranks, policy, limit, makespan, waits) -> None:
    """Issue 20 without timings: one network pass per time unit, the critical path worked out by hand."""
    from mpistyle.partition import make_plan

    sched = scaling.network_schedule(make_plan(frames, ranks, 10), limit, policy)
    assert sched["makespan"] == makespan and [r["wait"] for r in sched["ranks"]] == waits
    assert sched["ideal"] == -(-frames // ranks)


def test_scaling_model_without_overheads_is_ideal() -> None:
    ideal = {"network_s": 0.5, "halo": 0}
    rows = scaling.scaling_model(ideal, [1, 8, 512], frames=1000)
    for r in rows:
        assert r["overhead_fraction"] == pytest.approx(0.0, abs=1e-12)
        assert r["speedup"] == pytest.approx(r["ranks"])
        assert r["total_s"] == pytest.approx(1000 * 0.5 / r["ranks"])


def test_scaling_model_is_bound_by_the_serial_stream() -> None:
    rows = scaling.scaling_model(SYNTHETIC, [1, 512], frames=10_000)
    threads_s0 = SYNTHETIC["decode_s"] + SYNTHETIC["write_s"] + SYNTHETIC["encode_s"]
    # rank 0's serial share per frame (the larger of thread clocks and CPU time), 10 Gb/s link
    s0 = max(threads_s0, SYNTHETIC["root_cpu_s"]) + 2 * SYNTHETIC["frame_bytes"] / 1.25e9
    assert rows[1]["root_serial_s"] == pytest.approx(10_000 * s0)
    assert rows[1]["bound"] == "rank-0 stream"
    assert rows[1]["total_balanced_s"] >= 10_000 * s0
    with pytest.raises(ValueError):
        scaling.scaling_model(SYNTHETIC, [0])


def test_summarize_derives_ratio_speedup_efficiency() -> None:
    def run(n: int, wall: float, setup: float) -> dict:
        report = {"frames": 10, "wall_s": wall, "work_s": wall - setup, "threads_per_rank": 1,
                  "per_rank": [{"rank": r, "frames": 10 // n, "times_s": {"network": 1.0}} for r in range(n)]}
        return {"process_s": wall + 1.0, "report": report}

    summary = pipeline.summarize({"per_frame_s": 0.5}, {1: run(1, 7.0, 1.0), 2: run(2, 4.0, 1.0)})
    one, two = summary["runs"]
    assert summary["ratio"] == pytest.approx(6.0 / 10 / 0.5)
    assert summary["ratio_wall"] == pytest.approx(7.0 / 10 / 0.5)
    assert two["speedup"] == pytest.approx(2.0) and two["efficiency"] == pytest.approx(1.0)
    assert two["speedup_wall"] == pytest.approx(7.0 / 4.0)
    assert one["per_rank"][0]["other_s"] == pytest.approx(5.0)
    with pytest.raises(ValueError):
        pipeline.summarize({"per_frame_s": 0.5}, {2: run(2, 4.0, 1.0)})


def test_package_keeps_the_old_module_names() -> None:
    # bin/gpu-check and code written against the single-module bench.py use these.
    assert bench.rank0_cost is pipeline.rank0_cost and bench.encode_projection is scaling.encode_projection
    assert bench.SCALING_RANKS == common.SCALING_RANKS and callable(bench.main) and callable(bench.add_arguments)


def test_parse_ranks_always_includes_one() -> None:
    assert common.parse_ranks("2,4") == [1, 2, 4]
    assert common.parse_ranks("2, 1,2") == [1, 2]
    for bad in ("", "0", "a,b", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.parse_ranks(bad)


def test_bench_refuses_to_run_under_mpiexec(monkeypatch) -> None:
    monkeypatch.setenv("PMI_SIZE", "2")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(MpistyleError, match="plain process"):
        bench.main(parser.parse_args([str(BBB)]))


def test_bench_bad_input_is_one_line(tmp_path) -> None:
    proc = run_mpistyle(["bench", str(tmp_path / "missing.mp4")])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpistyle: error:") and "missing.mp4" in lines[0]
    proc = run_mpistyle(["bench", str(BBB), "--ranks", "0"])
    assert proc.returncode == 2 and "rank counts" in proc.stderr


# ----------------------------------------------------------------------------------------------
# --ceiling: the pipeline's own cost with an identity network


@pytest.fixture(scope="module")
def ceiling_result(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("ceiling") / "ceiling.json"
    # HEAD as the baseline: always in a clone; exercises git archive, PYTHONPATH and the side-by-side ratios.
    proc = run_mpistyle(["bench", "--ceiling", "--sizes", "128x72", "--ranks", "1,2", "--frames", "16",
                         "--encode", "segments", "--decode", "rank0", "--baseline-ref", "HEAD",
                         "--json", str(out)], timeout=300, check=True)
    return json.loads(out.read_text()), proc.stdout


def test_ceiling_runs_end_to_end(ceiling_result) -> None:
    result, stdout = ceiling_result
    assert result["mode"] == "ceiling" and result["temporal"] == "flow"  # stylize's default: warm-ups included
    new, base = result["versions"]
    assert new["label"] == "new" and base["label"].startswith("base@") and len(base["commit"]) == 40
    rows = result["rows"]
    assert sorted((r["version"], r["ranks"]) for r in rows) == sorted(
        (v, n) for v in (new["label"], base["label"]) for n in (1, 2))
    frame_msg = 8 + 128 * 72 * 3
    for r in rows:
        assert (r["width"], r["height"], r["frames"], r["encode"], r["decode"]) == (128, 72, 16, "segments", "rank0")
        assert _finite_positive(r["fps"]) and r["fps"] == pytest.approx(16 / r["wall_s"])
        assert _finite_positive(r["cpu_ms_per_frame"]) and r["rank0_children_cpu_s"] > 0  # ffmpeg decodes
        assert 0 < r["cpu_ms_per_frame_net"] < r["cpu_ms_per_frame"]
        assert r["cpu_ms_per_frame"] == pytest.approx((r["rank0_self_cpu_s"] + r["rank0_children_cpu_s"]) / 16 * 1e3)
        assert set(r["cpu_ranks"]) == {str(i) for i in range(r["ranks"])}
        assert r["wall_s"] < r["process_s"]
        if r["ranks"] == 1:
            assert r["recv_bytes"] == 0
        elif r["recv_source"] == "computed":  # v0.2 layout: rank 1's frames, one message each
            assert r["recv_bytes"] == 8 * frame_msg
        else:
            assert 0 <= r["recv_bytes"] <= 16 * frame_msg * 2
    assert len(result["ratios"]) == 2 and all(_finite_positive(q["ratio"]) for q in result["ratios"])
    assert [p["measured_at_ranks"] for p in result["projections"]] == [2, 2]
    for p in result["projections"]:
        assert [x["ranks"] for x in p["predicted"]] == [8, 64, 512] and _finite_positive(p["ceiling_fps"])
    assert "r0 CPU ms/f" in stdout and "usable GPU ranks" in stdout and base["commit"] in stdout


def test_ceiling_bootstrap_patches_load_model_and_records_cpu(tmp_path) -> None:
    """The bootstrap alone, as one plain process: the patched identity model, and a record on SystemExit."""
    import subprocess
    import sys

    from mpistyle.bench import ceiling
    from mpistyle.models import write_identity_model

    from .conftest import ROOT

    boot = ceiling.write_bootstrap(str(tmp_path))
    model = write_identity_model(str(tmp_path / "identity.pth"))
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), ceiling.DIR_ENV: str(tmp_path),
           ceiling.IDENTITY_ENV: "force", "PMI_RANK": "0"}
    out = tmp_path / "out.mp4"
    proc = subprocess.run([sys.executable, boot, "-q", "stylize", str(BBB), "-o", str(out), "--model", model,
                           "--temporal", "none", "--threads", "1", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "cpu-rank0.json").read_text())
    assert record["patched_load_model"] is True and record["exit"] == 0 and out.is_file()
    assert record["self_cpu_s"] > record["startup_cpu_s"] > 0 and record["children_cpu_s"] > 0
    assert record["mpistyle_file"] == str(ROOT / "mpistyle" / "__init__.py")
    # argparse's SystemExit(2): the record is still written, with that code.
    proc = subprocess.run([sys.executable, boot, "stylize"], capture_output=True, text=True,
                          env={**env, "PMI_RANK": "3"}, timeout=60)
    assert proc.returncode == 2
    assert json.loads((tmp_path / "cpu-rank3.json").read_text())["exit"] == 2


def _crow(version: str, ranks: int, encode: str = "segments", decode: str = "rank0", cpu_ms: float = 10.0,
          recv: int = 0, w: int = 640, h: int = 360) -> dict:
    return {"version": version, "width": w, "height": h, "ranks": ranks, "encode": encode, "decode": decode,
            "frames": 100, "cpu_ms_per_frame": cpu_ms, "cpu_ms_per_frame_net": cpu_ms / 2, "recv_bytes": recv,
            "recv_source": "report", "recv_kb_per_frame": recv / 100 / 1e3, "fps": 50.0}


def test_ceiling_received_bytes_from_report_or_computed() -> None:
    from mpistyle.bench import ceiling

    report = {"width": 4, "height": 2, "frames": 10, "ranks": 3,
              "per_rank": [{"rank": 0, "frames": 4, "counts": {}}, {"rank": 1, "frames": 3, "counts": {}},
                           {"rank": 2, "frames": 3}]}
    assert ceiling.rank0_received_bytes(report) == (6 * (8 + 4 * 2 * 3), "computed")
    report["per_rank"][0]["counts"]["recv_bytes"] = 123
    assert ceiling.rank0_received_bytes(report) == (123, "report")
    report["per_rank"][0]["counts"]["recv_bytes"] = 0  # the new pipeline may receive no frame data at all
    assert ceiling.rank0_received_bytes(report) == (0, "report")
    row = ceiling.ceiling_row({**report, "wall_s": 2.0},
                              {"self_cpu_s": 3.0, "children_cpu_s": 1.0, "startup_cpu_s": 2.0}, 5.0)
    assert row["fps"] == pytest.approx(5.0) and row["cpu_ms_per_frame"] == pytest.approx(400.0)
    assert row["cpu_ms_per_frame_net"] == pytest.approx(200.0) and row["recv_kb_per_frame"] == 0.0


def test_ceiling_ratios_and_projections() -> None:
    from mpistyle.bench import ceiling

    rows = [_crow("v02", 1, cpu_ms=30.0), _crow("v02", 4, cpu_ms=40.0, recv=100 * 691_208),
            _crow("new", 1, cpu_ms=15.0), _crow("new", 4, cpu_ms=10.0),
            _crow("new", 4, decode="each", cpu_ms=5.0), _crow("new", 4, encode="rank0", cpu_ms=20.0),
            _crow("new", 2, decode="each", cpu_ms=8.0)]
    qs = {(q["ranks"], q["encode"], q["decode"]): q["ratio"] for q in ceiling.ratios(rows, "v02", "new")}
    assert qs == {(1, "segments", "rank0"): 2.0, (4, "segments", "rank0"): 4.0, (4, "segments", "each"): 8.0}
    proj = {(p["version"], p["decode"]): p for p in ceiling.projections(rows, link_gbps=10.0, gpu_rank_fps=300.0)}
    assert set(proj) == {("v02", "rank0"), ("new", "rank0"), ("new", "each")}
    assert all(p["measured_at_ranks"] == 4 for p in proj.values())  # the largest segments run, not the rank0 one
    assert proj[("new", "each")]["serial_s"] == pytest.approx(0.0025)  # net CPU: 5 ms / 2
    v02 = proj[("v02", "rank0")]
    assert v02["recv_bytes_per_frame"] == 691_208 and v02["serial_s"] == pytest.approx(0.02)
    assert v02["serial_fps"] == pytest.approx(50.0) and v02["link_fps"] == pytest.approx(1.25e9 / 691_208)


def test_ceiling_projection_bounds() -> None:
    # rank 0 at 2 ms/frame: 500 f/s; 1 MB/frame over 10 Gb/s: 1250 f/s; GPU ranks at 300 f/s.
    p = scaling.ceiling_projection(0.002, 1e6, link_gbps=10.0, gpu_rank_fps=300.0, ranks=(1, 8, 512))
    assert p["serial_fps"] == pytest.approx(500.0) and p["link_fps"] == pytest.approx(1250.0)
    assert p["ceiling_fps"] == pytest.approx(500.0) and p["bound"] == "rank-0 serial"
    assert p["usable_gpu_ranks"] == pytest.approx(500.0 / 300.0)
    assert [(x["fps"], x["bound"]) for x in p["predicted"]] == [
        (300.0, "GPU ranks"), (pytest.approx(500.0), "rank-0 serial"), (pytest.approx(500.0), "rank-0 serial")]
    assert p["predicted"][1]["efficiency"] == pytest.approx(500.0 / 2400.0)
    # Link-bound: 1080p frames to rank 0 over 10 Gb/s, rank 0 itself cheap.
    q = scaling.ceiling_projection(0.0001, 8 + 1920 * 1080 * 3, ranks=(8, 64))
    assert q["bound"] == "link" and q["ceiling_fps"] == pytest.approx(1.25e9 / (8 + 1920 * 1080 * 3))
    assert q["predicted"][1]["bound"] == "link"
    # No frame data to rank 0 and no serial cost: only the ranks limit.
    r = scaling.ceiling_projection(0.0, 0.0, ranks=(512,))
    assert math.isinf(r["ceiling_fps"]) and r["predicted"][0]["fps"] == pytest.approx(512 * 300.0)
    with pytest.raises(ValueError):
        scaling.ceiling_projection(0.001, 0.0, link_gbps=0.0)
    from mpistyle.bench.ceiling import json_safe

    assert json_safe({"a": [math.inf, 1.0], "b": (math.nan,), "c": "x"}) == {"a": [None, 1.0], "b": [None], "c": "x"}


def test_ceiling_parsers_and_table() -> None:
    from mpistyle.bench import ceiling

    assert ceiling.parse_sizes("640x360, 1920X1080,640x360") == [(640, 360), (1920, 1080)]
    for bad in ("", "640", "641x360", "0x0", "axb"):
        with pytest.raises(ValueError):
            ceiling.parse_sizes(bad)
    assert ceiling.parse_modes("both", ceiling.ENCODE_MODES, "--encode") == ["rank0", "segments"]
    assert ceiling.parse_modes("each,rank0,each", ceiling.DECODE_MODES, "--decode") == ["each", "rank0"]
    with pytest.raises(ValueError):
        ceiling.parse_modes("auto", ceiling.ENCODE_MODES, "--encode")
    assert ceiling.default_frames(640, 360) == 384 and ceiling.default_frames(1920, 1080) == 128
    rows = [{**_crow("v02", 2, cpu_ms=12.5, recv=100 * 691_208), "recv_source": "computed"},
            _crow("new", 2, cpu_ms=6.25)]
    result = {"versions": [{"label": "new", "source": "/src/new", "commit": None, "decode_flag": True},
                           {"label": "v02", "source": "/src/v02", "commit": "c" * 40, "decode_flag": False}],
              "new_label": "new", "baseline_label": "v02", "temporal": "none", "threads": 1, "device": "cpu",
              "host": {"cpus": 2, "load_start": 0.1, "load_end": 0.2}, "rows": rows,
              "ratios": ceiling.ratios(rows, "v02", "new"), "projections": ceiling.projections(rows)}
    text = ceiling.format_ceiling(result)
    assert "12.5" in text and "6.2" in text and "691*" in text and "2.00x" in text and "c" * 40 in text
    assert "f/s @512 GPU ranks" in text and "--decode yes" in text


def test_ceiling_matrix_keeps_going_past_a_failed_run(monkeypatch) -> None:
    from mpistyle.bench import ceiling

    def fake_job(mpiexec, version, boot, clip, model, n, w, h, encode, decode, *rest):
        if n == 2:
            raise MpistyleError(f"the {n}-rank run failed")
        return _crow(version.label, n, encode=encode, decode=decode, w=w, h=h)

    monkeypatch.setattr(ceiling, "run_job", fake_job)
    monkeypatch.setattr(ceiling, "supports_decode", lambda v: True)
    monkeypatch.setattr(ceiling, "make_clip", lambda src, w, h, frames, d: __import__("shutil").copy(str(BBB), d))
    args = argparse.Namespace(sizes="128x72", encode="segments", decode="rank0,each", ranks=[1, 2], video=None,
                              threads_per_rank=1, baseline=None, baseline_ref=None, baseline_label=None, frames=4,
                              ceiling_temporal="none", device="cpu", link_gbps=10.0, gpu_rank_fps=300.0)
    result = ceiling.run(args, "mpiexec")
    assert [(r["ranks"], r["decode"]) for r in result["rows"]] == [(1, "rank0"), (1, "each")]
    assert [(f["ranks"], f["decode"]) for f in result["failures"]] == [(2, "rank0"), (2, "each")]
    assert "FAILED: new 128x72 2 rank(s) segments/each: the 2-rank run failed" in ceiling.format_ceiling(result)
    monkeypatch.setattr(args, "ranks", [2])
    with pytest.raises(MpistyleError, match="every ceiling run failed"):
        ceiling.run(args, "mpiexec")


def test_marginal_cost_leaves_out_the_fixed_costs() -> None:
    short = {"frames": 10, "rank0_cpu_s": 3.0, "recv_bytes": 100, "cpu_ms_per_frame_net": 200.0}
    long = {"frames": 40, "rank0_cpu_s": 3.6, "recv_bytes": 700, "cpu_ms_per_frame_net": 60.0}
    row = ceiling.with_marginal(short, long)
    assert row["marginal_cpu_ms_per_frame"] == pytest.approx(20.0)  # 0.6 s over 30 extra frames
    assert row["marginal_recv_kb_per_frame"] == pytest.approx(0.02)
    assert ceiling.cost_ms(row) == pytest.approx(20.0) and ceiling.cost_ms(long) == 60.0
    assert ceiling.serial_ms(row) == pytest.approx(20.0)  # one rank: all of it is serial
    # with other ranks, rank 0's serial cost is what it does beyond the median rank
    cpu = {"0": {"self_cpu_s": 3.0, "children_cpu_s": 0.0}, "1": {"self_cpu_s": 2.0, "children_cpu_s": 0.0},
           "2": {"self_cpu_s": 2.1, "children_cpu_s": 0.0}}
    cpu_long = {"0": {"self_cpu_s": 3.6, "children_cpu_s": 0.0}, "1": {"self_cpu_s": 2.45, "children_cpu_s": 0.0},
                "2": {"self_cpu_s": 2.55, "children_cpu_s": 0.0}}
    row = ceiling.with_marginal({**short, "cpu_ranks": cpu}, {**long, "cpu_ranks": cpu_long})
    assert row["worker_marginal_ms"] == pytest.approx(15.0) and ceiling.serial_ms(row) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        ceiling.with_marginal(long, short)


def test_bench_train_runs_both_settings_side_by_side(tmp_path) -> None:
    """bin/bench-train: 0.3's default and today's, one size, a few steps; both rows come out with
    positive images/s (no speed threshold here: see docs/performance.md), and the new default's loss was compiled
    (the 0.3 default's was not), as each model file's provenance records."""
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "bench-train"), "--sizes", "32", "--steps", "3",
                           "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    row = re.search(r"^\| 32 px \| ([0-9.e+-]+) \(([0-9.e+-]+)\) \| ([0-9.e+-]+) \(([0-9.e+-]+)\) \| "
                    r"([0-9.]+)x \(([0-9.]+)x\) \|$", proc.stdout, re.M)
    assert row, proc.stdout
    old, _, new, _, _, _ = map(float, row.groups())
    assert old > 0 and new > 0
    assert "loss compiled: 0.3 default no, new default yes" in proc.stdout, proc.stdout


@pytest.mark.parametrize("argv", [
    ["bench", "--ceiling", "--ranks", "1,2", "--sizes", "640x360", "--encode", "segments"],
    ["bench", "--ceiling", "--ceiling-temporal", "none", "--long-factor", "3", "--baseline-ref", "6cdba49"],
    ["bench", "clip.mp4", "--ranks", "1,2", "--frames", "6", "--launcher-args=-bind-to core", "--json", "x.json"],
    ["bench", "--networks", "--network-sizes", "640x272", "--network-threads", "1"],
])
def test_printed_command_reproduces_the_options_defaults_included(argv: list[str]) -> None:
    """The line printed beside the tables parses back to the same settings, and it spells out the defaults
    that decide what is measured (--ceiling-temporal, stylize's --temporal in the ceiling runs)."""
    import shlex

    from mpistyle.bench.cli import _CEILING_OPTIONS, _NETWORK_OPTIONS, reproduce_command
    from mpistyle.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)
    command = reproduce_command(args)
    words = shlex.split(command)
    assert words[:2] == ["mpistyle", "bench"]
    again = parser.parse_args(words[1:])
    if args.ceiling:
        assert f"--ceiling-temporal {args.ceiling_temporal}" in command  # flow unless asked: the default
        checked = _CEILING_OPTIONS
    elif args.networks:
        checked = _NETWORK_OPTIONS
    else:
        checked = ("video", "ranks", "frames", "launcher_args", "threads_per_rank", "device", "compile", "encode")
        assert "--json" not in command and "--ceiling-temporal" not in command
    assert {k: getattr(again, k) for k in checked} == {k: getattr(args, k) for k in checked}


def test_ceiling_table_prints_its_reproduce_command() -> None:
    result = {"versions": [], "temporal": "flow", "threads": 1, "device": "cpu",
              "host": {"cpus": 2, "load_start": 0.1, "load_end": 0.2}, "rows": [],
              "command": "mpistyle bench --ceiling --ceiling-temporal flow"}
    assert "  reproduce: mpistyle bench --ceiling --ceiling-temporal flow" in ceiling.format_ceiling(result)
