"""Compact <-> dense layout kernels: scatter ``values`` at ``indices`` into a dense map, gather it back.

Both kernels walk the flat list of entries ``(n, g, j)`` and locate each entry in the dense map from its
mode: spatial (channel ``g``, position ``idx``), channel (channel ``idx``, position ``g``), global
(channel ``idx // HW``, position ``idx % HW``). The dense side is addressed through strides, so the same
kernel writes NCHW for :func:`compact_to_dense` and channels-last buffers for the convolution kernels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import MODE_IDS, check_compact, check_float

BLOCK = 1024


@triton.jit
def _entry_location(e, idx, G, k, HW, MODE: tl.constexpr):
    """``(n, c, p)`` of compact entries ``e`` (flat over ``[N, G, k]``) with group indices ``idx``."""
    n = e // (G * k)
    g = (e // k) % G
    if MODE == 0:
        c = g
        p = idx
    elif MODE == 1:
        c = idx
        p = g
    else:
        c = idx // HW
        p = idx % HW
    return n, c, p


@triton.jit
def _compact_scatter_kernel(val_ptr, idx_ptr, out_ptr, total, G, k, HW, W, sN, sC, sH, sW,
                            MODE: tl.constexpr, BLOCK: tl.constexpr):
    """``out[n, c, p] = values[e]`` for every compact entry ``e`` (``out`` zero-filled beforehand)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < total
    idx = tl.load(idx_ptr + e, mask=m, other=0).to(tl.int64)
    v = tl.load(val_ptr + e, mask=m, other=0.0)
    n, c, p = _entry_location(e, idx, G, k, HW, MODE)
    tl.store(out_ptr + n * sN + c * sC + (p // W) * sH + (p % W) * sW, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _compact_gather_kernel(dense_ptr, idx_ptr, out_ptr, total, G, k, HW, W, sN, sC, sH, sW,
                           MODE: tl.constexpr, BLOCK: tl.constexpr):
    """``out[e] = dense[n, c, p]`` for every compact entry ``e``."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < total
    idx = tl.load(idx_ptr + e, mask=m, other=0).to(tl.int64)
    n, c, p = _entry_location(e, idx, G, k, HW, MODE)
    v = tl.load(dense_ptr + n * sN + c * sC + (p // W) * sH + (p % W) * sW, mask=m, other=0.0)
    tl.store(out_ptr + e, v.to(out_ptr.dtype.element_ty), mask=m)


def scatter_into(out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, mode: str) -> torch.Tensor:
    """Write compact ``values/indices`` into the zero-filled 4-d ``out`` (any strides, logical NCHW)."""
    N, C, H, W = out.shape
    total = values.numel()
    if total:
        sN, sC, sH, sW = out.stride()
        _compact_scatter_kernel[(triton.cdiv(total, BLOCK),)](
            values, indices, out, total, values.shape[1], values.shape[2], H * W, W, sN, sC, sH, sW,
            MODE=MODE_IDS[mode], BLOCK=BLOCK, num_warps=4)
    return out


def compact_to_dense(values: torch.Tensor, indices: torch.Tensor, mode: str, shape: Sequence[int]) -> torch.Tensor:
    """Scatter ``values/indices [N, G, k]`` into zeros of ``shape = [N, C, H, W]`` (dtype of values)."""
    check_float("values", values)
    check_compact(values, indices, mode, shape)
    values, indices = values.contiguous(), indices.contiguous()
    out = torch.zeros([int(s) for s in shape], dtype=values.dtype, device=values.device)
    return scatter_into(out, values, indices, mode)


def compact_gather(dense: torch.Tensor, indices: torch.Tensor, mode: str) -> torch.Tensor:
    """Gather ``dense [N, C, H, W]`` at compact ``indices [N, G, k]`` -> ``[N, G, k]`` (dtype of dense)."""
    check_float("dense", dense)
    if dense.dim() != 4:
        raise ValueError(f"dense must have shape [N, C, H, W], got {tuple(dense.shape)}")
    check_compact(indices, indices, mode, dense.shape)
    indices = indices.contiguous()
    N, C, H, W = dense.shape
    out = torch.empty(indices.shape, dtype=dense.dtype, device=dense.device)
    total = out.numel()
    if total:
        sN, sC, sH, sW = dense.stride()
        _compact_gather_kernel[(triton.cdiv(total, BLOCK),)](
            dense, indices, out, total, indices.shape[1], indices.shape[2], H * W, W, sN, sC, sH, sW,
            MODE=MODE_IDS[mode], BLOCK=BLOCK, num_warps=4)
    return out
