"""Text tables of a bench result."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .common import HELPER_PHASES, MAIN_PHASES


def fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  " + "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return lines


def format_report(result: dict[str, Any]) -> str:
    """The human-readable tables of a bench result."""
    fwd = result["forward"]
    summ = result["summary"]
    chk = fwd["precision_check"]
    host = result["host"]
    lines = [
        f"mpistyle bench: {result['video']} ({result['frames']} frames, "
        f"{result['width']}x{result['height']}), model {os.path.basename(result['model'])}",
        f"device {fwd['device']}, precision {fwd['precision']}, {result['threads_per_rank']} thread(s) per "
        f"rank, {host['cpus']} CPUs, load (1 min) {host['load_start']} at start, {host['load_end']} at end",
        *([f"reproduce: {result['command']}"] if result.get("command") else []),
        "",
        f"network forward (pure, 1 frame/call, {fwd['frames']} frames after {fwd['warmup_calls']} warm-up "
        f"calls): {fwd['per_frame_s']:.4f} s/frame (median {fwd['median_s']:.4f}, min {fwd['min_s']:.4f}; "
        f"CPU {fwd['cpu_per_frame_s']:.4f} s/frame), network {fwd.get('network', '-')}; mpistyle 0.3's eager "
        f"path beside it: {fmt(fwd.get('eager_per_frame_s'), '.4f')} s/frame; decoding the {fwd['frames']} "
        f"frames: {fmt(fwd.get('decode_s'), '.2f')} s",
        f"{chk['reduced']} vs fp32 on {chk['frames']} real frames: max abs diff {chk['max_abs_diff']}/255, "
        f"mean {chk['mean_abs_diff']:.4f}, PSNR min {fmt(chk['psnr_min_db'], '.1f')} dB "
        f"(fp32 {chk['fp32_s_per_frame']:.3f} s/frame, {chk['reduced']} "
        f"{chk[chk['reduced'] + '_s_per_frame']:.3f} s/frame)",
        "",
        _flow_line(result),
        _fusion_line(result),
        *_network_lines(result),
        "",
        "pipeline (mpiexec -n N mpistyle stylize; s/frame: process = launcher clock, wall = report wall_s "
        "incl. setup, work = wall_s - setup_s):",
    ]
    rows = [[str(r["ranks"]), fmt(r["process_s"], ".1f"), fmt(r["wall_s"], ".1f"),
             fmt(r["setup_s"], ".1f"), fmt(r["work_s"], ".1f"), fmt(r["s_per_frame_process"], ".4f"),
             fmt(r["s_per_frame_wall"], ".4f"), fmt(r["s_per_frame_work"], ".4f"),
             fmt(r["speedup"], ".2f") + "x", fmt(r["efficiency"], ".2f"),
             fmt(r["speedup_wall"], ".2f") + "x", fmt(r["speedup_process"], ".2f") + "x",
             fmt(r["wait_halo_max_fraction"] * 100, ".1f") + "%", fmt(r["cpu_s"], ".1f"),
             f"{r['load_before']}/{r['load_after']}"]
            for r in summ["runs"]]
    lines += table(["ranks", "process_s", "wall_s", "setup_s", "work_s", "s/f proc", "s/f wall", "s/f work",
                     "speedup", "eff", "speedup(wall)", "speedup(proc)", "wait_halo max", "cpu_s", "load"], rows)
    lines += ["", f"pipeline/forward at 1 rank: {summ['ratio']:.3f} (work_s), {summ['ratio_wall']:.3f} "
                  f"(wall_s), {summ['ratio_process']:.3f} (process); work_s / network time in the same run: "
                  f"{fmt(summ['ratio_in_run'])}"]
    lines += ["", "per rank (s; main thread: network wait_flow fuse send wait_halo wait_source; helpers: "
                  "flow decode write encode segment_encode join; other = work_s - main thread):"]
    rows = []
    for r in summ["runs"]:
        for pr in r["per_rank"]:
            t = pr["times_s"]
            counts = pr["counts"] or {}
            net = t.get("network", 0.0) / counts["network_frames"] if counts.get("network_frames") else None
            rows.append([str(r["ranks"]), str(pr["rank"]), str(pr["frames"]),
                         *(fmt(t.get(p, 0.0), ".2f") for p in (*MAIN_PHASES, *HELPER_PHASES)),
                         fmt(pr["other_s"], ".2f"), str(counts.get("halo_frames", 0)), fmt(net, ".4f")])
    lines += table(["N", "rank", "frames", *MAIN_PHASES, *HELPER_PHASES, "other", "halo_fr", "net/frame"],
                    rows)
    ob = result["overhead_1rank"]
    lines += ["", "1-rank time beyond frames x forward (s): " + ", ".join(
        f"{k} {v:+.2f}" for k, v in ob.items())]
    lines += ["", "targets: " + "; ".join(
        f"{t['name']} {t['value']:.3f} ({'<=' if t['kind'] == 'max' else '>='} {t['target']}: "
        f"{'met' if t['met'] else 'MISSED'})" for t in result["targets"])]
    m = result["measured"]
    lines += ["", f"scaling model ({result['scaling'][0]['frames']} frames; per frame: network "
                  f"{m['network_s']:.3f} s, flow {m['flow_s']:.4f}, fuse {m['fuse_s']:.4f}, rank-0 serial: "
                  f"decode {m['decode_s']:.4f} + write {m['write_s']:.4f} + encode {m['encode_s']:.4f} "
                  f"(as CPU time incl. ffmpeg: {m['root_cpu_s']:.4f}); "
                  f"startup {m['startup_s']:.1f} s; halo {m['halo']} frames, wait {m['halo_wait_s']:.2f} "
                  "s/boundary; formulas: bench.scaling.scaling_model):"]
    rows = [[str(r["ranks"]), fmt(r["frames_per_rank"], ".0f"), fmt(r["total_s"], ".0f"),
             fmt(r["overhead_fraction"] * 100, ".1f") + "%", fmt(r["speedup"], ".1f") + "x",
             fmt(r["efficiency"], ".2f"), fmt(r["total_balanced_s"], ".0f"),
             fmt(r["overhead_fraction_balanced"] * 100, ".1f") + "%", r["bound"]] for r in result["scaling"]]
    lines += table(["ranks", "frames/rank", "T_s", "overhead", "speedup", "eff", "T_bal_s", "overhead_bal",
                     "bound (bal)"], rows)
    lines += _encode_lines(result)
    return "\n".join(lines)


def _encode_lines(result: dict[str, Any]) -> list[str]:
    """Rank 0's measured serial cost per --encode mode and how far each mode scales with it."""
    projections = result.get("encode_scaling") or {}
    if not projections:
        return []
    lines = ["", "pipeline runs by --encode mode (s/frame work, speed-up over the 1-rank run):"]
    for mode, mode_runs in result["encode_runs"].items():
        lines.append(f"  {mode}: " + ", ".join(
            f"{n} rank(s) {fmt(r['s_per_frame_work'], '.4f')} ({fmt(r['speedup'], '.2f')}x)"
            for n, r in mode_runs.items()))
    gpu_fps = next(iter(projections.values()))["gpu_rank_fps"]
    lines += ["", "rank 0's serial cost per frame, measured (ms/frame of the video, from the largest run of each "
                  "mode; serial = decode + write + encode + join; link = scatter + gather at 10 Gb/s; "
                  "seg_enc = each rank's own encoder, parallel):"]
    rows = []
    for mode, proj in projections.items():
        cost = result["rank0_cost"][mode]
        rows.append([mode, str(cost["ranks"]), *(fmt(cost[k] * 1e3, ".2f") for k in (
            "decode_s", "write_s", "encode_s", "join_s", "serial_s")), fmt(proj["link_s"] * 1e3, ".2f"),
            fmt(cost["segment_encode_s"] * 1e3, ".2f"), fmt(proj["ceiling_fps"], ".0f"),
            fmt(proj["cpu_ranks_to_wall"], ".0f"), fmt(proj["gpu_ranks_to_wall"], ".1f"),
            fmt(proj["ceiling_overlapped_fps"], ".0f")])
    lines += table(["encode", "ranks", "decode", "write", "encode", "join", "serial", "link", "seg_enc",
                     "ceiling f/s", "ranks to wall (this run's c)", f"GPU ranks @{gpu_fps:.0f} f/s",
                     "ceiling if threads overlap"], rows)
    lines += ["  (join is mostly a fixed cost, a process start and one stream copy, spread here over "
              f"{result['frames']} frames: short clips overstate it per frame)",
              "", "scaling model with each mode's measured rank-0 cost (overhead, equal partitions / balanced):"]
    for mode, proj in projections.items():
        lines.append(f"  {mode}: " + ", ".join(
            f"{r['ranks']}: {r['overhead_fraction'] * 100:.0f}%/{r['overhead_fraction_balanced'] * 100:.0f}%"
            for r in proj["scaling"]))
    return lines


