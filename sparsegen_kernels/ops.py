"""The op registry: every ``torch.ops.sparsegen`` op's schema, typed wrapper, fake (meta) implementation,
autograd and autocast rule, in this one file.

Each wrapper takes exactly the schema's arguments; argument checking happens one level up, in
:mod:`sparsegen_kernels.functional`. The schemas are declared in C++ (``csrc/sparsegen.cpp``) and again in
:data:`SCHEMAS` (used when the compiled extension is missing); a test checks that the two agree. Kernels:
CPU in ``csrc/cpu`` (C++) or below (the upsample-conv, composed of the other ops); CUDA through
:mod:`sparsegen_kernels.backend` (CUDA C++ in ``csrc/cuda`` or Triton in :mod:`sparsegen_kernels.triton`).
Shapes: ``x [N, C, H, W]``; compact ``values, indices [N, G, k]``; transposed-conv ``weight [Cin, Cout, kh, kw]``;
upsample-conv ``weight [Cout, Cin, 3, 3]``.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend, reference
from ._loader import load_extension
from .geometry import conv_transpose_output_size, fold_upsample_weight, group_geometry, index_dtype, \
    unfold_upsample_weight_grad

_LIB = "sparsegen"
#: name -> schema ("(arguments) -> returns") of every op, in the order of the C++ block.
SCHEMAS = {
    "topk_compact": "(Tensor x, int k, str mode, Tensor? bias, bool relu) -> (Tensor values, Tensor indices)",
    "topk_mask": "(Tensor x, int k, str mode, Tensor? bias, bool relu) -> (Tensor out, Tensor indices)",
    "compact_to_dense": "(Tensor values, Tensor indices, str mode, SymInt[] shape) -> Tensor",
    "compact_gather": "(Tensor dense, Tensor indices, str mode) -> Tensor",
    "sparse_conv_transpose2d": "(Tensor values, Tensor? indices, str mode, SymInt[] in_shape, Tensor weight, "
                               "Tensor? bias, int[] stride, int[] padding, int[] output_padding) -> Tensor",
    "sparse_conv_transpose2d_input_grad": "(Tensor grad_out, Tensor indices, str mode, SymInt[] in_shape, "
                                          "Tensor weight, int[] stride, int[] padding) -> Tensor",
    "sparse_conv_transpose2d_weight_grad": "(Tensor grad_out, Tensor values, Tensor? indices, str mode, "
                                           "SymInt[] in_shape, SymInt[] weight_shape, int[] stride, "
                                           "int[] padding) -> Tensor",
    "sparse_upsample_conv2d": "(Tensor values, Tensor? indices, str mode, SymInt[] in_shape, Tensor weight, "
                              "Tensor? bias) -> Tensor",
    "sparse_upsample_conv2d_input_grad": "(Tensor grad_out, Tensor indices, str mode, SymInt[] in_shape, "
                                         "Tensor weight) -> Tensor",
    "sparse_upsample_conv2d_weight_grad": "(Tensor grad_out, Tensor values, Tensor? indices, str mode, "
                                          "SymInt[] in_shape) -> Tensor",
    "sparse_conv2d": "(Tensor input, Tensor weight, Tensor? bias, int[] padding) -> Tensor",
    "sparse_conv2d_weight_grad": "(Tensor grad_out, Tensor input, SymInt[] weight_shape, int[] padding) -> Tensor",
}
OP_NAMES = tuple(SCHEMAS)
# Ops whose CUDA kernel is PyTorch's own (cuDNN) rather than a choice between the CUDA C++ and Triton providers.
CUDNN_OPS = ("sparse_conv2d", "sparse_conv2d_weight_grad")
#: Ops whose CUDA kernel runs the provider chosen by sparsegen_kernels.backend.
PROVIDER_OPS = tuple(n for n in SCHEMAS if n not in CUDNN_OPS)
# Ops whose CPU kernels are compositions of the other ops, written in Python below (not in csrc/cpu).
PYTHON_CPU_OPS = ("sparse_upsample_conv2d", "sparse_upsample_conv2d_input_grad", "sparse_upsample_conv2d_weight_grad",
                  "sparse_conv2d", "sparse_conv2d_weight_grad")


def _op(name: str):
    return getattr(torch.ops.sparsegen, name).default


# ---------------------------------------------------------------------------------------------------
# Typed wrappers
# ---------------------------------------------------------------------------------------------------
def topk_compact(x: Tensor, k: int, mode: str, bias: Optional[Tensor], relu: bool) -> tuple[Tensor, Tensor]:
    """Fused ``relu?(x + bias)`` + per-group top-k. ``x [N, C, H, W] -> values, indices [N, G, k]``."""
    return _op("topk_compact")(x, k, mode, bias, relu)


def topk_mask(x: Tensor, k: int, mode: str, bias: Optional[Tensor], relu: bool) -> tuple[Tensor, Tensor]:
    """Fused top-k, dense output: ``x [N, C, H, W] -> out [N, C, H, W], indices [N, G, k]``."""
    return _op("topk_mask")(x, k, mode, bias, relu)


def compact_to_dense(values: Tensor, indices: Tensor, mode: str, shape: Sequence[int]) -> Tensor:
    """Scatter ``values [N, G, k]`` into zeros of ``shape = [N, C, H, W]``."""
    return _op("compact_to_dense")(values, indices, mode, list(shape))


def compact_gather(dense: Tensor, indices: Tensor, mode: str) -> Tensor:
    """Gather ``dense [N, C, H, W]`` at ``indices [N, G, k]`` -> ``[N, G, k]``."""
    return _op("compact_gather")(dense, indices, mode)


def sparse_conv_transpose2d(values: Tensor, indices: Optional[Tensor], mode: str, in_shape: Sequence[int],
                            weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                            output_padding: Sequence[int]) -> Tensor:
    """Transposed conv of a compact (or dense, ``indices=None``) input -> ``[N, Cout, Ho, Wo]``."""
    return _op("sparse_conv_transpose2d")(values, indices, mode, list(in_shape), weight, bias, list(stride),
                                          list(padding), list(output_padding))


def sparse_conv_transpose2d_input_grad(grad_out: Tensor, indices: Tensor, mode: str, in_shape: Sequence[int],
                                       weight: Tensor, stride: Sequence[int], padding: Sequence[int]) -> Tensor:
    """``d out / d values`` at the surviving entries only: ``grad_out [N, Cout, Ho, Wo] -> [N, G, k]``."""
    return _op("sparse_conv_transpose2d_input_grad")(grad_out, indices, mode, list(in_shape), weight, list(stride),
                                                     list(padding))


def sparse_conv_transpose2d_weight_grad(grad_out: Tensor, values: Tensor, indices: Optional[Tensor], mode: str,
                                        in_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                                        padding: Sequence[int]) -> Tensor:
    """``d out / d weight`` summed over the surviving entries -> ``[Cin, Cout, kh, kw]``."""
    return _op("sparse_conv_transpose2d_weight_grad")(grad_out, values, indices, mode, list(in_shape),
                                                      list(weight_shape), list(stride), list(padding))


def sparse_upsample_conv2d(values: Tensor, indices: Optional[Tensor], mode: str, in_shape: Sequence[int],
                           weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``conv2d(interpolate(dense(input), 2, "nearest"), weight, bias, padding=1)``, ``weight [Cout, Cin, 3, 3]``
    -> ``[N, Cout, 2H, 2W]``."""
    return _op("sparse_upsample_conv2d")(values, indices, mode, list(in_shape), weight, bias)


