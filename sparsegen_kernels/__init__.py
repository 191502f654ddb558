"""sparsegen_kernels: kernels that make top-k sparsified activations skip their zeros.

Fused bias + ReLU + top-k selection (``spatial`` / ``channel`` / ``global`` groups) with a compact output
(:class:`SparseActivation`), and transposed / upsample convolutions whose work is proportional to the
surviving entries. CPU (C++/OpenMP), CUDA (C++) and Triton backends behind ``torch.ops.sparsegen``.

    import sparsegen_kernels as sk
    sa = sk.topk_compact(x, k=16, mode="spatial", bias=b, relu=True)    # SparseActivation
    y = sk.sparse_upsample_conv2d(sa, weight3, bias3)                    # == conv2d(up2(dense(sa)), ...)
"""
from . import ops as _ops
from .backend import get_backend, set_backend
from .ops import cpu_reference_fallbacks
from .functional import sparse_conv2d, sparse_conv_transpose2d, sparse_upsample_conv2d, topk_compact, topk_mask
from .modules import SparseConv2d, SparseConvTranspose2d, SparseUpsampleConv2d, TopK, fold_cache
from .geometry import fold_upsample_weight
from .sparse_activation import SparseActivation
from .sparsify import SparsifyWarning, TopKActivation, TopKReLU, sparsify, sparsify_report, sparsify_sites

_ops.register()

__all__ = [
    "SparseActivation",
    "SparseConv2d",
    "SparseConvTranspose2d",
    "SparseUpsampleConv2d",
    "SparsifyWarning",
    "TopK",
    "TopKActivation",
    "TopKReLU",
    "cpu_reference_fallbacks",
    "fold_cache",
    "fold_upsample_weight",
    "get_backend",
    "set_backend",
    "sparse_conv2d",
    "sparse_conv_transpose2d",
    "sparse_upsample_conv2d",
    "sparsify",
    "sparsify_report",
    "sparsify_sites",
    "topk_compact",
    "topk_mask",
]
__version__ = "0.1.0"
