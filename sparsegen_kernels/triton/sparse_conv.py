"""Sparse transposed convolution: forward, input gradient at the surviving entries, weight gradient.

``out = conv_transpose2d(dense(input), weight, bias, stride, padding, output_padding)`` with
``weight [Cin, Cout, KH, KW]``; the kernels read it as ``wt = weight.permute(0, 2, 3, 1)`` made contiguous
(``[Cin, KH, KW, Cout]``, a no-op for the folded upsample weight), so every inner loop runs over Cout.

Forward strategies (chosen by the density ``k / group size`` of the compact input):

* ``"gather"`` (channel mode, very sparse, e.g. top-8 of 3200 channels): output-stationary. A program owns
  a tile of output pixels of one stride phase x a block of Cout; for every tap of that phase it reads the
  k surviving ``(channel, value)`` entries of the input pixel under each output pixel and accumulates
  ``v * wt[c, tap, :]`` in registers. Exactly the sparse MACs, no atomics, deterministic.
* ``"scatter"`` (spatial / global mode, very sparse): input-stationary. Every surviving entry adds
  ``v * wt[c, tap, :]`` into its output window with atomic adds into a float32 (float64) channels-last
  buffer. Exactly the sparse MACs, but the summation order varies between runs, so results are not
  bitwise deterministic (differences are rounding-level).
* ``"gemm"`` (moderate density such as 25%, and dense inputs): the compact input is decompressed into a
  channels-last dense map and the transposed convolution runs as an implicit GEMM with ``tl.dot`` (tensor
  cores on a GPU). The output is split into its ``stride_h * stride_w`` phases; within one phase every
  output pixel uses the same taps, so no MAC is spent on taps that do not hit (for the folded 4x4,
  stride-2 upsample kernel that is 4 of 16 taps per phase: the 2.25x saving of folding). Deterministic.

float32 operands of ``tl.dot`` use IEEE float32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set
(then TF32, relative error near 3e-4). float16 / bfloat16 accumulate in float32, float64 in float64.

Backward:

* input gradient ``[N, G, k]``: ``"entries"``: one gathered dot product per surviving entry of its
  ``grad_out`` window with ``wt[c]`` (exactly the sparse MACs, deterministic); ``"gemm"``: a dense strided
  convolution of ``grad_out`` as an implicit GEMM, gathered at the entries afterwards (tensor cores;
  worth it at moderate density for half-precision / TF32 operands).
* weight gradient ``[Cin, Cout, KH, KW]``: ``"segment"``: entries are ordered by input channel (a sort of
  the small index list), and one program per ``(channel, tap, Cout block)`` sums ``v * grad_out`` over the
  channel's entries (exactly the sparse MACs, no atomics, deterministic); ``"gemm"``: dense implicit GEMM
  ``x^T @ grad_out`` per tap over ``N*H*W`` (dense inputs and moderate densities; deterministic).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..geometry import conv_transpose_output_size
from ._common import MODE_IDS, check_compact, check_float, group_geometry, next_pow2, pair
from .layout import _entry_location, scatter_into

# Density (k / group size) at or below which the sparse forward paths are used instead of the GEMM.
GATHER_MAX_DENSITY = 1.0 / 16
SCATTER_MAX_DENSITY = 1.0 / 32
# Density at or above which the weight gradient of a compact input runs as a dense GEMM (on an H100 the
# GEMM beat the per-channel segment sums even at 0.25% density, so it is the default everywhere).
WGRAD_GEMM_MIN_DENSITY = 0.0
# Forward implicit GEMM: (BLOCK_P, BLOCK_CO, BLOCK_CI) upper bounds, warps and pipeline stages (the best
# bfloat16 setting of a 24-point sweep on an H100 at the paper64 layer sizes).
FWD_GEMM_CONFIG = dict(BLOCK_P=128, BLOCK_CO=128, BLOCK_CI=32, num_warps=4, num_stages=3)
# Programs the split-K weight-gradient GEMM aims for (a few per streaming multiprocessor).
WGRAD_TARGET_PROGRAMS = 512
# Density above which the input gradient runs as a dense GEMM (half precision / TF32 operands only).
IGRAD_GEMM_MIN_DENSITY = 1.0 / 8


# ---------------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _acc_zeros(M: tl.constexpr, N: tl.constexpr, ACC64: tl.constexpr):
    """A ``[M, N]`` accumulator of zeros: float64 for float64 operands, float32 for every other dtype."""
    if ACC64:
        acc = tl.zeros([M, N], dtype=tl.float64)
    else:
        acc = tl.zeros([M, N], dtype=tl.float32)
    return acc


@triton.jit
def _phase_tile(pid, n_tiles, Ao, Bo, Ho, Wo, SH, SW, PH, PW, BLOCK_P: tl.constexpr):
    """Decode ``pid`` into (sample, output-pixel tile of one stride phase) and that phase's tap geometry.

    Output pixel ``(oh, ow) = (rh + SH*a, rw + SW*b)``; its taps are ``kh = kh0 + SH*t`` reading input row
    ``ih = a + dh - t`` (and likewise for columns).
    """
    tile = pid % n_tiles
    r = (pid // n_tiles) % (SH * SW)
    n = pid // (n_tiles * SH * SW)
    rh = r // SW
    rw = r % SW
    q = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    a = q // Bo
    b = q % Bo
    oh = rh + SH * a
    ow = rw + SW * b
    pmask = (a < Ao) & (oh < Ho) & (ow < Wo)
    kh0 = (rh + PH) % SH
    kw0 = (rw + PW) % SW
    dh = (rh + PH - kh0) // SH
    dw = (rw + PW - kw0) // SW
    return n.to(tl.int64), a, b, oh, ow, pmask, kh0, kw0, dh, dw


@triton.jit
def _store_out(out_ptr, bias_ptr, acc, n, co, comask, oh, ow, pmask, Cout, Ho, Wo, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=comask, other=0.0).to(acc.dtype)[None, :]
    ptrs = out_ptr + n * Cout * Ho * Wo + co[None, :].to(tl.int64) * (Ho * Wo) + (oh * Wo + ow)[:, None]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & comask[None, :])


@triton.jit
def _conv_t_gemm_fwd_kernel(x_ptr, wt_ptr, bias_ptr, out_ptr,
                            Cin, H, W, Cout, Ho, Wo, KH, KW, sxN, sxC, sxH, sxW,
                            SH, SW, PH, PW, n_tiles, Ao, Bo,
                            HAS_BIAS: tl.constexpr, ACC64: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
                            DOT_PREC: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
    """Dense input (any strides) -> out NCHW; implicit GEMM per stride phase over (taps x Cin)."""
    n, a, b, oh, ow, pmask, kh0, kw0, dh, dw = _phase_tile(tl.program_id(0), n_tiles, Ao, Bo, Ho, Wo,
                                                          SH, SW, PH, PW, BLOCK_P)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < Cout
    acc = _acc_zeros(BLOCK_P, BLOCK_CO, ACC64)
    x_base = x_ptr + n * sxN
    n_th = (KH - kh0 + SH - 1) // SH
    n_tw = (KW - kw0 + SW - 1) // SW
    for th in range(n_th):
        kh = kh0 + SH * th
        ih = a + dh - th
        vh = pmask & (ih >= 0) & (ih < H)
        for tw in range(n_tw):
            kw = kw0 + SW * tw
            iw = b + dw - tw
            valid = vh & (iw >= 0) & (iw < W)
            a_ptrs = x_base + (ih * sxH + iw * sxW)[:, None]
            w_ptrs = wt_ptr + (kh * KW + kw) * Cout + co[None, :]
            for ci0 in range(0, Cin, BLOCK_CI):
                ci = ci0 + tl.arange(0, BLOCK_CI)
                cim = ci < Cin
                A = tl.load(a_ptrs + ci[None, :] * sxC, mask=valid[:, None] & cim[None, :], other=0.0)
                B = tl.load(w_ptrs + ci[:, None].to(tl.int64) * (KH * KW * Cout),
                            mask=cim[:, None] & comask[None, :], other=0.0)
                if UPCAST:
                    A = A.to(tl.float32)
                    B = B.to(tl.float32)
                if USE_DOT:
                    acc = tl.dot(A, B, acc, input_precision=DOT_PREC)
                else:
                    acc += tl.sum(A.to(acc.dtype)[:, :, None] * B.to(acc.dtype)[None, :, :], axis=1)
    _store_out(out_ptr, bias_ptr, acc, n, co, comask, oh, ow, pmask, Cout, Ho, Wo, HAS_BIAS)


@triton.jit
def _conv_t_gather_fwd_kernel(val_ptr, idx_ptr, wt_ptr, bias_ptr, out_ptr,
                              k, H, W, Cout, Ho, Wo, KH, KW,
                              SH, SW, PH, PW, n_tiles, Ao, Bo,
                              HAS_BIAS: tl.constexpr, ACC64: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Channel-mode compact input -> out NCHW; output-stationary, k entries per input pixel per tap."""
    n, a, b, oh, ow, pmask, kh0, kw0, dh, dw = _phase_tile(tl.program_id(0), n_tiles, Ao, Bo, Ho, Wo,
                                                          SH, SW, PH, PW, BLOCK_P)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < Cout
    acc = _acc_zeros(BLOCK_P, BLOCK_CO, ACC64)
    n_th = (KH - kh0 + SH - 1) // SH
    n_tw = (KW - kw0 + SW - 1) // SW
    for th in range(n_th):
        kh = kh0 + SH * th
        ih = a + dh - th
        vh = pmask & (ih >= 0) & (ih < H)
        for tw in range(n_tw):
            kw = kw0 + SW * tw
            iw = b + dw - tw
            valid = vh & (iw >= 0) & (iw < W)
            ent = ((n * H + ih) * W + iw) * k  # first entry of the input pixel's group
            wmask = valid[:, None] & comask[None, :]
            for j in range(k):
                c = tl.load(idx_ptr + ent + j, mask=valid, other=0).to(tl.int64)
                v = tl.load(val_ptr + ent + j, mask=valid, other=0.0).to(acc.dtype)
                w = tl.load(wt_ptr + ((c * KH + kh) * KW + kw)[:, None] * Cout + co[None, :], mask=wmask,
                            other=0.0)
                acc += v[:, None] * w.to(acc.dtype)
    _store_out(out_ptr, bias_ptr, acc, n, co, comask, oh, ow, pmask, Cout, Ho, Wo, HAS_BIAS)