def sparse_upsample_conv2d_input_grad(grad_out: Tensor, indices: Tensor, mode: str, in_shape: Sequence[int],
                                      weight: Tensor) -> Tensor:
    """``d out / d values`` of the upsample-conv at the surviving entries: ``grad_out [N, Cout, 2H, 2W] -> [N, G, k]``."""
    return _op("sparse_upsample_conv2d_input_grad")(grad_out, indices, mode, list(in_shape), weight)


def sparse_upsample_conv2d_weight_grad(grad_out: Tensor, values: Tensor, indices: Optional[Tensor], mode: str,
                                       in_shape: Sequence[int]) -> Tensor:
    """``d out / d weight`` of the upsample-conv summed over the surviving entries -> ``[Cout, Cin, 3, 3]``."""
    return _op("sparse_upsample_conv2d_weight_grad")(grad_out, values, indices, mode, list(in_shape))


def sparse_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], padding: Sequence[int]) -> Tensor:
    """Stride-1 ``conv2d(input, weight [Cout, Cin, kh, kw], bias, padding)`` skipping the exact zeros of the dense
    ``input [N, Cin, H, W]`` -> ``[N, Cout, H + 2ph - kh + 1, W + 2pw - kw + 1]``."""
    return _op("sparse_conv2d")(input, weight, bias, list(padding))