def _flow_line(result: dict[str, Any]) -> str:
    flow = result.get("flow")
    if not flow:
        return "flow alone: not measured"
    one, every = flow["threads_1"], flow["threads_all"]
    return (f"flow alone (DIS fast fwd+bwd + mask, {flow['width']}x{flow['height']}, {flow['pairs']} pairs): "
            f"{one['pairs_per_s']:.1f} pairs/s at 1 thread, {every['pairs_per_s']:.1f} pairs/s with a pool of "
            f"{every['workers']} threads ({flow['speedup']:.2f}x); CPU {one['cpu_s'] / one['pairs'] * 1e3:.1f} ms/pair "
            "(on a shared machine, pairs/s drops with the load; CPU time does not)")


def _fusion_line(result: dict[str, Any]) -> str:
    fusion = result.get("fusion")
    if not fusion:
        return "fusion alone: not measured"
    return (f"fusion alone (warp + blend, {fusion['frames']} frames): NumPy/OpenCV {fusion['numpy_ms']:.2f} ms/frame, "
            f"torch on {fusion['device']} {fusion['torch_ms']:.2f} ms/frame")


PATH_NAMES = {"eager": "eager (0.3)", "fused": "fused", "compiled": "compiled", "openvino": "openvino"}


def format_networks(result: dict[str, Any]) -> str:
    """``mpistyle bench --networks``: the network-paths table with its heading."""
    return "\n".join([f"mpistyle bench --networks: {result['video']}, model {os.path.basename(result['model'])}, "
                      f"{result['host']['cpus']} CPUs, load (1 min) {result['host']['load_start']}",
                      *([f"reproduce: {result['command']}"] if result.get("command") else []),
                      *_network_lines(result)])


