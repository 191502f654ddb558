"""The calls a rewritten ``forward`` makes at a site. Every weight is read at each call (a parametrised weight is
recomputed, the spectral / weight norm pre-hooks of the hook API are run): nothing is cached across calls, so no
edit of the parameters -- ``.data``, ``copy_``, ``load_state_dict``, an optimizer step, ``.to()`` -- can be missed.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as SF
from ..modules import SparseConv2d, SparseConvTranspose2d, SparseUpsampleConv2d, conv2d_zero_padding, compact_conv2d
from ..sparse_activation import SparseActivation
from .layers import select
from .sites import CONV, TRANSPOSED, UPSAMPLE, REPARAM_HOOKS, is_parametrized


class SparsifyWarning(UserWarning):
    """Part of a generator stays dense: a submodule could not be traced, or an activation -> conv chain cannot run
    on the sparse kernels. :func:`~sparsegen_kernels.sparsify_report` gives the details."""


def topk_site(x: Tensor, bias: Optional[Tensor], k, mode: str, activation: str, slope: float, name: str):
    """The top-k of the activation at site ``name`` (compact form)."""
    try:
        return select(x, k, mode, bias, activation, slope, compact=True)
    except ValueError as e:
        raise ValueError(f"site {name!r}: {e}") from None


def module_weight(m: nn.Module) -> Tensor:
    """``m.weight`` as ``m``'s own call would see it: the spectral / weight norm pre-hooks (hook API) recompute it
    first; a parametrised weight (``torch.nn.utils.parametrize``) is computed by reading it, once."""
    for hook in list(m._forward_pre_hooks.values()):
        if isinstance(hook, REPARAM_HOOKS):
            hook(m, ())
    return m.weight


def module_conv(m: nn.Module, inp, kind: str, bias: bool = True) -> Tensor:
    """Run the conv module ``m`` on ``inp``: sparsely (``kind`` ``"upsample"``: nearest x2 + 3x3 conv, ``"conv"``:
    stride-1 conv, ``"transposed"``), or as ``m`` itself would (``"dense"``); without its bias when ``bias`` is
    False (the next top-k adds it)."""
    w = module_weight(m)
    b = m.bias if bias else None
    if kind == UPSAMPLE or (kind == "dense" and isinstance(m, SparseUpsampleConv2d)):
        folded = m._reused_fold() if isinstance(m, SparseUpsampleConv2d) and not is_parametrized(m) else None
        return SF.sparse_upsample_conv2d(inp, w, b, folded_weight=folded)
    if kind == CONV or (kind == "dense" and isinstance(m, SparseConv2d)):
        return compact_conv2d(inp, w, b, conv2d_zero_padding(tuple(m.kernel_size), m.padding))
    if kind == TRANSPOSED or (kind == "dense" and isinstance(m, SparseConvTranspose2d)):
        return SF.sparse_conv_transpose2d(inp, w, b, m.stride, m.padding, m.output_padding)
    if isinstance(m, nn.ConvTranspose2d):
        return F.conv_transpose2d(inp, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    return m._conv_forward(inp, w, b)


def _dense(inp) -> Tensor:
    return inp.to_dense() if isinstance(inp, SparseActivation) else inp


def functional_conv(inp, weight: Tensor, bias: Optional[Tensor], kind: str, stride, padding, output_padding,
                    dilation, groups, name: str) -> Tensor:
    """A functional ``conv2d`` (``kind`` ``"upsample"`` after a nearest x2 upsampling, ``"conv"``, ``"dense"``) or
    ``conv_transpose2d`` (``"transposed"``, ``"dense_transposed"``) call at a site. The weight's kernel size is
    known only now: a kernel the sparse kernels cannot take is run dense on the masked activation (same result),
    with a warning."""
    if kind == TRANSPOSED:
        return SF.sparse_conv_transpose2d(inp, weight, bias, stride, padding, output_padding)
    if kind == "dense_transposed":
        return F.conv_transpose2d(inp, weight, bias, stride, padding, output_padding, groups, dilation)
    if kind == "dense":
        return F.conv2d(inp, weight, bias, stride, padding, dilation, groups)
    ks = tuple(weight.shape[2:])
    if kind == UPSAMPLE:
        if ks == (3, 3) and conv2d_zero_padding(ks, padding) == (1, 1):
            return SF.sparse_upsample_conv2d(inp, weight, bias)
        _dense_fallback(name, f"a {ks} kernel with padding {padding} after the upsampling (needs 3x3, padding 1)")
        return F.conv2d(F.interpolate(_dense(inp), scale_factor=2, mode="nearest"), weight, bias, 1, padding)
    pad = conv2d_zero_padding(ks, padding)
    if pad is None:
        _dense_fallback(name, f"padding {padding} with a {ks} kernel")
        return F.conv2d(_dense(inp), weight, bias, 1, padding)
    return compact_conv2d(inp, weight, bias, pad)


def _dense_fallback(name: str, why: str) -> None:
    warnings.warn(f"sparsify: the conv after site {name!r} runs dense: {why}", SparsifyWarning, stacklevel=3)