@triton.jit
def _conv_t_scatter_fwd_kernel(val_ptr, idx_ptr, wt_ptr, buf_ptr,
                               total, G, k, HW, W, Cout, Ho, Wo, KH, KW, SH, SW, PH, PW,
                               MODE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Compact input (any mode): each entry atomically adds ``v * wt[c, tap, :]`` into buf NHWC."""
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < Cout
    em = e < total
    idx = tl.load(idx_ptr + e, mask=em, other=0).to(tl.int64)
    v = tl.load(val_ptr + e, mask=em, other=0.0).to(buf_ptr.dtype.element_ty)
    em = em & (v != 0.0)
    n, c, p = _entry_location(e, idx, G, k, HW, MODE)
    ih = p // W
    iw = p % W
    for kh in range(KH):
        oh = ih * SH - PH + kh
        vh = em & (oh >= 0) & (oh < Ho)
        for kw in range(KW):
            ow = iw * SW - PW + kw
            valid = vh & (ow >= 0) & (ow < Wo)
            m = valid[:, None] & comask[None, :]
            w = tl.load(wt_ptr + ((c * KH + kh) * KW + kw)[:, None] * Cout + co[None, :], mask=m, other=0.0)
            dst = buf_ptr + ((n * Ho + oh) * Wo + ow)[:, None] * Cout + co[None, :]
            tl.atomic_add(dst, v[:, None] * w.to(v.dtype), mask=m, sem="relaxed")


# ---------------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _conv_t_input_grad_kernel(go_ptr, idx_ptr, wt_ptr, out_ptr,
                              total, G, k, HW, W, Cout, Ho, Wo, KH, KW, SH, SW, PH, PW,
                              MODE: tl.constexpr, ACC64: tl.constexpr,
                              BLOCK_E: tl.constexpr, BLOCK_CO: tl.constexpr):
    """``out[e] = sum_{tap, co} go[n, oh, ow, co] * wt[c, tap, co]`` per compact entry (go channels-last)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    em = e < total
    idx = tl.load(idx_ptr + e, mask=em, other=0).to(tl.int64)
    n, c, p = _entry_location(e, idx, G, k, HW, MODE)
    ih = p // W
    iw = p % W
    acc = _acc_zeros(BLOCK_E, BLOCK_CO, ACC64)
    for kh in range(KH):
        oh = ih * SH - PH + kh
        vh = em & (oh >= 0) & (oh < Ho)
        for kw in range(KW):
            ow = iw * SW - PW + kw
            valid = vh & (ow >= 0) & (ow < Wo)
            g_row = go_ptr + ((n * Ho + oh) * Wo + ow) * Cout
            w_row = wt_ptr + ((c * KH + kh) * KW + kw) * Cout
            for co0 in range(0, Cout, BLOCK_CO):
                co = co0 + tl.arange(0, BLOCK_CO)
                m = valid[:, None] & (co < Cout)[None, :]
                g = tl.load(g_row[:, None] + co[None, :], mask=m, other=0.0)
                w = tl.load(w_row[:, None] + co[None, :], mask=m, other=0.0)
                acc += g.to(acc.dtype) * w.to(acc.dtype)
    tl.store(out_ptr + e, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=em)


@triton.jit
def _conv_t_input_grad_gemm_kernel(go_ptr, wt_ptr, out_ptr,
                                   Cin, H, W, Cout, Ho, Wo, KH, KW, SH, SW, PH, PW, n_tiles,
                                   ACC64: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
                                   DOT_PREC: tl.constexpr,
                                   BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Dense ``grad_x[n, ih, iw, ci]`` (channels-last) of all input pixels: implicit GEMM over (taps x Cout)."""
    pid = tl.program_id(0)
    n = (pid // n_tiles).to(tl.int64)
    q = (pid % n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = q < H * W
    ih = q // W
    iw = q % W
    ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    cim = ci < Cin
    acc = _acc_zeros(BLOCK_P, BLOCK_CI, ACC64)
    for kh in range(KH):
        oh = ih * SH - PH + kh
        vh = pm & (oh >= 0) & (oh < Ho)
        for kw in range(KW):
            ow = iw * SW - PW + kw
            valid = vh & (ow >= 0) & (ow < Wo)
            g_ptrs = go_ptr + (((n * Ho + oh) * Wo + ow) * Cout)[:, None]
            w_ptrs = wt_ptr + ci[None, :].to(tl.int64) * (KH * KW * Cout) + (kh * KW + kw) * Cout
            for co0 in range(0, Cout, BLOCK_CO):
                co = co0 + tl.arange(0, BLOCK_CO)
                com = co < Cout
                A = tl.load(g_ptrs + co[None, :], mask=valid[:, None] & com[None, :], other=0.0)
                B = tl.load(w_ptrs + co[:, None], mask=com[:, None] & cim[None, :], other=0.0)
                if UPCAST:
                    A = A.to(tl.float32)
                    B = B.to(tl.float32)
                if USE_DOT:
                    acc = tl.dot(A, B, acc, input_precision=DOT_PREC)
                else:
                    acc += tl.sum(A.to(acc.dtype)[:, :, None] * B.to(acc.dtype)[None, :, :], axis=1)
    dst = out_ptr + ((n * H * W + q) * Cin)[:, None] + ci[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=pm[:, None] & cim[None, :])


@triton.jit
def _conv_t_weight_grad_segment_kernel(go_ptr, val_ptr, idx_ptr, perm_ptr, seg_ptr, dw_ptr,
                                       G, k, HW, W, Cout, Ho, Wo, KH, KW, SH, SW, PH, PW,
                                       MODE: tl.constexpr, ACC64: tl.constexpr,
                                       BLOCK_E: tl.constexpr, BLOCK_CO: tl.constexpr):
    """``dw[c, co, kh, kw] = sum over the entries of channel c of v * go[n, oh, ow, co]`` (go channels-last)."""
    c = tl.program_id(0)
    tap = tl.program_id(1)
    kh = tap // KW
    kw = tap % KW
    co = tl.program_id(2) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < Cout
    start = tl.load(seg_ptr + c)
    end = tl.load(seg_ptr + c + 1)
    acc = _acc_zeros(BLOCK_E, BLOCK_CO, ACC64)
    for e0 in range(start, end, BLOCK_E):
        i = e0 + tl.arange(0, BLOCK_E)
        im = i < end
        e = tl.load(perm_ptr + i, mask=im, other=0)
        idx = tl.load(idx_ptr + e, mask=im, other=0).to(tl.int64)
        v = tl.load(val_ptr + e, mask=im, other=0.0).to(acc.dtype)
        n, cc, p = _entry_location(e, idx, G, k, HW, MODE)
        oh = (p // W) * SH - PH + kh
        ow = (p % W) * SW - PW + kw
        valid = im & (v != 0.0) & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
        g = tl.load(go_ptr + ((n * Ho + oh) * Wo + ow)[:, None] * Cout + co[None, :],
                    mask=valid[:, None] & comask[None, :], other=0.0)
        acc += v[:, None] * g.to(acc.dtype)
    res = tl.sum(acc, axis=0)
    dst = dw_ptr + c.to(tl.int64) * Cout * KH * KW + co * (KH * KW) + kh * KW + kw
    tl.store(dst, res.to(dw_ptr.dtype.element_ty), mask=comask)


@triton.jit
def _conv_t_weight_grad_gemm_kernel(x_ptr, go_ptr, dw_ptr,
                                    N, Cin, H, W, Cout, Ho, Wo, KH, KW, sxN, sxC, sxH, sxW, SH, SW, PH, PW,
                                    n_co, k_split,
                                    ACC64: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
                                    DOT_PREC: tl.constexpr,
                                    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dw[s, ci, co, kh, kw] = sum_{n, ih, iw in split s} x[n, ci, ih, iw] * go[n, oh, ow, co]``.

    A GEMM over ``N*H*W`` per tap, split into ``k_split``-long ranges (one per ``s``) for parallelism; the
    caller sums the splits in a fixed order (deterministic).
    """
    ci = tl.program_id(0) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    cim = ci < Cin
    tap = tl.program_id(1)
    kh = tap // KW
    kw = tap % KW
    split = tl.program_id(2) // n_co
    co = (tl.program_id(2) % n_co) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    com = co < Cout
    acc = _acc_zeros(BLOCK_CI, BLOCK_CO, ACC64)
    HWi = H * W
    k_lo = split * k_split
    k_hi = tl.minimum(k_lo + k_split, N * HWi)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < k_hi
        n = (kk // HWi).to(tl.int64)
        p = kk % HWi
        ih = p // W
        iw = p % W
        oh = ih * SH - PH + kh
        ow = iw * SW - PW + kw
        valid = km & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
        A = tl.load(x_ptr + ci[:, None] * sxC + (n * sxN + ih * sxH + iw * sxW)[None, :],
                    mask=cim[:, None] & valid[None, :], other=0.0)
        B = tl.load(go_ptr + ((n * Ho + oh) * Wo + ow)[:, None] * Cout + co[None, :],
                    mask=valid[:, None] & com[None, :], other=0.0)
        if UPCAST:
            A = A.to(tl.float32)
            B = B.to(tl.float32)
        if USE_DOT:
            acc = tl.dot(A, B, acc, input_precision=DOT_PREC)
        else:
            acc += tl.sum(A.to(acc.dtype)[:, :, None] * B.to(acc.dtype)[None, :, :], axis=1)
    dst = (dw_ptr + split.to(tl.int64) * Cin * Cout * KH * KW + ci[:, None].to(tl.int64) * (Cout * KH * KW)
           + co[None, :] * (KH * KW) + kh * KW + kw)
    tl.store(dst, acc.to(dw_ptr.dtype.element_ty), mask=cim[:, None] & com[None, :])


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _dot_config(dtype: torch.dtype, device: torch.device) -> dict:
    """Constexpr flags ``ACC64, USE_DOT, UPCAST, DOT_PREC`` of the GEMM kernels for operands of ``dtype``.

    UPCAST: the interpreter (CPU tensors) has no bfloat16 matrix product, so operands go to float32 there.
    float64 does not use ``tl.dot`` (not every Triton version lowers it) but a broadcast multiply-add.
    """
    acc64 = dtype == torch.float64
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    upcast = dtype == torch.bfloat16 and device.type != "cuda"
    return dict(ACC64=acc64, USE_DOT=not acc64, UPCAST=upcast, DOT_PREC="tf32" if tf32 else "ieee")


def _gemm_blocks(dot: dict, m: int, n: int, k: int, bm: int = 64, bn: int = 64, bk: int = 32) -> tuple:
    """Block sizes of a GEMM kernel: ``tl.dot`` needs 16 or more per side; the float64 multiply-add path
    holds a ``[BM, BK, BN]`` product in registers, so it gets small tiles."""
    if dot["USE_DOT"]:
        return _block(m, 16, bm), _block(n, 16, bn), _block(k, 16, bk)
    return _block(m, 1, 32), _block(n, 1, 32), _block(k, 1, 4)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(n)))


def _weight_t(weight: torch.Tensor, Cin: int, dtype: torch.dtype) -> torch.Tensor:
    if weight.dim() != 4 or weight.shape[0] != Cin:
        raise ValueError(f"weight must have shape [Cin={Cin}, Cout, kh, kw], got {tuple(weight.shape)}")
    if weight.dtype != dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from the input dtype {dtype}")
    return weight.permute(0, 2, 3, 1).contiguous()  # [Cin, KH, KW, Cout]


def _geometry(in_shape, weight_shape, stride, padding, output_padding=(0, 0)):
    if len(in_shape) != 4:
        raise ValueError(f"in_shape must be [N, C, H, W], got {list(in_shape)}")
    N, Cin, H, W = (int(s) for s in in_shape)
    Cout, KH, KW = int(weight_shape[1]), int(weight_shape[2]), int(weight_shape[3])
    SH, SW = pair(stride, "stride")
    PH, PW = pair(padding, "padding")
    OPH, OPW = pair(output_padding, "output_padding")
    if SH < 1 or SW < 1 or PH < 0 or PW < 0 or OPH < 0 or OPW < 0:
        raise ValueError(f"invalid stride {stride} / padding {padding} / output_padding {output_padding}")
    Ho = conv_transpose_output_size(H, KH, SH, PH, OPH)
    Wo = conv_transpose_output_size(W, KW, SW, PW, OPW)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"conv_transpose2d output size ({Ho}, {Wo}) is not positive")
    return N, Cin, H, W, Cout, KH, KW, SH, SW, PH, PW, Ho, Wo


