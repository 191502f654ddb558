"""Pure-PyTorch references: the executable definition of every op's semantics.

Each ``*_ref`` here is shared by the tests (as the independent reference), by the benchmarks (as the
dense baseline) and by the package as its last-resort fallback when no compiled backend is present. They are
written from the semantics alone and import nothing from the package (the geometry the kernels use lives in
:mod:`sparsegen_kernels.geometry`).
Shapes: ``x`` is ``[N, C, H, W]``; a compact activation is ``values, indices`` of shape ``[N, G, k]``
(see :mod:`sparsegen_kernels.sparse_activation` for the grouping modes).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

MODES = ("spatial", "channel", "global")


def _group_count_and_size(mode: str, C: int, H: int, W: int) -> tuple[int, int]:
    sizes = {"spatial": (C, H * W), "channel": (H * W, C), "global": (1, C * H * W)}
    if mode not in sizes:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return sizes[mode]


def to_groups(x: torch.Tensor, mode: str) -> torch.Tensor:
    """``[N, C, H, W] -> [N, G, group_size]`` in the group's index order."""
    N, C, H, W = x.shape
    if mode == "spatial":
        return x.reshape(N, C, H * W)
    if mode == "channel":
        return x.reshape(N, C, H * W).transpose(1, 2)
    if mode == "global":
        return x.reshape(N, 1, C * H * W)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def from_groups(g: torch.Tensor, mode: str, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_groups`: ``[N, G, group_size] -> [N, C, H, W]``."""
    N, C, H, W = shape
    if mode == "channel":
        return g.transpose(1, 2).reshape(N, C, H, W)
    return g.reshape(N, C, H, W)


def preactivation_ref(x: torch.Tensor, bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """``relu?(x + bias[None, :, None, None])``: what the top-k selects on."""
    if bias is not None:
        x = x + bias.view(1, -1, 1, 1)
    return torch.relu(x) if relu else x


def topk_compact_ref(x: torch.Tensor, k: int, mode: str = "spatial", bias: Optional[torch.Tensor] = None,
                     relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact top-k: ``values, indices`` of shape ``[N, G, k]``, entries in ascending index order.

    Keeps the ``k`` largest entries of ``relu?(x + bias)`` per group; among equal values the lower
    index wins (a stable descending sort). Differentiable in ``x`` and ``bias``.
    """
    y = preactivation_ref(x, bias, relu)
    g = to_groups(y, mode)
    # Stable descending sort: equal values keep ascending index order, so the lower index wins.
    order = torch.sort(g.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
    idx = torch.sort(order, dim=-1).values
    values = torch.gather(g, -1, idx)
    return values, idx.to(torch.int16 if g.shape[-1] <= 32767 else torch.int32)


def compact_to_dense_ref(values: torch.Tensor, indices: torch.Tensor, mode: str,
                         shape: Sequence[int]) -> torch.Tensor:
    """Scatter ``values`` at ``indices`` into zeros of ``shape = [N, C, H, W]``."""
    N, C, H, W = shape
    G, size = _group_count_and_size(mode, C, H, W)
    g = values.new_zeros(N, G, size).scatter(-1, indices.long(), values)
    return from_groups(g, mode, shape)


def compact_gather_ref(dense: torch.Tensor, indices: torch.Tensor, mode: str) -> torch.Tensor:
    """Gather ``dense [N, C, H, W]`` at compact ``indices [N, G, k]``."""
    return torch.gather(to_groups(dense, mode), -1, indices.long())


def topk_mask_ref(x: torch.Tensor, k: int, mode: str = "spatial", bias: Optional[torch.Tensor] = None,
                  relu: bool = False) -> torch.Tensor:
    """Dense top-k: ``relu?(x + bias)`` with all but the k largest entries of each group set to zero."""
    values, indices = topk_compact_ref(x, k, mode, bias, relu)
    return compact_to_dense_ref(values, indices, mode, x.shape)


def sparse_conv_transpose2d_ref(dense_input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                                stride=1, padding=0, output_padding=0) -> torch.Tensor:
    """``F.conv_transpose2d`` of the dense input: what :func:`sparse_conv_transpose2d` must equal."""
    return F.conv_transpose2d(dense_input, weight, bias, stride=stride, padding=padding,
                              output_padding=output_padding)


def sparse_upsample_conv2d_ref(dense_input: torch.Tensor, weight3: torch.Tensor, bias: Optional[torch.Tensor] = None,
                               scale_factor: int = 2, padding: int = 1) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor, "nearest"), weight3, bias, padding)``: the dense baseline."""
    up = F.interpolate(dense_input, scale_factor=scale_factor, mode="nearest")
    return F.conv2d(up, weight3, bias, padding=padding)
