"""What a stylize run is asked to do (:class:`StylizeOptions`), what rank 0 decides (:class:`Setup`),
and small pure helpers about files and chunks."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MpistyleError
from ..temporal import TemporalSettings

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".m4v")


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
    batch: int = 0  # 0: 1 on CPU, 4 on CUDA
    buffer: str | None = None
    restart: bool = False
    keep_buffer: bool = False
    threads: int | None = None
    scratch: str | None = None
    chunk: int = 8
    schedule: str = "static"  # static: one contiguous partition per rank; dynamic: chunks on demand
    chunks: int = 0  # dynamic: number of contiguous chunks (0: 4 per rank)
    crf: int = 18
    report: str | None = None
    progress: bool = True


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
    return output + ".mpistyle.h5"


def validate_output(input_path: str, output: str) -> None:
    if not output:
        raise MpistyleError("no output path given (-o OUTPUT)")
    if os.path.isdir(output):
        raise MpistyleError(f"output path is a directory: {output}")
    if not output.lower().endswith(VIDEO_EXTENSIONS):
        raise MpistyleError(f"output must end in one of {', '.join(VIDEO_EXTENSIONS)}: {output}")
    if os.path.exists(output) and os.path.exists(input_path) and os.path.samefile(input_path, output):
        raise MpistyleError(f"output is the same file as the input: {output}")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise MpistyleError(f"output directory does not exist: {directory}")
    try:  # really try: access() says yes to root on read-only mounts
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mpistyle-probe-"):
            pass
    except OSError as exc:
        raise MpistyleError(f"cannot write to the output directory {directory}: {exc.strerror}") from None