def _dense_channels_last(values, indices, mode, N, C, H, W) -> torch.Tensor:
    """Decompress a compact activation into a zero-filled ``[N, C, H, W]`` tensor stored channels-last."""
    dense = torch.zeros((N, H, W, C), dtype=values.dtype, device=values.device).permute(0, 3, 1, 2)
    return scatter_into(dense, values, indices, mode)


def _check_sparse_input(values, indices, mode, in_shape):
    check_float("values", values)
    if indices is None:
        if tuple(values.shape) != tuple(int(s) for s in in_shape):
            raise ValueError(f"dense values shape {tuple(values.shape)} differs from in_shape {list(in_shape)}")
        return None
    return check_compact(values, indices, mode, in_shape)


def forward_strategy(mode: str, indices: Optional[torch.Tensor], density: float) -> str:
    """The forward strategy ``"gather" | "scatter" | "gemm"`` used for a compact input of ``density``."""
    if indices is None:
        return "gemm"
    if mode == "channel" and density <= GATHER_MAX_DENSITY:
        return "gather"
    if density <= SCATTER_MAX_DENSITY:
        return "scatter"
    return "gemm"


def sparse_conv_transpose2d(values: torch.Tensor, indices: Optional[torch.Tensor], mode: str,
                            in_shape: Sequence[int], weight: torch.Tensor, bias: Optional[torch.Tensor],
                            stride: Sequence[int], padding: Sequence[int], output_padding: Sequence[int],
                            *, strategy: Optional[str] = None) -> torch.Tensor:
    """``conv_transpose2d(dense(input), weight, bias, ...)`` -> ``[N, Cout, Ho, Wo]`` (dtype of values).

    ``values/indices [N, G, k]`` compact (or ``values [N, Cin, H, W]`` dense with ``indices=None``),
    ``weight [Cin, Cout, kh, kw]``, ``bias [Cout]`` or None. ``strategy`` forces ``"gather"`` (channel mode
    only), ``"scatter"`` or ``"gemm"``; by default it follows the density (see :func:`forward_strategy`).
    """
    geo = _check_sparse_input(values, indices, mode, in_shape)
    N, Cin, H, W, Cout, KH, KW, SH, SW, PH, PW, Ho, Wo = _geometry(in_shape, weight.shape, stride, padding,
                                                                     output_padding)
    dtype, dev = values.dtype, values.device
    wt = _weight_t(weight, Cin, dtype)
    if bias is not None:
        if bias.shape != (Cout,):
            raise ValueError(f"bias must have shape [{Cout}], got {tuple(bias.shape)}")
        bias = bias.contiguous()
    if strategy is None:
        strategy = forward_strategy(mode, indices, 1.0 if geo is None else geo[6] / max(geo[5], 1))
    if strategy not in ("gather", "scatter", "gemm") or (strategy != "gemm" and indices is None) or (
            strategy == "gather" and mode != "channel"):
        raise ValueError(f"strategy {strategy!r} is not available for mode {mode!r} "
                         f"with indices={'None' if indices is None else 'compact'}")
    out = torch.empty((N, Cout, Ho, Wo), dtype=dtype, device=dev)
    if out.numel() == 0:
        return out
    acc64 = dtype == torch.float64
    if strategy == "scatter":
        values, indices = values.contiguous(), indices.contiguous()
        buf = torch.zeros((N, Ho, Wo, Cout), dtype=_acc_dtype(dtype), device=dev)
        total = values.numel()
        if total:
            BLOCK_E, BLOCK_CO = 32, _block(Cout, 16, 128)
            grid = (triton.cdiv(total, BLOCK_E), triton.cdiv(Cout, BLOCK_CO))
            _conv_t_scatter_fwd_kernel[grid](values, indices, wt, buf, total, values.shape[1], values.shape[2],
                                             H * W, W, Cout, Ho, Wo, KH, KW, SH, SW, PH, PW,
                                             MODE=MODE_IDS[mode], BLOCK_E=BLOCK_E, BLOCK_CO=BLOCK_CO,
                                             num_warps=4)
        res = buf.permute(0, 3, 1, 2)
        if bias is not None:
            res = res + bias.to(res.dtype).view(1, -1, 1, 1)
        out.copy_(res)
        return out

    Ao, Bo = triton.cdiv(Ho, SH), triton.cdiv(Wo, SW)
    dot = _dot_config(dtype, dev)
    if strategy == "gather":
        BLOCK_P, BLOCK_CO = _block(Ao * Bo, 16, 64), _block(Cout, 16, 64)
    else:
        cfg = FWD_GEMM_CONFIG
        BLOCK_P, BLOCK_CO, BLOCK_CI = _gemm_blocks(dot, Ao * Bo, Cout, Cin, cfg["BLOCK_P"], cfg["BLOCK_CO"],
                                                   cfg["BLOCK_CI"])
    n_tiles = triton.cdiv(Ao * Bo, BLOCK_P)
    grid = (N * SH * SW * n_tiles, triton.cdiv(Cout, BLOCK_CO))
    bias_arg = bias if bias is not None else wt
    if strategy == "gather":
        values, indices = values.contiguous(), indices.contiguous()
        _conv_t_gather_fwd_kernel[grid](values, indices, wt, bias_arg, out, values.shape[2], H, W, Cout, Ho, Wo,
                                        KH, KW, SH, SW, PH, PW, n_tiles, Ao, Bo,
                                        HAS_BIAS=bias is not None, ACC64=acc64,
                                        BLOCK_P=BLOCK_P, BLOCK_CO=BLOCK_CO, num_warps=4)
        return out
    x = values if indices is None else _dense_channels_last(values.contiguous(), indices.contiguous(), mode,
                                                           N, Cin, H, W)
    sxN, sxC, sxH, sxW = x.stride()
    _conv_t_gemm_fwd_kernel[grid](x, wt, bias_arg, out, Cin, H, W, Cout, Ho, Wo, KH, KW, sxN, sxC, sxH, sxW,
                                  SH, SW, PH, PW, n_tiles, Ao, Bo,
                                  HAS_BIAS=bias is not None, **dot,
                                  BLOCK_P=BLOCK_P, BLOCK_CO=BLOCK_CO, BLOCK_CI=BLOCK_CI,
                                  num_warps=FWD_GEMM_CONFIG["num_warps"], num_stages=FWD_GEMM_CONFIG["num_stages"])
    return out


