"""``mpistyle bench``: network forward time vs whole-pipeline time, and rank scaling, in one run.

What it measures, on one clip (cut to ``--frames`` first when asked):

1. **forward**: the pure network, in this process: the model loaded as ``stylize`` loads it, the
   same :class:`~mpistyle.engine.Stylizer` at the same precision, torch limited to
   ``--threads-per-rank`` threads, two warm-up calls, then the decoded frames one per call
   (decoding is not timed). Also the reduced-precision output (bf16 on CPU, fp16 on CUDA) against
   fp32 on real frames: max abs difference and PSNR.
2. **pipeline**: ``mpiexec -n N python -m mpistyle stylize CLIP --threads T --report R.json`` for
   every N in ``--ranks`` (1 is always included). Three clocks per run, all divided by the frame
   count to give seconds per frame:

   - ``process_s``: the launcher's wall clock (mpiexec, interpreter start, imports, everything);
   - ``wall_s``: the report's clock: from the start of ``run_stylize`` (before model load) to the end
     (output closed);
   - ``work_s``: ``wall_s`` minus ``setup_s`` (probe, model load, buffer): from the moment every rank
     leaves setup to the end, i.e. *excluding* the fixed startup but including the final
     encode/mux.

   ``ratio`` = (1-rank ``work_s`` per frame) / (forward s per frame), target <= 1.15 (``ratio_wall``
   uses ``wall_s``). ``speedup`` = t(1) / t(N) and ``efficiency`` = speedup / N, both on ``work_s``;
   ``speedup_wall`` / ``efficiency_wall`` on ``wall_s``. ``cpu_s`` is the CPU time of every process
   of the run (ranks and ffmpeg): far below ranks x ``process_s`` means other jobs held the cores.
3. **scaling model**: a projection for long videos on 1..512 ranks from the measured per-frame
   costs (see :func:`scaling_model`).
4. **flow and fusion alone**: pair flows/s with 1 thread and with a :class:`~mpistyle.temporal.flowpool.FlowPool`
   of one thread per CPU (``--flow-pairs``), so the pool's effect shows on any machine; and fusion
   ms/frame with the NumPy/OpenCV reference and with the torch kernels on ``--device``.
5. **rank 0's serial cost per frame, per output mode**: with ``--encode both`` (default) every
   multi-rank pipeline runs twice, ``--encode segments`` (each rank encodes its frames, rank 0 joins)
   and ``--encode rank0`` (one x264 on rank 0). From the largest run of each mode: rank 0's decode,
   HDF5 write/commit, and encode (rank0) or join (segments), per frame of the video. Their sum is
   the measured serial cost ``s0`` that the scaling model then uses for that mode, giving a frames/s
   ceiling ``1 / s0`` and how many ranks (CPU ranks as measured; GPU ranks at ``--gpu-rank-fps``)
   fit under it (see :func:`rank0_cost` and :func:`encode_projection`).

``--repeat R`` repeats each measurement and keeps the fastest (the least disturbed by other jobs
on a shared machine); every repeat is kept in the JSON. The 1-minute load average before and after
each measurement is recorded next to it.

Layout (one concern per module):

- :mod:`.common`: constants and shared helpers (clips, rank lists, the launcher, the load average);
- :mod:`.measure`: in-process micro-benchmarks (forward, flow, fusion);
- :mod:`.pipeline`: real ``mpiexec ... stylize`` runs and what their reports say;
- :mod:`.scaling`: the scaling model (pure functions);
- :mod:`.ceiling`: ``--ceiling``, the pipeline's own cost with an identity network, against a baseline;
- :mod:`.format`: text tables;
- :mod:`.cli`: arguments and ``main``.
"""

from __future__ import annotations

# add_arguments and main: what mpistyle.cli uses. The rest: the names the single-module bench.py had,
# for scripts that use them (bin/gpu-check: rank0_cost, encode_projection, SCALING_RANKS).
from .cli import add_arguments, main
from .common import (
    ENCODE_MODES,
    GPU_RANK_FPS,
    HELPER_PHASES,
    LONG_VIDEO_FRAMES,
    MAIN_PHASES,
    SCALING_RANKS,
    TARGETS,
    cut_video,
    default_video,
    parse_ranks,
)
from .format import format_report
from .measure import measure_flow, measure_forward, measure_fusion
from .pipeline import (
    encode_jobs,
    measured_costs,
    overhead_breakdown,
    rank0_cost,
    run_pipeline,
    summarize,
    work_seconds,
)
from .scaling import ceiling_projection, encode_projection, root_serial_per_frame, scaling_model

__all__ = [
    "ENCODE_MODES", "GPU_RANK_FPS", "HELPER_PHASES", "LONG_VIDEO_FRAMES", "MAIN_PHASES", "SCALING_RANKS", "TARGETS",
    "add_arguments", "ceiling_projection", "cut_video", "default_video", "encode_jobs", "encode_projection",
    "format_report", "main", "measure_flow", "measure_forward", "measure_fusion", "measured_costs",
    "overhead_breakdown", "parse_ranks", "rank0_cost", "root_serial_per_frame", "run_pipeline", "scaling_model",
    "summarize", "work_seconds",
]
