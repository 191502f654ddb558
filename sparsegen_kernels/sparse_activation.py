"""The compact form of a top-k activation."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .geometry import group_geometry


class SparseActivation(NamedTuple):
    """A top-k activation in compact form: only the surviving entries of each group.

    ``values [N, G, k]`` (dtype of the dense activation) and ``indices [N, G, k]`` (int16 where the group
    size fits, else int32) hold, per group, the surviving entries in ascending index order; ``shape`` is the
    dense ``(N, C, H, W)`` and ``mode`` the grouping:

    ============  =========================  ==========  =====================
    mode          one group is               G           index inside group
    ============  =========================  ==========  =====================
    ``spatial``   one ``(n, c)``             C           ``h * W + w``
    ``channel``   one ``(n, h, w)``          H * W       ``c``
    ``global``    one ``n``                  1           ``c*H*W + h*W + w``
    ============  =========================  ==========  =====================
    """

    values: torch.Tensor
    indices: torch.Tensor
    shape: tuple
    mode: str

    @property
    def k(self) -> int:
        """Entries kept per group."""
        return self.values.shape[-1]

    @property
    def density(self) -> float:
        """Fraction of the dense entries that survive."""
        N, C, H, W = self.shape
        G, size = group_geometry(self.mode, C, H, W)
        return self.k / size

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to_dense(self) -> torch.Tensor:
        """Scatter into a dense ``[N, C, H, W]`` tensor, zeros elsewhere (differentiable in ``values``)."""
        from .ops import compact_to_dense

        return compact_to_dense(self.values, self.indices, self.mode, self.shape)

    def channel_and_position(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(channel, position)`` of every entry, each ``[N, G, k]`` int64 (position = ``h * W + w``)."""
        N, C, H, W = self.shape
        idx = self.indices.long()
        groups = torch.arange(idx.shape[1], device=idx.device).view(1, -1, 1).expand_as(idx)
        if self.mode == "spatial":
            return groups, idx
        if self.mode == "channel":
            return idx, groups
        return idx // (H * W), idx % (H * W)
