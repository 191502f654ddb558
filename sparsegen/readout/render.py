"""Pictures of AND-OR trees and dictionaries (matplotlib's Agg canvas; no display needed).

* :func:`render_andor_tree`: one generated image, the OR node of its strongest top-level position with
  its active basis functions, drilled down through the lower layers along the sparse connections
  (in the manner of CVPR 2020 Figure 1).
* :func:`render_dictionary`: a grid of basis / kernel images of one layer.
* :func:`render_side_by_side`: two dictionaries next to each other (sparse vs dense, CVPR Figure 7).

Basis functions live in the pre-tanh output space and have no natural range: each thumbnail is scaled on
its own (min-max over its pixels and channels), so shape, not amplitude, is what the pictures compare.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .andor import tree_layers
from .basis import FixedParse, crop, receptive_center, support_size


def _figure(w: float, h: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, facecolor="white")
    return path


def to_display(x: Tensor, mode: str = "minmax") -> np.ndarray:
    """``[C, h, w]`` -> ``[h, w, 3]`` floats in [0, 1] for ``imshow``.

    ``mode``: ``"minmax"`` (each picture scaled to fill [0, 1]), ``"symmetric"`` (0 at mid-grey, scaled by
    the largest magnitude) or ``"image"`` (already in [-1, 1]).
    """
    x = x.detach().double().cpu()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    if mode == "image":
        y = (x.clamp(-1, 1) + 1) / 2
    elif mode == "symmetric":
        m = float(x.abs().max())
        y = 0.5 + 0.5 * x / m if m > 0 else torch.full_like(x, 0.5)
    elif mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
        y = (x - lo) / (hi - lo) if hi > lo else torch.full_like(x, 0.5)
    else:
        raise ValueError(f"unknown display mode {mode!r}; expected 'minmax', 'symmetric' or 'image'")
    return y.permute(1, 2, 0).numpy()


def _thumb(ax, x: Tensor, title: str = "", mode: str = "minmax", edge: Optional[str] = None, fontsize: int = 7):
    ax.imshow(to_display(x, mode), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(edge or "#999999")
        s.set_linewidth(2.5 if edge else 0.6)
    if title:
        ax.set_title(title, fontsize=fontsize, pad=2)


def layer_crop_size(contrib: Tensor, lo: int = 6) -> int:
    """A crop side for a set of basis images: the median side holding 90% of their energy (at least ``lo``)."""
    if contrib.shape[0] == 0:
        return contrib.shape[-1]
    s = int(torch.median(support_size(contrib)).item())
    return int(min(contrib.shape[-1], max(lo, s)))


# ----------------------------------------------------------------------------------------------------
def andor_tree(fp: FixedParse, n: int = 0, layers: Optional[Sequence[str]] = None, width: int = 6) -> list:
    """The drill-down a tree figure shows, as data: one entry per level, top-down.

    Level 0 is the OR node at the strongest position of ``layers[0]`` (default: :func:`tree_layers`) in
    image ``n``: its units (OR children) by decreasing coefficient. Each further level holds the children
    (sparse connections, :meth:`FixedParse.children`) of the previous level's strongest unit. Each entry:
    ``{"layer", "grid", "rows", "weights", "focus", "or_position"?}`` with at most ``width`` rows.
    """
    layers = list(layers or tree_layers(fp.g))
    lp = fp.graph[layers[0]]
    h, w = lp.strongest_or_node(n)
    rows = lp.or_node(n, h, w)[:width]
    levels = [{"layer": layers[0], "grid": lp.grid, "rows": rows, "weights": lp.coefficient[rows],
               "or_position": (h, w), "focus": int(rows[0])}]
    for name in layers[1:]:
        prev = levels[-1]
        kids, wts = fp.children(prev["layer"], prev["focus"])
        if fp.names.index(name) != fp.names.index(prev["layer"]) + 1 or kids.numel() == 0:
            break
        kids, wts = kids[:width], wts[:width]
        levels.append({"layer": name, "grid": fp.graph[name].grid, "rows": kids, "weights": wts,
                       "focus": int(kids[0])})
    return levels


def render_andor_tree(fp: FixedParse, path: str, n: int = 0, layers: Optional[Sequence[str]] = None,
                      width: int = 6, title: str = "") -> dict:
    """Draw the AND-OR tree of image ``n`` of ``fp`` (CVPR Figure 1 style) into ``path`` (PNG).

    Top: the generated image with the top layer's AND grid, the chosen OR node outlined. Each row below
    shows the basis functions ``s_j B_j`` of one level, cropped around their energy: first the OR node's
    active children (channel ``c``, coefficient ``s``), then, row by row, the units of the next layer that
    the previous row's outlined unit connects to (position ``(h, w)``, channel, received contribution).
    Returns the tree data of :func:`andor_tree` with the crop sizes.
    """
    from matplotlib.patches import ConnectionPatch, Rectangle

    levels = andor_tree(fp, n, layers, width)
    C, S, _ = fp.g.image_shape
    nrows = len(levels)
    fig = _figure(1.35 * (width + 2.2), 2.3 + 1.75 * nrows, dpi=110)
    gs = fig.add_gridspec(nrows + 1, width + 2, height_ratios=[1.45] + [1.0] * nrows, hspace=0.55, wspace=0.25,
                          left=0.02, right=0.98, top=0.9, bottom=0.02)
    # The generated image with the top layer's grid.
    top = levels[0]
    H, W = top["grid"]
    ax_img = fig.add_subplot(gs[0, 0:2])
    ax_img.imshow(to_display(fp.images[n], "image"), interpolation="nearest", extent=(0, S, S, 0))
    for i in range(1, H):
        ax_img.axhline(i * S / H, color="white", lw=0.4, alpha=0.6)
    for j in range(1, W):
        ax_img.axvline(j * S / W, color="white", lw=0.4, alpha=0.6)
    oh, ow = top["or_position"]
    ax_img.add_patch(Rectangle((ow * S / W, oh * S / H), S / W, S / H, fill=False, ec="red", lw=2))
    ax_img.set_xticks([])
    ax_img.set_yticks([])
    ax_img.set_title(f"generated image; AND node = {H}x{W} grid of {top['layer']}", fontsize=8)
    ax_txt = fig.add_subplot(gs[0, 2:])
    ax_txt.axis("off")
    lp0 = fp.graph[top["layer"]]
    n_units = int((lp0.image == n).sum())
    lines = [f"OR node at (h, w) = ({oh}, {ow}) of {top['layer']}: {len(lp0.or_node(n, oh, ow))} active channel(s) "
             f"(of {lp0.shape[0]}); {n_units} units in this layer of the image.",
             "Row 1: the OR node's active basis functions s_j B_j (channel c, coefficient s).",
             ]
    for d, lev in enumerate(levels[1:], start=2):
        lines.append(f"Row {d}: units of {lev['layer']} ({lev['grid'][0]}x{lev['grid'][1]}) that the outlined unit "
                     "above connects to (position, channel, contribution received).")
    lines.append("Outlined in red: the unit drilled down into. Each basis is cropped around its energy and "
                 "scaled on its own.")
    ax_txt.text(0.0, 0.95, "\n".join(lines), va="top", ha="left", fontsize=8, wrap=True)
    crop_sizes = []
    prev_ax = None
    for r, lev in enumerate(levels):
        lp = fp.graph[lev["layer"]]
        contrib = fp.contributions(lev["layer"], lev["rows"])
        size = layer_crop_size(contrib)
        crop_sizes.append(size)
        crops = crop(contrib, receptive_center(lp, lev["rows"], S), size)
        ax_label = fig.add_subplot(gs[r + 1, 0])
        ax_label.axis("off")
        gh, gw = lev["grid"]
        ax_label.text(0.5, 0.5, f"{lev['layer']}\n{gh}x{gw} grid\n{lp.shape[0]} channels\ncrop {size}px",
                      ha="center", va="center", fontsize=8)
        focus_ax = None
        for t, row in enumerate(lev["rows"].tolist()):
            ax = fig.add_subplot(gs[r + 1, t + 1])
            h, w = lp.hw(torch.tensor([row]))
            c = int(lp.channel[row])
            wt = float(lev["weights"][t])
            lab = f"c{c} s={wt:.2f}" if r == 0 else f"({int(h)},{int(w)}) c{c}\n+{wt:.2f}"
            is_focus = row == lev["focus"]
            _thumb(ax, crops[t], lab, edge="red" if is_focus else None)
            if is_focus:
                focus_ax = ax
            if prev_ax is not None:
                con = ConnectionPatch(xyA=(0.5, 0.0), coordsA=prev_ax.transAxes, xyB=(0.5, 1.0),
                                      coordsB=ax.transAxes, color="#cc3333", lw=0.7, alpha=0.7)
                fig.add_artist(con)
            elif r == 0:
                con = ConnectionPatch(xyA=((ow + 0.5) * S / W, (oh + 1.0) * S / H), coordsA=ax_img.transData,
                                      xyB=(0.5, 1.0), coordsB=ax.transAxes, color="#cc3333", lw=0.7, alpha=0.7)
                fig.add_artist(con)
        prev_ax = focus_ax
    fig.suptitle(title or f"AND-OR tree of one generated image ({fp.g.config.name}, "
                          f"{'sparse' if fp.g.sparse else 'dense'})", fontsize=11)
    _save(fig, path)
    for lev, s in zip(levels, crop_sizes):
        lev["crop"] = s
    return {"path": path, "levels": levels}


# ----------------------------------------------------------------------------------------------------
def render_dictionary(items: Tensor, path: str, title: str = "", labels: Optional[Sequence[str]] = None,
                      ncol: int = 16, mode: str = "minmax", thumb: float = 0.75) -> str:
    """A grid of ``items [M, C, h, w]`` (each scaled on its own) with optional per-item labels, into ``path``."""
    M = items.shape[0]
    ncol = max(1, min(ncol, M))
    nrow = max(1, math.ceil(M / ncol))
    fig = _figure(thumb * ncol + 0.2, thumb * nrow * (1.18 if labels else 1.0) + (0.45 if title else 0.1), dpi=110)
    top = 1 - (0.42 / (thumb * nrow + 0.45) if title else 0.01)
    gs = fig.add_gridspec(nrow, ncol, wspace=0.08, hspace=0.35 if labels else 0.08, left=0.01, right=0.99,
                          top=top, bottom=0.01)
    for m in range(M):
        ax = fig.add_subplot(gs[m // ncol, m % ncol])
        _thumb(ax, items[m], labels[m] if labels else "", mode=mode, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def render_side_by_side(left: Tensor, right: Tensor, path: str, left_title: str, right_title: str,
                        title: str = "", ncol: int = 8, mode: str = "minmax") -> str:
    """Two dictionaries ``[M, C, h, w]`` next to each other (CVPR Figure 7's sparse vs dense comparison)."""
    nl, nr = left.shape[0], right.shape[0]
    nrow = max(1, math.ceil(max(nl, nr) / ncol))
    height = 0.8 * nrow + 1.0
    fig = _figure(2 * 0.8 * ncol + 0.6, height, dpi=110)
    top = 1 - 0.8 / height
    outer = fig.add_gridspec(1, 2, wspace=0.06, left=0.01, right=0.99, top=top, bottom=0.01)
    for k, (items, sub) in enumerate(((left, left_title), (right, right_title))):
        gs = outer[0, k].subgridspec(nrow, ncol, wspace=0.06, hspace=0.06)
        box = outer[0, k].get_position(fig)
        fig.text((box.x0 + box.x1) / 2, top + 0.15 / height, sub, fontsize=10, ha="center", va="bottom",
                 weight="bold")
        for m in range(items.shape[0]):
            ax = fig.add_subplot(gs[m // ncol, m % ncol])
            _thumb(ax, items[m], mode=mode)
    if title:
        fig.suptitle(title, fontsize=10, y=0.995)
    return _save(fig, path)


def save_image_grid(images: Tensor, path: str, nrow: int = 8) -> str:
    """Images ``[N, C, S, S]`` in [-1, 1] as a PNG grid (enlarged to at least 96 px per image)."""
    from ..train.pictures import save_grid

    return save_grid(images, path, nrow=nrow)
