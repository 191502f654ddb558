"""Public functional API: argument checking, then the ops of :mod:`sparsegen_kernels.ops`."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops
from .reference import FOLD_MATRIX, MODES, fold_upsample_weight, group_geometry
from .sparse_activation import SparseActivation

SparseOrDense = Union[SparseActivation, Tensor]


def _check_float_tensor(name: str, t: Tensor, ndim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, float16, bfloat16), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_same_device_dtype(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def _check_topk_args(x: Tensor, k: int, mode: str, bias: Optional[Tensor], relu: bool) -> None:
    _check_float_tensor("x", x, 4)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    N, C, H, W = x.shape
    _, size = group_geometry(mode, C, H, W)
    if not 1 <= k <= size:
        raise ValueError(f"k={k} is out of range for mode {mode!r}: the group size is {size} "
                         f"(x of shape {tuple(x.shape)}), so 1 <= k <= {size}")
    if bias is not None:
        _check_float_tensor("bias", bias, 1)
        if bias.shape[0] != C:
            raise ValueError(f"bias must have shape [{C}] (one per channel of x), got {tuple(bias.shape)}")
        _check_same_device_dtype("bias", bias, "x", x)
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")


def topk_compact(x: Tensor, k: int, mode: str = "spatial", bias: Optional[Tensor] = None,
                 relu: bool = False) -> SparseActivation:
    """Keep the ``k`` largest entries of ``relu?(x + bias)`` per group, in compact form.

    ``x [N, C, H, W]``, ``bias [C]`` -> :class:`SparseActivation` with ``values, indices [N, G, k]``.
    Ties go to the lower index inside the group. ``1 <= k <=`` group size.
    """
    _check_topk_args(x, k, mode, bias, relu)
    values, indices = ops.topk_compact(x, k, mode, bias, relu)
    return SparseActivation(values, indices, tuple(x.shape), mode)


def topk_mask(x: Tensor, k: int, mode: str = "spatial", bias: Optional[Tensor] = None,
              relu: bool = False) -> Tensor:
    """Dense top-k: ``relu?(x + bias)`` with all but the ``k`` largest entries of each group zeroed.

    ``x [N, C, H, W]``, ``bias [C]`` -> ``[N, C, H, W]`` (same dtype). Ties go to the lower index.
    """
    _check_topk_args(x, k, mode, bias, relu)
    out, _ = ops.topk_mask(x, k, mode, bias, relu)
    return out


def _pair(name: str, v) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return list(v)
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def _unpack_input(inp: SparseOrDense) -> tuple[Tensor, Optional[Tensor], str, list[int]]:
    """``(values, indices or None, mode, dense shape)`` of a compact or dense input."""
    if isinstance(inp, SparseActivation):
        _check_float_tensor("input values", inp.values, 3)
        return inp.values, inp.indices, inp.mode, list(inp.shape)
    if isinstance(inp, Tensor):
        _check_float_tensor("input", inp, 4)
        return inp, None, "spatial", list(inp.shape)
    raise TypeError(f"input must be a SparseActivation or a 4-d tensor, got {type(inp).__name__}")


def _check_conv_args(values: Tensor, in_shape: Sequence[int], weight: Tensor, bias: Optional[Tensor]) -> None:
    _check_float_tensor("weight", weight, 4)
    if weight.shape[0] != in_shape[1]:
        raise ValueError(f"weight [Cin, Cout, kh, kw] = {tuple(weight.shape)} does not match the input's "
                         f"{in_shape[1]} channels")
    _check_same_device_dtype("weight", weight, "input", values)
    if bias is not None:
        _check_float_tensor("bias", bias, 1)
        if bias.shape[0] != weight.shape[1]:
            raise ValueError(f"bias must have shape [{weight.shape[1]}] (one per output channel), "
                             f"got {tuple(bias.shape)}")
        _check_same_device_dtype("bias", bias, "input", values)


def sparse_conv_transpose2d(inp: SparseOrDense, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                            padding=0, output_padding=0) -> Tensor:
    """``F.conv_transpose2d(dense(inp), weight, bias, stride, padding, output_padding)``, skipping zeros.

    ``inp``: :class:`SparseActivation` or dense ``[N, Cin, H, W]`` (its zeros are skipped);
    ``weight [Cin, Cout, kh, kw]``; ``bias [Cout]`` -> ``[N, Cout, Ho, Wo]`` with
    ``Ho = (H - 1) * stride - 2 * padding + kh + output_padding``.
    """
    values, indices, mode, in_shape = _unpack_input(inp)
    _check_conv_args(values, in_shape, weight, bias)
    stride, padding, output_padding = _pair("stride", stride), _pair("padding", padding), \
        _pair("output_padding", output_padding)
    if min(stride) < 1 or min(padding) < 0 or min(output_padding) < 0:
        raise ValueError(f"need stride >= 1, padding >= 0, output_padding >= 0; got {stride}, {padding}, "
                         f"{output_padding}")
    if any(op >= s for op, s in zip(output_padding, stride)):
        raise ValueError(f"output_padding {output_padding} must be smaller than stride {stride}")
    for i in range(2):
        if (in_shape[2 + i] - 1) * stride[i] - 2 * padding[i] + weight.shape[2 + i] + output_padding[i] < 1:
            raise ValueError(f"padding {padding} leaves an empty output for input {in_shape} and weight "
                             f"{tuple(weight.shape)}")
    return ops.sparse_conv_transpose2d(values, indices, mode, in_shape, weight, bias, stride, padding,
                                       output_padding)


def sparse_upsample_conv2d(inp: SparseOrDense, weight: Tensor, bias: Optional[Tensor] = None,
                           scale_factor: int = 2, padding: int = 1, *,
                           folded_weight: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d(F.interpolate(dense(inp), scale_factor=2, mode="nearest"), weight, bias, padding=1)``.

    Computed as one stride-2 transposed conv with the folded 4x4 weight (never materialising the
    upsampled tensor). ``inp``: :class:`SparseActivation` or dense ``[N, Cin, H, W]``; ``weight
    [Cout, Cin, 3, 3]``; ``bias [Cout]`` -> ``[N, Cout, 2H, 2W]``. ``folded_weight`` may pass a
    precomputed :func:`~sparsegen_kernels.reference.fold_upsample_weight` of ``weight`` (no gradient
    then reaches ``weight`` through it).
    """
    if scale_factor != 2 or padding != 1:
        raise ValueError(f"sparse_upsample_conv2d supports scale_factor=2 with a 3x3 kernel and padding=1, "
                         f"got scale_factor={scale_factor}, padding={padding}")
    _check_float_tensor("weight", weight, 4)
    if tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [Cout, Cin, 3, 3], got {tuple(weight.shape)}")
    if folded_weight is not None:
        return sparse_conv_transpose2d(inp, folded_weight, bias, stride=2, padding=1)
    values, indices, mode, in_shape = _unpack_input(inp)
    _check_conv_args(values, in_shape, weight.transpose(0, 1), bias)
    return _FoldedUpsampleConv.apply(values, indices, mode, in_shape, weight, bias)


