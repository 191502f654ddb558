"""Shared benchmark utilities: command line, providers, timing, environment description, result files.

Timing is the median of repeated runs: ``torch.utils.benchmark`` (``blocked_autorange``) on the CPU,
``triton.testing.do_bench`` on CUDA. Every provider of a case is timed in the same process, one after the
other, so the ratios compare like with like. Results go to ``benchmarks/results/<name>_<device>.json``
(each run appended, tagged with the machine, versions, thread count and date) unless ``--out`` names a file.

Providers:

* ``dense``      the PyTorch baseline from :mod:`sparsegen_kernels.reference` (what a dense model does);
* ``dense_folded`` (sparse-conv benchmark, CUDA) cuDNN on the folded weight: the best dense formulation;
* ``sparsegen``  the ``torch.ops.sparsegen`` ops (CPU: the C++ kernels; CUDA: backend ``"auto"``);
* ``triton``, ``cuda`` (CUDA only) the same ops with ``sparsegen_kernels.set_backend(...)`` forcing one
  GPU provider; skipped where that API or provider is missing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
from typing import Callable, Iterator, NamedTuple, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(description: str, dtypes: bool = False, batches: bool = False, budget: bool = False) -> argparse.Namespace:
    """``--device cpu|cuda``, ``--quick`` (small batch, few repeats: for tests), ``--out FILE``, ``--threads``;
    with ``dtypes``, also ``--dtype`` and ``--tf32`` (see :func:`set_float32_precision`); with ``batches``,
    ``--batch N [N ...]``; with ``budget``, ``--budget SECONDS`` (stop starting new cases after that)."""
    p = argparse.ArgumentParser(description=description)
    if batches:
        p.add_argument("--batch", type=int, nargs="+", default=None,
                       help="batch sizes (default: 16 on the CPU, 64 and 256 on a GPU, 2 with --quick)")
    if budget:
        p.add_argument("--budget", type=float, default=None,
                       help="seconds; no new case starts after this (what was measured is written)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")
    p.add_argument("--quick", action="store_true", help="small batch and few repeats (a smoke test, not a measurement)")
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/<name>_<device>.json)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    if dtypes:
        p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                       help="data type of inputs and weights, the same for sparse and dense (default: float32)")
        p.add_argument("--tf32", action="store_true",
                       help="let float32 matrix products and convolutions use TF32 tensor cores, on both sides "
                            "(default: IEEE float32 on both sides)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if dtypes:
        if args.device == "cpu" and args.dtype in ("float16", "bfloat16"):
            p.error(f"--dtype {args.dtype}: the CPU kernels take float32 and float64")
        args.torch_dtype = DTYPES[args.dtype]
        set_float32_precision(args.tf32)
    return args


def set_float32_precision(tf32: bool) -> None:
    """Same float32 precision for the dense baseline and the sparse kernels.

    cuDNN convolutions use TF32 by default while matrix products (and the Triton kernels, which follow
    ``torch.backends.cuda.matmul.allow_tf32``) do not; a float32 comparison sets both switches alike.
    """
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


def precision_note(args: argparse.Namespace) -> dict:
    """What a result run records about its numeric precision."""
    return {"dtype": args.dtype, "tf32": bool(args.tf32) if args.dtype == "float32" else None}


def load_ops():
    """Import the kernel package (registers ``torch.ops.sparsegen``); fail loudly without the extension."""
    import sparsegen_kernels  # noqa: F401

    try:
        import sparsegen_kernels._C  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"sparsegen_kernels._C is not built ({exc}); build it first "
                         "(pip install --no-build-isolation -e .)") from exc
    return torch.ops.sparsegen


def providers(device: str) -> list[str]:
    """The providers to time on ``device``."""
    names = ["dense", "sparsegen"]
    if device == "cuda":
        try:
            from sparsegen_kernels import set_backend  # noqa: F401

            names += ["triton", "cuda"]
        except ImportError:
            pass
    return names


@contextlib.contextmanager
def use_provider(name: str) -> Iterator[bool]:
    """Select the GPU backend for ``triton`` / ``cuda`` (``auto`` otherwise); yields False if unavailable."""
    if name not in ("triton", "cuda"):
        yield True
        return
    try:
        from sparsegen_kernels import get_backend, set_backend
    except ImportError:
        yield False
        return
    previous = get_backend()
    try:
        set_backend(name)
    except (ValueError, RuntimeError):
        yield False
        return
    try:
        yield True
    finally:
        set_backend(previous)


class Timing(NamedTuple):
    """Seconds per call: the median of the repeats, and the fastest one (on a shared machine the gap
    between the two shows how much other work interfered)."""

    median: float
    min: float


def time_fn(fn: Callable[[], object], device: str, quick: bool = False) -> Timing:
    """Seconds per call of ``fn`` (after a warm-up call)."""
    fn()
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=5 if quick else 10, rep=20 if quick else 50,
                                     return_mode="all")
        ms = sorted(ms)
        return Timing(ms[len(ms) // 2] / 1e3, ms[0] / 1e3)
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.timeit(2) if quick else timer.blocked_autorange(min_run_time=0.6)
    return Timing(m.median, min(m.times))


def try_time(fn: Callable[[], object], device: str, quick: bool) -> Optional[Timing]:
    """:func:`time_fn`, or None (with a note) where the provider raises."""
    try:
        return time_fn(fn, device, quick)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        print(f"    (failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Where and with what a result was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }
    try:
        env["load_average"] = os.getloadavg()
    except OSError:
        pass
    return env


def write_results(name: str, rows: list[dict], device: str, out: Optional[str] = None, extra: Optional[dict] = None,
                  quick: bool = False) -> str:
    """Append one run (environment + rows) to ``benchmarks/results/<name>_<device>[_quick].json`` or ``out``."""
    path = out or os.path.join(RESULTS, f"{name}_{device}{'_quick' if quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    runs = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                runs = json.load(f).get("runs", [])
        except (OSError, ValueError):
            runs = []
    run = {"benchmark": name, "environment": environment(device), "quick": quick, "rows": rows}
    if extra:
        run.update(extra)
    runs.append(run)
    with open(path, "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    return path


def fmt_ms(seconds: Optional[float]) -> str:
    return "      -" if seconds is None else f"{seconds * 1e3:9.3f}"


def ratio(base: Optional[float], other: Optional[float]) -> Optional[float]:
    return None if base is None or other is None or other == 0 else base / other


def fmt_ratio(r: Optional[float]) -> str:
    return "     -" if r is None else f"{r:6.1f}x"