def sparse_conv2d_weight_grad(grad_out: Tensor, input: Tensor, weight_shape: Sequence[int],
                              padding: Sequence[int]) -> Tensor:
    """``d out / d weight`` of :func:`sparse_conv2d`, summed over the non-zeros of ``input`` -> ``weight_shape``."""
    return _op("sparse_conv2d_weight_grad")(grad_out, input, list(weight_shape), list(padding))


# ---------------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only
# ---------------------------------------------------------------------------------------------------
def _compact_shape(x_shape, k, mode):
    N, C, H, W = x_shape
    G, size = group_geometry(mode, C, H, W)
    return (N, G, k), index_dtype(size)


def _conv_out_hw(in_shape, weight, stride, padding, output_padding):
    return tuple(conv_transpose_output_size(in_shape[2 + i], weight.shape[2 + i], stride[i], padding[i],
                                            output_padding[i]) for i in range(2))


def _fake_topk_compact(x, k, mode, bias, relu):
    shape, idx_dtype = _compact_shape(x.shape, k, mode)
    return x.new_empty(shape), x.new_empty(shape, dtype=idx_dtype)


def _fake_topk_mask(x, k, mode, bias, relu):
    shape, idx_dtype = _compact_shape(x.shape, k, mode)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(shape, dtype=idx_dtype)


def _fake_compact_to_dense(values, indices, mode, shape):
    return values.new_empty(list(shape))


def _fake_compact_gather(dense, indices, mode):
    return dense.new_empty(indices.shape)


def _fake_sparse_conv_transpose2d(values, indices, mode, in_shape, weight, bias, stride, padding, output_padding):
    Ho, Wo = _conv_out_hw(in_shape, weight, stride, padding, output_padding)
    return values.new_empty((in_shape[0], weight.shape[1], Ho, Wo))


def _fake_input_grad(grad_out, indices, mode, in_shape, weight, stride, padding):
    return grad_out.new_empty(indices.shape)


def _fake_weight_grad(grad_out, values, indices, mode, in_shape, weight_shape, stride, padding):
    return grad_out.new_empty(list(weight_shape))


def _fake_upsample_conv(values, indices, mode, in_shape, weight, bias):
    return values.new_empty((in_shape[0], weight.shape[0], 2 * in_shape[2], 2 * in_shape[3]))


def _fake_upsample_input_grad(grad_out, indices, mode, in_shape, weight):
    return grad_out.new_empty(indices.shape)


def _fake_upsample_weight_grad(grad_out, values, indices, mode, in_shape):
    return grad_out.new_empty((grad_out.shape[1], in_shape[1], 3, 3))


def _fake_sparse_conv2d(input, weight, bias, padding):
    N, _, H, W = input.shape
    return input.new_empty((N, weight.shape[0], H + 2 * padding[0] - weight.shape[2] + 1,
                            W + 2 * padding[1] - weight.shape[3] + 1))


def _fake_sparse_conv2d_weight_grad(grad_out, input, weight_shape, padding):
    return grad_out.new_empty(list(weight_shape))


