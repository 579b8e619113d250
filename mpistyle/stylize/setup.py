"""Setup (collective): validate the input on rank 0, load the model on every rank, open or resume the
buffer; any failure is raised as the same one-line error on every rank."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import __version__
from ..errors import MpistyleError, exit_code_for
from .comm import describe
from .options import Setup, StylizeOptions, default_buffer_path, file_fingerprint, input_fingerprint, validate_output
from .segments import uses_segments

logger = logging.getLogger(__name__)


def collective(comm: Any, fn: Any, root_only: bool = True) -> Any:
    """Run ``fn`` on rank 0 (or every rank) and raise the same MpistyleError everywhere on failure."""
    rank = comm.Get_rank()
    result, error = None, None
    if rank == 0 or not root_only:
        try:
            result = fn()
        except MpistyleError as exc:
            error = (str(exc), exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - turned into one clear line on every rank
            logger.debug("setup failed", exc_info=True)
            error = (describe(exc), exit_code_for(exc))
    if root_only:
        result, error = comm.bcast((result, error), root=0)
    else:
        errors = comm.allgather(error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank_failed, error = failed[0]
            if len({e[0] for _, e in failed}) > 1 or len(failed) < comm.Get_size():
                error = (f"rank {rank_failed}: {error[0]}", error[1])
    if error is not None:
        exc = MpistyleError(error[0])
        exc.exit_code = error[1]
        raise exc
    return result


@dataclass
class Validated:
    info: Any
    width: int
    height: int
    model_path: str
    decode: str = "rank0"  # who decodes: rank0 or each (--decode auto resolved)


def resolve_decode(option: str, schedule: str, n_ranks: int, info: Any) -> str:
    """``--decode auto``: every rank decodes its own frames (a frame-exact seek) with the static schedule
    on several ranks, where the input seeks; else rank 0's one stream. With rank 0 decoding, the last
    rank's first frame arrives only when rank 0's decoder reaches it, (P-1)/P of the way through the
    video (measured: 9 s of an 88 s 2-rank run of 1000 frames at 640x272), pure."""
    from ..io.seek import seeks

    if option == "each" and schedule == "dynamic":
        raise MpistyleError("--decode each needs --schedule static (dynamic chunks are decoded by rank 0)")
    if option != "auto":
        return option
    return "each" if schedule == "static" and n_ranks > 1 and seeks(info) else "rank0"


def validate_on_root(opts: StylizeOptions, n_ranks: int = 1) -> Validated:
    """Cheap checks first (input, output, size, model name), before any rank loads a model."""
    from ..io.media import probe
    from ..io.probe import output_size
    from ..models import resolve_model

    info = probe(opts.input, fps=opts.fps)
    if opts.fps is not None and not info.is_sequence:
        raise MpistyleError(f"--fps sets the rate of an image sequence input; {opts.input} is a video and keeps "
                            f"its own rate ({info.fps} fps)")
    validate_output(opts.input, opts.output)
    uses_segments(opts.output, 1, opts.encode)  # a bad --encode for this output fails here, once
    decode = resolve_decode(opts.decode, opts.schedule, n_ranks, info)
    width, height = output_size(info, width=opts.width, height=opts.height, scale=opts.scale)
    return Validated(info=info, width=width, height=height, model_path=resolve_model(opts.model), decode=decode)


def choose_network(opts: StylizeOptions, checked: Validated, stylizer: Any) -> tuple[str, str]:
    """Rank 0: the numeric path this job takes on every rank (``compiled/...`` or the eager recipe) and why.

    ``--compile auto`` decides by rank 0's recorded compile figures; every rank follows the decision.

    A resumed buffer keeps the path it was made with under ``--compile auto`` (frames must match bit for
    bit); an explicit ``--compile on|off`` that differs from it is a settings mismatch, as for any setting.
    """
    from ..compiled import decide, is_transformer, read_figures
    from ..mpi import fixed_threads

    stored = None
    buffer_path = opts.buffer or default_buffer_path(opts.output)
    if not opts.restart and os.path.isfile(buffer_path):
        name = stored_network(buffer_path)
        stored = None if name is None else name.startswith("compiled/")
    net_h, net_w = opts.controls(checked.height, checked.width).network_sizes(checked.height, checked.width)[0]
    on, why = decide(opts.compile, stylizer.device, checked.info.n_frames, net_h, net_w,
                     fixed_threads(opts.threads), stored=stored, transformer=is_transformer(stylizer),
                     figures=read_figures(stylizer.device.type) if opts.compile == "auto" else None)
    return ("compiled/" if on else "") + stylizer.recipe.describe(), why


def stored_network(buffer_path: str) -> str | None:
    """The network path an existing buffer was made with (None: unreadable or from an older version)."""
    import json

    import h5py

    try:
        with h5py.File(buffer_path, "r", locking=False) as f:
            value = json.loads(f.attrs.get("settings", "{}")).get("network")
    except (OSError, ValueError, TypeError):
        return None
    return value if isinstance(value, str) else None


def open_buffer_on_root(opts: StylizeOptions, checked: Validated, precision_name: str, device_type: str,
                        n_ranks: int = 1, network: str | None = None) -> Setup:
    """Open or resume the buffer; its settings record everything the frames depend on (a resume with any
    other setting, the look controls included, is refused in one line by :meth:`FrameBuffer.open`)."""
    from ..buffer import FrameBuffer, check_free_space, resolve_layout
    from ..rawbuffer import scan_raw

    info, width, height, model_path = checked.info, checked.width, checked.height, checked.model_path
    buffer_path = opts.buffer or default_buffer_path(opts.output)
    if os.path.abspath(buffer_path) in (os.path.abspath(opts.input), os.path.abspath(opts.output)):
        raise MpistyleError(f"buffer path must differ from input and output: {buffer_path}")
    t = opts.temporal
    settings = {
        "input": input_fingerprint(opts.input),
        "model": file_fingerprint(model_path),
        "temporal": t.mode,
        "strength": t.strength if t.mode != "none" else None,
        "scene_cut": t.scene_cut if t.mode != "none" else None,
        "flow": f"{t.flow_method}/{t.flow_preset}" if t.mode != "none" else None,
        "fusion_texture": t.texture if t.mode != "none" else None,
        "halo": opts.halo if t.mode != "none" else None,
        "precision": precision_name,
        "network": network,  # the numeric path (compiled or eager recipe): a resume must take the same
        "device_type": device_type,
        "mpistyle": __version__,
        # style_strength, keep_colors, stroke_scale (resolved: auto is a number for this frame size), stroke_detail
        **opts.controls(height, width).settings(),
    }
    fresh = opts.restart or not os.path.exists(buffer_path)
    if fresh:  # before anything is created: a disk too small fails at once and leaves nothing behind
        check_free_space(buffer_path, info.n_frames, width * height * 3)
    layout = resolve_layout(opts.buffer_layout, n_ranks)  # used when the buffer is created
    buf = FrameBuffer.open(buffer_path, info.n_frames, height, width, settings, restart=opts.restart, layout=layout)
    layout = buf.layout  # an existing buffer keeps its own
    done = buf.done.copy()
    buf.close()
    if not fresh:
        check_free_space(buffer_path, int((~done).sum()), width * height * 3)
    raw: dict[int, tuple[str, int]] = {}
    if not fresh:  # the network outputs a stopped job stored: fused on resume, not stylized again
        raw, _ = scan_raw(buffer_path, buf.digest, (height, width, 3), done)
    if done.any() or raw:
        logger.info("resuming from %s: %d of %d frames already done, %d more already stylized", buffer_path,
                    int(done.sum()), len(done), len(raw))
    return Setup(n_frames=info.n_frames, width=width, height=height, fps_num=info.fps.numerator,
                 fps_den=info.fps.denominator, has_audio=info.has_audio, model_path=model_path,
                 buffer_path=buffer_path, done=done, settings=settings, layout=layout, raw=raw)


def read_state_frames(buffer_path: str, frames: list[int]) -> dict[int, np.ndarray]:
    """Stored outputs that start 'buffer' runs exactly: each rank reads its own from the buffer."""
    if not frames:
        return {}
    import h5py

    try:
        with h5py.File(buffer_path, "r", locking=False) as f:
            return {t: np.ascontiguousarray(f["frames"][t]) for t in frames}
    except OSError as exc:
        raise MpistyleError(f"cannot read buffer {buffer_path}: {exc}") from None
