"""Shutdown: one path for success, signals and failures; rank 0 commits, encodes and gives the verdict.

Each rank finishes its current frame, commits what it computed to its part of the buffer, finishes its
pending sends and gives rank 0 its final progress; all ranks meet in a non-blocking barrier and cancel
receives that can no longer match. With segments, the blocks no run covered whole are then encoded from
the buffer by all ranks, and rank 0 joins. A watchdog aborts the job if this stalls (a peer vanished).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import threading
import time
from dataclasses import asdict
from fractions import Fraction
from typing import Any

from .. import __version__
from ..buffer import remove_buffer
from ..errors import Interrupted, MpistyleError, io_failure
from ..mpi import StopFlag, pause_point, poll_until
from ..partition import Plan
from .comm import TAG_FIN, TAG_GIVE, Messenger
from .gather import Sink
from .options import Setup, StylizeOptions
from .scatter import Decoder, LocalDecoder, Receiver
from .segments import (
    SEGMENT_FRAMES,
    encode_blocks,
    join_output,
    leftover_share,
    missing_blocks,
    segment_dir,
    segment_threads,
)
from .store import FrameStore
from .worker import RankWorker

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 120.0


class Watchdog:
    """If the orderly shutdown stalls (a peer vanished), abort the whole job instead of hanging."""

    def __init__(self, comm: Any, rank: int, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        def fire() -> None:
            sys.stderr.write(f"mpistyle: error: rank {rank}: shutdown timed out after {timeout:.0f} s; "
                             "aborting the job\n")
            sys.stderr.flush()
            comm.Abort(1)

        self.timer = threading.Timer(timeout, fire)
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        self.timer.cancel()


def shutdown(comm: Any, msgr: Messenger, worker: RankWorker | None, store: FrameStore | None,
              receiver: Receiver | None, decoder: Decoder | LocalDecoder | None, sink: Sink | None, buffer: Any,
              encoder: Any, setup: Setup, plan: Plan, opts: StylizeOptions, threads: int, device: str, precision: str,
              clock: tuple[float, float], segmented: bool, parallel: Any = None) -> dict[str, Any]:
    rank, size = comm.Get_rank(), comm.Get_size()
    if msgr.stop:
        msgr.broadcast_stop()
    if worker is not None and worker.segments is not None:  # its blocks are complete before rank 0 joins
        worker.segments.close(abort=bool(msgr.stop))
    if store is not None:  # everything computed is committed, also after a stop or a failure elsewhere
        store.close()
    if worker is not None:
        worker.finish_sends()
        if worker.awaiting_chunk:  # collect rank 0's answer so its send completes
            if poll_until(lambda: comm.iprobe(source=0, tag=TAG_GIVE), timeout=60):
                comm.recv(source=0, tag=TAG_GIVE)
    if decoder is not None and decoder.is_alive():
        decoder.join()
    if rank != 0:
        comm.send(worker.progress().as_message() if worker is not None else (0, 0, {}), dest=0, tag=TAG_FIN)
    else:
        if sink is not None:
            sink.local_done.set()
            if sink.is_alive():
                while sink.is_alive():
                    sink.join(0.05)
                    msgr.poll_stop_messages()
    # Everyone is here only after their sends completed: meet, then cancel what can't match.
    barrier = comm.Ibarrier()
    poll_until(barrier.Test)
    if parallel is not None:  # mpio layout: every rank is past its last write; close together
        if buffer is not None:
            buffer.attach(None)
        parallel.close()
    if rank == 0 and buffer is not None:
        buffer.rescan()  # the parts are closed: their done flags are the truth
    leftover_frames, leftover_s = 0, 0.0
    if segmented:
        leftover_frames, leftover_s = _encode_leftovers(comm, msgr, buffer, setup, plan, opts, device)
    # Only now a stall means a vanished peer: before the barrier a rank may rightly wait for slower
    # ranks still at work, and after the gather only rank 0 works (encoding) while the others wait.
    watchdog = Watchdog(comm, rank)
    try:
        msgr.poll_stop_messages()
        if receiver is not None:
            receiver.cancel.set()
            receiver.join()
        if worker is not None:
            worker.cancel_unmatched()
        msgr.finish_stop_messages()

        times = dict(worker.times) if worker is not None else {}
        counts = dict(worker.counts) if worker is not None else {}
        if decoder is not None:
            times["decode"] = decoder.decode_s
            counts["local_decode"] = int(isinstance(decoder, LocalDecoder))
        if worker is not None and worker.segments is not None:
            times["segment_encode"] = worker.segments.encode_s
            counts["segments"] = len(worker.segments.finished)
            counts["segment_frames"] = sum(count for _, count in worker.segments.finished)
            counts["segment_failures"] = worker.segments.failures
        if segmented:
            counts["leftover_frames"] = leftover_frames
            counts["leftover_blocks"] = -(-leftover_frames // SEGMENT_FRAMES)
            times["leftover_encode"] = leftover_s
        if store is not None:
            times["write"] = store.write_s
        if sink is not None:
            times["encode"] = sink.encode_s
            counts["recv_bytes"] = counts.get("recv_bytes", 0) + sink.recv_bytes
        if receiver is not None:
            counts["recv_bytes"] = counts.get("recv_bytes", 0) + receiver.recv_bytes
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        times["cpu"] = sum(u.ru_utime + u.ru_stime for u in usage)  # the process and its ffmpeg children
        failure = msgr.error[0] if msgr.error else ""
        code = msgr.error[1] if msgr.error else 0
        events = worker.events if worker is not None else []
        trace = worker.trace() if worker is not None else {}
        per_rank = comm.gather({"rank": rank, "times": times, "counts": counts, "events": events, "trace": trace,
                                "failure": failure,
                                "code": code, "peer_failure": msgr.peer_failure, "stopped": bool(msgr.stop),
                                "reason": msgr.stop.reason, "signal": msgr.stop.signal_name,
                                "frames": worker.emitted if worker is not None else 0}, root=0)
    finally:
        watchdog.cancel()
    verdict = None
    report: dict[str, Any] = {}
    if rank == 0:
        verdict, report = _finish_on_root(per_rank, buffer, encoder, sink, setup, plan, opts, threads, device,
                                          precision, clock, size, msgr.stop, segmented)
    verdict = comm.bcast(verdict, root=0)
    kind, message, exit_code = verdict
    if kind == "failed":
        if msgr.error:  # the failing rank says why, once
            where = f"rank {rank}: " if size > 1 else ""
            sys.stderr.write(f"mpistyle: error: {where}{msgr.error[0]}\n")
        exc = MpistyleError(message)
        exc.exit_code = exit_code
        exc.already_reported = True  # type: ignore[attr-defined]
        raise exc
    if kind == "stopped":
        raise Interrupted(message)
    return report


def _finish_on_root(per_rank: list[dict[str, Any]], buffer: Any, encoder: Any, sink: Sink | None, setup: Setup,
                    plan: Plan, opts: StylizeOptions, threads: int, device: str, precision: str,
                    clock: tuple[float, float], size: int, stop: StopFlag | None = None,
                    segmented: bool = False) -> tuple[tuple[str, str, int], dict[str, Any]]:
    failures = [p for p in per_rank if p["failure"]]
    complete = buffer is not None and buffer.complete()
    verdict: tuple[str, str, int]
    try:
        if failures:
            first = failures[0]
            verdict = ("failed", f"rank {first['rank']}: {first['failure']}" if size > 1 else first["failure"],
                       first["code"] or 1)
        elif complete and segmented:
            logger.info("phase: encode (joining the ranks' segments)")
            pause_point("encode", stop)  # test hook (MPISTYLE_PAUSE_AT)
            join_start = time.perf_counter()
            joined = join_output(segment_dir(opts.output), opts.output, setup.n_frames, setup.width, setup.height,
                                 Fraction(setup.fps_num, setup.fps_den), buffer.read,
                                 audio_from=opts.input if setup.has_audio else None, crf=opts.crf,
                                 threads=segment_threads(device.split(":")[0]))
            # rank 0's serial tail in segments mode: the bench's scaling model needs it per frame
            per_rank[0]["times"]["join"] = time.perf_counter() - join_start
            streamed = sum(p["counts"].get("segment_frames", 0) for p in per_rank)
            leftover = sum(p["counts"].get("leftover_frames", 0) for p in per_rank)
            logger.debug("joined %d segments: %d frames encoded as they were computed, %d from the buffer by "
                        "the ranks, %d by rank 0 at the join", joined["segments"], streamed, leftover,
                        joined["frames_encoded_on_rank0"])
            verdict = ("done", "", 0)
        elif complete and sink is not None and sink.encoder is not None:
            if sink.encoded < setup.n_frames:
                sink.finish_encoding()  # frames done before this run (resume) or committed last
            if sink.encoder is not None:
                logger.info("phase: encode")
                pause_point("encode", stop)  # test hook (MPISTYLE_PAUSE_AT)
                _announce_mux(sink.encoder, stop)
                sink.encoder.close()
                sink.encoder = encoder = None
                verdict = ("done", "", 0)
            else:
                raise sink.encode_failure or MpistyleError(sink.encode_error)
        elif complete:
            if sink is not None and sink.encode_failure is not None:
                raise sink.encode_failure
            raise MpistyleError(sink.encode_error if sink is not None else "nothing was encoded")
        else:
            signal_name = next((p["signal"] for p in per_rank if p["signal"]), "")
            why = f"received {signal_name}" if signal_name else "stopped"
            done = int(buffer.done.sum()) if buffer is not None else 0
            verdict = ("stopped", f"{why}: {done}/{setup.n_frames} frames are safe in {setup.buffer_path}; "
                                  "rerun the same command to resume", Interrupted.exit_code)
    except (MpistyleError, OSError) as exc:
        if not isinstance(exc, MpistyleError):  # the output's file system failed (a join, a rename)
            exc = io_failure(exc, opts.output)
        asked = _stop_signal(per_rank, stop)
        if asked:
            # A stop was asked for and every frame is committed: whatever ended the encoder (a child
            # killed along with the job, say), this is a stop to resume, not bad input (exit 2).
            verdict = ("stopped", f"received {asked} while encoding ({exc}); all {setup.n_frames} frames are safe "
                                  f"in {setup.buffer_path}: rerun the same command to encode", Interrupted.exit_code)
        else:
            message = f"{exc}; all {setup.n_frames} frames are safe in {setup.buffer_path}: rerun to encode"
            verdict = ("failed", message, exc.exit_code)
            sys.stderr.write(f"mpistyle: error: {message}\n")
    finally:
        if sink is not None and sink.encoder is not None:
            sink.encoder.abort()
        elif encoder is not None and sink is None:
            encoder.abort()
        if buffer is not None:
            buffer.close()
        # A stopped run keeps its finished segments: the rerun encodes only the missing blocks. A failed
        # one removes them (a full output disk must not stay full); the buffer has every frame.
        if verdict[0] == "failed":
            shutil.rmtree(segment_dir(opts.output), ignore_errors=True)
    t_start, t_work = clock
    elapsed = time.perf_counter() - t_start
    setup_s = t_work - t_start
    report = {
        "mpistyle": __version__,
        "input": opts.input,
        "output": opts.output,
        "frames": setup.n_frames,
        "frames_computed": sum(p["frames"] for p in per_rank),
        "width": setup.width,
        "height": setup.height,
        "ranks": size,
        "threads_per_rank": threads,
        "device": device,
        "precision": precision,
        "temporal": asdict(opts.temporal),
        "halo": plan.halo,
        "halo_fusion_steps": plan.halo_cost(),
        "boundaries": plan.boundaries(),
        "schedule": opts.schedule,
        "decode": "each" if per_rank[0]["counts"].get("local_decode") else "rank0",  # --decode auto resolved
        "parts": plan.n_ranks,
        "wall_s": elapsed,
        "work_s": elapsed - setup_s,
        "frames_per_s": sum(p["frames"] for p in per_rank) / max(elapsed, 1e-9),
        "setup_s": setup_s,
        "per_rank": [{"rank": p["rank"], "frames": p["frames"], "times_s": p["times"], "counts": p["counts"],
                      "events": p["events"], "trace": p["trace"]} for p in per_rank],
        "outcome": verdict[0],
    }
    if verdict[0] == "done" and not opts.keep_buffer:
        remove_buffer(setup.buffer_path)
    return verdict, report


def _encode_leftovers(comm: Any, msgr: Messenger, buffer: Any, setup: Setup, plan: Plan, opts: StylizeOptions,
                      device: str) -> tuple[int, float]:
    """Every rank encodes its share of the blocks no run covered whole, from the buffer (rank 0 says which).

    Returns the frames this rank encoded and the time it took."""
    todo: list[int] = []
    if comm.Get_rank() == 0 and buffer is not None and not msgr.stop and buffer.complete():
        todo = missing_blocks(segment_dir(opts.output), setup.n_frames)
    todo = comm.bcast(todo, root=0)
    bounds = None if opts.schedule == "dynamic" else [rp.bounds for rp in plan.ranks]
    mine = leftover_share(todo, comm.Get_rank(), comm.Get_size(), setup.n_frames, bounds)
    encoded, start = 0, time.perf_counter()
    if mine:
        from ..buffer import FrameBuffer

        reader = buffer if buffer is not None else FrameBuffer.open(setup.buffer_path, setup.n_frames, setup.height,
                                                                      setup.width, setup.settings)
        try:
            encoded = encode_blocks(segment_dir(opts.output), mine, setup.n_frames, setup.width, setup.height,
                          Fraction(setup.fps_num, setup.fps_den), reader.read, opts.crf,
                          segment_threads(device.split(":")[0]))
        except MpistyleError as exc:  # rank 0 encodes what is still missing before the join (and fails there)
            logger.warning("rank %d: encoding blocks %s from the buffer failed (%s)", comm.Get_rank(), mine, exc)
        finally:
            if reader is not buffer:
                reader.close()
        logger.debug("rank %d: encoded leftover blocks %s in %.2f s", comm.Get_rank(), mine,
                     time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    barrier = comm.Ibarrier()  # rank 0 joins only once every rank's blocks are written
    poll_until(barrier.Test)
    return encoded, elapsed


def _stop_signal(per_rank: list[dict[str, Any]], stop: StopFlag | None) -> str:
    """The stop signal any rank got (rank 0's may have come during the final encode), or ''."""
    if stop is not None and stop.signal_name:
        return stop.signal_name
    return next((p["signal"] for p in per_rank if p["signal"]), "")


def _announce_mux(encoder: Any, stop: StopFlag | None) -> None:
    """Log the audio mux as a phase of its own, with its test pause (MPISTYLE_PAUSE_AT=mux).

    The mux is the second ffmpeg pass inside ``VideoEncoder.close``; it is wrapped here so the encoder
    need not know about phases.
    """
    mux = getattr(encoder, "_mux_audio", None)
    if mux is None or getattr(encoder, "_audio_from", None) is None:
        return

    def mux_as_a_phase(source: str) -> None:
        logger.info("phase: mux")
        pause_point("mux", stop)
        mux(source)

    encoder._mux_audio = mux_as_a_phase


def write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)
