"""Public functional API: argument checking, then the ops of :mod:`sparsegen_kernels.ops`."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops
from .geometry import MODES, conv_transpose_output_size, group_geometry
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
    # Under autocast the ops cast their floating inputs to one dtype themselves (see ops.py).
    if t.dtype != ref.dtype and not torch.is_autocast_enabled(ref.device.type):
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


def _check_conv_args(values: Tensor, in_shape: Sequence[int], weight: Tensor, bias: Optional[Tensor],
                     transposed: bool = True) -> None:
    """The weight (``[Cin, Cout, kh, kw]`` when ``transposed``, else ``[Cout, Cin, kh, kw]``) and bias of a conv of an
    input of ``in_shape`` whose values are ``values``."""
    _check_float_tensor("weight", weight, 4)
    cin, cout = (0, 1) if transposed else (1, 0)
    if weight.shape[cin] != in_shape[1]:
        layout = "[Cin, Cout, kh, kw]" if transposed else "[Cout, Cin, kh, kw]"
        raise ValueError(f"weight {layout} = {tuple(weight.shape)} does not match the input's {in_shape[1]} channels")
    _check_same_device_dtype("weight", weight, "input", values)
    if bias is not None:
        _check_float_tensor("bias", bias, 1)
        if bias.shape[0] != weight.shape[cout]:
            raise ValueError(f"bias must have shape [{weight.shape[cout]}] (one per output channel), "
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
        if conv_transpose_output_size(in_shape[2 + i], weight.shape[2 + i], stride[i], padding[i],
                                      output_padding[i]) < 1:
            raise ValueError(f"padding {padding} leaves an empty output for input {in_shape} and weight "
                             f"{tuple(weight.shape)}")
    return ops.sparse_conv_transpose2d(values, indices, mode, in_shape, weight, bias, stride, padding,
                                       output_padding)


def sparse_upsample_conv2d(inp: SparseOrDense, weight: Tensor, bias: Optional[Tensor] = None,
                           scale_factor: int = 2, padding: int = 1, *,
                           folded_weight: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d(F.interpolate(dense(inp), scale_factor=2, mode="nearest"), weight, bias, padding=1)``.

    Never materialises the upsampled tensor: the kernels run a stride-2 transposed conv with the folded 4x4
    weight, or, after a very sparse channel top-k (the FC layer), work on the 3x3 weight directly.
    ``inp``: :class:`SparseActivation` or dense ``[N, Cin, H, W]``; ``weight [Cout, Cin, 3, 3]``;
    ``bias [Cout]`` -> ``[N, Cout, 2H, 2W]``. ``folded_weight`` may pass a precomputed
    :func:`~sparsegen_kernels.fold_upsample_weight` of ``weight`` (no gradient then reaches ``weight``
    through it).
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
    _check_conv_args(values, in_shape, weight, bias, transposed=False)
    return ops.sparse_upsample_conv2d(values, indices, mode, in_shape, weight, bias)


def sparse_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, padding=0) -> Tensor:
    """Stride-1 ``F.conv2d(input, weight, bias, padding=padding)`` that skips the exact zeros of ``input``.

    ``input [N, Cin, H, W]`` (dense; typically an activation's output), ``weight [Cout, Cin, kh, kw]``,
    ``bias [Cout]`` -> ``[N, Cout, H + 2 * ph - kh + 1, W + 2 * pw - kw + 1]``. On the CPU the sparse kernel runs
    where the input is sparse enough to beat the dense convolution (:func:`sparsegen_kernels.ops.
    sparse_conv2d_crossover`), the dense one elsewhere; on a GPU this is cuDNN's convolution. The gradient
    with respect to ``input`` is the convolution's exact (dense) gradient.
    """
    _check_float_tensor("input", input, 4)
    _check_conv_args(input, input.shape, weight, bias, transposed=False)
    padding = _pair("padding", padding)
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    for i in range(2):
        if input.shape[2 + i] + 2 * padding[i] - weight.shape[2 + i] + 1 < 1:
            raise ValueError(f"padding {padding} leaves an empty output for input {tuple(input.shape)} and weight "
                             f"{tuple(weight.shape)}")
    return ops.sparse_conv2d(input, weight, bias, padding)
