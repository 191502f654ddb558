"""``parts``: a procedural compositional dataset with ground-truth part masks.

Each image is one object made of four part *slots* at fixed places on a 2x2 layout (the AND node); each
slot draws one of its part *types* (the OR choices under it), a colour from a palette, a size and a small
offset. The whole object is shifted a little too. Everything comes from ``numpy.random.default_rng(seed)``,
so the same arguments always give the same images, masks and labels.

========  ===============  =========================
slot      place            part types (OR)
========  ===============  =========================
0         top-left         disk, square
1         top-right        triangle, diamond
2         bottom-left      ring, cross
3         bottom-right     horizontal bar, vertical bar
========  ===============  =========================

Images are rendered 4x supersampled and box-filtered (anti-aliased). Masks are the pixels at least half
covered by the part.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import ImageDataset, from_numpy_images

SLOT_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right")
SLOT_CENTRES = ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7))  # (x, y) as fractions of the image size
SLOT_TYPES = (("disk", "square"), ("triangle", "diamond"), ("ring", "cross"), ("hbar", "vbar"))
PART_NAMES = tuple(t for types in SLOT_TYPES for t in types)  # global part type ids
PALETTE = np.array([
    (0.95, 0.25, 0.20),  # red
    (0.25, 0.80, 0.30),  # green
    (0.25, 0.45, 0.95),  # blue
    (0.98, 0.85, 0.20),  # yellow
    (0.85, 0.30, 0.85),  # magenta
    (0.20, 0.85, 0.90),  # cyan
])
BACKGROUND = (0.08, 0.08, 0.10)
SUPERSAMPLE = 4


def _shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside-test of part ``kind`` of radius ``r`` at offsets ``dx, dy`` from its centre."""
    ax, ay = np.abs(dx), np.abs(dy)
    if kind == "disk":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return np.maximum(ax, ay) <= 0.82 * r
    if kind == "triangle":  # apex up, base at y = 0.8 r
        return (dy <= 0.8 * r) & (ax <= (dy + r) / 1.8)
    if kind == "diamond":
        return ax + ay <= r
    if kind == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "cross":
        return ((ax <= 0.3 * r) & (ay <= r)) | ((ay <= 0.3 * r) & (ax <= r))
    if kind == "hbar":
        return (ax <= r) & (ay <= 0.38 * r)
    if kind == "vbar":
        return (ay <= r) & (ax <= 0.38 * r)
    raise ValueError(f"unknown part type {kind!r}")


def make_parts(n: int = 1024, image_size: int = 32, seed: int = 0, channels: int = 3) -> ImageDataset:
    """Generate ``n`` images of ``image_size`` (>= 8) with their part masks and labels.

    Returns an :class:`~sparsegen.data.base.ImageDataset` with ``masks bool [n, 4, S, S]`` (one per slot),
    ``part_labels int64 [n, 4]`` (ids into :data:`PART_NAMES`) and ``info`` holding the slot and part
    names and each part's ``colors int64 [n, 4]`` (ids into :data:`PALETTE`).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"parts: n must be an int >= 1, got {n!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"parts: image_size must be an int >= 8, got {image_size!r}")
    rng = np.random.default_rng(seed)
    S, ss = image_size, SUPERSAMPLE
    big = S * ss
    coords = (np.arange(big) + 0.5) / ss  # pixel-unit coordinates of the sub-samples
    X, Y = np.meshgrid(coords, coords)
    images = np.empty((n, S, S, 3), dtype=np.float32)
    masks = np.zeros((n, len(SLOT_NAMES), S, S), dtype=bool)
    labels = np.zeros((n, len(SLOT_NAMES)), dtype=np.int64)
    colors = np.zeros((n, len(SLOT_NAMES)), dtype=np.int64)
    offsets = np.cumsum([0] + [len(t) for t in SLOT_TYPES])[:-1]
    for i in range(n):
        canvas = np.empty((big, big, 3), dtype=np.float32)
        canvas[:] = BACKGROUND
        shift = rng.uniform(-S / 16, S / 16, size=2)
        for s, ((fx, fy), types) in enumerate(zip(SLOT_CENTRES, SLOT_TYPES)):
            t = int(rng.integers(len(types)))
            c = int(rng.integers(len(PALETTE)))
            r = S * rng.uniform(0.13, 0.18)
            jitter = rng.uniform(-S / 32, S / 32, size=2)
            cx, cy = fx * S + shift[0] + jitter[0], fy * S + shift[1] + jitter[1]
            inside = _shape_mask(types[t], X - cx, Y - cy, r)
            canvas[inside] = PALETTE[c]
            cover = inside.reshape(S, ss, S, ss).mean(axis=(1, 3))
            masks[i, s] = cover >= 0.5
            labels[i, s] = offsets[s] + t
            colors[i, s] = c
        images[i] = canvas.reshape(S, ss, S, ss, 3).mean(axis=(1, 3))
    info = {"slot_names": SLOT_NAMES, "part_names": PART_NAMES, "slot_types": SLOT_TYPES,
            "colors": torch.from_numpy(colors), "seed": seed}
    return ImageDataset(from_numpy_images(images, channels), f"parts(n={n}, seed={seed})",
                        masks=torch.from_numpy(masks), part_labels=torch.from_numpy(labels), info=info)