def _check_grad_out(grad_out, N, Cout):
    check_float("grad_out", grad_out)
    if grad_out.dim() != 4 or grad_out.shape[0] != N or grad_out.shape[1] != Cout:
        raise ValueError(f"grad_out must have shape [N={N}, Cout={Cout}, Ho, Wo], got {tuple(grad_out.shape)}")
    return grad_out.permute(0, 2, 3, 1).contiguous()  # [N, Ho, Wo, Cout]


def _check_out_size(grad_out, H, W, KH, KW, SH, SW, PH, PW):
    Ho, Wo = grad_out.shape[2], grad_out.shape[3]
    for name, o, i, kk, s, p in (("height", Ho, H, KH, SH, PH), ("width", Wo, W, KW, SW, PW)):
        base = conv_transpose_output_size(i, kk, s, p)
        if not base <= o < base + max(s, 1):
            raise ValueError(f"grad_out {name} {o} does not match a transposed conv of input {name} {i} "
                             f"(expected {base} + output_padding < {base + s})")
    return Ho, Wo


def sparse_conv_transpose2d_input_grad(grad_out: torch.Tensor, indices: torch.Tensor, mode: str,
                                       in_shape: Sequence[int], weight: torch.Tensor, stride: Sequence[int],
                                       padding: Sequence[int], *, strategy: Optional[str] = None) -> torch.Tensor:
    """Gradient w.r.t. the compact values: ``grad_out [N, Cout, Ho, Wo] -> [N, G, k]`` (dtype of grad_out).

    ``strategy``: ``"entries"`` (per-entry gathered dot products) or ``"gemm"`` (dense strided conv then
    gather); by default ``"gemm"`` at densities above :data:`IGRAD_GEMM_MIN_DENSITY` with half-precision or
    TF32 operands, else ``"entries"``.
    """
    N, Cin, H, W, Cout, KH, KW, SH, SW, PH, PW, _, _ = _geometry(in_shape, weight.shape, stride, padding)
    dtype, dev = grad_out.dtype, grad_out.device
    go = _check_grad_out(grad_out, N, Cout)
    Ho, Wo = _check_out_size(grad_out, H, W, KH, KW, SH, SW, PH, PW)
    if indices.dim() != 3 or indices.shape[0] != N:
        raise ValueError(f"indices must have shape [N={N}, G, k], got {tuple(indices.shape)}")
    G, S = group_geometry(mode, Cin, H, W)
    if indices.shape[1] != G:
        raise ValueError(f"indices must have G={G} groups for mode {mode!r}, got {indices.shape[1]}")
    wt = _weight_t(weight, Cin, dtype)
    indices = indices.contiguous()
    k = indices.shape[2]
    dot = _dot_config(dtype, dev)
    if strategy is None:
        fast_dot = dtype in (torch.float16, torch.bfloat16) or dot["DOT_PREC"] == "tf32"
        strategy = "gemm" if fast_dot and k / max(S, 1) > IGRAD_GEMM_MIN_DENSITY else "entries"
    out = torch.empty(indices.shape, dtype=dtype, device=dev)
    total = out.numel()
    if total == 0:
        return out
    if strategy == "entries":
        BLOCK_E, BLOCK_CO = 32, _block(Cout, 16, 64)
        _conv_t_input_grad_kernel[(triton.cdiv(total, BLOCK_E),)](
            go, indices, wt, out, total, G, k, H * W, W, Cout, Ho, Wo, KH, KW, SH, SW, PH, PW,
            MODE=MODE_IDS[mode], ACC64=dot["ACC64"], BLOCK_E=BLOCK_E, BLOCK_CO=BLOCK_CO, num_warps=4)
        return out
    if strategy != "gemm":
        raise ValueError(f"unknown input-gradient strategy {strategy!r}; expected 'entries' or 'gemm'")
    from .layout import compact_gather

    dense = torch.empty((N, H, W, Cin), dtype=_acc_dtype(dtype), device=dev)
    BLOCK_P, BLOCK_CI, BLOCK_CO = _gemm_blocks(dot, H * W, Cin, Cout)
    n_tiles = triton.cdiv(H * W, BLOCK_P)
    _conv_t_input_grad_gemm_kernel[(N * n_tiles, triton.cdiv(Cin, BLOCK_CI))](
        go, wt, dense, Cin, H, W, Cout, Ho, Wo, KH, KW, SH, SW, PH, PW, n_tiles,
        **dot, BLOCK_P=BLOCK_P, BLOCK_CI=BLOCK_CI, BLOCK_CO=BLOCK_CO,
        num_warps=4)
    return compact_gather(dense.permute(0, 3, 1, 2), indices, mode).to(dtype)


