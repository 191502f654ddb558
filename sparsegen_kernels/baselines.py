"""What a dense PyTorch model does where the sparse kernels run: the speed baselines of the benchmarks and of
``SparseGenerator(use_kernels=False)`` (the sparse network computed with dense ops)."""
from __future__ import annotations

from typing import Optional

import torch


def topk_mask_torch_baseline(x: torch.Tensor, k: int, mode: str = "spatial", bias: Optional[torch.Tensor] = None,
                             relu: bool = False) -> torch.Tensor:
    """``relu?(x + bias)`` with all but the ``k`` largest entries per group zeroed, the way a dense PyTorch model
    does it: ``relu`` + ``torch.topk`` + ``scatter_``. ``x [N, C, H, W]`` -> same shape.

    Ties are resolved by ``torch.topk`` (unspecified order), so this is a baseline for speed only; the exact
    semantics are :func:`sparsegen_kernels.reference.topk_mask_ref`.
    """
    N, C, H, W = x.shape
    y = x if bias is None else x + bias.view(1, -1, 1, 1)
    if relu:
        y = torch.relu(y)
    if mode == "spatial":
        g = y.reshape(N, C, H * W)
    elif mode == "channel":
        g = y.reshape(N, C, H * W).transpose(1, 2)
    elif mode == "global":
        g = y.reshape(N, 1, C * H * W)
    else:
        raise ValueError(f"unknown mode {mode!r}; expected 'spatial', 'channel' or 'global'")
    idx = torch.topk(g, k, dim=-1, sorted=False).indices
    out = torch.zeros_like(g).scatter_(-1, idx, torch.gather(g, -1, idx))
    if mode == "channel":
        return out.transpose(1, 2).reshape(N, C, H, W)
    return out.reshape(N, C, H, W)
