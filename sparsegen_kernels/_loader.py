"""Loading of the compiled extension ``sparsegen_kernels._C`` (registers the ``torch.ops.sparsegen`` ops)."""
from __future__ import annotations

import warnings

_LOAD_ERROR: str | None = None
_LOADED = False


def load_extension() -> bool:
    """Import ``_C`` once; on failure warn with what is missing and return False (references take over)."""
    global _LOADED, _LOAD_ERROR
    if _LOADED or _LOAD_ERROR is not None:
        return _LOADED
    import glob
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    if not glob.glob(os.path.join(here, "_C*.so")) and not glob.glob(os.path.join(here, "_C*.pyd")):
        _LOAD_ERROR = "the extension is not built"
        warnings.warn(
            "sparsegen_kernels._C is not built; the ops fall back to the pure-PyTorch references (slow). "
            "Build it with `pip install --no-build-isolation -e .` or `make install`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    try:
        from . import _C  # noqa: F401  (import registers the ops)

        _LOADED = True
    except ImportError as exc:  # not built, or built against another torch
        _LOAD_ERROR = str(exc)
        warnings.warn(
            f"sparsegen_kernels._C could not be loaded ({exc}); the ops fall back to the pure-PyTorch "
            "references (slow). Build it with `pip install --no-build-isolation -e .` or `make install`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _LOADED


def load_error() -> str | None:
    """Why ``_C`` failed to load, or None."""
    return _LOAD_ERROR
