"""What survives at a site: ``k`` (a count, a fraction of the group, or per site) and the grouping ``mode``."""
from __future__ import annotations

import math
from typing import Mapping, Optional, Union

from ..geometry import MODES

KSpec = Union[int, float, tuple]


def check_k(where: str, k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"{where}: k must be an int (entries kept per group) or a float in (0, 1] (fraction of "
                        f"the group), got {k!r}")
    if isinstance(k, int) and k < 1:
        raise ValueError(f"{where}: k must be >= 1 when given as an int, got {k}")
    if isinstance(k, float) and not (0.0 < k <= 1.0 and math.isfinite(k)):
        raise ValueError(f"{where}: k must be in (0, 1] when given as a float (a fraction of the group), got {k}")


def check_mode(where: str, mode) -> None:
    if mode not in MODES:
        raise ValueError(f"{where}: unknown mode {mode!r}; expected one of {MODES}")


def resolve_k(k: Union[int, float], group_size: int) -> int:
    """Entries kept per group: ``k`` itself (an int) or ``max(1, round(k * group_size))`` (a float fraction)."""
    if isinstance(k, float):
        return max(1, min(group_size, int(round(k * group_size))))
    return k


def per_site(k, mode: Optional[str], names: list, where: str, *, strict: bool = True) -> dict:
    """``{site name: (k spec, mode or None)}`` for the chosen sites, from ``k`` and ``mode``.

    With ``strict=False`` names in a dict ``k`` that are not in ``names`` are ignored (used for the variants of a
    forward traced after :func:`~sparsegen_kernels.sparsify` returned, which may lack some sites).
    """
    if mode is not None:
        check_mode(where, mode)
    if isinstance(k, Mapping):
        unknown = [n for n in k if n not in names]
        if unknown and strict:
            raise ValueError(f"{where}: {unknown} are not sparsifiable activations of this module; "
                             f"they are {names} (see sparsegen_kernels.sparsify.sparsify_sites)")
        out = {}
        for n, v in k.items():
            if v is None or n not in names:
                continue
            if isinstance(v, tuple):
                if len(v) != 2:
                    raise ValueError(f"{where}: k[{n!r}] must be k or a pair (k, mode), got {v!r}")
                check_k(f"{where}: k[{n!r}]", v[0])
                check_mode(f"{where}: k[{n!r}]", v[1])
                out[n] = (v[0], v[1])
            else:
                check_k(f"{where}: k[{n!r}]", v)
                out[n] = (v, mode)
        return out
    check_k(where, k)
    return {n: (k, mode) for n in names}