# ---------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------
def _setup_topk_compact(ctx, inputs, output):
    x, k, mode, bias, relu = inputs
    values, indices = output
    ctx.mode, ctx.relu, ctx.x_shape = mode, relu, tuple(x.shape)
    ctx.save_for_backward(values if relu else None, indices)
    ctx.mark_non_differentiable(indices)


def _backward_topk_compact(ctx, grad_values, grad_indices):
    values, indices = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]):
        return None, None, None, None, None
    g = grad_values * (values > 0) if ctx.relu else grad_values
    grad_x = compact_to_dense(g.contiguous(), indices, ctx.mode, ctx.x_shape)
    grad_bias = grad_x.sum((0, 2, 3)) if ctx.needs_input_grad[3] else None
    return (grad_x if ctx.needs_input_grad[0] else None), None, None, grad_bias, None


def _setup_topk_mask(ctx, inputs, output):
    x, k, mode, bias, relu = inputs
    out, indices = output
    ctx.mode, ctx.relu = mode, relu
    ctx.save_for_backward(out if relu else None, indices)
    ctx.mark_non_differentiable(indices)


def _backward_topk_mask(ctx, grad_out, grad_indices):
    out, indices = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]):
        return None, None, None, None, None
    g = compact_gather(grad_out.contiguous(), indices, ctx.mode)
    if ctx.relu:
        g = g * (compact_gather(out, indices, ctx.mode) > 0)
    grad_x = compact_to_dense(g, indices, ctx.mode, grad_out.shape)
    grad_bias = grad_x.sum((0, 2, 3)) if ctx.needs_input_grad[3] else None
    return (grad_x if ctx.needs_input_grad[0] else None), None, None, grad_bias, None


def _setup_compact_to_dense(ctx, inputs, output):
    values, indices, mode, shape = inputs
    ctx.mode = mode
    ctx.save_for_backward(indices)


def _backward_compact_to_dense(ctx, grad):
    (indices,) = ctx.saved_tensors
    return compact_gather(grad.contiguous(), indices, ctx.mode), None, None, None


def _setup_compact_gather(ctx, inputs, output):
    dense, indices, mode = inputs
    ctx.mode, ctx.shape = mode, tuple(dense.shape)
    ctx.save_for_backward(indices)


def _backward_compact_gather(ctx, grad):
    (indices,) = ctx.saved_tensors
    return compact_to_dense(grad.contiguous(), indices, ctx.mode, ctx.shape), None, None


def _setup_sparse_conv(ctx, inputs, output):
    values, indices, mode, in_shape, weight, bias, stride, padding, output_padding = inputs
    ctx.mode, ctx.in_shape, ctx.stride, ctx.padding = mode, tuple(in_shape), tuple(stride), tuple(padding)
    ctx.has_indices = indices is not None
    # Only the compact input (values + indices) and the weight are kept for backward.
    ctx.save_for_backward(values, indices, weight)


def _backward_sparse_conv(ctx, grad_out):
    values, indices, weight = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_values = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        if ctx.has_indices:
            grad_values = sparse_conv_transpose2d_input_grad(grad_out, indices, ctx.mode, ctx.in_shape, weight,
                                                             ctx.stride, ctx.padding)
        else:  # dense input: the adjoint of a transposed conv is a conv
            grad_values = F.conv2d(grad_out, weight, stride=ctx.stride, padding=ctx.padding)
            grad_values = grad_values[..., : ctx.in_shape[2], : ctx.in_shape[3]]
    if ctx.needs_input_grad[4]:
        grad_weight = sparse_conv_transpose2d_weight_grad(grad_out, values, indices, ctx.mode, ctx.in_shape,
                                                          weight.shape, ctx.stride, ctx.padding)
    if ctx.needs_input_grad[5]:
        grad_bias = grad_out.sum((0, 2, 3))
    return grad_values, None, None, None, grad_weight, grad_bias, None, None, None


