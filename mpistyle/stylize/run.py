"""The stylize run from start to end: setup, plan, start the stages, work, shutdown."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from fractions import Fraction
from typing import Any

from ..buffer import settings_digest
from ..errors import MpistyleError, exit_code_for
from ..mpi import StopFlag, configure_threads, local_rank_and_size, pause_point, select_device, threads_per_rank
from ..partition import RankPlan, make_plan
from ..rawbuffer import remove_raw_except
from .comm import Messenger, Stopped, describe
from .gather import Sink
from .options import Setup, StylizeOptions, chunk_list
from .scatter import Decoder, LocalDecoder, Receiver, Scheduler, SourceSpool
from .segments import SegmentWriter, prepare_segment_dir, segment_dir, segment_threads, uses_segments
from .setup import Validated, choose_network, collective, open_buffer_on_root, read_state_frames, validate_on_root
from .shutdown import shutdown
from .spool import OutputSpool, slots_needed
from .store import FrameStore
from .worker import RankWorker

logger = logging.getLogger(__name__)


def open_outputs(setup: Setup, rp: RankPlan, rank: int, ahead_limit: int, batch: int, dynamic: bool) -> OutputSpool:
    """This rank's raw-output file, holding (durably) the outputs a stopped job stored for its frames."""
    from ..rawbuffer import RawFile, read_raw

    todo = set(rp.todo)
    inherited = {t: entry for t, entry in setup.raw.items() if t in todo} if not dynamic else {}
    slots = slots_needed(len(set(rp.exports) - set(inherited)), len(inherited), ahead_limit, batch)
    shape = (setup.height, setup.width, 3)
    outputs = OutputSpool(shape, RawFile(setup.buffer_path, rank, slots, shape, settings_digest(setup.settings)))
    outputs.load(read_raw(setup.buffer_path, inherited))
    return outputs


