"""The training loss compiled once per job, and the figures ``--compile auto`` decides by.

Once per job: rank 0 compiles the loss (forward and backward, on the first step's batch shapes) while
the other ranks wait without spinning; it then sends them its compiled artifacts (torch's portable
cache, ``torch.compiler.save_cache_artifacts``), which they load into a private inductor cache, so
their own first step finds every graph compiled (about 60 s saved per rank on a 2-core CPU). Only
rank 0 writes torch's shared on-disk cache: many ranks writing the same files was the trouble stylize
avoids too (mpistyle.compiled).

Figures: each run records, in the compiled-network cache directory, what compiling cost and how long
a step took per image, eager or compiled, for its settings on this machine; ``--compile auto`` then
compiles when the steps left repay the compilation :data:`PAYBACK` times over, from rank 0's record
(broadcast). Until both speeds are recorded, the first guess ``COMPILE_AUTO_MIN_STEPS`` decides.
The decision sees the whole batch (not the rank's share), so 1 rank and N ranks take the same path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mpistyle.errors import MpistyleError

logger = logging.getLogger(__name__)

PAYBACK = 3.0  # compile when the steps left save at least 3x the compilation (the first guess: ~3.6x)
FIGURES_FORMAT = 1


@dataclass(frozen=True)
class TrainFigures:
    """Recorded for one setting on one machine; None where not measured yet."""

    compile_s: float | None = None
    eager_image_s: float | None = None  # seconds per image of a step, eager
    compiled_image_s: float | None = None  # the same, compiled

    def min_steps(self, batch_size: int) -> float | None:
        """Steps from which compiling pays PAYBACK times over; None until both speeds are known."""
        if self.compile_s is None or self.eager_image_s is None or self.compiled_image_s is None:
            return None
        saving = (self.eager_image_s - self.compiled_image_s) * batch_size
        return PAYBACK * self.compile_s / saving if saving > 0 else float("inf")


def figures_path(key: dict[str, Any]) -> str:
    from mpistyle.compiled import cache_dir, cpu_features, key_digest

    full = {"format": FIGURES_FORMAT, "torch": torch.__version__, "cpu": cpu_features(), **key}
    return os.path.join(cache_dir(), f"train-figures-{key_digest(full)[:16]}.json")


def read_figures(key: dict[str, Any]) -> TrainFigures:
    from mpistyle.compiled import read_recorded

    values = read_recorded(figures_path(key), ("compile_s", "eager_image_s", "compiled_image_s"), "training figures")
    return TrainFigures() if values is None else TrainFigures(**values)


def record_figures(key: dict[str, Any], **measured: float | None) -> None:
    """Keep the latest measurement of each figure given (rank 0 only; a whole file through a rename)."""
    from mpistyle.models import atomic_write

    path = figures_path(key)
    record: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="utf-8") as fh:
            loaded = json.load(fh)
        record = loaded if isinstance(loaded, dict) else {}
    record.update({k: float(v) for k, v in measured.items() if v is not None and v > 0})
    record.update(setting=key, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda fh: fh.write(json.dumps(record, indent=1, sort_keys=True).encode()), suffix=".json")
    except OSError as exc:
        logger.warning("cannot record the training figures in %s: %s", path, exc.strerror or exc)


def compile_counts() -> dict[str, int]:
    """This process's compiled graphs so far: inductor cache misses (compiled here) and hits (read)."""
    from torch._dynamo.utils import counters

    ind, aot = counters["inductor"], counters["aot_autograd"]
    return {"graphs_compiled": int(ind.get("fxgraph_cache_miss", 0)),
            "graphs_read": int(ind.get("fxgraph_cache_hit", 0)),
            "autograd_compiled": int(aot.get("autograd_cache_miss", 0)),
            "autograd_read": int(aot.get("autograd_cache_hit", 0))}


@contextlib.contextmanager
def private_inductor_cache(active: bool) -> Iterator[None]:
    """For ranks other than 0: torch's inductor cache in a private temporary directory (removed after)."""
    if not active:
        yield
        return
    from mpistyle.compiled import _private_inductor_cache

    with _private_inductor_cache():
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def share_compilation(comm: Any, rank: int, size: int, warm_up: Any) -> dict[str, Any]:
    """Collective: rank 0 runs ``warm_up()`` (which compiles every graph the job's ranks need) and sends
    its compiled artifacts; the others load them. Returns what happened (rank 0's seconds, bytes)."""
    from mpistyle.compiled import wait_idle

    t0 = time.perf_counter()
    artifacts: bytes | None = None
    error = failed = None
    if rank == 0:
        try:
            warm_up()
        except Exception as exc:  # noqa: BLE001 - every rank stops below with this line, none hangs
            logger.debug("compiling the loss failed", exc_info=True)
            failed = _first_line(exc)
        if failed is None:
            try:
                saved = torch.compiler.save_cache_artifacts()
                artifacts = saved[0] if saved else None
            except Exception as exc:  # noqa: BLE001 - the others then compile for themselves
                error = _first_line(exc)
    compile_s = time.perf_counter() - t0
    if size > 1:
        wait_idle(comm)  # the others wait for rank 0 without spinning a core it compiles on
        artifacts, compile_s, error, failed = comm.bcast((artifacts, compile_s, error, failed), root=0)
    if failed is not None:
        raise MpistyleError(f"compiling the training loss failed on rank 0: {failed} (--compile off runs eagerly)")
    if rank != 0 and artifacts:
        try:
            torch.compiler.load_cache_artifacts(artifacts)
        except Exception as exc:  # noqa: BLE001 - this rank compiles for itself
            logger.warning("rank %d could not load rank 0's compiled loss (%s): compiling it here", rank, exc)
    if error and rank == 0:
        logger.warning("the compiled loss could not be shared (%s): each rank compiles it", error)
    return {"rank0_compile_s": compile_s, "artifact_bytes": len(artifacts or b"")}
