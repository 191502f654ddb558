"""The modules a sparsified generator is made of: the top-k activations, and the convolutions that leave their bias
to the top-k after them. The ``nn.Sequential`` rewrite puts these in place of the dense modules; the graph rewrite
calls :func:`select` and the convolutions of :mod:`.runtime` from the generated ``forward``."""
from __future__ import annotations

from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as SF
from ..geometry import group_geometry
from ..modules import SparseConv2d, SparseConvTranspose2d, SparseUpsampleConv2d, compact_conv2d
from .sites import CONV, TRANSPOSED, UPSAMPLE
from .spec import check_k, check_mode, resolve_k

ACTIVATIONS = ("relu", "relu6", "leaky_relu", "none")


def select(x: Tensor, k, mode: str, bias: Optional[Tensor], activation: str, slope: float = 0.0,
           compact: bool = True):
    """The top-k of an activation's outputs: the ``k`` largest of ``act(x + bias)`` per group, the rest zeroed.

    ``activation``: ``"relu"`` (fused into the selection), ``"relu6"``, ``"leaky_relu"`` (``slope``) or ``"none"``
    (``x`` is already activated). ``k``: an int, or a float fraction of the group resolved for ``x``'s shape.
    Returns a :class:`~sparsegen_kernels.SparseActivation` (``compact``) or the masked dense tensor.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"a top-k activation expects a [N, C, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    _, size = group_geometry(mode, *x.shape[1:])
    kk = resolve_k(k, size)
    op = SF.topk_compact if compact else SF.topk_mask
    if activation == "relu":
        return op(x, kk, mode, bias, relu=True)
    if bias is not None:
        x = x + bias.view(1, -1, 1, 1)
    if activation == "leaky_relu":
        x = F.leaky_relu(x, slope)
    elif activation == "relu6":
        x = F.relu6(x)
    return op(x, kk, mode, None, relu=False)


class TopKActivation(nn.Module):
    """An activation of the ReLU family followed by a top-k: keeps the ``k`` largest *activation outputs* of
    ``act(x + bias)`` per group and zeroes the rest.

    ``activation``: ``"relu"``, ``"relu6"``, ``"leaky_relu"`` (with ``negative_slope``; negative outputs take
    part in the ranking like any other) or ``"none"`` (the input is already activated). ``forward(x [N, C, H, W])``
    -> :class:`~sparsegen_kernels.SparseActivation` (``compact=True``) or the dense masked tensor. ``k`` is an int
    (entries per group) or a float in (0, 1] (a fraction of the group size, resolved at each call so the module
    works at any resolution). When built by :func:`~sparsegen_kernels.sparsify` with a fused bias, ``bias`` is read
    from the preceding convolution (which then skips adding it).
    """

    def __init__(self, k: Union[int, float], mode: str = "spatial", activation: str = "relu",
                 negative_slope: float = 0.01, compact: bool = True, bias_from: Optional[nn.Module] = None,
                 bias_from_name: str = "", site: str = ""):
        super().__init__()
        check_k(type(self).__name__, k)
        check_mode(type(self).__name__, mode)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.k, self.mode, self.activation, self.compact = k, mode, activation, compact
        self.negative_slope = float(negative_slope) if activation == "leaky_relu" else 0.0
        # A plain reference, not a submodule: the bias stays registered (and saved) where it was.
        object.__setattr__(self, "_bias_from", bias_from)
        self.bias_from_name = bias_from_name
        self.site = site  # the site's name in the model sparsified (for error messages)

    def group_k(self, shape) -> int:
        """Entries kept per group for an input of ``shape = [N, C, H, W]``."""
        _, size = group_geometry(self.mode, *shape[1:])
        return resolve_k(self.k, size)

    def forward(self, x: Tensor):
        bias = None if self._bias_from is None else self._bias_from.bias
        try:
            return select(x, self.k, self.mode, bias, self.activation, self.negative_slope, self.compact)
        except ValueError as e:
            if not self.site:
                raise
            raise ValueError(f"site {self.site!r}: {e}") from None

    def _kind(self) -> str:
        return f"leaky_relu({self.negative_slope:g})" if self.activation == "leaky_relu" else self.activation

    def extra_repr(self) -> str:
        kind = "fraction of the group" if isinstance(self.k, float) else "per group"
        s = f"k={self.k} ({kind}), mode={self.mode!r}"
        if type(self) is TopKActivation:
            s += f", activation={self._kind()}"
        s += f", compact={self.compact}"
        return s + (f", bias of {self.bias_from_name!r}" if self._bias_from is not None else "")


class TopKReLU(TopKActivation):
    """``ReLU`` followed by a top-k: keeps the ``k`` largest of ``relu(x + bias)`` per group (the ReLU is fused
    into the selection). See :class:`TopKActivation`."""

    def __init__(self, k: Union[int, float], mode: str = "spatial", compact: bool = True,
                 bias_from: Optional[nn.Module] = None, bias_from_name: str = "", site: str = ""):
        super().__init__(k, mode, "relu", compact=compact, bias_from=bias_from, bias_from_name=bias_from_name,
                         site=site)


def topk_module(k, mode: str, activation: str, slope: float, bias_from=None, bias_from_name="",
                site: str = "") -> TopKActivation:
    if activation == "relu":
        return TopKReLU(k, mode, compact=True, bias_from=bias_from, bias_from_name=bias_from_name, site=site)
    return TopKActivation(k, mode, activation, slope, compact=True, bias_from=bias_from, bias_from_name=bias_from_name,
                          site=site)


# ---------------------------------------------------------------------------------------------------
# Convolutions whose bias the next top-k adds
# ---------------------------------------------------------------------------------------------------
_DEFERRED = ", bias added by the next top-k"


class _Conv2dBiasInTopK(nn.Conv2d):
    """``nn.Conv2d`` whose bias is added by the following :class:`TopKReLU` (fused into its selection)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, None)

    def extra_repr(self) -> str:
        return super().extra_repr() + _DEFERRED

    def _get_name(self) -> str:
        return "Conv2d"


