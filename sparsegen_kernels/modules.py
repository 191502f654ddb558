"""Drop-in modules: :class:`TopK`, :class:`SparseUpsampleConv2d`, :class:`SparseConvTranspose2d`.

``TopK`` hands the compact form to a following sparse convolution, so nothing dense is materialised
between them.
"""
from __future__ import annotations

from typing import Optional

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
    or a dense ``[N, Cin, H, W]`` tensor and returns ``[N, Cout, 2H, 2W]``. When no gradient can reach
    the weight (inference, Langevin inference of the latents) and the same weight is used a second time,
    the folded weight is cached until the weight changes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True,
                 device=None, dtype=None):
        if kernel_size != 3:
            raise ValueError(f"SparseUpsampleConv2d supports kernel_size=3, got {kernel_size}")
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias, device=device, dtype=dtype)
        self._folded_cache: Optional[tuple] = None  # (weight key, folded weight)
        self._folded_seen: Optional[tuple] = None  # key of the last weight folded without caching

    def folded_weight(self) -> Tensor:
        """The folded ``[Cin, Cout, 4, 4]`` stride-2 transposed-conv weight (differentiable)."""
        return fold_upsample_weight(self.weight)

    def _cached_folded_weight(self) -> Optional[Tensor]:
        """The folded weight for a forward that cannot train the weight, else None (fold inside the op).

        The fold is cached from the second use of the same weight on (Langevin's steps reuse it), not on the
        first: a single no-grad forward (the critic step's samples) then leaves no 16/9-size copy of the weight
        alive (for the FC layer, 3200x512x16 floats). A forward that trains the weight drops the cache.
        """
        w = self.weight
        if torch.compiler.is_compiling():
            return None
        if torch.is_grad_enabled() and w.requires_grad:
            self._folded_cache = self._folded_seen = None
            return None
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._folded_cache is not None and self._folded_cache[0] == key:
            return self._folded_cache[1]
        self._folded_cache = None  # free a stale copy before folding the new one
        folded = fold_upsample_weight(w.detach())
        if self._folded_seen == key:
            self._folded_cache = (key, folded)
        self._folded_seen = key
        return folded

    def forward(self, inp) -> Tensor:  # type: ignore[override]
        return SF.sparse_upsample_conv2d(inp, self.weight, self.bias, folded_weight=self._cached_folded_weight())

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, upsample=2 (nearest), kernel_size=3, padding=1"


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
