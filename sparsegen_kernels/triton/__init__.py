"""Triton kernels of the sparsegen ops (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

Every provider takes the arguments of its ``sparsegen::<op>`` schema (``csrc/sparsegen.cpp``) in schema
order and returns what the schema returns. :data:`PROVIDERS` maps op names to them; it is empty when
Triton is not available, and importing this package never fails for lack of Triton or of a GPU.

* ``topk_compact(x, k, mode, bias, relu) -> (values [N, G, k], indices [N, G, k])``
* ``topk_mask(x, k, mode, bias, relu) -> (out [N, C, H, W], indices [N, G, k])``
* ``compact_to_dense(values, indices, mode, shape) -> [N, C, H, W]``
* ``compact_gather(dense, indices, mode) -> [N, G, k]``
* ``sparse_conv_transpose2d(values, indices, mode, in_shape, weight, bias, stride, padding, output_padding)``
* ``sparse_conv_transpose2d_input_grad(grad_out, indices, mode, in_shape, weight, stride, padding) -> [N, G, k]``
* ``sparse_conv_transpose2d_weight_grad(grad_out, values, indices, mode, in_shape, weight_shape, stride,
  padding) -> [Cin, Cout, kh, kw]``
* ``sparse_upsample_conv2d(values, indices, mode, in_shape, weight, bias) -> [N, Cout, 2H, 2W]``
* ``sparse_upsample_conv2d_input_grad(grad_out, indices, mode, in_shape, weight) -> [N, G, k]``
* ``sparse_upsample_conv2d_weight_grad(grad_out, values, indices, mode, in_shape) -> [Cout, Cin, 3, 3]``

The kernels are defined whenever the ``triton`` package imports (also on a machine without a GPU, where
they run on CPU tensors under ``TRITON_INTERPRET=1``); whether a GPU can run them is for the caller to
ask (``torch.utils._triton.has_triton()``). Whether ``TRITON_INTERPRET=1`` applies is decided when the
kernel modules are first imported.
"""
from __future__ import annotations

from torch.utils._triton import has_triton_package

PROVIDERS: dict = {}
__all__ = ["PROVIDERS"]

if has_triton_package():
    from .layout import compact_gather, compact_to_dense
    from .sparse_conv import (
        sparse_conv_transpose2d,
        sparse_conv_transpose2d_input_grad,
        sparse_conv_transpose2d_weight_grad,
    )
    from .topk import topk_compact, topk_mask
    from .upsample_conv import (
        sparse_upsample_conv2d,
        sparse_upsample_conv2d_input_grad,
        sparse_upsample_conv2d_weight_grad,
    )

    PROVIDERS.update(
        topk_compact=topk_compact,
        topk_mask=topk_mask,
        compact_to_dense=compact_to_dense,
        compact_gather=compact_gather,
        sparse_conv_transpose2d=sparse_conv_transpose2d,
        sparse_conv_transpose2d_input_grad=sparse_conv_transpose2d_input_grad,
        sparse_conv_transpose2d_weight_grad=sparse_conv_transpose2d_weight_grad,
        sparse_upsample_conv2d=sparse_upsample_conv2d,
        sparse_upsample_conv2d_input_grad=sparse_upsample_conv2d_input_grad,
        sparse_upsample_conv2d_weight_grad=sparse_upsample_conv2d_weight_grad,
    )
    __all__ += list(PROVIDERS)
