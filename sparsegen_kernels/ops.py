"""Typed wrappers over ``torch.ops.sparsegen.*``, their fake (meta) implementations and autograd.

This is the one Python front door to the compiled ops. Each wrapper takes exactly the schema's arguments
(see ``csrc/sparsegen.cpp``); argument checking happens one level up, in :mod:`sparsegen_kernels.functional`.
Shapes: ``x [N, C, H, W]``; compact ``values, indices [N, G, k]``; transposed-conv ``weight [Cin, Cout, kh, kw]``.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend, reference
from ._loader import load_extension

_LIB = "sparsegen"
OP_NAMES = (
    "topk_compact",
    "topk_mask",
    "compact_to_dense",
    "compact_gather",
    "sparse_conv_transpose2d",
    "sparse_conv_transpose2d_input_grad",
    "sparse_conv_transpose2d_weight_grad",
)


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


# ---------------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only
# ---------------------------------------------------------------------------------------------------
def _compact_shape(x_shape, k, mode):
    N, C, H, W = x_shape
    G, size = reference.group_geometry(mode, C, H, W)
    return (N, G, k), reference.index_dtype(size)


def _conv_out_hw(in_shape, weight, stride, padding, output_padding):
    H, W = in_shape[2], in_shape[3]
    kh, kw = weight.shape[2], weight.shape[3]
    Ho = (H - 1) * stride[0] - 2 * padding[0] + kh + output_padding[0]
    Wo = (W - 1) * stride[1] - 2 * padding[1] + kw + output_padding[1]
    return Ho, Wo


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


_REFERENCE_KERNELS = {
    "topk_compact": reference.topk_compact_ref,
    "topk_mask": _ref_topk_mask,
    "compact_to_dense": reference.compact_to_dense_ref,
    "compact_gather": reference.compact_gather_ref,
    "sparse_conv_transpose2d": _ref_conv,
    "sparse_conv_transpose2d_input_grad": _ref_input_grad,
    "sparse_conv_transpose2d_weight_grad": _ref_weight_grad,
}


def _define_schema_if_missing() -> None:
    """Without ``_C`` the op schemas do not exist: declare them from the same strings the C++ block uses."""
    schemas = {
        "topk_compact": "(Tensor x, int k, str mode, Tensor? bias, bool relu) -> (Tensor values, Tensor indices)",
        "topk_mask": "(Tensor x, int k, str mode, Tensor? bias, bool relu) -> (Tensor out, Tensor indices)",
        "compact_to_dense": "(Tensor values, Tensor indices, str mode, SymInt[] shape) -> Tensor",
        "compact_gather": "(Tensor dense, Tensor indices, str mode) -> Tensor",
        "sparse_conv_transpose2d": "(Tensor values, Tensor? indices, str mode, SymInt[] in_shape, Tensor weight, "
        "Tensor? bias, int[] stride, int[] padding, int[] output_padding) -> Tensor",
        "sparse_conv_transpose2d_input_grad": "(Tensor grad_out, Tensor indices, str mode, SymInt[] in_shape, "
        "Tensor weight, int[] stride, int[] padding) -> Tensor",
        "sparse_conv_transpose2d_weight_grad": "(Tensor grad_out, Tensor values, Tensor? indices, str mode, "
        "SymInt[] in_shape, SymInt[] weight_shape, int[] stride, int[] padding) -> Tensor",
    }
    global _FALLBACK_LIB
    _FALLBACK_LIB = torch.library.Library(_LIB, "FRAGMENT")
    for name, schema in schemas.items():
        _FALLBACK_LIB.define(name + schema)


def _contiguous_outputs(fn):
    """Kernels return contiguous tensors (the fake impls promise so); references may return views."""

    def kernel(*args):
        out = fn(*args)
        return tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()

    return kernel


_FALLBACK_LIB = None
_REGISTERED = False


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
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"{_LIB}::{name}", fake)

    autograd = {
        "topk_compact": (_backward_topk_compact, _setup_topk_compact),
        "topk_mask": (_backward_topk_mask, _setup_topk_mask),
        "compact_to_dense": (_backward_compact_to_dense, _setup_compact_to_dense),
        "compact_gather": (_backward_compact_gather, _setup_compact_gather),
        "sparse_conv_transpose2d": (_backward_sparse_conv, _setup_sparse_conv),
    }
    for name, (bwd, setup) in autograd.items():
        torch.library.register_autograd(f"{_LIB}::{name}", bwd, setup_context=setup)

    missing_cpu = [n for n in OP_NAMES if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{_LIB}::{n}", "CPU")]
    if missing_cpu:
        warnings.warn(f"sparsegen: no compiled CPU kernel for {missing_cpu}; using the pure-PyTorch references",
                      RuntimeWarning, stacklevel=2)
        for name in missing_cpu:
            torch.library.register_kernel(f"{_LIB}::{name}", "cpu", _contiguous_outputs(_REFERENCE_KERNELS[name]))

    for name in OP_NAMES:
        torch.library.register_kernel(f"{_LIB}::{name}", "cuda",
                                     backend.cuda_dispatcher(name, _contiguous_outputs(_REFERENCE_KERNELS[name])))