def _setup_upsample_conv(ctx, inputs, output):
    values, indices, mode, in_shape, weight, bias = inputs
    ctx.mode, ctx.in_shape = mode, tuple(in_shape)
    ctx.has_indices = indices is not None
    # The compact input and the 3x3 weight (a parameter, alive anyway): no folded copy is kept for backward.
    ctx.save_for_backward(values, indices, weight)


def _backward_upsample_conv(ctx, grad_out):
    values, indices, weight = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_values = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        if ctx.has_indices:
            grad_values = sparse_upsample_conv2d_input_grad(grad_out, indices, ctx.mode, ctx.in_shape, weight)
        else:  # dense input: the adjoint of the folded stride-2 transposed conv is a stride-2 conv
            grad_values = F.conv2d(grad_out, fold_upsample_weight(weight), stride=2, padding=1)
    if ctx.needs_input_grad[4]:
        grad_weight = sparse_upsample_conv2d_weight_grad(grad_out, values, indices, ctx.mode, ctx.in_shape)
    if ctx.needs_input_grad[5]:
        grad_bias = grad_out.sum((0, 2, 3))
    return grad_values, None, None, None, grad_weight, grad_bias


def _setup_sparse_conv2d(ctx, inputs, output):
    input, weight, bias, padding = inputs
    ctx.padding = list(padding)
    ctx.save_for_backward(input, weight)


def _backward_sparse_conv2d(ctx, grad_out):
    input, weight = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:  # the exact gradient of the conv: dense, as the zeros of the input are inputs too
        grad_input = F.conv_transpose2d(grad_out, weight, padding=ctx.padding)
    if ctx.needs_input_grad[1]:
        grad_weight = sparse_conv2d_weight_grad(grad_out, input, weight.shape, ctx.padding)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_out.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias, None


# ---------------------------------------------------------------------------------------------------
# Stride-1 conv that skips the zeros of its input. On the CPU the sparse kernel (the transposed conv with the
# flipped, transposed weight over the non-zeros) runs where the input is sparse enough to beat the dense conv;
# the densities below are measured crossovers (2 cores, batch 16, 3x3: 20% with 512 channels, 14% with 128,
# 6% with 64; benchmarks/results/sparse_conv2d_cpu.json), interpolated in log2 of the channels. At the ~50%
# density of a ReLU's output the dense conv wins, so it runs there. On a GPU the op is cuDNN's conv.
# ---------------------------------------------------------------------------------------------------
def sparse_conv2d_crossover(in_channels: int) -> float:
    """Input density below which the CPU sparse stride-1 conv beats the dense one, for ``in_channels``."""
    import math

    return min(0.20, max(0.06, 0.06 + 0.08 * math.log2(max(in_channels, 1) / 64)))


def _sparse_enough(input: Tensor) -> bool:
    return torch.count_nonzero(input).item() < sparse_conv2d_crossover(input.shape[1]) * input.numel()


def _transposed_padding(kernel: Sequence[int], padding: Sequence[int]) -> Optional[list]:
    """The padding of the stride-1 transposed conv (flipped, transposed weight) equal to a conv with ``padding``:
    ``k - 1 - p`` per axis, or None where that is negative (a padding wider than the kernel)."""
    tp = [k - 1 - p for k, p in zip(kernel, padding)]
    return tp if min(tp) >= 0 else None


def _sparse_conv2d_cpu(input, weight, bias, padding):
    tp = _transposed_padding(weight.shape[2:], padding)
    if tp is None or not _sparse_enough(input):
        return F.conv2d(input, weight, bias, padding=padding).contiguous()
    return sparse_conv_transpose2d(input, None, "spatial", list(input.shape), weight.flip(2, 3).transpose(0, 1), bias,
                                   [1, 1], tp, [0, 0])


