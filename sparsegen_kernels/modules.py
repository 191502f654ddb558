"""Drop-in modules: :class:`TopK`, :class:`SparseUpsampleConv2d`, :class:`SparseConvTranspose2d`.

``TopK`` hands the compact form to a following sparse convolution, so nothing dense is materialised
between them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from . import functional as SF
from .geometry import fold_upsample_weight
from .sparse_activation import SparseActivation


class TopK(nn.Module):
    """Keep the ``k`` largest activations per group (``mode``: ``spatial``, ``channel`` or ``global``).

    ``forward(x [N, C, H, W], bias=None)`` selects on ``relu?(x + bias)`` and returns a
    :class:`SparseActivation` (``compact=True``) or the dense masked tensor (``compact=False``).
    """

    def __init__(self, k: int, mode: str = "spatial", relu: bool = False, compact: bool = True):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if mode not in ("spatial", "channel", "global"):
            raise ValueError(f"unknown mode {mode!r}; expected 'spatial', 'channel' or 'global'")
        self.k, self.mode, self.relu, self.compact = k, mode, relu, compact

    def forward(self, x: Tensor, bias: Optional[Tensor] = None):
        if self.compact:
            return SF.topk_compact(x, self.k, self.mode, bias, self.relu)
        return SF.topk_mask(x, self.k, self.mode, bias, self.relu)

    def extra_repr(self) -> str:
        return f"k={self.k}, mode={self.mode!r}, relu={self.relu}, compact={self.compact}"


class SparseUpsampleConv2d(nn.Conv2d):
    """Nearest x2 upsampling followed by a 3x3 convolution (padding 1), skipping zero inputs.

    Same parameters and ``state_dict`` as ``nn.Conv2d(in_channels, out_channels, 3, padding=1)``:
    ``weight [Cout, Cin, 3, 3]``, ``bias [Cout]``. ``forward(inp)`` takes a :class:`SparseActivation`
    or a dense ``[N, Cin, H, W]`` tensor and returns ``[N, Cout, 2H, 2W]``. The weight is read afresh at every
    call; inside :func:`fold_cache` a forward that cannot train the weight reuses one fold of it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True,
                 device=None, dtype=None):
        if kernel_size != 3:
            raise ValueError(f"SparseUpsampleConv2d supports kernel_size=3, got {kernel_size}")
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias, device=device, dtype=dtype)
        self._fold_cached = False  # inside fold_cache(...)
        self._folded: Optional[Tensor] = None  # the fold reused there

    def folded_weight(self) -> Tensor:
        """The folded ``[Cin, Cout, 4, 4]`` stride-2 transposed-conv weight (differentiable)."""
        return fold_upsample_weight(self.weight)

    def _reused_fold(self) -> Optional[Tensor]:
        """Inside :func:`fold_cache`, for a forward that cannot train the weight: the weight folded once for the
        block. Otherwise None: the op folds (or reads the 3x3 weight) itself."""
        if not self._fold_cached or (torch.is_grad_enabled() and self.weight.requires_grad):
            return None
        if self._folded is None:
            self._folded = fold_upsample_weight(self.weight.detach())
        return self._folded

    def forward(self, inp) -> Tensor:  # type: ignore[override]
        return SF.sparse_upsample_conv2d(inp, self.weight, self.bias, folded_weight=self._reused_fold())

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, upsample=2 (nearest), kernel_size=3, padding=1"


