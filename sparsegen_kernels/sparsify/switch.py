"""Modules that carry their own sparse path (``sparsegen.SparseGenerator(..., sparse=False)``): switched onto it."""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

from torch import nn

from ..geometry import group_geometry
from .spec import check_mode, per_site, resolve_k


def has_switch(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "sparse", None), bool) and isinstance(getattr(m, "layer_topk", None), Mapping)
            and isinstance(getattr(m, "layer_shapes", None), Mapping))


def switch_sites(module: nn.Module) -> "OrderedDict[str, str]":
    return OrderedDict((n, f"{tuple(module.layer_shapes[n])}, mode={m!r}, k={k}")
                       for n, (k, m) in module.layer_topk.items())


def sparsify_switch(module: nn.Module, k, mode: Optional[str]) -> None:
    """Turn on the sparse path of a module with ``sparse`` / ``layer_topk`` / ``layer_shapes``."""
    names = list(module.layer_topk)
    where = f"sparsify({type(module).__name__})"
    if k is None:
        chosen = {n: (module.layer_topk[n][0], mode) for n in names}
        if mode is not None:
            check_mode(where, mode)
            if any(mode != module.layer_topk[n][1] for n in names):
                raise ValueError(f"{where}: with k=None every layer keeps its own k; give k too when changing "
                                 f"the mode to {mode!r}")
    else:
        chosen = per_site(k, mode, names, where)
    new = OrderedDict()
    for n in names:
        own_k, own_mode = module.layer_topk[n]
        C, H, W = module.layer_shapes[n]
        spec, m = chosen.get(n, (1.0, None))  # not chosen: the whole group (the dense layer's output)
        m = own_mode if m is None else m
        _, size = group_geometry(m, C, H, W)
        kk = resolve_k(spec, size)
        if not 1 <= kk <= size:
            raise ValueError(f"{where}: k={kk} is out of range for layer {n!r} (mode {m!r}, shape {(C, H, W)}): "
                             f"the group size is {size}")
        new[n] = (kk, m)
    module.layer_topk = new
    module.sparse = True
    if isinstance(getattr(module, "use_kernels", None), bool):
        module.use_kernels = True