def _sparse_conv2d_weight_grad_cpu(grad_out, input, weight_shape, padding):
    Cout, Cin, kh, kw = weight_shape
    tp = _transposed_padding((kh, kw), padding)
    if tp is None or not _sparse_enough(input):
        return torch.nn.grad.conv2d_weight(input, list(weight_shape), grad_out, padding=padding).contiguous()
    gwt = sparse_conv_transpose2d_weight_grad(grad_out, input, None, "spatial", list(input.shape), [Cin, Cout, kh, kw],
                                              [1, 1], tp)
    return gwt.transpose(0, 1).flip(2, 3).contiguous()


def _sparse_conv2d_dense(input, weight, bias, padding):
    return F.conv2d(input, weight, bias, padding=padding).contiguous()


def _sparse_conv2d_weight_grad_dense(grad_out, input, weight_shape, padding):
    return torch.nn.grad.conv2d_weight(input, list(weight_shape), grad_out, padding=padding).contiguous()


# ---------------------------------------------------------------------------------------------------
# CPU kernels of the upsample-conv ops. Very sparse compact inputs (a channel / global top-k that keeps at most
# DIRECT_MAX_DENSITY of the group: the FC layer's 8 of 3200) run the fold-free kernels of csrc/cpu/upsample_cpu.cpp,
# which read only the surviving channels' rows of the 3x3 weight; denser inputs fold the weight to the stride-2
# 4x4 transposed conv.
# ---------------------------------------------------------------------------------------------------
DIRECT_MAX_DENSITY = 1.0 / 16


def _direct(name: str):
    return getattr(torch.ops._sparsegen_cpu, name).default


def _uses_direct_cpu_kernels(indices: Optional[Tensor], mode: str, in_shape: Sequence[int]) -> bool:
    if indices is None or mode == "spatial":
        return False
    N, C, H, W = in_shape
    size = C if mode == "channel" else C * H * W
    if indices.shape[-1] > DIRECT_MAX_DENSITY * size:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("_sparsegen_cpu::upsample_conv_direct", "CPU")
    except RuntimeError:
        return False


def _upsample_conv_cpu(values, indices, mode, in_shape, weight, bias):
    if _uses_direct_cpu_kernels(indices, mode, in_shape):
        return _direct("upsample_conv_direct")(values, indices, mode, in_shape, weight, bias)
    return sparse_conv_transpose2d(values, indices, mode, in_shape, fold_upsample_weight(weight), bias, [2, 2],
                                   [1, 1], [0, 0])


def _upsample_input_grad_cpu(grad_out, indices, mode, in_shape, weight):
    if _uses_direct_cpu_kernels(indices, mode, in_shape):
        return _direct("upsample_conv_direct_input_grad")(grad_out, indices, mode, in_shape, weight)
    return sparse_conv_transpose2d_input_grad(grad_out, indices, mode, in_shape, fold_upsample_weight(weight), [2, 2],
                                              [1, 1])


def _upsample_weight_grad_cpu(grad_out, values, indices, mode, in_shape):
    if _uses_direct_cpu_kernels(indices, mode, in_shape):
        return _direct("upsample_conv_direct_weight_grad")(grad_out, values, indices, mode, in_shape)
    gw4 = sparse_conv_transpose2d_weight_grad(grad_out, values, indices, mode, in_shape,
                                              [in_shape[1], grad_out.shape[1], 4, 4], [2, 2], [1, 1])
    return unfold_upsample_weight_grad(gw4)


_PYTHON_CPU_KERNELS = {
    "sparse_conv2d": _sparse_conv2d_cpu,
    "sparse_conv2d_weight_grad": _sparse_conv2d_weight_grad_cpu,
    "sparse_upsample_conv2d": _upsample_conv_cpu,
    "sparse_upsample_conv2d_input_grad": _upsample_input_grad_cpu,
    "sparse_upsample_conv2d_weight_grad": _upsample_weight_grad_cpu,
}


# ---------------------------------------------------------------------------------------------------
# Last-resort CPU kernels from the references (only where the compiled extension provides none)
# ---------------------------------------------------------------------------------------------------
def _ref_topk_mask(x, k, mode, bias, relu):
    values, indices = reference.topk_compact_ref(x, k, mode, bias, relu)
    return reference.compact_to_dense_ref(values, indices, mode, x.shape), indices


