"""Optimisation-based stylisation of one frame (Gatys et al. 2016): what a fast network could reach.

``mpistyle quality --reference`` runs it so a user who trains a style sees how close the model gets to
what is possible at about the same structure kept. The image itself is optimised, starting from the frame:
L-BFGS on content (VGG-19 relu4_2 feature MSE) plus ``style_weight`` times the Gram losses at relu1_1 ..
relu5_1, each normalised by ||G(painting)||^2 so every layer counts alike. Average pooling (Gatys et al.'s
choice for synthesis: its gradient reaches every pixel). About 50 s for 150 steps at 320x180 on 2 cores.
"""

from __future__ import annotations

import numpy as np
import torch

from mpistyle.training.losses import VGG19Features
from mpistyle.training.scores import resize_long

STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CONTENT_LAYER = "relu4_2"
# Two style weights: about structure kept 0.86-0.90 (1e4) and 0.72-0.77 (1e5) on Big Buck Bunny.
STYLE_WEIGHTS = (1e4, 1e5)


def _gram(f: torch.Tensor) -> torch.Tensor:
    n, c, h, w = f.shape
    m = f.reshape(n * c, h * w)
    return m @ m.T / (h * w)


def stylize_by_optimisation(frame: np.ndarray, painting: np.ndarray, style_weight: float = 1e4,
                            steps: int = 150) -> np.ndarray:
    """The frame (H,W,3 uint8 RGB) optimised toward the painting's texture; uint8 RGB of the same size."""
    vgg = VGG19Features((*STYLE_LAYERS, CONTENT_LAYER), pool="avg").eval()
    to_t = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float().contiguous()  # noqa: E731
    with torch.no_grad():
        fp = vgg(to_t(resize_long(painting)))
        targets = {k: _gram(fp[k]) for k in STYLE_LAYERS}
        norms = {k: float((g**2).sum()) for k, g in targets.items()}
        content = vgg(to_t(frame), (CONTENT_LAYER,))[CONTENT_LAYER]
    x = to_t(frame).requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=steps, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        f = vgg(x.clamp(0, 255))
        loss = torch.nn.functional.mse_loss(f[CONTENT_LAYER], content)
        for k in STYLE_LAYERS:
            loss = loss + style_weight * ((_gram(f[k]) - targets[k]) ** 2).sum() / norms[k]
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach().clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
