"""The compiled network, paid once per job: rank 0 compiles, every rank runs the same artifact.

A :class:`~mpistyle.engine.FrameNet` (uint8 frames in and out, one static shape: the frame size is fixed
within a job) is compiled ahead of time with AOTInductor (``torch.export`` +
``aoti_compile_and_package``) into a ``.pt2`` package. Rank 0 compiles it, or reads it from the cache of
earlier jobs, and broadcasts the package's bytes; every rank, rank 0 included, loads the same bytes, so
every rank runs the same kernels and the frames of N ranks match those of 1 rank. Loading takes well
under a second: no rank traces or compiles anything.

The cache (``$MPISTYLE_CACHE_DIR``, default ``~/.cache/mpistyle/compiled``) holds one package per key:
the mpistyle, torch and Python versions, the numeric path, the shape, the device type, the CPU's
features and a digest of the weights (AOTInductor embeds them). Only rank 0 reads and writes it, whole
files through a rename, so ranks never read a half-written file (the trouble of torch's own on-disk
cache under many ranks: PyTorch PR 172144); torch's inductor cache of the compilation goes to a private
temporary directory for the same reason. A package that does not load, or whose output strays from
the eager network's, is ignored with a warning and compiled again.

``--compile auto`` compiles where it pays: when the frames each rank will stylize save more than the
compilation costs (:func:`break_even_frames`; measured figures below).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mpistyle import __version__
from mpistyle.engine import FrameNet, Stylizer, cpu_supports_bf16
from mpistyle.errors import MpistyleError
from mpistyle.nets import TransformerNet

logger = logging.getLogger(__name__)

COMPILE_CHOICES = ("auto", "on", "off")
CACHE_ENV = "MPISTYLE_CACHE_DIR"
FORMAT = 1  # bump when the package's contents or key change meaning
# Below this PSNR against the eager network (dB) a compiled package is taken as broken (eager vs
# compiled differ in the last bits only: about 55 dB on the bundled models).
CHECK_PSNR_DB = 35.0

# First guesses for --compile auto, measured on the 2-core development machine (Xeon with AMX-BF16),
# bf16, `mpistyle bench --networks`: what compiling costs and what it saves per frame. Compilation:
# 11-29 s (export + AOTInductor), about the same at any frame size. Each job that compiles or reads a
# package measures these on the machine at hand and records them in the cache (:class:`Figures`); later
# decisions use the recorded figures, these constants only until then.
COMPILE_COLD_S = 25.0
COMPILE_WARM_S = 1.5  # a cached package: read, broadcast, load, check against the eager network
# Fused eager minus compiled, one thread: 0.049 s at 640x272 (0.28 s per megapixel), 0.44 s at
# 1280x720 (0.48); the smaller figure. With T threads the saving is taken as 1/T of it (at 2 threads
# the compiled path still measured 0.56-0.57x of the fused one).
SAVING_S_PER_MPIXEL = 0.28
FIGURES_FORMAT = 1


@dataclass(frozen=True)
class Figures:
    """What compiling costs and saves on this machine: measured and recorded, else the first guesses."""

    compile_cold_s: float = COMPILE_COLD_S  # rank 0's whole work for a cache miss: compile, load, check
    compile_warm_s: float = COMPILE_WARM_S  # the same for a cache hit: read, load, check
    saving_s_per_mpixel: float = SAVING_S_PER_MPIXEL  # eager minus compiled per frame, one thread
    measured: tuple[str, ...] = ()  # the fields measured on this machine (the others are first guesses)

    def describe(self) -> str:
        """What the break-even came from (the cold cost and the saving decide it; the warm cost does not)."""
        return "measured here" if {"compile_cold_s", "saving_s_per_mpixel"} & set(self.measured) else "first guesses"


def figures_path(device_type: str = "cpu") -> str:
    """The figures of this machine (CPU features, torch build, device type) in the cache directory."""
    key = {"format": FIGURES_FORMAT, "torch": torch.__version__, "device": device_type,
           "cpu": cpu_features() if device_type == "cpu" else ""}
    return os.path.join(cache_dir(), f"figures-{key_digest(key)[:16]}.json")


def read_recorded(path: str, keys: tuple[str, ...], what: str) -> dict[str, float] | None:
    """The positive figures ``keys`` of a JSON record (stylize's or train's); None where there is no record,
    or, with one warning line, an unreadable one."""
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
        return {k: float(record[k]) for k in keys
                if isinstance(record.get(k), (int, float)) and 0 < float(record[k]) < 1e6}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        logger.warning("ignoring the recorded %s %s: %s", what, path, _first_line(exc))
        return None


def read_figures(device_type: str = "cpu") -> Figures:
    """The recorded figures, the first guesses where none are (or the record is unreadable). Rank 0 reads
    them and decides for the job, so every rank follows rank 0's figures."""
    values = read_recorded(figures_path(device_type), ("compile_cold_s", "compile_warm_s", "saving_s_per_mpixel"),
                           "compile figures")
    if values is None:
        return Figures()
    return Figures(**values, measured=tuple(sorted(values)))