def _ref_conv(values, indices, mode, in_shape, weight, bias, stride, padding, output_padding):
    dense = values if indices is None else reference.compact_to_dense_ref(values, indices, mode, in_shape)
    return reference.sparse_conv_transpose2d_ref(dense, weight, bias, stride, padding, output_padding)


def _ref_input_grad(grad_out, indices, mode, in_shape, weight, stride, padding):
    full = F.conv2d(grad_out, weight, stride=stride, padding=padding)[..., : in_shape[2], : in_shape[3]]
    return reference.compact_gather_ref(full, indices, mode)


def _ref_weight_grad(grad_out, values, indices, mode, in_shape, weight_shape, stride, padding):
    dense = values if indices is None else reference.compact_to_dense_ref(values, indices, mode, in_shape)
    # conv_transpose2d(x, w) is the adjoint of conv2d(., w): its weight gradient is conv2d's with the
    # roles of input and output swapped.
    return torch.nn.grad.conv2d_weight(grad_out, list(weight_shape), dense, stride=stride, padding=padding)


def _ref_upsample_conv(values, indices, mode, in_shape, weight, bias):
    dense = values if indices is None else reference.compact_to_dense_ref(values, indices, mode, in_shape)
    return reference.sparse_upsample_conv2d_ref(dense, weight, bias)


def _ref_upsample_input_grad(grad_out, indices, mode, in_shape, weight):
    return _ref_input_grad(grad_out, indices, mode, in_shape, fold_upsample_weight(weight), [2, 2], [1, 1])


def _ref_upsample_weight_grad(grad_out, values, indices, mode, in_shape):
    dense = values if indices is None else reference.compact_to_dense_ref(values, indices, mode, in_shape)
    up = F.interpolate(dense, scale_factor=2, mode="nearest")
    return torch.nn.grad.conv2d_weight(up, [grad_out.shape[1], in_shape[1], 3, 3], grad_out, padding=1)


_REFERENCE_KERNELS = {
    "topk_compact": reference.topk_compact_ref,
    "topk_mask": _ref_topk_mask,
    "compact_to_dense": reference.compact_to_dense_ref,
    "compact_gather": reference.compact_gather_ref,
    "sparse_conv_transpose2d": _ref_conv,
    "sparse_conv_transpose2d_input_grad": _ref_input_grad,
    "sparse_conv_transpose2d_weight_grad": _ref_weight_grad,
    "sparse_upsample_conv2d": _ref_upsample_conv,
    "sparse_upsample_conv2d_input_grad": _ref_upsample_input_grad,
    "sparse_upsample_conv2d_weight_grad": _ref_upsample_weight_grad,
    "sparse_conv2d": _sparse_conv2d_dense,
    "sparse_conv2d_weight_grad": _sparse_conv2d_weight_grad_dense,
}


def _define_schema_if_missing() -> None:
    """Without ``_C`` the op schemas do not exist: declare them from :data:`SCHEMAS`."""
    global _FALLBACK_LIB
    _FALLBACK_LIB = torch.library.Library(_LIB, "FRAGMENT")
    for name, schema in SCHEMAS.items():
        _FALLBACK_LIB.define(name + schema)


def _contiguous_outputs(fn):
    """Kernels return contiguous tensors (the fake impls promise so); references may return views."""

    def kernel(*args):
        out = fn(*args)
        return tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()

    return kernel


_FALLBACK_LIB = None
_REGISTERED = False
_CPU_FALLBACKS: list = []


def cpu_reference_fallbacks() -> tuple:
    """The ops whose CPU kernel is the slow pure-PyTorch reference, because the compiled extension lacks it
    (all of the C++ ops when ``_C`` did not load; see :func:`sparsegen_kernels._loader.load_error`)."""
    register()
    return tuple(_CPU_FALLBACKS)