@contextlib.contextmanager
def fold_cache(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every :class:`SparseUpsampleConv2d` in ``module`` folds its weight once and reuses the
    fold in the forwards that cannot train the weight (no grad, or a frozen weight: inference and Langevin
    inference of the latents, where the FC layer's fold would otherwise be redone at every step).

    The weights must not change inside the block (no optimizer step, ``.data`` edit, ``load_state_dict`` or
    ``.to()``): the fold is not checked against them. Leaving the block drops the folds. Blocks nest.

        with sk.fold_cache(generator), torch.no_grad():
            images = [generator(z) for z in latents]
    """
    layers = [m for m in module.modules() if isinstance(m, SparseUpsampleConv2d)]
    outer = [m._fold_cached for m in layers]
    for m in layers:
        m._fold_cached = True
    try:
        yield module
    finally:
        for m, was in zip(layers, outer):
            m._fold_cached = was
            if not was:
                m._folded = None


class SparseConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (same constructor and parameters) that accepts a :class:`SparseActivation`.

    ``forward(inp)``: compact or dense ``[N, Cin, H, W]`` -> ``[N, Cout, Ho, Wo]``; zeros are skipped.
    Supports ``groups=1``, ``dilation=1``, ``padding_mode="zeros"``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.groups != 1 or tuple(self.dilation) != (1, 1) or self.padding_mode != "zeros":
            raise ValueError("SparseConvTranspose2d supports groups=1, dilation=1 and padding_mode='zeros'")

    def forward(self, inp, output_size=None) -> Tensor:  # type: ignore[override]
        if output_size is not None:
            raise ValueError("SparseConvTranspose2d does not take output_size; set output_padding instead")
        return SF.sparse_conv_transpose2d(inp, self.weight, self.bias, self.stride, self.padding,
                                          self.output_padding)


def compact_conv2d(inp, weight: Tensor, bias: Optional[Tensor] = None, padding=(0, 0)) -> Tensor:
    """``F.conv2d(dense(inp), weight, bias, stride=1, padding=padding)``, skipping the zeros of ``inp``.

    A stride-1 convolution is the transposed convolution of the flipped, transposed weight with padding
    ``kernel - 1 - padding``; ``0 <= padding <= kernel - 1`` per dimension. ``weight [Cout, Cin, kh, kw]``.
    """
    kh, kw = weight.shape[2:]
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    if not (0 <= ph <= kh - 1 and 0 <= pw <= kw - 1):
        raise ValueError(f"compact_conv2d needs 0 <= padding <= kernel - 1, got padding {(ph, pw)} for a "
                         f"{(kh, kw)} kernel")
    # [Cin, Cout, kh, kw] over [Cin, kh, kw, Cout] storage: output channels contiguous, as the kernels read them.
    flipped = weight.flip(2, 3).permute(1, 2, 3, 0).contiguous().permute(0, 3, 1, 2)
    return SF.sparse_conv_transpose2d(inp, flipped, bias, stride=1, padding=(kh - 1 - ph, kw - 1 - pw))


class SparseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with stride 1 (same constructor and parameters) that accepts a :class:`SparseActivation`.

    ``forward(inp)``: compact ``inp`` -> :func:`compact_conv2d` on the surviving entries; dense ``[N, Cin, H, W]``
    -> :func:`~sparsegen_kernels.sparse_conv2d` (skips its exact zeros). Supports stride 1, ``dilation=1``,
    ``groups=1``, zero padding with ``0 <= padding <= kernel - 1`` (``"same"`` for odd kernels, ``"valid"``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pad = _stride1_padding(self)
        if self._pad is None:
            raise ValueError("SparseConv2d supports stride 1, dilation 1, groups 1, padding_mode='zeros' and "
                             "0 <= padding <= kernel - 1 ('same' with odd kernels)")

    def forward(self, inp) -> Tensor:  # type: ignore[override]
        if isinstance(inp, Tensor):
            return SF.sparse_conv2d(inp, self.weight, self.bias, self._pad)
        return compact_conv2d(inp, self.weight, self.bias, self._pad)


def _stride1_padding(m: nn.Conv2d):
    """The zero padding per dimension of a stride-1 conv the sparse kernels can compute, or None."""
    if tuple(m.stride) != (1, 1) or tuple(m.dilation) != (1, 1) or m.groups != 1 or m.padding_mode != "zeros":
        return None
    return conv2d_zero_padding(tuple(m.kernel_size), m.padding)


def conv2d_zero_padding(kernel_size, padding):
    """``padding`` of a stride-1 conv as a pair, or None where :func:`compact_conv2d` cannot take it ("same" with an
    even kernel pads unevenly; padding beyond ``kernel - 1`` reads only zeros at the border)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        return None if any(k % 2 == 0 for k in kernel_size) else tuple(k // 2 for k in kernel_size)
    pad = tuple(padding) if isinstance(padding, (tuple, list)) else (padding, padding)
    return pad if all(0 <= p <= k - 1 for p, k in zip(pad, kernel_size)) else None