def record_figures(device_type: str, **measured: float) -> None:
    """Keep the latest measurement of each figure given (rank 0 only; a whole file through a rename)."""
    from mpistyle.models import atomic_write

    path = figures_path(device_type)
    record: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="utf-8") as fh:
            loaded = json.load(fh)
        record = loaded if isinstance(loaded, dict) else {}
    record.update({k: float(v) for k, v in measured.items() if v is not None and v > 0})
    record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda fh: fh.write(json.dumps(record, indent=1, sort_keys=True).encode()), suffix=".json")
    except OSError as exc:
        logger.warning("cannot record the compile figures in %s: %s", path, exc.strerror or exc)


def cache_dir() -> str:
    """Where compiled packages are kept across jobs."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mpistyle", "compiled")


def cpu_features() -> str:
    """The CPU's instruction-set features that compiled kernels depend on (part of the cache key)."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = sorted(f for f in line.split(":", 1)[1].split()
                                   if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "bmi")))
                    break
    except OSError:
        pass
    return f"{capability}:{','.join(flags)}"


def weights_digest(net: torch.nn.Module) -> str:
    """SHA-256 of the network's state dict as it runs (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, value in net.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def artifact_key(stylizer: Stylizer, shape: tuple[int, ...]) -> dict[str, Any]:
    """What a compiled package depends on: equal keys, interchangeable packages."""
    return {"format": FORMAT, "mpistyle": __version__, "torch": torch.__version__,
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "network": stylizer.recipe.describe(),
            "shape": [int(s) for s in shape], "device": stylizer.device.type,
            "cpu": cpu_features() if stylizer.device.type == "cpu" else "",
            "cuda": (torch.cuda.get_device_name(stylizer.device) if stylizer.device.type == "cuda" else ""),
            "weights": weights_digest(stylizer.model)}


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def break_even_frames(height: int, width: int, threads: int = 1, cached: bool = False,
                      figures: Figures | None = None) -> float:
    """Frames from which compiling pays: compile (or load) cost over the saving per frame at ``threads``.

    :func:`decide` applies it to the whole video's frame count at one thread, cold, whatever the rank count."""
    f = figures or Figures()
    saving = f.saving_s_per_mpixel * height * width / 1e6 / max(1, threads)
    return (f.compile_warm_s if cached else f.compile_cold_s) / max(saving, 1e-9)