def run_stylize(opts: StylizeOptions, comm: Any | None = None) -> dict[str, Any]:
    """Stylize ``opts.input`` into ``opts.output`` on every rank of ``comm``. Returns rank 0's report.

    Raises MpistyleError (same message on every rank for setup problems), Interrupted after a
    signal (buffer consistent; rerun to resume).
    """
    from ..mpi import world

    comm = comm or world()
    if opts.style_strength == 0.0 and opts.temporal.mode != "none":
        # S = 0 is the source itself, which needs no steadying: the fusion's warping would only soften it
        # (measured on sample.mp4, 2 ranks: 3.80 levels from the source against 2.50 for the source
        # re-encoded alone). The buffer records temporal none.
        opts = replace(opts, temporal=replace(opts.temporal, mode="none"))
    rank, size = comm.Get_rank(), comm.Get_size()
    stop = StopFlag()
    stop.install_signal_handlers()  # takes over a signal that came during start-up: the run stops at once
    msgr = Messenger(comm, stop)
    if rank == 0:
        logger.debug("phase: setup")  # debug: a setup error must stay the only line a failed run prints
    pause_point("setup", stop)
    t_start = time.perf_counter()

    local_rank, local_size = local_rank_and_size(comm)
    threads = threads_per_rank(local_size, opts.threads)
    configure_threads(threads)

    checked: Validated = collective(comm, lambda: validate_on_root(opts, size))
    # The look controls (mpistyle.controls): the network runs at the stroke scale's size, and at full size
    # too for painted detail; the batch and the compiled network are for the largest of those sizes.
    controls = opts.controls(checked.height, checked.width)
    net_sizes = controls.network_sizes(checked.height, checked.width)
    net_h, net_w = net_sizes[0]

    def load() -> Any:
        import torch

        from ..engine import Stylizer, resolve_precision
        from ..models import load_model

        device = select_device(opts.device, local_rank)
        model = load_model(checked.model_path, device)
        dtype = resolve_precision(opts.precision, torch.device(device))
        stylizer = Stylizer(model, device=torch.device(device), precision=opts.precision)
        # --batch auto: from the device's free memory, shared by the ranks bound to the same GPU
        sharing = -(-local_size // max(1, torch.cuda.device_count())) if device.startswith("cuda") else 1
        batch = stylizer.resolve_batch(opts.batch or "auto", net_h, net_w, ranks_per_device=sharing)
        return stylizer, device, dtype, batch

    stylizer, device, dtype, batch = collective(comm, load, root_only=False)
    # The numeric path, the same on every rank: compiled once per job (rank 0 compiles or reads the cache
    # in a background thread; mpistyle.compiled), or the eager recipe. The wait for it is spent decoding.
    network, network_why = collective(comm, lambda: choose_network(opts, checked, stylizer))
    compile_job = None
    if network.startswith("compiled/"):
        from ..compiled import start_compile

        if rank == 0:
            logger.info("preparing the compiled network for %dx%d frames (compiled once per frame size and "
                        "machine, then read from the cache)", net_w, net_h)
        compile_job = start_compile(comm, stylizer, (batch, net_h, net_w, 3))
    precision_name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    device_type = device.split(":")[0]
    segmented = uses_segments(opts.output, size, opts.encode)  # validated on rank 0 above
    seg_threads = segment_threads(device_type)

    def open_on_root(restart: bool = False) -> Setup:
        """The buffer for the job's network path (``network`` as it stands); ``restart``: made afresh."""
        opened = open_buffer_on_root(replace(opts, restart=True) if restart else opts, checked, precision_name,
                                     device_type, n_ranks=size, network=network)
        if segmented:  # before any rank can write a segment; a resume keeps the blocks already encoded
            prepare_segment_dir(segment_dir(opts.output), resume=bool(opened.done.any()),
                                params={"buffer": settings_digest(opened.settings), "crf": opts.crf,
                                        "threads": seg_threads, "size": [opened.width, opened.height],
                                        "fps": [opened.fps_num, opened.fps_den], "frames": opened.n_frames})
        return opened

    setup: Setup = collective(comm, open_on_root)
    temporal_on = opts.temporal.mode != "none"
    dynamic = opts.schedule == "dynamic"
    local_decode = checked.decode == "each"  # resolved on rank 0: static schedule only
    n_parts = (opts.chunks or 4 * size) if dynamic else size
    # Dynamic chunks start at anchors, so each warms up over the lead only (see partition.py).
    plan = make_plan(setup.n_frames, n_parts, opts.halo, done=list(setup.done), temporal=temporal_on,
                     align=dynamic)
    # Static: this rank's partition. Dynamic: chunks arrive one by one; start with nothing.
    rp = plan.ranks[rank] if not dynamic else RankPlan(rank=rank, bounds=(0, 0))
    logger.debug("rank %d/%d (local %d/%d): device %s, %d threads, partition %s, %d runs, %d to do",
                 rank, size, local_rank, local_size, device, threads, rp.bounds, len(rp.runs), len(rp.todo))
    opened: list[Any] = []  # rank 0's FrameBuffer

    def index_on_root() -> None:
        # The main file maps every frame to the part that holds it or will: readable as one dataset now.
        from ..buffer import FrameBuffer

        index = FrameBuffer.open(setup.buffer_path, setup.n_frames, setup.height, setup.width, setup.settings)
        opened.append(index)
        index.write_index([(run.start, run.stop) for p in plan.ranks for run in p.runs])

    shape = (setup.height, setup.width, 3)
    # A rank that decodes its own frames reads its exports first (the network stylizes them first);
    # rank 0's decoder sends every rank its frames in video order.
    source_order = rp.source_order() if local_decode else rp.source_frames()
    spool = SourceSpool(source_order, shape, opts.scratch, msgr.interrupted)
    threads_started: list[threading.Thread] = []
    receiver = decoder = sink = store = None
    buffer = encoder = scheduler = None
    worker = None
    parallel = None
    compile_info: dict[str, Any] = {}
    outcome = "done"
    t_work = time.perf_counter()
    try:
        # The source frames flow while rank 0 compiles: they do not depend on the network path. (Dynamic:
        # rank 0's decoder follows the scheduler, which needs the buffer; it starts below.)
        if local_decode:  # every rank reads its own frames (a frame-exact seek); nothing is scattered
            decoder = LocalDecoder(opts.input, (setup.width, setup.height), source_order, spool, msgr,
                                   info=checked.info)
        elif rank != 0:
            receiver = Receiver(comm, chunk_list(rp.source_frames(), opts.chunk), spool, msgr, dynamic=dynamic,
                                chunk=opts.chunk)
        elif not dynamic:
            decoder = Decoder(comm, opts.input, (setup.width, setup.height), plan, opts.chunk, spool, msgr,
                              info=checked.info)
        for th in (decoder, receiver):
            if th is not None:
                th.start()
                threads_started.append(th)
        if compile_job is not None:
            compile_info = compile_job.finish(comm)
            if not compile_info["compiled"]:  # every rank agrees (finish): the job runs eagerly
                network_why += f"; compilation failed: {compile_info.get('error')}"
                network = stylizer.network
                # The buffer records the path its frames take. None is written yet: a fresh buffer is made
                # again for the eager path; one being resumed holds compiled frames, which must not mix.
                if setup.done.any():
                    raise MpistyleError(f"the buffer's frames were made by the compiled network, which could not "
                                        f"be compiled here ({compile_info.get('error')}); rerun, or start again "
                                        "with --compile off --restart")
                if rank == 0:
                    logger.warning("the job runs eagerly (%s); its new buffer records that path", network)
                setup = collective(comm, lambda: open_on_root(restart=True))
        source_ready = spool.arrived  # decoded (or received) while the compilation ran: the report says it
        t_work = time.perf_counter()  # all ranks left the last collective (setup or compile) together: a shared origin
        # Static: each rank fuses the stored outputs of its own frames. Dynamic: nobody knows yet who gets
        # which chunk; those frames are stylized again (same bits) and the old outputs deleted below.
        reused = len(setup.raw) if not dynamic else 0
        if rank == 0:
            logger.info(run_summary(setup.n_frames, plan.n_todo, setup.width, setup.height, size,
                                    checked.model_path, device, precision_name, network, reused))
            if not controls.identity:
                logger.info("look: %s (network at %s)", controls.describe(),
                            " and ".join(f"{w}x{h}" for h, w in net_sizes))
            # The details, for -v: the numeric recipe, why it was (not) compiled, the threads.
            logger.debug("network %s (%s); %d thread(s) per rank", network, network_why, threads)
        collective(comm, index_on_root)  # before any rank reads stored frames from it
        # Stored outputs that start runs exactly: each rank reads its own (static schedule).
        state_frames = collective(comm, lambda: read_state_frames(setup.buffer_path, rp.buffer_frames())
                                  if not dynamic else {}, root_only=False)
        if setup.layout == "mpio":  # one file, written by every rank: opened together, closed together
            from ..buffer import open_parallel

            parallel = collective(comm, lambda: open_parallel(setup.buffer_path, comm), root_only=False)
        outputs = collective(comm, lambda: open_outputs(setup, rp, rank, plan.max_warmup + batch if rp.imports else 0,
                                                        batch, dynamic), root_only=False)
        names = comm.gather(outputs.raw.name if outputs.raw is not None else "", root=0)
        # Every rank holds its share durably in its own file now: the old files go (one generation on disk)
        collective(comm, lambda: remove_raw_except(setup.buffer_path, names))
        store = FrameStore(setup.buffer_path, setup.height, setup.width, settings_digest(setup.settings), msgr,
                           parallel=parallel)
        later: list[threading.Thread] = [store]
        if rank == 0:
            from ..io.media import open_writer

            buffer = opened[0]
            buffer.attach(parallel)
            if not segmented:  # one in-order encoder on rank 0; veryfast: medium costs ~2x CPU for no gain here
                encoder = open_writer(opts.output, setup.width, setup.height, Fraction(setup.fps_num, setup.fps_den),
                                      audio_from=opts.input if setup.has_audio else None, crf=opts.crf,
                                      preset="veryfast", threads=1, n_frames=setup.n_frames,
                                      first_number=checked.info.first_number)  # a video, or PNG frames
            sink = Sink(comm, buffer, encoder, setup, plan, msgr, opts.progress)
            if dynamic:
                scheduler = sink.scheduler = Scheduler(plan, buffer)
                if not local_decode:
                    decoder = Decoder(comm, opts.input, (setup.width, setup.height), plan, opts.chunk, spool, msgr,
                                      scheduler=scheduler, info=checked.info)
                    later.append(decoder)
            later.append(sink)
        for th in later:
            th.start()
            threads_started.append(th)
        if rank == 0:
            logger.info("phase: compute")
        # Flow pool: on a GPU node the rank's cores are free for flow; on CPU ranks the network has them.
        from ..engine import ControlledStylizer

        # The controls act on the network's output, before fusion: the worker sees the final look.
        looks = ControlledStylizer(stylizer, controls)
        worker = RankWorker(comm, rp, plan, setup, looks, opts.temporal, spool, msgr, store, batch, state_frames,
                            t0=t_work, flow_workers=threads if device_type == "cuda" else 1, outputs=outputs)
        worker.counts["source_frames_ready_at_start"] = source_ready
        if sink is not None:
            sink.local = worker.progress
        if segmented:
            worker.segments = SegmentWriter(segment_dir(opts.output), setup.width, setup.height,
                                            Fraction(setup.fps_num, setup.fps_den), opts.crf,
                                            threads=seg_threads, n_frames=setup.n_frames)
            worker.segments.start()
        if dynamic:
            worker.run_dynamic(scheduler, receiver)
        else:
            worker.run()
    except Stopped:
        outcome = "stopped"
    except Exception as exc:  # noqa: BLE001 - every failure goes through the same shutdown
        msgr.fail(describe(exc), exit_code_for(exc))
        outcome = "failed"
    try:
        report = shutdown(comm, msgr, worker, store, receiver, decoder, sink, buffer, encoder, setup, plan, opts,
                           threads, device, precision_name, (t_start, t_work), segmented, parallel)
    finally:
        spool.close()
    if report:  # rank 0
        report["network"] = {"path": network, "why": network_why, **compile_info}
        report["outputs_inherited"] = sum(r["trace"].get("outputs_inherited", 0) for r in report["per_rank"])
        report["controls"] = {**controls.settings(), "network_sizes": [[w, h] for h, w in net_sizes]}
    logger.debug("rank %d: work ended: %s", rank, outcome)
    return report


_SHORT_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def run_summary(n_frames: int, todo: int, width: int, height: int, ranks: int, model_path: str, device: str,
                precision: str, network: str, reused: int = 0) -> str:
    """The line a user reads first: what is stylized, where and how, in plain words (details at -v)."""
    style = os.path.splitext(os.path.basename(model_path))[0]
    where = "CPU" if device == "cpu" else f"GPU {device}"
    how = ", ".join([where, _SHORT_PRECISION.get(precision, precision)]
                    + (["compiled"] if network.startswith("compiled/") else []))
    done = n_frames - todo
    resumed = f"; {done} were done before, {todo} to go" if done else ""
    if reused:  # outputs the network made before a kill, kept in the buffer: fused, not stylized again
        resumed += f" ({todo - reused} to do; {reused} more stylized before the stop, to fuse)"
    return (f"stylizing {n_frames} frames at {width}x{height} on {ranks} rank{'s' if ranks != 1 else ''} "
            f"with '{style}' ({how}){resumed}")
