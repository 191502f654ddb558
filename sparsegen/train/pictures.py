"""Pictures of a run: image grids (PNG, via Pillow) and the loss curves (PNG, via matplotlib's Agg canvas), each
written atomically (a temp file renamed over the picture), so a reader never sees half a picture."""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..data.base import to_uint8
from .checkpoint import write_atomic


def make_grid(images: Tensor, nrow: int = 8, pad: int = 2, pad_value: int = 255) -> Tensor:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 ``[H', W', 3]`` grid of ``nrow`` images per row."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    x = to_uint8(images.cpu())
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    grid = torch.full((3, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0).contiguous()


def save_grid(images: Tensor, path: str, nrow: int = 8, scale: Optional[int] = None) -> str:
    """Save images ``[N, C, H, W]`` in [-1, 1] as a PNG grid (whatever the name's extension), enlarged ``scale``
    times (nearest; default: so that each image is at least 96 pixels wide). Returns ``path``."""
    from PIL import Image

    if scale is None:
        scale = max(1, math.ceil(96 / images.shape[-1]))
    im = Image.fromarray(make_grid(images, nrow).numpy())
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return write_atomic(path, lambda f: im.save(f, format="PNG"))


def save_loss_plot(history: Mapping[str, Sequence[float]], path: str, title: str = "") -> str:
    """Plot the training curves of ``history`` (``"iter"`` plus one list per quantity) into ``path``.

    Panels: reconstruction MSE (log scale), the critic's energies of observed and synthesised images, and
    the critic's loss with its gradient penalty. Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    it = list(history.get("iter", []))
    panels = [("reconstruction MSE", ["recon_mse"], True),
              ("critic energy f(Y)", ["energy_real", "energy_fake"], False),
              ("critic loss (Eq. 21 + penalty)", ["loss_d", "gp"], False)]
    panels = [p for p in panels if any(len(history.get(k, [])) for k in p[1])]
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, keys, log) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k in keys:
            v = list(history.get(k, []))
            if v:
                ax.plot(it[:len(v)], v, label=k, lw=1.2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))
