"""Build of sparsegen and its extension ``sparsegen_kernels._C``.

The build decides on toolchains, never on the presence of a GPU:

* C++/OpenMP CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are always built.
* CUDA kernels (``csrc/cuda/*.cu``) are built when the installed torch has CUDA (``torch.version.cuda``)
  and a CUDA toolkit is found (``CUDA_HOME``); otherwise the reason is printed and they are skipped.

Environment: ``SPARSEGEN_SKIP_CUDA=1`` skips CUDA, ``DEBUG=1`` builds with ``-O0 -g``,
``TORCH_CUDA_ARCH_LIST`` is honoured, ``MAX_JOBS`` caps parallel compile jobs (default 2).
Build against the torch you already have: ``pip install --no-build-isolation -e .``.
"""
import glob
import os

from setuptools import find_packages, setup

os.environ.setdefault("MAX_JOBS", "2")

import torch  # noqa: E402  (build-time requirement, see pyproject.toml)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"


def _cuda_decision():
    """Return (build_cuda, reason)."""
    if os.environ.get("SPARSEGEN_SKIP_CUDA", "0") == "1":
        return False, "SPARSEGEN_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}"


def _extension():
    build_cuda, reason = _cuda_decision()
    print(f"sparsegen: CUDA kernels {'ON' if build_cuda else 'OFF'} ({reason})")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx = opt + ["-fopenmp"]
    extra = {"cxx": cxx}
    kwargs = dict(extra_link_args=["-fopenmp"], py_limited_api=True)
    if build_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["cxx"] = cxx + ["-DSPARSEGEN_WITH_CUDA"]
        extra["nvcc"] = (["-O0", "-g", "-lineinfo"] if DEBUG else ["-O3", "-lineinfo"]) + [
            "--use_fast_math", "-DSPARSEGEN_WITH_CUDA",
        ]
        return CUDAExtension("sparsegen_kernels._C", sources, extra_compile_args=extra, **kwargs)
    return CppExtension("sparsegen_kernels._C", sources, extra_compile_args=extra, **kwargs)


setup(
    name="sparsegen",
    version="0.1.0",
    description="Kernels that make sparsely activated (top-k) generator networks save compute and memory, "
    "and the hierarchical compositional (AND-OR) generator built on them.",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sparsegen", "sparsegen.*", "sparsegen_kernels", "sparsegen_kernels.*"]),
    # The measured provider table that sk.set_backend("auto") reads on GPUs.
    package_data={"sparsegen_kernels": ["backend_table.json"]},
    # Accept the torch a user already has; the Makefile pins the CPU build used for development.
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "pillow", "safetensors"],
    extras_require={
        "triton": ["triton>=3.2"],
        "data": ["scikit-image"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest", "scikit-image", "psutil"],
    },
    entry_points={"console_scripts": ["sparsegen=sparsegen.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
