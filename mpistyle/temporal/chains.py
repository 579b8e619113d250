"""Flow-guided temporal fusion of per-frame stylizations (a cheap, sequential, resumable filter).

``out_t = s_t (1 - a) + warp(out_{t-1}, flow_back) a`` with ``a = strength * mask``: the previous
*output* is carried into frame t by optical flow computed on the *source* frames and blended
with the fresh stylization ``s_t`` where the forward-backward check trusts the flow; occluded
and disoccluded pixels (mask 0) take the fresh stylization as is. The mask is the check itself, not
eroded (issue 30, docs/flicker.md): on fast motion a 7x7 erosion left a fifth of the frame to the
per-frame output, and that fifth held nearly all the flicker the mode left.

Properties the MPI pipeline builds on:

* The carried state is exactly ``(previous source frame, previous output frame)``, both uint8,
  and every step is deterministic, so a run resumed from a saved output frame is bit-identical.
* The map from state to output is a contraction: the contribution of the state to ``out_t`` is
  weighted by at most ``strength``, so a wrong state decays like ``strength**k`` over k frames,
  but only down to the uint8 rounding floor: a rounded contraction has several fixed points
  (:func:`mpistyle.temporal.kernels.fuse`), so a cold start never provably reaches the 1-rank bits. Hence anchors
  (:class:`~mpistyle.partition.Anchors`, given to :class:`TemporalFuser`): the recursion
  restarts at points fixed by the frame index, a new chain starting ``lead`` frames before
  each anchor and running alongside the old one until the output switches to it at the anchor.
  Every output frame is then a pure function of the frames since its chain start, whatever
  the rank count, and the switch is invisible because both chains have converged by then.
* A scene cut (mean mask below ``scene_cut``) resets to the fresh stylization: nothing is
  smeared across cuts.

Defaults, measured on the bundled real clips with a stand-in flickery stylizer (each frame with
its own random colour gain 0.85-1.15, offset +-12 and Gaussian noise sigma 8), warping error
(:mod:`mpistyle.metrics`) and PSNR to the clean frames (ghosting lowers it):

* ``strength`` 0.7: on bbb_640x272 (40 frames) the warping error falls by 79/85/90/92/94 % at
  strength 0.5/0.6/0.7/0.8/0.9 while PSNR to the clean frames peaks at 0.7 (28.6, 29.1, 29.3,
  28.9, 27.6 dB; 24.7 dB unfused); carphone agrees (-87 %, 28.5 dB at 0.7). Above 0.8 the output
  lags/ghosts more than it gains; a wrong state decays to 1 % in 13 frames (0.7**13).
* ``flow_preset`` "medium" (0.5; :data:`~mpistyle.temporal.flow.DEFAULT_DIS_PRESET`): with the stand-in above,
  "fast" beat "ultrafast" clearly (-90 % vs -81 % warping error on bbb at 0.7) and equalled "medium" on bbb,
  but with the 0.5 styles on held-out fast motion "medium" leaves less of the flicker real stylization adds
  (issue 30, docs/flicker.md), at about 3x fast's flow time.
* ``scene_cut`` 0.25: consecutive frames of the clips have confidence >= 0.76 with DIS fast (mean
  0.86-0.93; >= 0.55 with ultrafast/medium on the 128x72 clip), frames across a cut (bbb vs
  carphone) <= 0.10 (<= 0.14 with issue 30's un-eroded mask; consecutive bbb frames >= 0.93), and
  bbb frames 100 frames apart (same set, large motion) still 0.65-0.70.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mpistyle.errors import MpistyleError
from mpistyle.partition import Anchors
from mpistyle.temporal.flow import (
    DEFAULT_DIS_PRESET,
    DIS_PRESETS,
    FLOW_METHODS,
    FlowEstimator,
    PairFlow,
    pair_flow,
    to_gray,
)
from mpistyle.temporal.kernels import FusionBackend, NumpyFusion

logger = logging.getLogger(__name__)

TEMPORAL_MODES = ("flow", "none")
# How the fused frame keeps the style's texture (:mod:`mpistyle.temporal.detail`): "keep" (since 0.5) carries
# the state with a bicubic warp and keeps the fresh stylization's local detail energy; "blend" is 0.4's plain
# average with a bilinear warp, which fades the strokes (docs/styles.md).
FUSION_TEXTURES = ("keep", "blend")


@dataclass(frozen=True)
class TemporalSettings:
    """How frames are fused over time; validated on creation (MpistyleError on bad values)."""

    mode: str = "flow"  # "flow" or "none"
    strength: float = 0.7  # weight of the warped previous output where the mask trusts the flow
    scene_cut: float = 0.25  # confidence below this resets the state (fresh stylization)
    flow_method: str = "dis"
    flow_preset: str = DEFAULT_DIS_PRESET
    texture: str = "keep"  # "keep": bicubic warp, detail energy kept; "blend": 0.4's plain average

    def __post_init__(self) -> None:
        if self.mode not in TEMPORAL_MODES:
            raise MpistyleError(f"unknown temporal mode {self.mode!r} (choose from {', '.join(TEMPORAL_MODES)})")
        if self.texture not in FUSION_TEXTURES:
            raise MpistyleError(
                f"unknown fusion texture {self.texture!r} (choose from {', '.join(FUSION_TEXTURES)})")
        if not 0.0 <= self.strength < 1.0:
            raise MpistyleError(f"temporal strength must be in [0, 1), got {self.strength}")
        if not 0.0 <= self.scene_cut <= 1.0:
            raise MpistyleError(f"scene-cut threshold must be in [0, 1], got {self.scene_cut}")
        if self.flow_method not in FLOW_METHODS:
            raise MpistyleError(
                f"unknown flow method {self.flow_method!r} (choose from {', '.join(FLOW_METHODS)})")
        if self.flow_method == "dis" and self.flow_preset not in DIS_PRESETS:
            raise MpistyleError(
                f"unknown DIS preset {self.flow_preset!r} (choose from {', '.join(DIS_PRESETS)})")

    @property
    def warp_interpolation(self) -> str:
        """How the state is warped: ``cubic`` when the texture is kept, else ``linear``."""
        return "cubic" if self.texture == "keep" else "linear"

    @property
    def keep_detail(self) -> bool:
        return self.texture == "keep"

    def halo_frames(self, tolerance: float = 0.01) -> int:
        """Frames of warm-up after which a wrong initial state weighs below ``tolerance`` in the blend.

        With the detail kept, the fine detail of a wrong state decays more slowly (by at most 0.9 a frame;
        measured on real clips, about 0.76), which is why the anchors' lead is measured, not derived.
        """
        if self.mode == "none" or self.strength == 0.0:
            return 0
        return int(np.ceil(np.log(tolerance) / np.log(self.strength)))


class TemporalFuser:
    """Sequential fusion state: feed frames in order with :meth:`step`.

    With ``anchors`` the fuser runs the anchored chains (see the module docstring) and
    :meth:`step` needs each frame's index ``t``; without, it is one chain that never restarts
    except at scene cuts. A cold fuser (no state) starts a chain at the first frame it is given:
    for a result identical to the 1-rank run, start at ``anchors.chain_start(t)`` or continue
    from a stored output where ``anchors.exact_from_output(t)`` (what the partition plan does).
    """

    def __init__(self, settings: TemporalSettings, anchors: Anchors | None = None,
                 backend: FusionBackend | None = None) -> None:
        self.settings = settings
        self.anchors = anchors
        # Where the per-frame math runs: NumPy/OpenCV on the host (the reference), or torch on the
        # rank's GPU (bit-identical). Frames come in and go out as host arrays either way; the
        # chains' state stays on the backend.
        self.backend: FusionBackend = backend if backend is not None else NumpyFusion()
        self._estimator: FlowEstimator | None = None
        self._prev_source: np.ndarray | None = None
        self._prev_gray: np.ndarray | None = None
        self._prev_output: np.ndarray | None = None  # the chain being output
        self._next_output: np.ndarray | None = None  # the chain started ``lead`` frames before the next anchor
        self._last_t: int | None = None
        self._last_was_cut = False

    @property
    def estimator(self) -> FlowEstimator:
        """The fuser's own flow estimator (created on first use; not shared across threads)."""
        if self._estimator is None:
            self._estimator = FlowEstimator(self.settings.flow_method, self.settings.flow_preset)
        return self._estimator

    @property
    def last_was_cut(self) -> bool:
        """True when the last :meth:`step` detected a scene cut and restarted from the stylization."""
        return self._last_was_cut

    @property
    def has_state(self) -> bool:
        return self._prev_output is not None

    @property
    def state(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(previous source, previous output), or None when the next frame starts fresh.

        With anchors this is the whole state only where ``anchors.exact_from_output`` says so.
        """
        if self._prev_source is None or self._prev_output is None:
            return None
        return self._prev_source, self.backend.to_host(self._prev_output)

    def reset(self, prev_source: np.ndarray | None = None, prev_output: np.ndarray | None = None,
              prev_t: int | None = None) -> None:
        """Drop the state (both None) or continue from ``(prev_source, prev_output)`` of frame ``prev_t``."""
        self._last_was_cut = False
        self._next_output = None
        self._last_t = None
        if prev_source is None and prev_output is None:
            self._prev_source = self._prev_gray = self._prev_output = None
            return
        if prev_source is None or prev_output is None:
            raise ValueError("reset needs both prev_source and prev_output, or neither")
        _check_frame("prev_source", prev_source)
        _check_frame("prev_output", prev_output)
        if prev_source.shape != prev_output.shape:
            raise MpistyleError(
                f"saved output frame is {prev_output.shape[1]}x{prev_output.shape[0]} but the video is "
                f"{prev_source.shape[1]}x{prev_source.shape[0]}")
        if self.anchors is not None:
            if prev_t is None:
                raise ValueError("a fuser with anchors needs prev_t to continue from a stored output")
            if not self.anchors.exact_from_output(prev_t + 1):
                raise ValueError(f"the output of frame {prev_t} is not the whole fusion state (anchor or lead "
                                 "window next): warm up from the chain start instead")
        # Private copies: the caller may reuse its buffers.
        self._prev_source = np.array(prev_source, copy=True)
        self._prev_output = _owned(self.backend.asarray(np.array(prev_output, copy=True)))
        self._prev_gray = None
        self._last_t = prev_t

    def step(self, source: np.ndarray, stylized: np.ndarray, pair: PairFlow | None = None,
             t: int | None = None) -> np.ndarray:
        """Fuse one frame; return out_t (uint8) and make ``(source, out_t)`` the new state.

        ``pair`` may be precomputed with ``pair_flow(est, to_gray(prev_source), to_gray(source))``
        (e.g. in another thread); it is ignored when there is no state. When nothing is fused
        (mode "none", first frame, scene cut) the returned array is ``stylized`` itself. ``t``
        (the frame index) is required with anchors, and frames must then come in order.
        """
        _check_frame("source", source)
        _check_frame("stylized", stylized)
        if source.shape != stylized.shape:
            raise MpistyleError(f"stylized frame {stylized.shape} does not match source frame {source.shape}")
        self._last_was_cut = False
        if self.settings.mode == "none":
            return stylized
        if self.anchors is not None:
            if t is None:
                raise ValueError("a fuser with anchors needs the frame index t")
            if self._last_t is not None and self._prev_output is not None and t != self._last_t + 1:
                raise ValueError(f"frames must come in order: got {t} after {self._last_t}")
        cold = self._prev_output is None
        b = self.backend
        s_b: object | None = None  # the stylization on the backend, uploaded once when needed

        def stylized_b() -> object:
            nonlocal s_b
            if s_b is None:
                s_b = b.asarray(stylized)
            return s_b

        out_b = None  # the output on the backend; None: the output is the stylization itself
        gray = None
        if not cold:
            assert self._prev_output is not None
            if tuple(self._prev_output.shape) != source.shape:
                raise MpistyleError(f"frame size changed from {self._prev_output.shape} to {source.shape}")
            if pair is None:
                if self._prev_gray is None:
                    assert self._prev_source is not None
                    self._prev_gray = to_gray(self._prev_source)
                gray = to_gray(source)
                pair = pair_flow(self.estimator, self._prev_gray, gray)
            elif pair.mask.shape != source.shape[:2]:
                raise ValueError(f"precomputed flow {pair.mask.shape} does not fit frame {source.shape}")
            if pair.confidence < self.settings.scene_cut:
                logger.debug("scene cut: flow confidence %.3f < %.3f", pair.confidence, self.settings.scene_cut)
                self._last_was_cut = True
                self._next_output = None  # both chains restart: they are the same from here
            else:
                p = b.upload_pair(pair)
                out_b = self._fuse(stylized_b(), self._prev_output, p)
                if self._next_output is not None:  # same flow, same rule: the young chain converges to the old
                    self._next_output = self._fuse(stylized_b(), self._next_output, p)
        if self.anchors is not None and t is not None:
            # A chain starting at t (not the one this cold fuser starts anyway) begins from the stylization.
            if self.anchors.starts_chain(t) and not cold:
                self._next_output = _owned(stylized_b())
            if self.anchors.is_anchor(t) and self._next_output is not None:
                out_b = self._next_output  # the output switches to the chain started lead frames ago
            if self.anchors.is_anchor(t):
                self._next_output = None
            self._last_t = t
        self._prev_source = np.array(source, copy=True)
        self._prev_gray = gray  # None -> recomputed from _prev_source when needed
        if out_b is None:
            self._prev_output = _owned(stylized_b())
            return stylized
        self._prev_output = _owned(out_b)
        return b.to_host(out_b)


    def _fuse(self, stylized: object, state: object, pair: PairFlow) -> object:
        st, b = self.settings, self.backend
        return b.fuse(stylized, b.warp(state, pair.flow_back, st.warp_interpolation), pair.mask, st.strength,
                      st.keep_detail)


def _owned(frame: object) -> object:
    """A private copy of a backend frame (the caller, or a switch of chains, may reuse the original)."""
    if isinstance(frame, np.ndarray):
        return np.array(frame, copy=True)
    return frame.clone()  # type: ignore[attr-defined]  # a torch tensor: stays on its device


def _check_frame(name: str, frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", None)
        raise ValueError(f"{name} must be a uint8 (H, W, 3) RGB frame, got {getattr(frame, 'dtype', type(frame))} "
                         f"{shape}")
