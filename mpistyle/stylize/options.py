"""What a stylize run is asked to do (:class:`StylizeOptions`), what rank 0 decides (:class:`Setup`),
and small pure helpers about files and chunks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from ..temporal.chains import TemporalSettings


@dataclass
class StylizeOptions:
    input: str
    output: str
    model: str | None = None
    temporal: TemporalSettings = field(default_factory=TemporalSettings)
    halo: int = 10
    width: int | None = None
    height: int | None = None
    scale: float | None = None
    device: str = "auto"
    precision: str = "auto"
    batch: int = 0  # 0: auto (engine.resolve_batch: from free GPU memory; 1 on CPU)
    compile: str = "auto"  # auto | on | off: the network compiled once per job (mpistyle.compiled)
    buffer: str | None = None
    buffer_layout: str = "auto"  # auto | parts | mpio (see buffer.py)
    restart: bool = False
    keep_buffer: bool = False
    threads: int | None = None
    scratch: str | None = None
    chunk: int = 8
    schedule: str = "static"  # static: one contiguous partition per rank; dynamic: chunks on demand
    chunks: int = 0  # dynamic: number of contiguous chunks (0: 4 per rank)
    crf: int = 18
    encode: str = "auto"  # auto | rank0 | segments (see segments.py)
    # rank0: rank 0 decodes and scatters | each: every rank decodes its own frames | auto (the CLI's default):
    # each with the static schedule on several ranks where the input seeks, else rank0 (setup.resolve_decode)
    decode: str = "rank0"
    fps: Fraction | None = None  # rate of an image-sequence input (--fps; default 25)
    report: str | None = None
    progress: bool = True
    # Look controls (mpistyle.controls), applied to the network's output before fusion.
    style_strength: float = 1.0
    keep_colors: bool = False
    stroke_scale: float | str = 1.0  # a number >= 1, or "auto" (short side / 360)
    stroke_detail: str = "painted"  # where a stroke-scaled frame's fine detail comes from (controls.STROKE_DETAILS)

    def controls(self, height: int, width: int) -> Any:
        """The :class:`~mpistyle.controls.Controls` for output frames of this size."""
        from ..controls import STROKE_DETAIL, Controls, resolve_stroke_scale

        k = resolve_stroke_scale(self.stroke_scale, height, width)
        # at K = 1 there is no detail to restore: the choice is recorded as the default, so it cannot
        # make a resume refuse a run whose frames would be the same
        return Controls(style_strength=float(self.style_strength), keep_colors=bool(self.keep_colors),
                        stroke_scale=k, stroke_detail=self.stroke_detail if k > 1.0 else STROKE_DETAIL)


@dataclass
class Setup:
    """What rank 0 decides and broadcasts before the work starts."""

    n_frames: int
    width: int
    height: int
    fps_num: int
    fps_den: int
    has_audio: bool
    model_path: str
    buffer_path: str
    done: np.ndarray
    settings: dict[str, Any]
    layout: str = "parts"  # the buffer's layout: parts (one file per run, a virtual main file) or mpio
    # network outputs a stopped job stored for frames not done: frame -> (raw file name, slot) (rawbuffer.py)
    raw: dict[int, tuple[str, int]] = field(default_factory=dict)


def chunk_list(frames: Sequence[int], chunk: int) -> list[list[int]]:
    """How a rank's source frames are grouped into scatter messages (both sides compute it)."""
    return [list(frames[i:i + chunk]) for i in range(0, len(frames), max(1, chunk))]


def file_fingerprint(path: str, block: int = 1 << 20) -> str:
    """Cheap identity of a possibly huge file: size + SHA-256 of its first and last MiB."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(block))
        if size > block:
            f.seek(max(block, size - block))
            digest.update(f.read(block))
    return digest.hexdigest()[:32]


def default_buffer_path(output: str) -> str:
    from ..io.sequence import buffer_path_for

    return buffer_path_for(output) or output + ".mpistyle.h5"


def input_fingerprint(path: str) -> str:
    """``file_fingerprint`` of a video; names, sizes and end frames of an image sequence."""
    from ..io.sequence import fingerprint, is_sequence_input

    return fingerprint(path) if is_sequence_input(path) else file_fingerprint(path)


def validate_output(input_path: str, output: str) -> None:
    """Video (.mp4/.m4v/.mov/.mkv/.webm) or PNG sequence output that can be written (``io.media.check_output``)."""
    from ..io.media import check_output

    check_output(input_path, output)
