"""Sparse upsample convolution (nearest x2 + 3x3 conv, padding 1) on the 3x3 weight, without folding it.

``out = conv2d(interpolate(dense(input), 2, "nearest"), weight3, bias, padding=1)``, ``weight3 [Cout, Cin, 3, 3]``.

For very sparse channel-mode inputs (the FC layer: 8 of 3200 channels at each of 4x4 positions) folding the
whole weight into its 4x4 transposed form on every training step moves more bytes than the convolution
itself. These kernels read the 3x3 weight in its own layout, where the 9 taps of one ``(output channel,
input channel)`` pair are contiguous, and never form the folded weight or its gradient:

* forward, two kernels: (1) per input pixel ``r``, ``P[r, t, co] = sum_j v[r, j] * W3[co, c_j, t]`` over its
  ``k`` surviving ``(c_j, v)`` entries and the 9 taps ``t = (y, x)``; (2) col2im on the virtual upsampled
  grid: ``out[n, co, oy, ox] = bias[co] + sum_{y, x} P[pixel((oy + y - 1) // 2, (ox + x - 1) // 2), (y, x), co]``.
  That is ``9 * Cout`` MACs per surviving entry plus 9 adds per output element.
* backward, with the window sums of the output gradient ``Gs[r, t, co] = sum_{a, b in {0, 1}}
  grad_out[n, co, 2i + a + 1 - y, 2j + b + 1 - x]`` (input pixel ``r = (n, i, j)``, tap ``t = (y, x)``):
  input gradient ``dv[r, j] = sum_{t, co} W3[co, c_j, t] * Gs[r, t, co]``; weight gradient
  ``dW3[co, c, t] = sum over the entries of channel c of v * Gs[r, t, co]``, one program per
  ``(channel, Cout block)`` walking the entries sorted by channel (no atomics: deterministic).

Other inputs (spatial and global modes, denser inputs, dense inputs) go through the folded weight and the
transposed-convolution kernels of :mod:`.sparse_conv`. Accumulation is in float32 (float64 for float64).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..geometry import fold_upsample_weight, unfold_upsample_weight_grad
from . import sparse_conv
from ._common import check_compact, check_float, next_pow2

# Channel-mode density (k / Cin) at or below which the 3x3-weight kernels are used instead of the fold.
DIRECT_MAX_DENSITY = 1.0 / 16


@triton.jit
def _acc3_zeros(A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, ACC64: tl.constexpr):
    if ACC64:
        acc = tl.zeros([A, B, C], dtype=tl.float64)
    else:
        acc = tl.zeros([A, B, C], dtype=tl.float32)
    return acc


@triton.jit
def _upconv_tap_sum_kernel(val_ptr, idx_ptr, w_ptr, p_ptr, n_pix, k, Cin, Cout,
                           ACC64: tl.constexpr, BLOCK_PX: tl.constexpr, BLOCK_CO: tl.constexpr):
    """``P[r, t, co] = sum_j v[r, j] * W3[co, idx[r, j], t]`` for input pixels ``r`` (rows of ``[N*H*W, k]``)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_PX + tl.arange(0, BLOCK_PX)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    t = tl.arange(0, 16)
    rm = r < n_pix
    mask = rm[:, None, None] & (t < 9)[None, :, None] & (co < Cout)[None, None, :]
    w_rows = w_ptr + co[None, None, :].to(tl.int64) * (Cin * 9) + t[None, :, None]
    acc = _acc3_zeros(BLOCK_PX, 16, BLOCK_CO, ACC64)
    for j in range(k):
        c = tl.load(idx_ptr + r * k + j, mask=rm, other=0).to(tl.int64)
        v = tl.load(val_ptr + r * k + j, mask=rm, other=0.0).to(acc.dtype)
        w = tl.load(w_rows + (c * 9)[:, None, None], mask=mask, other=0.0)
        acc += v[:, None, None] * w.to(acc.dtype)
    dst = p_ptr + (r[:, None, None] * 9 + t[None, :, None]) * Cout + co[None, None, :]
    tl.store(dst, acc, mask=mask)


