"""Production geometry of the ops: grouping modes, index dtypes, transposed-conv output sizes, and the fold of
nearest-x2 upsampling into a 3x3 convolution (with its adjoint).

The fold: ``conv2d(interpolate(x, 2, "nearest"), W3, padding=1) == conv_transpose2d(x, fold(W3), stride=2,
padding=1)``: output phase ``r`` of a row reads input rows ``i - 1 + r``..; the three taps of the 3x3 kernel
collapse onto the 4 taps of the folded kernel as the rows of :data:`FOLD_MATRIX` (tap ``j`` of the 4x4 kernel
sums the 3x3 taps ``y`` with ``A[j, y] = 1``). Within one output phase the 4 folded taps partition the 9 original
ones, which is why the fold saves 2.25x of the MACs.

The references that define what the ops compute are elsewhere (:mod:`sparsegen_kernels.reference`) and share
no code with this module.
"""
from __future__ import annotations

import torch

MODES = ("spatial", "channel", "global")
FOLD_MATRIX = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def group_geometry(mode: str, C: int, H: int, W: int) -> tuple[int, int]:
    """``(G, group_size)`` of top-k ``mode`` on an ``[N, C, H, W]`` input: spatial ``(C, H*W)``, channel
    ``(H*W, C)``, global ``(1, C*H*W)``."""
    if mode == "spatial":
        return C, H * W
    if mode == "channel":
        return H * W, C
    if mode == "global":
        return 1, C * H * W
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def index_dtype(group_size: int) -> torch.dtype:
    """Dtype of compact indices: int16 where every index inside a group fits, else int32."""
    return torch.int16 if group_size <= 32767 else torch.int32


def conv_transpose_output_size(size: int, kernel: int, stride: int, padding: int, output_padding: int = 0) -> int:
    """Output length of a transposed convolution along one axis: ``(size - 1) * stride - 2 * padding + kernel
    + output_padding``."""
    return (size - 1) * stride - 2 * padding + kernel + output_padding


def _kron_fold_matrix(like: torch.Tensor) -> torch.Tensor:
    """``kron(A, A)`` ``[16, 9]`` of :data:`FOLD_MATRIX` on ``like``'s device and dtype.

    ``A[j, y] = 1`` exactly where ``j + y`` is 2 or 3, so the matrix is built on the device from index
    arithmetic: no host-to-device copy, hence no host synchronisation (CUDA graphs can capture it).
    """
    r = torch.arange(16, device=like.device).view(16, 1)
    c = torch.arange(9, device=like.device).view(1, 9)
    rows, cols = r // 4 + c // 3, r % 4 + c % 3
    return (((rows == 2) | (rows == 3)) & ((cols == 2) | (cols == 3))).to(like.dtype)


def fold_upsample_weight(weight3: torch.Tensor) -> torch.Tensor:
    """Fold nearest-x2 upsampling into a 3x3 conv weight.

    ``weight3 [Cout, Cin, 3, 3]`` (``nn.Conv2d`` layout) -> ``weight4 [Cin, Cout, 4, 4]``
    (``nn.ConvTranspose2d`` layout) such that
    ``conv_transpose2d(x, weight4, stride=2, padding=1) == conv2d(interpolate(x, 2, "nearest"), weight3, padding=1)``.
    Differentiable, so autograd maps ``dweight4`` back to ``dweight3``. The result is laid out
    channels-last over ``Cout`` in memory (``[Cin, 4, 4, Cout]`` storage), which is the layout the
    kernels read without a copy.
    """
    if weight3.dim() != 4 or tuple(weight3.shape[2:]) != (3, 3):
        raise ValueError(f"fold_upsample_weight expects a [Cout, Cin, 3, 3] weight, got {tuple(weight3.shape)}")
    Cout, Cin = weight3.shape[:2]
    # W4[i, j, k, o] = sum_yx A[j, y] A[k, x] W3[o, i, y, x]: the weight laid out [Cin, 9, Cout] (one copy), then
    # one batched product with kron(A, A) [16, 9]. On a GPU its K = 9 keeps cuBLAS on unaligned GEMM kernels
    # (bfloat16, 3200x512 weight on an H200: 184 us, the same as the product over strided operands).
    wt = weight3.permute(1, 2, 3, 0).reshape(Cin, 9, Cout)
    w = torch.matmul(_kron_fold_matrix(weight3), wt)  # [Cin, 16, Cout]
    return w.view(Cin, 4, 4, Cout).permute(0, 3, 1, 2)  # [Cin, Cout, 4, 4] view of [Cin, 4, 4, Cout] storage


def unfold_upsample_weight_grad(grad_weight4: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`fold_upsample_weight`: ``dweight4 [Cin, Cout, 4, 4] -> dweight3 [Cout, Cin, 3, 3]``
    (contiguous)."""
    # dW3[o, i, y, x] = sum_jk A[j, y] A[k, x] dW4[i, o, j, k]: one [Cin*Cout, 16] x kron(A, A) [16, 9] product.
    Cin, Cout = grad_weight4.shape[:2]
    g = grad_weight4.reshape(Cin * Cout, 16)
    return torch.matmul(g, _kron_fold_matrix(grad_weight4)).view(Cin, Cout, 3, 3).transpose(0, 1).contiguous()