def _network_lines(result: dict[str, Any]) -> list[str]:
    """Per size and thread count: s/frame of each network path, ratio to eager, PSNR against fp32 eager."""
    nets = result.get("networks")
    if not nets:
        return []
    names = [n for n in PATH_NAMES if any(n in r["paths"] for r in nets["rows"])]
    lines = ["", f"network paths on CPU ({nets['precision']}; s/frame, fastest of {nets['repeat']} rounds of "
                 f"{nets['frames']} frames, paths side by side; x = ratio to eager; dB = PSNR against fp32 eager):"]
    rows = []
    for r in nets["rows"]:
        cells = [f"{r['width']}x{r['height']}", str(r["threads"])]
        for n in names:
            p = r["paths"].get(n)
            cells.append("-" if p is None else
                         f"{p['s_per_frame']:.3f} ({p['ratio']:.2f}x, {fmt(p['psnr_db'], '.1f')} dB)")
        rows.append(cells)
    lines += table(["size", "threads", *(PATH_NAMES[n] for n in names)], rows)
    seen = set()
    for r in nets["rows"]:
        key = (r["width"], r["height"])
        if key in seen:
            continue
        seen.add(key)
        c = r["setup"].get("compiled", {})
        o = r["setup"].get("openvino")
        text = (f"  {key[0]}x{key[1]}: compiled package: cache {c.get('cache', '-')}"
                + (f", compiled in {c['compile_s']:.0f} s" if c.get("compile_s") else "")
                + (f", failed: {c['error']}" if c.get("error") else ""))
        if o:
            text += (f"; openvino {o.get('version', '')} converted in {fmt(o.get('convert_s'), '.1f')} s, "
                     f"{o.get('precision', '')}" if "error" not in o else f"; openvino: {o['error']}")
        lines.append(text)
    return lines