# Fold only the input channels the selection touches when they are at most this fraction of all channels.
TOUCHED_CHANNEL_FRACTION = 0.75


def _touched_channels(indices: Optional[Tensor], mode: str, in_shape: Sequence[int]):
    """``(channels, sub_indices, sub_shape)`` restricting a ``channel``/``global`` compact input to the input
    channels it selects, or None where that would not pay (spatial mode, dense input, most channels touched,
    or under ``torch.compile``, which cannot trace the data-dependent channel count).

    ``channels [U]`` (sorted) are the touched channels; ``sub_indices`` address the same entries of an input of
    ``sub_shape = [N, U, H, W]``.
    """
    if indices is None or mode == "spatial" or torch.compiler.is_compiling():
        return None
    N, C, H, W = in_shape
    # With as many picks as twice the channels, most channels are touched anyway (1 - e^-2 = 86% for uniform
    # picks): skip the count, which waits for the device, and never count while a CUDA graph is captured.
    if indices.numel() >= 2 * C or (indices.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    idx = indices.long()
    channel = idx if mode == "channel" else torch.div(idx, H * W, rounding_mode="floor")
    channels, inverse = torch.unique(channel, sorted=True, return_inverse=True)
    if channels.numel() > TOUCHED_CHANNEL_FRACTION * C:
        return None
    sub = inverse if mode == "channel" else inverse * (H * W) + idx % (H * W)
    return channels, sub.to(indices.dtype), [N, channels.numel(), H, W]


class _FoldedUpsampleConv(torch.autograd.Function):
    """Upsample-conv through the folded weight, keeping only the 3x3 weight for backward.

    Saving the 3x3 weight (a parameter, alive anyway) instead of the 16/9x larger folded 4x4 copy keeps
    backward memory to the compact input; the fold is recomputed in backward and its adjoint maps
    ``dweight4 -> dweight3``. For ``channel``/``global`` top-k (the FC layer: 8 of 3200 channels per
    position) only the input channels that were selected are folded, and only their gradient computed.
    """

    @staticmethod
    def forward(ctx, values, indices, mode, in_shape, weight3, bias):
        touched = _touched_channels(indices, mode, in_shape)
        if touched is None:
            channels, conv_indices, conv_shape, w3 = None, indices, in_shape, weight3
        else:
            channels, conv_indices, conv_shape = touched
            w3 = weight3.index_select(1, channels)
        ctx.mode, ctx.in_shape, ctx.conv_shape = mode, in_shape, conv_shape
        ctx.save_for_backward(values, conv_indices, weight3, channels)
        return ops.sparse_conv_transpose2d(values, conv_indices, mode, conv_shape, fold_upsample_weight(w3), bias,
                                           [2, 2], [1, 1], [0, 0])

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weight3, channels = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_values = grad_weight = grad_bias = None
        need_values, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[4], \
            ctx.needs_input_grad[5]
        w3 = weight3 if channels is None else weight3.index_select(1, channels)
        w4 = fold_upsample_weight(w3) if (need_values or need_weight) else None
        if need_values:
            if indices is not None:
                grad_values = ops.sparse_conv_transpose2d_input_grad(grad_out, indices, ctx.mode, ctx.conv_shape,
                                                                     w4, [2, 2], [1, 1])
            else:
                grad_values = torch.nn.functional.conv2d(grad_out, w4, stride=2, padding=1)
        if need_weight:
            grad_w4 = ops.sparse_conv_transpose2d_weight_grad(grad_out, values, indices, ctx.mode, ctx.conv_shape,
                                                              list(w4.shape), [2, 2], [1, 1])
            grad_weight = unfold_upsample_weight_grad(grad_w4)
            if channels is not None:
                grad_weight = weight3.new_zeros(weight3.shape).index_copy_(1, channels, grad_weight)
        if need_bias:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_values, None, None, None, grad_weight, grad_bias


def unfold_upsample_weight_grad(grad_weight4: Tensor) -> Tensor:
    """Adjoint of :func:`fold_upsample_weight`: ``dweight4 [Cin, Cout, 4, 4] -> dweight3 [Cout, Cin, 3, 3]``."""
    # dW3[o, i, y, x] = sum_jk A[j, y] A[k, x] dW4[i, o, j, k]: one [Cin*Cout, 16] x kron(A, A) [16, 9] product
    # (a view of the result in [Cout, Cin, 3, 3] order, Cin-major in memory).
    Cin, Cout = grad_weight4.shape[:2]
    A = grad_weight4.new_tensor(FOLD_MATRIX)
    g = grad_weight4.reshape(Cin * Cout, 16)
    return torch.matmul(g, torch.kron(A, A)).view(Cin, Cout, 3, 3).transpose(0, 1)
