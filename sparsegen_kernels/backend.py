"""Choice of GPU provider (CUDA C++ or Triton) for the ops' CUDA kernels.

On CPU tensors the dispatcher runs the C++ CPU kernels. On CUDA tensors every op's CUDA kernel is a small
dispatcher that calls one provider:

* ``"cuda"``: the C++ kernels in ``csrc/cuda`` (the internal ops ``torch.ops._sparsegen_cuda.<op>``),
* ``"triton"``: the kernels in :mod:`sparsegen_kernels.triton`,
* ``"auto"`` (default): per op, top-k mode and dtype, the faster of the two according to the measured table
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

from .geometry import fold_upsample_weight, unfold_upsample_weight_grad

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


# The CUDA C++ providers are the internal ops ``torch.ops._sparsegen_cuda.<op>`` (csrc/cuda), with the public
# ops' schemas. The provider of the upsample-conv ops folds the 3x3 weight and runs the transposed-conv ones.
_PROVIDER_NAMESPACE = "_sparsegen_cuda"


def _cuda_op(name: str):
    return getattr(getattr(torch.ops, _PROVIDER_NAMESPACE), name).default


def _cuda_upsample_conv(values, indices, mode, in_shape, weight, bias):
    w4 = fold_upsample_weight(weight)
    return _cuda_op("sparse_conv_transpose2d")(values, indices, mode, in_shape, w4, bias, [2, 2], [1, 1], [0, 0])


def _cuda_upsample_input_grad(grad_out, indices, mode, in_shape, weight):
    return _cuda_op("sparse_conv_transpose2d_input_grad")(grad_out, indices, mode, in_shape,
                                                          fold_upsample_weight(weight), [2, 2], [1, 1])


def _cuda_upsample_weight_grad(grad_out, values, indices, mode, in_shape):
    w_shape = [in_shape[1], grad_out.shape[1], 4, 4]
    gw4 = _cuda_op("sparse_conv_transpose2d_weight_grad")(grad_out, values, indices, mode, in_shape, w_shape,
                                                          [2, 2], [1, 1])
    return unfold_upsample_weight_grad(gw4)


# op -> (CUDA C++ op it is built on, the composition)
_CUDA_COMPOSITES = {
    "sparse_upsample_conv2d": ("sparse_conv_transpose2d", _cuda_upsample_conv),
    "sparse_upsample_conv2d_input_grad": ("sparse_conv_transpose2d_input_grad", _cuda_upsample_input_grad),
    "sparse_upsample_conv2d_weight_grad": ("sparse_conv_transpose2d_weight_grad", _cuda_upsample_weight_grad),
}


def cuda_provider_ops(op_names) -> tuple:
    """Of ``op_names``, the ops that have an internal CUDA C++ provider op of their own (``_sparsegen_cuda::<op>``;
    the upsample-conv ops are composed from the transposed-conv ones)."""
    return tuple(n for n in op_names if n not in _CUDA_COMPOSITES)


@lru_cache(maxsize=None)
def cuda_available(op: str) -> bool:
    """Whether the CUDA C++ provider of ``op`` was compiled into ``_C`` (asked once per op: it cannot change)."""
    base = _CUDA_COMPOSITES[op][0] if op in _CUDA_COMPOSITES else op
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_PROVIDER_NAMESPACE}::{base}", "CUDA")
    except RuntimeError:
        return False


def _cuda_kernel(op: str) -> Callable:
    if op in _CUDA_COMPOSITES:
        return _CUDA_COMPOSITES[op][1]
    return _cuda_op(op)


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
def _preferred(op: str, mode: str | None, dtype: str | None = None) -> str | None:
    """The measured faster provider of ``op`` for inputs of ``dtype`` (e.g. ``"bfloat16"``) grouped by ``mode``:
    the table of that dtype first, then the table's defaults."""
    table = _table_file()
    for t in (table.get("by_dtype", {}).get(dtype, {}), table):
        choice = t.get("fastest_by_mode", {}).get(op, {}).get(mode) or t.get("fastest", {}).get(op)
        if choice:
            return choice
    return None


def measured_table() -> dict:
    """``{op: "cuda" | "triton"}``: the faster provider per op, as measured by the GPU benchmarks."""
    return dict(_table_file().get("fastest", {}))


def measured_mode_table() -> dict:
    """``{op: {mode: "cuda" | "triton"}}``: the faster provider per op and top-k mode, where measured."""
    return {op: dict(modes) for op, modes in _table_file().get("fastest_by_mode", {}).items()}


def provider_name(op: str, mode: str | None = None, dtype: torch.dtype | None = None) -> str:
    """The provider that will run ``op`` (on groups of top-k ``mode``, inputs of ``dtype``) on a CUDA tensor now."""
    choice = get_backend()
    if choice == "auto":
        preferred = _preferred(op, mode, None if dtype is None else str(dtype).rsplit(".", 1)[-1])
        order = [preferred] if preferred else []
        order += [p for p in ("cuda", "triton") if p not in order]
        for p in order:
            if (p == "cuda" and cuda_available(op)) or (p == "triton" and triton_available(op)):
                return p
        return "reference"
    if choice == "cuda" and not cuda_available(op):
        raise RuntimeError(f"backend 'cuda' selected but sparsegen_kernels._C was built without CUDA kernels "
                           f"(no CUDA kernel for {op}); rebuild with a CUDA toolkit or use 'triton'")
    if choice == "triton" and not triton_available(op):
        raise RuntimeError(f"backend 'triton' selected but Triton is not available for {op}")
    return choice


def cuda_dispatcher(op: str, reference_kernel: Callable) -> Callable:
    """The CUDA kernel registered for ``sparsegen::<op>``: forwards to the selected provider."""

    # Position of the op's ``mode`` argument, read once from its schema (not searched for at every call).
    names = [a.name for a in getattr(torch.ops.sparsegen, op).default._schema.arguments]
    mode_at = names.index("mode")

    def kernel(*args):
        name = provider_name(op, args[mode_at], args[0].dtype)
        if name == "cuda":
            return _cuda_kernel(op)(*args)
        if name == "triton":
            return _triton_providers()[op](*args)
        return reference_kernel(*args)

    kernel.__name__ = f"{op}_cuda_dispatch"
    kernel.__doc__ = f"CUDA kernel of sparsegen::{op}: runs the provider chosen by sparsegen_kernels.backend."
    return kernel