@triton.jit
def _upconv_col2im_kernel(p_ptr, bias_ptr, out_ptr, H, W, Cout, n_tiles,
                          HAS_BIAS: tl.constexpr, ACC64: tl.constexpr,
                          BLOCK_O: tl.constexpr, BLOCK_CO: tl.constexpr):
    """``out[n, co, oy, ox] = bias[co] + sum_{y, x} P[n, (oy + y - 1) // 2, (ox + x - 1) // 2, (y, x), co]``."""
    pid = tl.program_id(0)
    n = (pid // n_tiles).to(tl.int64)
    Wo = 2 * W
    HWo = 4 * H * W
    q = (pid % n_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)
    qm = q < HWo
    oy = q // Wo
    ox = q % Wo
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    com = co < Cout
    if ACC64:
        acc = tl.zeros([BLOCK_O, BLOCK_CO], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_O, BLOCK_CO], dtype=tl.float32)
    for y in tl.static_range(3):
        uy = oy + (y - 1)
        vy = qm & (uy >= 0) & (uy < 2 * H)
        iy = tl.where(vy, uy, 0) // 2
        for x in tl.static_range(3):
            ux = ox + (x - 1)
            valid = vy & (ux >= 0) & (ux < Wo)
            ix = tl.where(valid, ux, 0) // 2
            row = (n * H + iy) * W + ix
            p = tl.load(p_ptr + (row * 9 + (3 * y + x))[:, None] * Cout + co[None, :],
                        mask=valid[:, None] & com[None, :], other=0.0)
            acc += p
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=com, other=0.0).to(acc.dtype)[None, :]
    dst = out_ptr + (n * Cout + co[None, :].to(tl.int64)) * HWo + q[:, None]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=qm[:, None] & com[None, :])


