"""Choice of GPU provider (CUDA C++ or Triton) for the ops' CUDA kernels.

On CPU tensors the dispatcher runs the C++ CPU kernels. On CUDA tensors every op's CUDA kernel is a small
dispatcher that calls one provider:

* ``"cuda"``: the C++ kernels in ``csrc/cuda`` (ops ``torch.ops.sparsegen.<op>_cuda``),
* ``"triton"``: the kernels in :mod:`sparsegen_kernels.triton`,
* ``"auto"`` (default): per op and top-k mode, the faster of the two according to the measured table
  ``backend_table.json`` beside this file (written by ``benchmarks/backend_table.py`` from the GPU
  benchmarks), else whichever is available, CUDA C++ first.

Choose with :func:`set_backend` or the environment variable ``SPARSEGEN_BACKEND``.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Callable

import torch

BACKENDS = ("auto", "triton", "cuda")
_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_table.json")
_backend: str | None = None


def set_backend(name: str) -> None:
    """Select the GPU provider: ``"auto"``, ``"triton"`` or ``"cuda"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    """The selected GPU provider (``SPARSEGEN_BACKEND`` until :func:`set_backend` is called)."""
    if _backend is not None:
        return _backend
    name = os.environ.get("SPARSEGEN_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"SPARSEGEN_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def cuda_available(op: str) -> bool:
    """Whether the CUDA C++ provider of ``op`` was compiled into ``_C``."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsegen::{op}_cuda", "CUDA")
    except RuntimeError:
        return False


@lru_cache(maxsize=None)
def _triton_providers() -> dict | None:
    from torch.utils._triton import has_triton

    if not has_triton():
        return None
    from . import triton as triton_kernels

    return getattr(triton_kernels, "PROVIDERS", None)


def triton_available(op: str) -> bool:
    """Whether a Triton provider of ``op`` exists (and Triton can run here)."""
    providers = _triton_providers()
    return providers is not None and op in providers


@lru_cache(maxsize=None)
def _table_file() -> dict:
    try:
        with open(_TABLE_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@lru_cache(maxsize=None)
def _preferred(op: str, mode: str | None) -> str | None:
    table = _table_file()
    return table.get("fastest_by_mode", {}).get(op, {}).get(mode) or table.get("fastest", {}).get(op)


def measured_table() -> dict:
    """``{op: "cuda" | "triton"}``: the faster provider per op, as measured by the GPU benchmarks."""
    return dict(_table_file().get("fastest", {}))


def measured_mode_table() -> dict:
    """``{op: {mode: "cuda" | "triton"}}``: the faster provider per op and top-k mode, where measured."""
    return {op: dict(modes) for op, modes in _table_file().get("fastest_by_mode", {}).items()}


def provider_name(op: str, mode: str | None = None) -> str:
    """The provider that will run ``op`` (on groups of top-k ``mode``) on a CUDA tensor now."""
    choice = get_backend()
    if choice == "auto":
        preferred = _preferred(op, mode)
        order = [preferred] if preferred else []
        order += [p for p in ("cuda", "triton") if p not in order]
        for p in order:
            if (p == "cuda" and cuda_available(op)) or (p == "triton" and triton_available(op)):
                return p
        return "reference"
    if choice == "cuda" and not cuda_available(op):
        raise RuntimeError(f"backend 'cuda' selected but sparsegen_kernels._C was built without CUDA kernels "
                           f"(no kernel for sparsegen::{op}_cuda); rebuild with a CUDA toolkit or use 'triton'")
    if choice == "triton" and not triton_available(op):
        raise RuntimeError(f"backend 'triton' selected but Triton is not available for {op}")
    return choice


def cuda_dispatcher(op: str, reference_kernel: Callable) -> Callable:
    """The CUDA kernel registered for ``sparsegen::<op>``: forwards to the selected provider."""

    # Position of the op's ``mode`` argument, read once from its schema (not searched for at every call).
    names = [a.name for a in getattr(torch.ops.sparsegen, op).default._schema.arguments]
    mode_at = names.index("mode")

    def kernel(*args):
        name = provider_name(op, args[mode_at])
        if name == "cuda":
            return getattr(torch.ops.sparsegen, f"{op}_cuda").default(*args)
        if name == "triton":
            return _triton_providers()[op](*args)
        return reference_kernel(*args)

    kernel.__name__ = f"{op}_cuda_dispatch"
    kernel.__doc__ = f"CUDA kernel of sparsegen::{op}: runs the provider chosen by sparsegen_kernels.backend."
    return kernel