def decide(option: str, device: torch.device, frames: int, height: int, width: int, threads: int | None,
           stored: bool | None = None, transformer: bool = True, figures: Figures | None = None) -> tuple[bool, str]:
    """Compile or not, and why (pure; rank 0 decides for the job).

    The compiled and eager paths differ in the last bits, so ``auto`` decides from what is the same for
    1 rank and N ranks, and for a cold or a warm cache: the device, the network, the video's frames and
    size, and a thread count fixed by the user (``threads``: ``--threads`` or SLURM_CPUS_PER_TASK; None
    when it follows the node's cores and the rank count). A job then gives the same frames on any rank
    count. ``stored``: what the buffer being resumed used (a resume keeps it); ``transformer``: the
    network is a TransformerNet (the one whose break-even was measured); ``figures``: the machine's
    recorded figures (rank 0's, :func:`read_figures`), else the first guesses. The break-even always uses
    the cold compile's cost, so a warm package cache does not change the path.
    """
    if option not in COMPILE_CHOICES:
        raise MpistyleError(f"unknown --compile {option!r} (choose {', '.join(COMPILE_CHOICES)})")
    if option == "on":
        return True, "--compile on"
    if option == "off":
        return False, "--compile off"
    if stored is not None:
        return stored, "as the buffer being resumed"
    if device.type != "cpu" or not cpu_supports_bf16():
        return False, "auto: compiled path measured on CPUs with native bf16 only"
    if not transformer:
        return False, "auto: compiled path measured for TransformerNet only"
    if threads != 1:  # the package runs one thread; the thread count must not follow the rank count
        why = "set by the rank count" if threads is None else f"{threads}"
        return False, f"auto: threads per rank {why} (the compiled path runs one thread: --threads 1 to use it)"
    figures = figures or Figures()
    need = break_even_frames(height, width, 1, cached=False, figures=figures)
    if frames >= need:  # the whole video's frames, not a rank's share: the same verdict on any rank count
        return True, f"auto: {frames} frames >= break-even {need:.0f} ({figures.describe()})"
    return False, f"auto: {frames} frames < break-even {need:.0f} ({figures.describe()})"


