"""In-memory image datasets: uint8 storage, float batches in [-1, 1]."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


class ImageDataset(torch.utils.data.Dataset):
    """Images held in memory as ``uint8 [N, C, S, S]``; items and batches come out as float in [-1, 1].

    Attributes:
        images: ``uint8 [N, C, S, S]``.
        name: what it is (a spec or a folder).
        masks: optional ground-truth part masks, ``bool [N, P, S, S]`` (one per part slot).
        part_labels: optional ``int64 [N, P]``: the part type drawn at each slot.
        info: free-form description (slot and part names, skipped files, ...).
    """

    def __init__(self, images: Tensor, name: str, masks: Optional[Tensor] = None,
                 part_labels: Optional[Tensor] = None, info: Optional[dict] = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, S, S], got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError(f"dataset {name!r} is empty")
        self.images = images.contiguous()
        self.name = name
        self.masks = masks
        self.part_labels = part_labels
        self.info = dict(info or {})

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return to_float(self.images[i])

    def batch(self, indices: Sequence[int] | Tensor) -> Tensor:
        """Float images ``[B, C, S, S]`` in [-1, 1] at ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return to_float(self.images.index_select(0, idx))

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, n={len(self)}, shape={self.image_shape})"


def to_float(u8: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return u8.float().div_(127.5).sub_(1.0)


def to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


def from_numpy_images(arr: np.ndarray, channels: int) -> Tensor:
    """``float [N, H, W] or [N, H, W, c]`` in [0, 1] -> uint8 ``[N, channels, H, W]`` (gray is replicated)."""
    if arr.ndim == 3:
        arr = arr[..., None]
    arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    return match_channels(t, channels)


def match_channels(t: Tensor, channels: int) -> Tensor:
    """``uint8 [N, c, H, W]`` with c in {1, 3} -> ``[N, channels, H, W]`` (gray replicated or averaged)."""
    c = t.shape[1]
    if c == channels:
        return t
    if c == 1:
        return t.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        return t.float().mean(1, keepdim=True).round().to(torch.uint8)
    raise ValueError(f"cannot turn {c}-channel images into {channels}-channel ones")