@triton.jit
def _upconv_window_sum_kernel(go_ptr, gs_ptr, n_pix, H, W, Cout,
                              ACC64: tl.constexpr, BLOCK_PX: tl.constexpr, BLOCK_CO: tl.constexpr):
    """``Gs[r, t, co] = sum_{a, b} go[n, 2i + a + 1 - y, 2j + b + 1 - x, co]`` (``go`` channels-last)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_PX + tl.arange(0, BLOCK_PX)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    t = tl.arange(0, 16)
    rm = r < n_pix
    com = co < Cout
    HW = H * W
    n = r // HW
    i = (r % HW) // W
    j = r % W
    ty = t // 3
    tx = t % 3
    tm = rm[:, None] & (t < 9)[None, :]
    acc = _acc3_zeros(BLOCK_PX, 16, BLOCK_CO, ACC64)
    for a in tl.static_range(2):
        oy = 2 * i[:, None] + (a + 1) - ty[None, :]
        vy = tm & (oy >= 0) & (oy < 2 * H)
        for b in tl.static_range(2):
            ox = 2 * j[:, None] + (b + 1) - tx[None, :]
            valid = vy & (ox >= 0) & (ox < 2 * W)
            pix = (n[:, None] * (2 * H) + tl.where(valid, oy, 0)) * (2 * W) + tl.where(valid, ox, 0)
            g = tl.load(go_ptr + pix[:, :, None] * Cout + co[None, None, :],
                        mask=valid[:, :, None] & com[None, None, :], other=0.0)
            acc += g.to(acc.dtype)
    dst = gs_ptr + (r[:, None, None] * 9 + t[None, :, None]) * Cout + co[None, None, :]
    tl.store(dst, acc, mask=tm[:, :, None] & com[None, None, :])


@triton.jit
def _upconv_input_grad_kernel(gs_ptr, idx_ptr, w_ptr, out_ptr, n_pix, k, Cin, Cout,
                              ACC64: tl.constexpr, BLOCK_PX: tl.constexpr, BLOCK_CO: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    """``dv[r, j] = sum_{t, co} W3[co, idx[r, j], t] * Gs[r, t, co]`` for input pixels ``r``."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_PX + tl.arange(0, BLOCK_PX)
    rm = r < n_pix
    t = tl.arange(0, 16)
    jj = tl.arange(0, BLOCK_K)
    if ACC64:
        acc = tl.zeros([BLOCK_PX, BLOCK_K], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_PX, BLOCK_K], dtype=tl.float32)
    for co0 in range(0, Cout, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        mask = rm[:, None, None] & (t < 9)[None, :, None] & (co < Cout)[None, None, :]
        gs = tl.load(gs_ptr + (r[:, None, None] * 9 + t[None, :, None]) * Cout + co[None, None, :], mask=mask,
                     other=0.0).to(acc.dtype)
        w_rows = w_ptr + co[None, None, :].to(tl.int64) * (Cin * 9) + t[None, :, None]
        for j in range(k):
            c = tl.load(idx_ptr + r * k + j, mask=rm, other=0).to(tl.int64)
            w = tl.load(w_rows + (c * 9)[:, None, None], mask=mask, other=0.0).to(acc.dtype)
            s = tl.sum(tl.sum(w * gs, axis=2), axis=1)
            acc += tl.where(jj[None, :] == j, s[:, None], 0.0)
    tl.store(out_ptr + r[:, None] * k + jj[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & (jj < k)[None, :])


@triton.jit
def _upconv_weight_grad_kernel(gs_ptr, val_ptr, perm_ptr, seg_ptr, dw_ptr, k, Cin, Cout,
                               ACC64: tl.constexpr, BLOCK_CO: tl.constexpr):
    """``dW3[co, c, t] = sum_{e in seg(c)} v[e] * Gs[e // k, t, co]`` (entries sorted by channel)."""
    c = tl.program_id(0).to(tl.int64)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    t = tl.arange(0, 16)
    mask = (t < 9)[:, None] & (co < Cout)[None, :]
    if ACC64:
        acc = tl.zeros([16, BLOCK_CO], dtype=tl.float64)
    else:
        acc = tl.zeros([16, BLOCK_CO], dtype=tl.float32)
    start = tl.load(seg_ptr + c)
    end = tl.load(seg_ptr + c + 1)
    for i in range(start, end):
        e = tl.load(perm_ptr + i)
        v = tl.load(val_ptr + e).to(acc.dtype)
        r = e // k
        gs = tl.load(gs_ptr + (r * 9 + t[:, None]) * Cout + co[None, :], mask=mask, other=0.0)
        acc += v * gs.to(acc.dtype)
    dst = dw_ptr + co[None, :].to(tl.int64) * (Cin * 9) + c * 9 + t[:, None]
    tl.store(dst, acc.to(dw_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_weight3(weight: torch.Tensor, Cin: int, dtype: torch.dtype) -> torch.Tensor:
    if weight.dim() != 4 or weight.shape[1] != Cin or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must have shape [Cout, Cin={Cin}, 3, 3], got {tuple(weight.shape)}")
    if weight.dtype != dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from the input dtype {dtype}")
    return weight.contiguous()


def _in_shape(in_shape: Sequence[int]) -> tuple:
    if len(in_shape) != 4:
        raise ValueError(f"in_shape must be [N, C, H, W], got {list(in_shape)}")
    return tuple(int(s) for s in in_shape)


def uses_direct_kernels(mode: str, indices: Optional[torch.Tensor], in_shape: Sequence[int]) -> bool:
    """Whether the 3x3-weight kernels (no fold) serve a compact input of this mode and density."""
    if indices is None or mode != "channel" or indices.dim() != 3:
        return False
    return indices.shape[2] <= DIRECT_MAX_DENSITY * int(in_shape[1])


def _window_sums(grad_out: torch.Tensor, N: int, H: int, W: int, Cout: int) -> torch.Tensor:
    """``Gs [N*H*W, 9, Cout]`` (float32 / float64) of ``grad_out [N, Cout, 2H, 2W]``."""
    if grad_out.dim() != 4 or tuple(grad_out.shape) != (N, Cout, 2 * H, 2 * W):
        raise ValueError(f"grad_out must have shape [N={N}, Cout={Cout}, {2 * H}, {2 * W}], "
                         f"got {tuple(grad_out.shape)}")
    check_float("grad_out", grad_out)
    go = grad_out.permute(0, 2, 3, 1).contiguous()  # [N, 2H, 2W, Cout]
    n_pix = N * H * W
    gs = torch.empty((n_pix, 9, Cout), dtype=_acc_dtype(grad_out.dtype), device=grad_out.device)
    if gs.numel():
        BLOCK_PX, BLOCK_CO = 2, min(128, next_pow2(Cout))
        _upconv_window_sum_kernel[(triton.cdiv(n_pix, BLOCK_PX), triton.cdiv(Cout, BLOCK_CO))](
            go, gs, n_pix, H, W, Cout, ACC64=grad_out.dtype == torch.float64, BLOCK_PX=BLOCK_PX,
            BLOCK_CO=BLOCK_CO, num_warps=4)
    return gs


def sparse_upsample_conv2d(values: torch.Tensor, indices: Optional[torch.Tensor], mode: str,
                           in_shape: Sequence[int], weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv2d(interpolate(dense(input), 2), weight, bias, padding=1)`` -> ``[N, Cout, 2H, 2W]``.

    ``values/indices [N, G, k]`` compact (or ``values [N, Cin, H, W]`` dense, ``indices=None``),
    ``weight [Cout, Cin, 3, 3]``, ``bias [Cout]`` or None.
    """
    check_float("values", values)
    N, Cin, H, W = _in_shape(in_shape)
    if not uses_direct_kernels(mode, indices, in_shape):
        w4 = fold_upsample_weight(_check_weight3(weight, Cin, values.dtype))
        return sparse_conv.sparse_conv_transpose2d(values, indices, mode, in_shape, w4, bias, [2, 2], [1, 1], [0, 0])
    check_compact(values, indices, mode, in_shape)
    w = _check_weight3(weight, Cin, values.dtype)
    Cout = w.shape[0]
    if bias is not None:
        if bias.shape != (Cout,):
            raise ValueError(f"bias must have shape [{Cout}], got {tuple(bias.shape)}")
        bias = bias.contiguous()
    values, indices = values.contiguous(), indices.contiguous()
    k = values.shape[2]
    n_pix = N * H * W
    acc64 = values.dtype == torch.float64
    out = torch.empty((N, Cout, 2 * H, 2 * W), dtype=values.dtype, device=values.device)
    if out.numel() == 0:
        return out
    p = torch.empty((n_pix, 9, Cout), dtype=_acc_dtype(values.dtype), device=values.device)
    BLOCK_PX, BLOCK_CO = 2, min(128, next_pow2(Cout))
    _upconv_tap_sum_kernel[(triton.cdiv(n_pix, BLOCK_PX), triton.cdiv(Cout, BLOCK_CO))](
        values, indices, w, p, n_pix, k, Cin, Cout, ACC64=acc64, BLOCK_PX=BLOCK_PX, BLOCK_CO=BLOCK_CO,
        num_warps=4)
    BLOCK_O, BLOCK_CO = min(64, next_pow2(4 * H * W)), min(64, next_pow2(Cout))
    n_tiles = triton.cdiv(4 * H * W, BLOCK_O)
    _upconv_col2im_kernel[(N * n_tiles, triton.cdiv(Cout, BLOCK_CO))](
        p, bias if bias is not None else p, out, H, W, Cout, n_tiles, HAS_BIAS=bias is not None, ACC64=acc64,
        BLOCK_O=BLOCK_O, BLOCK_CO=BLOCK_CO, num_warps=4)
    return out


def sparse_upsample_conv2d_input_grad(grad_out: torch.Tensor, indices: torch.Tensor, mode: str,
                                      in_shape: Sequence[int], weight: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the compact values: ``grad_out [N, Cout, 2H, 2W] -> [N, G, k]`` (dtype of grad_out)."""
    N, Cin, H, W = _in_shape(in_shape)
    if not uses_direct_kernels(mode, indices, in_shape):
        w4 = fold_upsample_weight(_check_weight3(weight, Cin, grad_out.dtype))
        return sparse_conv.sparse_conv_transpose2d_input_grad(grad_out, indices, mode, in_shape, w4, [2, 2], [1, 1])
    check_compact(indices, indices, mode, in_shape)
    w = _check_weight3(weight, Cin, grad_out.dtype)
    Cout = w.shape[0]
    gs = _window_sums(grad_out, N, H, W, Cout)
    indices = indices.contiguous()
    k = indices.shape[2]
    n_pix = N * H * W
    out = torch.empty(indices.shape, dtype=grad_out.dtype, device=grad_out.device)
    if out.numel():
        BLOCK_PX, BLOCK_CO = 2, min(128, next_pow2(Cout))
        _upconv_input_grad_kernel[(triton.cdiv(n_pix, BLOCK_PX),)](
            gs, indices, w, out, n_pix, k, Cin, Cout, ACC64=grad_out.dtype == torch.float64, BLOCK_PX=BLOCK_PX,
            BLOCK_CO=BLOCK_CO, BLOCK_K=next_pow2(k), num_warps=4)
    return out


def sparse_upsample_conv2d_weight_grad(grad_out: torch.Tensor, values: torch.Tensor, indices: Optional[torch.Tensor],
                                       mode: str, in_shape: Sequence[int]) -> torch.Tensor:
    """Gradient w.r.t. the 3x3 weight: ``-> [Cout, Cin, 3, 3]`` (dtype of grad_out)."""
    N, Cin, H, W = _in_shape(in_shape)
    if grad_out.dim() != 4:
        raise ValueError(f"grad_out must have shape [N, Cout, 2H, 2W], got {tuple(grad_out.shape)}")
    Cout = int(grad_out.shape[1])
    if values.dtype != grad_out.dtype:
        raise TypeError(f"values dtype {values.dtype} differs from grad_out dtype {grad_out.dtype}")
    if not uses_direct_kernels(mode, indices, in_shape):
        gw4 = sparse_conv.sparse_conv_transpose2d_weight_grad(grad_out, values, indices, mode, in_shape,
                                                              [Cin, Cout, 4, 4], [2, 2], [1, 1])
        return unfold_upsample_weight_grad(gw4)
    check_compact(values, indices, mode, in_shape)
    gs = _window_sums(grad_out, N, H, W, Cout)
    values, indices = values.contiguous(), indices.contiguous()
    k = values.shape[2]
    perm, seg = sparse_conv._entries_by_channel(indices, mode, Cin, H * W)
    dw = torch.empty((Cout, Cin, 3, 3), dtype=grad_out.dtype, device=grad_out.device)
    if dw.numel():
        BLOCK_CO = min(128, next_pow2(Cout))
        _upconv_weight_grad_kernel[(Cin, triton.cdiv(Cout, BLOCK_CO))](
            gs, values, perm, seg, dw, k, Cin, Cout, ACC64=grad_out.dtype == torch.float64, BLOCK_CO=BLOCK_CO,
            num_warps=4)
    return dw