def probe_frames(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Deterministic test frames (gradients plus noise) of ``shape`` (B, H, W, 3) uint8."""
    b, h, w, _ = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(1, w - 1), yy * 255 / max(1, h - 1), (xx + yy) % 256], axis=-1)
    frames = base[None] * 0.7 + rng.uniform(0, 76, size=(b, h, w, 3))
    return torch.from_numpy(np.clip(frames, 0, 255).astype(np.uint8))


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


@contextlib.contextmanager
def _private_inductor_cache() -> Any:
    """Inductor's on-disk caches in a private temporary directory for the compilation (removed after)."""
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    old = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory(prefix="mpistyle-inductor-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
        try:
            yield tmp
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def compile_package(framenet: FrameNet, example: torch.Tensor) -> bytes:
    """AOTInductor package of ``framenet`` for ``example``'s shape, as bytes.

    Inductor's own kernels are generated single-threaded (``cpp.threads=1``): with more threads it
    splits the instance norms' reductions over H*W between them and adds the partial sums in an order
    fixed by the thread count, so a rank with 2 threads would not match one with 1. The convolutions
    (oneDNN) still use the rank's threads and give the same bits for any count.
    """
    import torch._inductor.config as inductor_config

    with _private_inductor_cache() as tmp, torch.no_grad(), inductor_config.patch({"cpp.threads": 1}):
        exported = torch.export.export(framenet, (example,))
        path = os.path.join(tmp, "network.pt2")
        torch._inductor.aoti_compile_and_package(exported, package_path=path)
        with open(path, "rb") as fh:
            return fh.read()


def load_package(data: bytes, device: torch.device) -> Any:
    """A callable (B, H, W, 3) uint8 -> (B, H, W, 3) uint8 from a package's bytes.

    torch's loader itself (milliseconds): ``aoti_load_package`` first imports inductor, seconds per rank.
    """
    index = device.index if device.type == "cuda" and device.index is not None else -1
    with tempfile.NamedTemporaryFile(prefix="mpistyle-", suffix=".pt2") as fh:
        fh.write(data)
        fh.flush()
        try:
            loader = torch._C._aoti.AOTIModelPackageLoader(fh.name, "model", False, 1, index)
        except (AttributeError, TypeError):  # another torch: its public loader
            runner = torch._inductor.aoti_load_package(fh.name, device_index=index)
            return lambda frames: _single(runner(frames))

    def run(frames: torch.Tensor) -> torch.Tensor:
        return loader.run([frames])[0]

    return run


def _single(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (list, tuple)) else out


def read_cached(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("ignoring the compiled-network cache %s: %s", path, exc.strerror or exc)
        return None


def write_cached(path: str, data: bytes, key: dict[str, Any]) -> None:
    from mpistyle.models import atomic_write

    try:
        atomic_write(path, lambda fh: fh.write(data), suffix=".pt2")
        atomic_write(path[:-4] + ".json", lambda fh: fh.write(json.dumps(key, indent=1).encode()), suffix=".json")
    except OSError as exc:
        logger.warning("cannot keep the compiled network in %s: %s", path, exc.strerror or exc)


def check_runner(run: Any, stylizer: Stylizer, probe: torch.Tensor) -> float:
    """PSNR of the package's output against the eager network's on ``probe`` (raises if it fails to run)."""
    with torch.inference_mode():
        got = run(probe.to(stylizer.device))
        want = stylizer.framenet(probe.to(stylizer.device))
    if tuple(got.shape) != tuple(want.shape) or got.dtype != torch.uint8:
        raise RuntimeError(f"the package returned {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} uint8")
    return psnr_db(got, want)


def measure_saving(run: Any, stylizer: Stylizer, probe: torch.Tensor, repeat: int = 2) -> float | None:
    """Eager (fused) minus compiled seconds per frame per megapixel on ``probe``, the best of ``repeat``
    runs each; None unless torch runs one thread here (what ``--compile auto`` decides for)."""
    if torch.get_num_threads() != 1:
        return None
    frames = probe.to(stylizer.device)

    def best(fn: Any) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(repeat):
                t = time.perf_counter()
                fn(frames)
                times.append(time.perf_counter() - t)
        return min(times)

    b, h, w = probe.shape[:3]
    saving = (best(stylizer.framenet) - best(run)) / b / (h * w / 1e6)
    return saving if saving > 0 else None


def obtain_package(stylizer: Stylizer, shape: tuple[int, ...], key: dict[str, Any] | None = None,
                   path: str | None = None) -> tuple[bytes | None, dict[str, Any]]:
    """A checked package for ``stylizer`` at ``shape``: from the cache, else compiled (and kept there).

    Returns (bytes or None when neither works, info: cache hit/miss/bad, compile_s, check_psnr_db, error,
    saving_s_per_mpixel). Records what it measured in the machine's figures (:func:`record_figures`).
    """
    start = time.perf_counter()
    key = key or artifact_key(stylizer, shape)
    path = path or os.path.join(cache_dir(), f"{key_digest(key)}.pt2")
    probe = probe_frames(shape)
    info: dict[str, Any] = {}
    runner = None
    data = read_cached(path)
    if data is not None:
        try:
            runner = load_package(data, stylizer.device)
            db = check_runner(runner, stylizer, probe)
            if db < CHECK_PSNR_DB:
                raise RuntimeError(f"its output is {db:.1f} dB from the eager network's")
            info.update(cache="hit", check_psnr_db=db)
        except Exception as exc:  # noqa: BLE001 - a bad cache is ignored, never fatal
            logger.warning("ignoring the compiled-network cache %s (%s): compiling again", path, _first_line(exc))
            data, runner = None, None
            info["cache"] = "bad"
    if data is None:
        info.setdefault("cache", "miss")
        try:
            t = time.perf_counter()
            data = compile_package(stylizer.framenet, probe.to(stylizer.device))
            info["compile_s"] = time.perf_counter() - t
            runner = load_package(data, stylizer.device)
            db = check_runner(runner, stylizer, probe)
            info["check_psnr_db"] = db
            if db < CHECK_PSNR_DB:
                raise RuntimeError(f"the compiled network's output is {db:.1f} dB from the eager network's")
            write_cached(path, data, key)
        except Exception as exc:  # noqa: BLE001 - the job goes on eagerly, on every rank
            logger.debug("compilation failed", exc_info=True)
            info["error"] = _first_line(exc, 300)
            data, runner = None, None
    info["root_s"] = time.perf_counter() - start
    if data is not None and runner is not None:
        # The figures --compile auto decides by, measured here: the cost is the whole of rank 0's work; the
        # saving per frame is measured after a compilation only (4 more passes: small beside it, while
        # on a cache hit they could double rank 0's work at large frames).
        if info["cache"] == "hit":
            record_figures(stylizer.device.type, compile_warm_s=info["root_s"])
        else:
            with contextlib.suppress(Exception):
                info["saving_s_per_mpixel"] = measure_saving(runner, stylizer, probe)
            record_figures(stylizer.device.type, compile_cold_s=info["root_s"],
                           saving_s_per_mpixel=info.get("saving_s_per_mpixel"))
    return data, info


def _first_line(exc: BaseException, n: int = 200) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:n] if text else type(exc).__name__


@dataclass
class CompileJob:
    """Rank 0's compilation (or cache read) in a background thread; every rank's result after :meth:`finish`."""

    stylizer: Stylizer
    shape: tuple[int, ...]
    key: dict[str, Any]
    path: str
    is_root: bool
    data: bytes | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _thread: threading.Thread | None = None

    def start(self) -> CompileJob:
        if self.is_root:
            self._thread = threading.Thread(target=self._root_work, name="mpistyle-compile", daemon=True)
            self._thread.start()
        return self

    def _root_work(self) -> None:
        self.data, info = obtain_package(self.stylizer, self.shape, self.key, self.path)
        self.info.update(info)

    def finish(self, comm: Any) -> dict[str, Any]:
        """Collective: rank 0's package to every rank; all load it, or none does. Returns the info.

        The caller has the other ranks decode meanwhile (mpistyle.stylize.run); only the main thread
        makes MPI collectives, so the helper threads' point-to-point traffic on ``comm`` does not mix in.
        """
        wait_start = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
        wait_idle(comm)  # the others wait for rank 0 without spinning a core it compiles on
        data, info = comm.bcast((self.data, self.info) if self.is_root else None, root=0)
        error = None
        if data is not None:
            try:
                runner = load_package(data, self.stylizer.device)
            except Exception as exc:  # noqa: BLE001 - agreed on below
                error = _first_line(exc)
        failed = [e for e in comm.allgather(error) if e is not None]
        info = dict(info)
        if data is not None and not failed:
            self.stylizer.use_compiled(runner, self.shape)
            info["compiled"] = True
        else:
            if data is not None:
                info["error"] = f"a rank could not load the compiled network: {failed[0]}"
            if self.is_root:
                logger.warning("the compiled network is not available: %s", info.get("error", "not compiled"))
            info["compiled"] = False
        info["wait_s"] = time.perf_counter() - wait_start
        info["bytes"] = len(data) if data is not None else 0
        return info


def wait_idle(comm: Any, poll_s: float = 0.05) -> None:
    """A barrier that sleeps between polls (MPI's blocking waits spin, and would slow rank 0's compile)."""
    ibarrier = getattr(comm, "Ibarrier", None)
    if ibarrier is None:
        comm.barrier()
        return
    request = ibarrier()
    while not request.Test():
        time.sleep(poll_s)


def start_compile(comm: Any, stylizer: Stylizer, shape: tuple[int, ...]) -> CompileJob:
    """Begin the job's compilation: rank 0 in a background thread; :meth:`CompileJob.finish` ends it."""
    key = artifact_key(stylizer, shape)
    keys = comm.allgather(key_digest(key))
    if len(set(keys)) > 1:  # ranks on different CPUs or torch builds would run different kernels
        raise MpistyleError("--compile: the ranks differ in CPU, torch or model; run with --compile off")
    path = os.path.join(cache_dir(), f"{keys[0]}.pt2")
    return CompileJob(stylizer, tuple(shape), key, path, comm.Get_rank() == 0).start()


def is_transformer(stylizer: Stylizer) -> bool:
    return isinstance(stylizer.model, TransformerNet)
