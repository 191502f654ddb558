"""Top-k selection kernels: fused bias + ReLU, exact selected set, compact and mask outputs.

Selection works on order-preserving unsigned integer keys (``float -> uint``: the bits of non-negative
numbers with the sign bit set, the bits of negative numbers all flipped; ``-0.0`` is read as ``+0.0`` and
every NaN as one NaN above ``+inf``, as ``torch.sort`` orders them). The k-th largest key ``T`` of a group
is found without sorting, then an entry is kept when its key is ``> T``, or ``== T`` and it is among the
first ``k - count(> T)`` such entries in index order (ties go to the lower index). The kept entries are
written in ascending index order at the positions given by a prefix count of the keep mask.

Two paths:

* **one program per tile of groups** (group size up to :data:`SINGLE_BLOCK_MAX`): the tile
  ``[BLOCK_G groups, BLOCK_E elements]`` is loaded once into registers and ``T`` is built bit by bit from the
  top (32 or 64 steps of ``count(key >= candidate)``). Channel mode reads ``x`` with the group axis
  contiguous, so a tile of positions walks the channels with coalesced loads.
* **chunked radix select** (larger groups, e.g. global mode over ``C*H*W``): every group is split into
  chunks handled by separate programs; 4 passes (8 for float64) each build a per-chunk 256-bin histogram
  of the next 8-bit digit among the keys that match the prefix found so far; the digit choice, the
  per-chunk counts above the threshold and their prefix sums are small tensor operations between the
  launches (no host synchronisation); a last pass writes the outputs. Deterministic (no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import MODE_IDS, check_float, group_geometry, index_dtype, next_pow2

# Largest group handled by one program (elements held in registers); larger groups use the chunked path.
SINGLE_BLOCK_MAX = 8192
# Elements per program in the one-program path (BLOCK_G * BLOCK_E, several groups for small ones) and
# its warps: on an H100, 1024-element tiles with 4 warps were fastest for groups of 256 to 4096 (a sweep
# of 1024..8192 elements x 2..16 warps).
TILE_ELEMS = 1024
TILE_WARPS = 4
# Elements per chunk in the chunked path.
CHUNK = 4096


@triton.jit
def _preactivation(x_ptr, bias_ptr, off, c, m, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                   ROUND: tl.constexpr, ACC64: tl.constexpr):
    """``relu?(x + bias[c])`` rounded to the input dtype, returned in float32 (float64 for ACC64).

    ROUND: 0 = no rounding needed (float32 / float64 or no bias), 1 = round to float16, 2 = round to
    bfloat16 (done on the bits, round-to-nearest-even, so it matches torch on every backend).
    """
    x = tl.load(x_ptr + off, mask=m, other=0.0)
    if ACC64:
        v = x.to(tl.float64)
    else:
        v = x.to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + c, mask=m, other=0.0)
        if ACC64:
            v = v + b.to(tl.float64)
        else:
            v = v + b.to(tl.float32)
        if ROUND == 1:
            v = v.to(tl.float16).to(tl.float32)
        if ROUND == 2:
            bits = v.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            rounded = tl.where(v != v, bits, rounded)
            v = rounded.to(tl.float32, bitcast=True)
    if RELU:
        v = tl.where(v < 0.0, 0.0, v)  # keeps NaN, as torch.relu does
    return v


@triton.jit
def _order_key(v, KEY64: tl.constexpr):
    """Order-preserving unsigned key of float32 (uint32) or float64 (uint64) values."""
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 == +0.0
    if KEY64:
        b = v.to(tl.int64, bitcast=True)
        b = tl.where(v != v, 0x7FF8000000000000, b)
        s = b ^ ((b >> 63) & 0x7FFFFFFFFFFFFFFF)
        u = (s ^ -9223372036854775808).to(tl.uint64, bitcast=True)
    else:
        b = v.to(tl.int32, bitcast=True)
        b = tl.where(v != v, 0x7FC00000, b)
        s = b ^ ((b >> 31) & 0x7FFFFFFF)
        u = (s ^ -2147483648).to(tl.uint32, bitcast=True)
    return u


@triton.jit
def _topk_tile_fwd_kernel(x_ptr, bias_ptr, val_ptr, idx_ptr, out_ptr,
                          G, S, HW, CHW, k,
                          MODE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                          ROUND: tl.constexpr, KEY64: tl.constexpr, KEY_SHIFT: tl.constexpr,
                          WRITE_VALUES: tl.constexpr, WRITE_MASK: tl.constexpr,
                          BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program selects the top-k of BLOCK_G whole groups of sample ``program_id(0)``.

    KEY_SHIFT: low key bits that are the same for every value of the input dtype (16 for bfloat16, 13 for
    float16, whose values are float32 numbers with that many trailing zero mantissa bits), dropped so the
    threshold search takes 16 (19) steps instead of 32.
    """
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    e = tl.arange(0, BLOCK_E)
    m = (g < G)[:, None] & (e < S)[None, :]
    if MODE == 0:  # spatial: group = channel, element = position (contiguous)
        off = g[:, None] * HW + e[None, :]
        c = g[:, None] + 0 * e[None, :]
    elif MODE == 1:  # channel: group = position (contiguous), element = channel
        off = e[None, :] * HW + g[:, None]
        c = e[None, :] + 0 * g[:, None]
    else:  # global: one group per sample
        off = e[None, :] + 0 * g[:, None]
        c = off // HW
    base = n * CHW
    v = _preactivation(x_ptr + base, bias_ptr, off, c, m, HAS_BIAS, RELU, ROUND, KEY64)
    key = _order_key(v, KEY64)

    # k-th largest key per group, built from the most significant bit down: keep a bit when at least k
    # keys are >= the prefix with that bit set. (Two bits per step with the three counts packed into one
    # int64 reduction measured slower on an H100.)
    if KEY64:
        thr = tl.zeros([BLOCK_G], dtype=tl.uint64)
        one = tl.full([], 1, tl.uint64)
        NBITS: tl.constexpr = 64
    else:
        key = key >> KEY_SHIFT
        thr = tl.zeros([BLOCK_G], dtype=tl.uint32)
        one = tl.full([], 1, tl.uint32)
        NBITS: tl.constexpr = 32 - KEY_SHIFT
    for i in range(NBITS):
        cand = thr | (one << (NBITS - 1 - i))
        cnt = tl.sum(((key >= cand[:, None]) & m).to(tl.int32), axis=1)
        thr = tl.where(cnt >= k, cand, thr)

    gt = m & (key > thr[:, None])
    eq = m & (key == thr[:, None])
    need = k - tl.sum(gt.to(tl.int32), axis=1)
    eq_rank = tl.cumsum(eq.to(tl.int32), axis=1)
    keep = gt | (eq & (eq_rank <= need[:, None]))
    pos = tl.cumsum(keep.to(tl.int32), axis=1) - 1
    dst = (n * G + g[:, None]) * k + pos
    if WRITE_VALUES:
        tl.store(val_ptr + dst, v.to(val_ptr.dtype.element_ty), mask=keep)
    tl.store(idx_ptr + dst, e[None, :] + 0 * g[:, None], mask=keep)
    if WRITE_MASK:
        tl.store(out_ptr + base + off, tl.where(keep, v, 0.0).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _chunk_offsets(grp, chunk, G, S, HW, CHW, MODE: tl.constexpr, BLOCK: tl.constexpr):
    n = (grp // G).to(tl.int64)
    g = grp % G
    e = chunk * BLOCK + tl.arange(0, BLOCK)
    m = e < S
    if MODE == 0:
        off = g * HW + e
        c = g + 0 * e
    elif MODE == 1:
        off = e.to(tl.int64) * HW + g
        c = e
    else:
        off = e
        c = e // HW
    return n * CHW + off, c, e, m


@triton.jit
def _topk_radix_hist_kernel(x_ptr, bias_ptr, prefix_ptr, hist_ptr,
                            G, S, HW, CHW, n_chunks,
                            SHIFT: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                            RELU: tl.constexpr, ROUND: tl.constexpr, KEY64: tl.constexpr,
                            BLOCK: tl.constexpr):
    """Histogram of the 8-bit digit at SHIFT among the chunk's keys that match the group's prefix."""
    grp = tl.program_id(0)
    chunk = tl.program_id(1)
    off, c, e, m = _chunk_offsets(grp, chunk, G, S, HW, CHW, MODE, BLOCK)
    v = _preactivation(x_ptr, bias_ptr, off, c, m, HAS_BIAS, RELU, ROUND, KEY64)
    key = _order_key(v, KEY64)
    if KEY64:
        NBITS: tl.constexpr = 64
        prefix = tl.load(prefix_ptr + grp).to(tl.uint64, bitcast=True)
    else:
        NBITS: tl.constexpr = 32
        prefix = tl.load(prefix_ptr + grp).to(tl.uint32)
    if SHIFT + 8 < NBITS:
        match = m & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    else:
        match = m
    digit = tl.where(match, ((key >> SHIFT) & 255).to(tl.int32), 0)
    hist = tl.histogram(digit, 256)
    bins = tl.arange(0, 256)
    hist = hist - tl.where(bins == 0, tl.sum((~match).to(tl.int32)), 0)
    tl.store(hist_ptr + (grp.to(tl.int64) * n_chunks + chunk) * 256 + bins, hist)


@triton.jit
def _topk_radix_select_kernel(hist_ptr, prefix_ptr, krem_ptr, gt_ptr, eq_ptr, k, n_chunks,
                              SHIFT: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                              CB: tl.constexpr):
    """One program per group: pick the digit at SHIFT from the chunk histograms and update the state.

    State per group: ``prefix`` (key bits chosen so far), ``krem`` (how many of the k are still to be found
    among keys matching the prefix) and per chunk ``gt`` (count of keys above the prefix so far). On the
    last digit ``gt`` and ``eq`` become the exclusive prefix sums over chunks of the counts of keys above /
    equal to the threshold, which place every chunk's output.
    """
    grp = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, 256)
    hbase = hist_ptr + grp * n_chunks * 256
    total = tl.zeros([256], dtype=tl.int32)
    for c0 in range(0, n_chunks, CB):
        cc = c0 + tl.arange(0, CB)
        h = tl.load(hbase + cc[:, None] * 256 + bins[None, :], mask=(cc < n_chunks)[:, None], other=0)
        total += tl.sum(h, axis=0)
    if FIRST:
        krem = tl.full([], 0, tl.int64) + k
        prefix = tl.full([], 0, tl.int64)
    else:
        krem = tl.load(krem_ptr + grp)
        prefix = tl.load(prefix_ptr + grp)
    at_least = tl.sum(total) - tl.cumsum(total, axis=0) + total  # count of digits >= d
    digit = tl.sum((at_least >= krem).to(tl.int32)) - 1
    above = bins > digit
    tl.store(krem_ptr + grp, krem - tl.sum(tl.where(above, total, 0)).to(tl.int64))
    tl.store(prefix_ptr + grp, prefix | (digit.to(tl.int64) << SHIFT))
    carry_gt = tl.full([], 0, tl.int32)
    carry_eq = tl.full([], 0, tl.int32)
    for c0 in range(0, n_chunks, CB):
        cc = c0 + tl.arange(0, CB)
        cm = cc < n_chunks
        h = tl.load(hbase + cc[:, None] * 256 + bins[None, :], mask=cm[:, None], other=0)
        g = tl.sum(tl.where(above[None, :], h, 0), axis=1)
        slot = grp * n_chunks + cc
        if not FIRST:
            g += tl.load(gt_ptr + slot, mask=cm, other=0)
        if LAST:
            e = tl.sum(tl.where((bins == digit)[None, :], h, 0), axis=1)
            tl.store(gt_ptr + slot, carry_gt + tl.cumsum(g, axis=0) - g, mask=cm)
            tl.store(eq_ptr + slot, carry_eq + tl.cumsum(e, axis=0) - e, mask=cm)
            carry_gt += tl.sum(g)
            carry_eq += tl.sum(e)
        else:
            tl.store(gt_ptr + slot, g, mask=cm)


@triton.jit
def _topk_chunk_write_kernel(x_ptr, bias_ptr, thr_ptr, need_ptr, gt_before_ptr, eq_before_ptr,
                             val_ptr, idx_ptr, out_ptr,
                             G, S, HW, CHW, k, n_chunks,
                             MODE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                             ROUND: tl.constexpr, KEY64: tl.constexpr,
                             WRITE_VALUES: tl.constexpr, WRITE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Keep keys above the threshold and the first ``need`` equal ones; write compact and/or mask."""
    grp = tl.program_id(0)
    chunk = tl.program_id(1)
    off, c, e, m = _chunk_offsets(grp, chunk, G, S, HW, CHW, MODE, BLOCK)
    v = _preactivation(x_ptr, bias_ptr, off, c, m, HAS_BIAS, RELU, ROUND, KEY64)
    key = _order_key(v, KEY64)
    if KEY64:
        thr = tl.load(thr_ptr + grp).to(tl.uint64, bitcast=True)
    else:
        thr = tl.load(thr_ptr + grp).to(tl.uint32)
    need = tl.load(need_ptr + grp).to(tl.int32)
    slot = grp.to(tl.int64) * n_chunks + chunk
    gt_before = tl.load(gt_before_ptr + slot).to(tl.int32)
    eq_before = tl.load(eq_before_ptr + slot).to(tl.int32)
    gt = m & (key > thr)
    eq = m & (key == thr)
    eq_rank = eq_before + tl.cumsum(eq.to(tl.int32), axis=0)
    keep = gt | (eq & (eq_rank <= need))
    pos = gt_before + tl.minimum(eq_before, need) + tl.cumsum(keep.to(tl.int32), axis=0) - 1
    dst = grp.to(tl.int64) * k + pos
    if WRITE_VALUES:
        tl.store(val_ptr + dst, v.to(val_ptr.dtype.element_ty), mask=keep)
    tl.store(idx_ptr + dst, e, mask=keep)
    if WRITE_MASK:
        tl.store(out_ptr + off, tl.where(keep, v, 0.0).to(out_ptr.dtype.element_ty), mask=m)


def _round_mode(dtype: torch.dtype, has_bias: bool) -> int:
    if not has_bias:
        return 0
    return {torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0)


def _check_topk_inputs(x: torch.Tensor, k: int, mode: str, bias: Optional[torch.Tensor]):
    if x.dim() != 4:
        raise ValueError(f"topk expects x of shape [N, C, H, W], got {tuple(x.shape)}")
    check_float("x", x)
    N, C, H, W = x.shape
    G, S = group_geometry(mode, C, H, W)
    if not 1 <= k <= S:
        raise ValueError(f"topk mode {mode!r}: k={k} must satisfy 1 <= k <= group size {S}")
    if bias is not None:
        if bias.shape != (C,):
            raise ValueError(f"bias must have shape [{C}], got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        bias = bias.contiguous()
    return x.contiguous(), bias, N, C, H, W, G, S


def _topk(x, k, mode, bias, relu, write_values, write_mask):
    x, bias, N, C, H, W, G, S = _check_topk_inputs(x, k, mode, bias)
    values = torch.empty((N, G, k) if write_values else (0,), dtype=x.dtype, device=x.device)
    indices = torch.empty((N, G, k), dtype=index_dtype(S), device=x.device)
    out = torch.empty_like(x) if write_mask else values
    if N == 0 or G == 0:
        return values, indices, out
    has_bias = bias is not None
    bias_arg = bias if has_bias else x
    flags = dict(MODE=MODE_IDS[mode], HAS_BIAS=has_bias, RELU=bool(relu),
                 ROUND=_round_mode(x.dtype, has_bias), KEY64=x.dtype == torch.float64)
    HW, CHW = H * W, C * H * W
    if next_pow2(S) <= SINGLE_BLOCK_MAX:
        BLOCK_E = next_pow2(S)
        BLOCK_G = max(1, min(next_pow2(G), TILE_ELEMS // BLOCK_E))
        grid = (N, triton.cdiv(G, BLOCK_G))
        key_shift = {torch.bfloat16: 16, torch.float16: 13}.get(x.dtype, 0)
        _topk_tile_fwd_kernel[grid](x, bias_arg, values, indices, out, G, S, HW, CHW, k, KEY_SHIFT=key_shift,
                                    WRITE_VALUES=write_values, WRITE_MASK=write_mask,
                                    BLOCK_G=BLOCK_G, BLOCK_E=BLOCK_E, num_warps=TILE_WARPS, **flags)
        return values, indices, out

    # Chunked radix select over the 8-bit digits of the keys, most significant first.
    NG = N * G
    n_chunks = triton.cdiv(S, CHUNK)
    nbits = 64 if x.dtype == torch.float64 else 32
    dev = x.device
    prefix = torch.empty(NG, dtype=torch.int64, device=dev)
    k_rem = torch.empty(NG, dtype=torch.int64, device=dev)
    gt = torch.empty((NG, n_chunks), dtype=torch.int32, device=dev)
    eq = torch.empty((NG, n_chunks), dtype=torch.int32, device=dev)
    hist = torch.empty((NG, n_chunks, 256), dtype=torch.int32, device=dev)
    grid = (NG, n_chunks)
    CB = min(next_pow2(n_chunks), 16)
    for shift in range(nbits - 8, -1, -8):
        _topk_radix_hist_kernel[grid](x, bias_arg, prefix, hist, G, S, HW, CHW, n_chunks,
                                      SHIFT=shift, BLOCK=CHUNK, num_warps=8, **flags)
        _topk_radix_select_kernel[(NG,)](hist, prefix, k_rem, gt, eq, k, n_chunks, SHIFT=shift,
                                         FIRST=shift == nbits - 8, LAST=shift == 0, CB=CB, num_warps=4)
    _topk_chunk_write_kernel[grid](x, bias_arg, prefix, k_rem, gt, eq, values, indices, out,
                                   G, S, HW, CHW, k, n_chunks,
                                   WRITE_VALUES=write_values, WRITE_MASK=write_mask, BLOCK=CHUNK,
                                   num_warps=8, **flags)
    return values, indices, out


def topk_compact(x: torch.Tensor, k: int, mode: str, bias: Optional[torch.Tensor], relu: bool):
    """Compact top-k of ``relu?(x + bias)``: ``x [N, C, H, W] -> (values [N, G, k], indices [N, G, k])``.

    Entries of a group in ascending index order; indices int16 where the group size fits, else int32.
    """
    values, indices, _ = _topk(x, k, mode, bias, relu, True, False)
    return values, indices


def topk_mask(x: torch.Tensor, k: int, mode: str, bias: Optional[torch.Tensor], relu: bool):
    """Dense top-k: ``x [N, C, H, W] -> (out [N, C, H, W], indices [N, G, k])``, unselected entries zero."""
    _, indices, out = _topk(x, k, mode, bias, relu, False, True)
    return out, indices
