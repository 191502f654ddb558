"""Geometry and argument checks shared by the Triton launchers."""
from __future__ import annotations

from typing import Sequence

import torch

from ..geometry import group_geometry, index_dtype  # noqa: F401  (re-exported for the launchers)

MODE_IDS = {"spatial": 0, "channel": 1, "global": 2}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= max(n, 1)``."""
    return 1 << max(int(n) - 1, 0).bit_length()


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_compact(values: torch.Tensor, indices: torch.Tensor, mode: str, shape: Sequence[int]) -> tuple:
    """Validate a compact activation against ``shape = [N, C, H, W]``; returns ``(N, C, H, W, G, S, k)``."""
    if len(shape) != 4:
        raise ValueError(f"shape must be [N, C, H, W], got {list(shape)}")
    N, C, H, W = (int(s) for s in shape)
    G, S = group_geometry(mode, C, H, W)
    if values.dim() != 3 or values.shape[:2] != (N, G):
        raise ValueError(f"values must have shape [N={N}, G={G}, k] for mode {mode!r}, got {tuple(values.shape)}")
    if indices.shape != values.shape:
        raise ValueError(f"indices shape {tuple(indices.shape)} differs from values shape {tuple(values.shape)}")
    if indices.dtype not in (torch.int16, torch.int32, torch.int64):
        raise TypeError(f"indices must be int16, int32 or int64, got {indices.dtype}")
    if indices.device != values.device:
        raise ValueError(f"indices are on {indices.device} but values are on {values.device}")
    return N, C, H, W, G, S, values.shape[2]


def pair(v, name: str) -> tuple[int, int]:
    """``int`` or a sequence of one or two ints -> ``(a, b)``."""
    if isinstance(v, int):
        return v, v
    v = [int(a) for a in v]
    if len(v) == 1:
        return v[0], v[0]
    if len(v) != 2:
        raise ValueError(f"{name} must have 1 or 2 elements, got {v}")
    return v[0], v[1]