def register() -> None:
    """Register fake impls, autograd and the CUDA provider dispatch for every op (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    if not load_extension():
        _define_schema_if_missing()

    fakes = {
        "topk_compact": _fake_topk_compact,
        "topk_mask": _fake_topk_mask,
        "compact_to_dense": _fake_compact_to_dense,
        "compact_gather": _fake_compact_gather,
        "sparse_conv_transpose2d": _fake_sparse_conv_transpose2d,
        "sparse_conv_transpose2d_input_grad": _fake_input_grad,
        "sparse_conv_transpose2d_weight_grad": _fake_weight_grad,
        "sparse_upsample_conv2d": _fake_upsample_conv,
        "sparse_upsample_conv2d_input_grad": _fake_upsample_input_grad,
        "sparse_upsample_conv2d_weight_grad": _fake_upsample_weight_grad,
        "sparse_conv2d": _fake_sparse_conv2d,
        "sparse_conv2d_weight_grad": _fake_sparse_conv2d_weight_grad,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"{_LIB}::{name}", fake)

    autograd = {
        "topk_compact": (_backward_topk_compact, _setup_topk_compact),
        "topk_mask": (_backward_topk_mask, _setup_topk_mask),
        "compact_to_dense": (_backward_compact_to_dense, _setup_compact_to_dense),
        "compact_gather": (_backward_compact_gather, _setup_compact_gather),
        "sparse_conv_transpose2d": (_backward_sparse_conv, _setup_sparse_conv),
        "sparse_upsample_conv2d": (_backward_upsample_conv, _setup_upsample_conv),
        "sparse_conv2d": (_backward_sparse_conv2d, _setup_sparse_conv2d),
    }
    for name, (bwd, setup) in autograd.items():
        torch.library.register_autograd(f"{_LIB}::{name}", bwd, setup_context=setup)

    for name, kernel in _PYTHON_CPU_KERNELS.items():
        torch.library.register_kernel(f"{_LIB}::{name}", "cpu", kernel)
    missing_cpu = [n for n in OP_NAMES if n not in PYTHON_CPU_OPS
                   and not torch._C._dispatch_has_kernel_for_dispatch_key(f"{_LIB}::{n}", "CPU")]
    _CPU_FALLBACKS.extend(missing_cpu)
    if missing_cpu:
        warnings.warn(f"sparsegen: no compiled CPU kernel for {missing_cpu}; using the pure-PyTorch references",
                      RuntimeWarning, stacklevel=2)
        for name in missing_cpu:
            torch.library.register_kernel(f"{_LIB}::{name}", "cpu", _contiguous_outputs(_REFERENCE_KERNELS[name]))

    for name in PROVIDER_OPS:
        torch.library.register_kernel(f"{_LIB}::{name}", "cuda",
                                     backend.cuda_dispatcher(name, _contiguous_outputs(_REFERENCE_KERNELS[name])))
    for name in CUDNN_OPS:
        torch.library.register_kernel(f"{_LIB}::{name}", "cuda", _REFERENCE_KERNELS[name])

    global _AUTOCAST_LIB
    _AUTOCAST_LIB = torch.library.Library(_LIB, "IMPL")
    for name in OP_NAMES:
        for device_type, key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):
            _AUTOCAST_LIB.impl(name, _autocast_kernel(name, device_type, key), key)


# ---------------------------------------------------------------------------------------------------
# Autocast: under torch.autocast the ops run in one floating dtype, as PyTorch's own convolutions do, so the
# model code needs no casts. On a GPU that is the autocast dtype (bfloat16 / float16); the CPU kernels take
# float32 and float64, so on the CPU half-precision inputs are widened to float32. float64 is never cast.
# ---------------------------------------------------------------------------------------------------
_AUTOCAST_LIB = None


def _autocast_kernel(name: str, device_type: str, key: str):
    op = _op(name)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type) if device_type == "cuda" else torch.float32

        def cast(a):
            if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64 and a.dtype != dtype:
                return a.to(dtype)
            return a

        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*(cast(a) for a in args))

    kernel.__name__ = f"{name}_autocast_{device_type}"
    return kernel
