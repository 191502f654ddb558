"""Test configuration: seeded RNGs, Triton in interpreter mode when there is no GPU, a `gpu` marker, and the
`device` parametrization that runs op tests on the CPU and, on a CUDA machine, once per GPU provider."""
import contextlib
import os
import random

import pytest
import torch

# Triton kernels run on CPU tensors in the interpreter where no GPU exists; this must be set before any
# Triton kernel is defined, i.e. before sparsegen_kernels.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tolerance import no_tf32  # noqa: E402

CUDA = torch.cuda.is_available()
GPU_BACKENDS = ("triton", "cuda")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass
    yield


def devices():
    """Devices to run op tests on: CPU always, CUDA where present (with the default provider choice)."""
    return ["cpu"] + (["cuda"] if CUDA else [])


# ---------------------------------------------------------------------------------------------------------
# One parametrization per provider: "cpu", and where CUDA exists "cuda-triton" and "cuda-cuda" (marked gpu).
# Use with indirect=True; the `device` fixture turns the name into the torch device and selects the provider.
# ---------------------------------------------------------------------------------------------------------
def _gpu_param(values, id_):
    return pytest.param(*values, id=id_, marks=pytest.mark.gpu)


def device_params():
    """Values for ``@pytest.mark.parametrize("device", device_params(), indirect=True)``."""
    params = [pytest.param("cpu", id="cpu")]
    if CUDA:
        params += [_gpu_param((f"cuda-{b}",), f"cuda-{b}") for b in GPU_BACKENDS]
    return params


def device_dtype_params(cpu_dtypes, cuda_dtypes):
    """Values for ``@pytest.mark.parametrize("device, dtype", ..., indirect=["device"])``: the CPU with each of
    ``cpu_dtypes`` and, where CUDA exists, each GPU provider with each of ``cuda_dtypes``."""
    params = [pytest.param("cpu", dt, id=f"cpu-{str(dt).split('.')[-1]}") for dt in cpu_dtypes]
    if CUDA:
        params += [_gpu_param((f"cuda-{b}", dt), f"cuda-{b}-{str(dt).split('.')[-1]}")
                   for b in GPU_BACKENDS for dt in cuda_dtypes]
    return params


def gpu_params():
    """Like :func:`device_params`, the GPU providers only (for tests that need CUDA; without CUDA one
    placeholder that the `gpu` marker skips)."""
    return device_params()[1:] if CUDA else [_gpu_param(("cuda-triton",), "cuda-triton")]


def gpu_backend_unavailable(name):
    """Why GPU provider ``name`` ("triton" or "cuda") cannot run here, or None when it can."""
    if not CUDA:
        return "needs a CUDA device"
    from sparsegen_kernels import backend

    if name == "cuda":
        if not backend.cuda_available("topk_compact"):
            return ("sparsegen_kernels._C was built without its CUDA kernels (no sparsegen::topk_compact_cuda); "
                    "rebuild with a CUDA toolkit")
        return None
    if name == "triton":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton cannot run on this machine (torch.utils._triton.has_triton() is False)"
        if not backend.triton_available("topk_compact"):
            return "sparsegen_kernels.triton provides no kernels here"
        return None
    raise ValueError(f"unknown GPU backend {name!r}; expected one of {GPU_BACKENDS}")


@contextlib.contextmanager
def gpu_backend(name):
    """Within the block, CUDA tensors run on provider ``name`` (``sparsegen_kernels.set_backend``) and float32
    means IEEE float32 (no TF32); both are restored afterwards. Skips the test where ``name`` cannot run."""
    reason = gpu_backend_unavailable(name)
    if reason is not None:
        pytest.skip(f"backend {name!r}: {reason}")
    from sparsegen_kernels import backend

    previous = backend._backend  # None: SPARSEGEN_BACKEND decides (get_backend); restored exactly as it was
    backend.set_backend(name)
    try:
        assert backend.get_backend() == name
        with no_tf32():
            yield
    finally:
        backend._backend = previous


@pytest.fixture
def device(request):
    """The torch device of an indirect ``device`` parameter: "cpu" -> "cpu"; "cuda-<provider>" -> "cuda", with
    ``sparsegen_kernels.set_backend(<provider>)`` for the duration of the test."""
    name = getattr(request, "param", "cpu")
    if name == "cpu":
        yield "cpu"
        return
    kind, _, provider = name.partition("-")
    if kind != "cuda" or provider not in GPU_BACKENDS:
        raise ValueError(f"unknown device parameter {name!r}")
    with gpu_backend(provider):
        yield "cuda"