def _entries_by_channel(indices: torch.Tensor, mode: str, Cin: int, HW: int):
    """``(perm, seg)``: compact entries ordered by input channel, ``seg[c]:seg[c+1]`` those of channel c."""
    N, G, k = indices.shape
    dev = indices.device
    if mode == "spatial":  # entry (n, c, j) belongs to channel c: order (c, n, j) without sorting
        perm = torch.arange(N * G * k, device=dev, dtype=torch.int64).view(N, G, k).transpose(0, 1).reshape(-1)
        seg = torch.arange(Cin + 1, device=dev, dtype=torch.int64) * (N * k)
        return perm, seg
    ch = indices.reshape(-1).to(torch.int64)
    if mode == "global":
        ch = ch // HW
    ch, perm = torch.sort(ch, stable=True)
    seg = torch.searchsorted(ch, torch.arange(Cin + 1, device=dev, dtype=torch.int64))
    return perm, seg


def sparse_conv_transpose2d_weight_grad(grad_out: torch.Tensor, values: torch.Tensor,
                                        indices: Optional[torch.Tensor], mode: str, in_shape: Sequence[int],
                                        weight_shape: Sequence[int], stride: Sequence[int],
                                        padding: Sequence[int], *, strategy: Optional[str] = None) -> torch.Tensor:
    """Gradient w.r.t. the weight: ``-> [Cin, Cout, kh, kw]`` (dtype of grad_out), accumulated in float32.

    ``values/indices`` compact, or ``values [N, Cin, H, W]`` dense with ``indices=None``. ``strategy``:
    ``"segment"`` (compact only) or ``"gemm"``; by default ``"gemm"`` for dense inputs and densities above
    :data:`WGRAD_GEMM_MIN_DENSITY`, else ``"segment"``.
    """
    if len(weight_shape) != 4:
        raise ValueError(f"weight_shape must be [Cin, Cout, kh, kw], got {list(weight_shape)}")
    weight_shape = [int(s) for s in weight_shape]
    geo = _check_sparse_input(values, indices, mode, in_shape)
    N, Cin, H, W, Cout, KH, KW, SH, SW, PH, PW, _, _ = _geometry(in_shape, weight_shape, stride, padding)
    if weight_shape[0] != Cin:
        raise ValueError(f"weight_shape[0]={weight_shape[0]} differs from the input channels {Cin}")
    dtype, dev = grad_out.dtype, grad_out.device
    if values.dtype != dtype:
        raise TypeError(f"values dtype {values.dtype} differs from grad_out dtype {dtype}")
    go = _check_grad_out(grad_out, N, Cout)
    Ho, Wo = _check_out_size(grad_out, H, W, KH, KW, SH, SW, PH, PW)
    if strategy is None:
        strategy = "gemm" if geo is None or geo[6] / max(geo[5], 1) >= WGRAD_GEMM_MIN_DENSITY else "segment"
    if strategy not in ("segment", "gemm") or (strategy == "segment" and indices is None):
        raise ValueError(f"weight-gradient strategy {strategy!r} is not available here")
    dot = _dot_config(dtype, dev)
    dw = torch.empty(weight_shape, dtype=dtype, device=dev)
    if dw.numel() == 0:
        return dw
    if strategy == "segment":
        values, indices = values.contiguous(), indices.contiguous()
        perm, seg = _entries_by_channel(indices, mode, Cin, H * W)
        BLOCK_E, BLOCK_CO = 32, _block(Cout, 16, 128)
        grid = (Cin, KH * KW, triton.cdiv(Cout, BLOCK_CO))
        _conv_t_weight_grad_segment_kernel[grid](go, values, indices, perm, seg, dw,
                                                 values.shape[1], values.shape[2], H * W, W, Cout, Ho, Wo,
                                                 KH, KW, SH, SW, PH, PW, MODE=MODE_IDS[mode], ACC64=dot["ACC64"],
                                                 BLOCK_E=BLOCK_E, BLOCK_CO=BLOCK_CO, num_warps=4)
        return dw
    x = values if indices is None else _dense_channels_last(values.contiguous(), indices.contiguous(), mode,
                                                           N, Cin, H, W)
    K = N * H * W
    BLOCK_CI, BLOCK_CO, BLOCK_K = _gemm_blocks(dot, Cin, Cout, K)
    n_ci, n_co = triton.cdiv(Cin, BLOCK_CI), triton.cdiv(Cout, BLOCK_CO)
    # Split the N*H*W reduction until there are enough programs to fill the GPU.
    tiles = n_ci * n_co * KH * KW
    n_split = max(1, min(triton.cdiv(WGRAD_TARGET_PROGRAMS, tiles), triton.cdiv(K, 8 * BLOCK_K)))
    k_split = triton.cdiv(triton.cdiv(K, n_split), BLOCK_K) * BLOCK_K
    n_split = triton.cdiv(K, k_split)
    part = dw if n_split == 1 else torch.empty([n_split] + weight_shape, dtype=_acc_dtype(dtype), device=dev)
    sxN, sxC, sxH, sxW = x.stride()
    grid = (n_ci, KH * KW, n_co * n_split)
    _conv_t_weight_grad_gemm_kernel[grid](x, go, part, N, Cin, H, W, Cout, Ho, Wo, KH, KW, sxN, sxC, sxH, sxW,
                                          SH, SW, PH, PW, n_co, k_split, **dot,
                                          BLOCK_CI=BLOCK_CI, BLOCK_CO=BLOCK_CO, BLOCK_K=BLOCK_K, num_warps=4)
    if n_split > 1:
        dw.copy_(part.sum(0))
    return dw