class _ConvTranspose2dBiasInTopK(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose bias is added by the following :class:`TopKReLU`."""

    def forward(self, x: Tensor, output_size=None) -> Tensor:  # type: ignore[override]
        if output_size is not None:
            raise ValueError("a sparsified ConvTranspose2d does not take output_size; set output_padding instead")
        return F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)

    def extra_repr(self) -> str:
        return super().extra_repr() + _DEFERRED

    def _get_name(self) -> str:
        return "ConvTranspose2d"


class _SparseUpsampleConv2dBiasInTopK(SparseUpsampleConv2d):
    """:class:`SparseUpsampleConv2d` whose bias is added by the following :class:`TopKReLU`."""

    def forward(self, inp) -> Tensor:  # type: ignore[override]
        return SF.sparse_upsample_conv2d(inp, self.weight, None, folded_weight=self._reused_fold())

    def extra_repr(self) -> str:
        return super().extra_repr() + _DEFERRED

    def _get_name(self) -> str:
        return "SparseUpsampleConv2d"


class _SparseConvTranspose2dBiasInTopK(SparseConvTranspose2d):
    """:class:`SparseConvTranspose2d` whose bias is added by the following :class:`TopKReLU`."""

    def forward(self, inp, output_size=None) -> Tensor:  # type: ignore[override]
        if output_size is not None:
            raise ValueError("SparseConvTranspose2d does not take output_size; set output_padding instead")
        return SF.sparse_conv_transpose2d(inp, self.weight, None, self.stride, self.padding, self.output_padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + _DEFERRED

    def _get_name(self) -> str:
        return "SparseConvTranspose2d"


class _SparseConv2dBiasInTopK(SparseConv2d):
    """:class:`SparseConv2d` whose bias is added by the following :class:`TopKReLU`."""

    def forward(self, inp) -> Tensor:  # type: ignore[override]
        return compact_conv2d(inp, self.weight, None, self._pad)

    def extra_repr(self) -> str:
        return super().extra_repr() + _DEFERRED

    def _get_name(self) -> str:
        return "SparseConv2d"


BIAS_DEFERRED = (_Conv2dBiasInTopK, _ConvTranspose2dBiasInTopK, _SparseUpsampleConv2dBiasInTopK,
                 _SparseConvTranspose2dBiasInTopK, _SparseConv2dBiasInTopK)
# Modules of ours that tracing treats as opaque calls.
LEAVES = (TopKActivation, SparseUpsampleConv2d, SparseConvTranspose2d, SparseConv2d) + BIAS_DEFERRED


def _share_params(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` (built on the meta device) the very ``Parameter`` objects of ``old``."""
    new.weight = old.weight
    if old.bias is None:
        new.register_parameter("bias", None)
    else:
        new.bias = old.bias
    new.train(old.training)
    return new


def rebuild_conv(old: nn.Module, kind: Optional[str], bias_in_topk: bool) -> nn.Module:
    """A replacement for the conv ``old`` sharing its parameters: taking a compact input when ``kind`` is
    ``"upsample"`` / ``"conv"`` / ``"transposed"`` (None: its input stays dense) and leaving its bias to the next
    top-k when ``bias_in_topk``."""
    kw = dict(bias=old.bias is not None, device="meta", dtype=old.weight.dtype)
    if isinstance(old, SparseUpsampleConv2d) or kind == UPSAMPLE:
        cls = _SparseUpsampleConv2dBiasInTopK if bias_in_topk else SparseUpsampleConv2d
        return _share_params(cls(old.in_channels, old.out_channels, 3, **kw), old)
    if isinstance(old, nn.ConvTranspose2d):
        if kind == TRANSPOSED or isinstance(old, SparseConvTranspose2d):
            cls = _SparseConvTranspose2dBiasInTopK if bias_in_topk else SparseConvTranspose2d
        else:
            cls = _ConvTranspose2dBiasInTopK
        return _share_params(cls(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                 old.output_padding, old.groups, dilation=old.dilation,
                                 padding_mode=old.padding_mode, **kw), old)
    if kind == CONV or isinstance(old, SparseConv2d):
        cls = _SparseConv2dBiasInTopK if bias_in_topk else SparseConv2d
    else:
        cls = _Conv2dBiasInTopK
    return _share_params(cls(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                             old.dilation, old.groups, padding_mode=old.padding_mode, **kw), old)
