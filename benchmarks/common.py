"""The benchmark library: command line, environment, result files, timing, memory, CUDA graphs, providers, ratios.

Every benchmark script declares its cases, providers and workloads and calls this module for the rest:

* command line: :func:`parse_args` (the per-op scripts), :func:`add_run_args` and :func:`start_device` (the
  generator-level scripts), :func:`set_float32_precision`;
* environment: :func:`environment` (device name; torch, Triton, CUDA and cuDNN versions; CPU model, threads,
  load, date, git commit, dtype; the ops running on the pure-PyTorch references, from
  ``sparsegen_kernels.cpu_reference_fallbacks()`` and ``sparsegen_kernels._loader.load_error()``);
* result files: each run is appended to ``benchmarks/results/<name>_<device>[...].json`` (:func:`append_run`;
  ``--out`` names another file); :func:`save_run` keeps ``<stem>.partial.json`` while a run goes on and writes
  the ``.md`` table at the end; :func:`pyplot` / :func:`save_figure` write the ``.png``; :func:`replot` redraws
  both from a results file;
* timing: the median of repeated runs. Ops (:func:`time_fn`): ``torch.utils.benchmark`` (``blocked_autorange``)
  on the CPU, ``triton.testing.do_bench`` on CUDA. Whole models (:func:`measure_block`): one warm-up per
  provider, then repeated runs round robin over the providers (:func:`round_robin`), each GPU run a CUDA-event
  interval over back-to-back calls (:func:`time_calls`); :class:`MemoryMeter` for memory;
  :func:`capture_graph` for a call captured in a CUDA graph; :func:`profile_call` for ``torch.profiler`` tables;
* providers: :func:`providers` and :func:`use_provider`; ratios: :func:`ratio`, :func:`speedups`,
  :func:`memory_ratios`.

Per-op providers:

* ``dense``      the PyTorch baseline from :mod:`sparsegen_kernels.reference` (what a dense model does);
* ``dense_folded`` (sparse-conv benchmark, CUDA) cuDNN on the folded weight: the best dense formulation;
* ``sparsegen``  the ``torch.ops.sparsegen`` ops (CPU: the C++ kernels; CUDA: backend ``"auto"``);
* ``triton``, ``cuda`` (CUDA only) the same ops with ``sparsegen_kernels.set_backend(...)`` forcing one
  GPU provider; skipped where that API or provider is missing.

Every provider of a case is timed in the same process, one after the other, so the ratios compare like with like.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Iterator, NamedTuple, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MB = 1024.0 ** 2
GRAPH_WARMUP = 3  # calls on a side stream before a capture
TARGET_S = 0.02  # a GPU timing run lasts about this long (back-to-back calls)
MAX_CALLS = 200


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
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


def default_batches(args: argparse.Namespace) -> list[int]:
    """The per-op scripts' batch sizes: ``--batch``, else 2 with ``--quick``, 64 and 256 on CUDA, 16 on the CPU."""
    return args.batch or ([2] if args.quick else ([64, 256] if args.device == "cuda" else [16]))


def add_run_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """``--threads``, ``--out`` (a results path without extension), ``--no-plot`` and ``--replot JSON``: the
    options the generator-level scripts share."""
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", metavar="JSON", help="only redraw the table (.md) and plot (.png) of a results "
                   "file's last run")


def start_device(args: argparse.Namespace) -> torch.device:
    """``torch.device(args.device)``, refused when it is CUDA and there is none; applies ``args.threads``."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


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


# ---------------------------------------------------------------------------------------------------
# Kernels and environment
# ---------------------------------------------------------------------------------------------------
def load_ops():
    """Import the kernel package (registers ``torch.ops.sparsegen``); fail loudly without the extension."""
    import sparsegen_kernels  # noqa: F401
    from sparsegen_kernels._loader import load_error

    error = load_error()
    if error is not None:
        raise SystemExit(f"sparsegen_kernels._C is not built ({error}); build it first "
                         "(pip install --no-build-isolation -e .)")
    return torch.ops.sparsegen


def kernel_fallbacks() -> list:
    """The ops whose CPU kernel is the pure-PyTorch reference (``sparsegen_kernels.cpu_reference_fallbacks()``);
    one entry naming the reason when ``sparsegen_kernels._C`` did not load at all."""
    import sparsegen_kernels as sk
    from sparsegen_kernels._loader import load_error

    fallbacks = list(sk.cpu_reference_fallbacks())
    error = load_error()
    return [f"all (sparsegen_kernels._C not loaded: {error})"] if error is not None else fallbacks


def warn_fallbacks(env: dict, who: str) -> None:
    """Print a warning when ``env`` records ops running on the references (``who``: what runs them)."""
    if env["reference_fallback_ops"]:
        print(f"# WARNING: no compiled CPU kernel for {env['reference_fallback_ops']}: {who} the slow references")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    """The short commit of the checkout, ``+dirty`` with uncommitted changes to tracked files; None outside git."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> Optional[tuple]:
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def environment(device, dtype: str = "float32", tf32: bool = False) -> dict:
    """Where and with what a result was measured: date, device and its name, CPU model and threads, load,
    versions (torch, Triton, Python, numpy, the kernels; on CUDA also CUDA, cuDNN, the GPU backend and the device
    capability), git commit, the ops running on the references, and the precision of the run.

    ``device``: ``"cpu"``, ``"cuda"`` or a ``torch.device``."""
    import sparsegen_kernels as sk

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    kind = torch.device(device).type
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": kind,
        "device_name": torch.cuda.get_device_name() if kind == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }
    load = load_average()
    if load is not None:
        env["load_average"] = load
    env.update({
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "numpy": numpy_version,
        "sparsegen_kernels": getattr(sk, "__version__", None),
        "git_commit": git_commit(),
        "reference_fallback_ops": kernel_fallbacks(),
        "dtype": dtype,
        "tf32": tf32,
    })
    if kind == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu_backend"] = sk.get_backend()
        env["device_capability"] = list(torch.cuda.get_device_capability(device))
    return env


def describe(env: dict) -> str:
    """``"<device name> (<device>, <n> threads)"``, for headers and plot titles."""
    return f"{env['device_name']} ({env['device']}, {env['torch_threads']} threads)"


def fallback_note(env: dict) -> str:
    """A plot title's mark of a run whose sparse side ran (partly) on the references."""
    return " [reference fallbacks]" if env["reference_fallback_ops"] else ""


# ---------------------------------------------------------------------------------------------------
# Result files
# ---------------------------------------------------------------------------------------------------
RUN_HEAD = ("benchmark", "environment", "quick", "rows")  # the keys every run starts with, in this order


def default_stem(name: str, device: str, quick: bool = False, tag: str = "") -> str:
    """``benchmarks/results/<name>_<device><tag>[_quick]`` (no extension)."""
    return os.path.join(RESULTS, f"{name}_{device}{tag}{'_quick' if quick else ''}")


def append_run(path: str, run: dict) -> str:
    """Append ``run`` to the results file ``path`` (``{"runs": [...]}``; created if missing, earlier runs kept;
    an unreadable file starts over). The run's keys ``benchmark, environment, quick, rows`` come first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    runs = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                runs = json.load(f).get("runs", [])
        except (OSError, ValueError):
            runs = []
    head = {k: run[k] for k in RUN_HEAD if k in run}
    runs.append({**head, **{k: v for k, v in run.items() if k not in head}})
    with open(path, "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    return path


def save_op_results(name: str, rows: list, env: dict, args: argparse.Namespace, extra: dict,
                    row_ops: Optional[dict] = None) -> str:
    """The end of a per-op run: on CUDA, the fastest GPU provider per op (``backend_table.fastest_providers``,
    under ``"fastest"``); the run appended to ``--out`` or ``benchmarks/results/<name>_<device>[_quick].json``."""
    if args.device == "cuda":
        from backend_table import fastest_providers

        extra["fastest"] = fastest_providers(name, rows, row_ops)
        print("fastest GPU provider per op:", extra["fastest"])
    path = append_run(args.out or default_stem(name, args.device, args.quick) + ".json",
                      {"benchmark": name, "environment": env, "quick": args.quick, "rows": rows, **extra})
    print(f"results: {path}")
    return path


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text + "\n")


def save_run(run: dict, stem: str, final: bool, markdown: Callable[[dict], str]) -> Optional[str]:
    """While running: ``<stem>.partial.json`` (this run only). At the end: the run is appended to
    ``<stem>.json`` (:func:`append_run`; earlier runs are kept), ``<stem>.md`` gets its table and the
    partial file goes."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    partial = stem + ".partial.json"
    if not final:
        with open(partial, "w") as f:
            json.dump(run, f, indent=1)
        return None
    path = append_run(stem + ".json", {**run, "quick": run.get("quick", False)})
    write_text(stem + ".md", markdown(run))
    if os.path.exists(partial):
        os.remove(partial)
    return path


def load_last_run(path: str) -> dict:
    """The last run of a results file (``{"runs": [...]}``) or a partial file (one run)."""
    with open(path) as f:
        data = json.load(f)
    return data["runs"][-1] if "runs" in data else data


def replot(path: str, markdown, draw) -> dict:
    """Redraw the table (``.md``, from ``markdown(run)``) and plot (``.png``, ``draw(run, png_path)``) of a
    results file's last run, beside the file."""
    run = load_last_run(path)
    stem = path[:-len(".partial.json")] if path.endswith(".partial.json") else os.path.splitext(path)[0]
    table = markdown(run)
    write_text(stem + ".md", table)
    print(table)
    print(f"plot: {draw(run, stem + '.png')}")
    return run


def report_run(run: dict, stem: str, results_path: str, markdown, draw, no_plot: bool) -> None:
    """Print the table of a finished run, draw its plot (``draw(run, png_path)``, unless ``no_plot``) and say
    where the results went."""
    print()
    print(markdown(run))
    if not no_plot:
        path = draw(run, stem + ".png")
        if path:
            print(f"plot: {os.path.relpath(path, ROOT)}")
    print(f"results: {os.path.relpath(results_path, ROOT)} (this run appended)")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str, title: str) -> str:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# Timing of ops: torch.utils.benchmark on the CPU, triton.testing.do_bench on CUDA
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Timing of whole models: CUDA events over back-to-back calls, round robin over providers; memory
# ---------------------------------------------------------------------------------------------------
def error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0][:300]}"


class Budget:
    """``--budget SECONDS``: :meth:`spent` once that many seconds have passed (never with None)."""

    def __init__(self, seconds: Optional[float]):
        self.deadline = time.monotonic() + seconds if seconds else None

    def spent(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (synchronised on a GPU)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class MemoryMeter:
    """Memory allocated during a block above what was allocated at its start: ``peak`` and ``held`` (bytes).

    CPU: sums the allocation / free events of ``torch.profiler`` (``profile_memory=True``) in time order.
    GPU: ``torch.cuda.max_memory_allocated`` / ``memory_allocated``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.held = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.held = torch.cuda.memory_allocated(self.device) - self._base
            return False
        self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"
                  and e.device_type() == torch.autograd.DeviceType.CPU]
        cur = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            cur += e.nbytes()
            peak = max(peak, cur)
        self.peak, self.held = peak, cur
        return False




def time_calls(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``calls`` back-to-back calls: CUDA events on a GPU (the device is idle
    when the first event is recorded), the wall clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def count_host_syncs(fn: Callable[[], object]) -> int:
    """Host synchronisations during one call of ``fn`` on a GPU, as ``torch.cuda``'s sync debug mode sees them
    (``.item()``, pageable host-to-device copies, stream / device synchronisation, ...)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def capture_graph(call: Callable[[], object], device: torch.device) -> tuple:
    """``(replay, peak_bytes)``: one ``call()`` captured in a CUDA graph and its replay (returning the graph's
    static output); ``peak_bytes``: the memory the captured call allocated at its peak.

    ``call`` must read only tensors that stay alive (its static inputs). A call that synchronises with the
    host cannot be captured: refused here (``RuntimeError``) before any capture is attempted, from the count of
    :func:`count_host_syncs` and a call in the sync debug mode ``"error"`` (which raises in any thread).
    """
    syncs = count_host_syncs(call)
    if syncs:
        raise RuntimeError(f"not capturable: {syncs} host synchronisation(s) per call "
                           "(torch.cuda sync debug mode; e.g. .item() or a pageable host-to-device copy)")
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    except RuntimeError as exc:
        raise RuntimeError(f"not capturable: a host synchronisation ({error_text(exc)})") from exc
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = call()
    except Exception as exc:
        during = exc.__context__
        raise RuntimeError(f"capture failed: {error_text(exc)}"
                           + (f" (raised during the capture: {error_text(during)})" if during else "")) from exc
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base

    def replay():
        graph.replay()
        return out

    return replay, peak


def round_robin(runs: dict, repeats: int, on_error: Optional[Callable[[str, Exception], None]] = None) -> dict:
    """``repeats`` rounds over ``runs`` (``{name: run}``, each ``run()`` returning the seconds it measured), in
    order: ``{name: [seconds, ...]}``. Without ``on_error`` an exception ends the measurement; with it, a run
    that raises is reported to ``on_error(name, exc)`` and dropped (from later rounds and from the result)."""
    live = dict(runs)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in list(live.items()):
            try:
                times[name].append(run())
            except Exception as exc:  # noqa: BLE001  (one provider failing must not stop the others)
                if on_error is None:
                    raise
                on_error(name, exc)
                del live[name]
    return {name: times[name] for name in live}


def peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """MB allocated at the peak of one call of ``fn`` above what was allocated before it (:class:`MemoryMeter`)."""
    with MemoryMeter(device) as m:
        fn()
    return m.peak / MB


def measure_block(block: list, setups: dict, repeats: int, device: torch.device, budget: Budget,
                  setup_rank: Callable[[str], int] = lambda provider: 0) -> None:
    """Warm up, time (round robin) and measure the memory of one workload at one batch size.

    ``block``: one row per provider (``{"workload", "batch", "provider", ...}``), filled in place with the
    times (``times_s``, ``median_s``, ``min_s``, ``images_per_s``), ``warmup_s``, ``calls_per_run``, the memory
    (``peak_mb``, ``act_mb``) and ``host_syncs``, or with ``error`` / ``skipped`` / ``memory_error``.
    ``setups``: ``{provider: setup()}``, each returning a dict with ``run`` (one call), ``warmup`` (the first
    call: compiles or captures), ``calls`` (None: from a timed call after the warm-up), ``memory`` (None: one
    ``run`` under a :class:`MemoryMeter`; a callable returning ``{"peak_bytes", "act_bytes"}``) and optionally
    ``peak_bytes`` (measured already) and ``host_syncs`` (bool: count them once). Providers are set up in the
    order of ``setup_rank(provider)`` (stable: the rows keep their order).
    """
    gpu = device.type == "cuda"
    runners = {}
    rows = {row["provider"]: row for row in block}

    def fail(p, exc):
        rows[p]["error"] = error_text(exc)
        print(f"  {rows[p]['workload']} B={rows[p]['batch']} {p}: {rows[p]['error']}", flush=True)

    for row in sorted(block, key=lambda r: setup_rank(r["provider"])):
        p = row["provider"]
        if budget.spent():
            row["skipped"] = "budget"
            continue
        try:
            t0 = time.perf_counter()
            r = setups[p]()
            if r.get("warmup") is not None:
                timed(r["warmup"], device)  # includes compilation
            row["warmup_s"] = time.perf_counter() - t0
            calls = r.get("calls")
            if calls is None:
                est = timed(r["run"], device)
                calls = max(1, min(MAX_CALLS, math.ceil(TARGET_S / max(est, 1e-6)))) if gpu else 1
            r["calls"] = row["calls_per_run"] = calls
            if gpu and r.get("host_syncs"):
                row["host_syncs"] = count_host_syncs(r["run"])
            runners[p] = r
        except Exception as exc:  # noqa: BLE001  (one provider failing must not stop the others)
            fail(p, exc)
    times = round_robin({p: (lambda r=r: time_calls(r["run"], r["calls"], device)) for p, r in runners.items()},
                        repeats, on_error=fail)
    for p, t in times.items():
        r, row = runners[p], rows[p]
        row["times_s"] = t
        row["median_s"] = statistics.median(t)
        row["min_s"] = min(t)
        row["images_per_s"] = row["batch"] / row["median_s"]
        try:
            if r.get("peak_bytes") is not None:
                row["peak_mb"] = r["peak_bytes"] / MB
            elif r.get("memory") is None:
                row["peak_mb"] = peak_mb(r["run"], device)
            else:
                figures = r["memory"]()
                row["peak_mb"] = figures["peak_bytes"] / MB
                row["act_mb"] = figures["act_bytes"] / MB
        except Exception as exc:  # noqa: BLE001
            row["memory_error"] = error_text(exc)


# ---------------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------------
def top_kernels(prof, gpu: bool, iterations: int, top: int = 25) -> dict:
    """The ``top`` entries by total time of a finished ``torch.profiler.profile``, per iteration: GPU kernels
    (and copies) by device time on a GPU, operators by self CPU time on a CPU."""
    from torch.autograd import DeviceType

    entries = []
    for e in prof.key_averages():
        if gpu:
            if e.device_type != DeviceType.CUDA:
                continue
            us = getattr(e, "device_time_total", None)
            if us is None:
                us = getattr(e, "cuda_time_total", 0)
        else:
            if e.device_type != DeviceType.CPU:
                continue
            us = e.self_cpu_time_total
        if us > 0:
            entries.append((e.key, e.count, float(us)))
    total = sum(us for _, _, us in entries)
    entries.sort(key=lambda t: -t[2])
    return {"time": "device" if gpu else "self CPU", "total_us": total / iterations, "distinct": len(entries),
            "top": [{"name": name[:80], "calls": count / iterations, "total_us": us / iterations,
                     "pct": 100.0 * us / total if total else 0.0} for name, count, us in entries[:top]]}


def profile_call(fn: Callable[[], object], device: torch.device, iterations: int = 3) -> dict:
    """:func:`top_kernels` of ``iterations`` calls of ``fn`` under ``torch.profiler`` (on a GPU with CUDA
    activity), after one warm-up call; ``{"error": ...}`` where that raises (a diagnostic never stops a run)."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    try:
        fn()
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(iterations):
                fn()
            sync(device)
        out = top_kernels(prof, gpu, iterations)
        if gpu and not out["top"]:
            out["note"] = "no device activity recorded (CUPTI unavailable?)"
    except Exception as exc:  # noqa: BLE001  (a diagnostic; never stops the benchmark)
        out = {"error": error_text(exc)}
    return out


def profile_markdown(prof: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    if prof.get("skipped") or prof.get("error"):
        return "\n".join(lines + [f"Not profiled: {prof.get('skipped') or prof.get('error')}"])
    lines += [f"Batch {prof['batch']}, {prof['dtype']}; figures per call, over {prof['iterations']} profiled calls "
              "after one warm-up. GPU: kernels (and copies) by device time; CPU: operators by self CPU time.", ""]
    for phase, what in (("forward", "forward (no grad)"),
                        ("forward_backward", "forward + backward (loss = out.float().square().mean(), "
                                             "gradients of the parameters)")):
        lines += [f"## {what}", ""]
        for p, phases in prof["providers"].items():
            r = phases.get(phase, {})
            if "top" not in r:
                lines += [f"### {p}", "", f"error: {r.get('error', 'not run')}", ""]
                continue
            lines += [f"### {p}: {r['total_us']:.1f} us of {r['time']} time per call, {r['distinct']} distinct "
                      "entries" + (f" ({r['note']})" if r.get("note") else ""), "",
                      "| kernel | calls | total us | % |", "|---|---|---|---|"]
            for k in r["top"]:
                name = k["name"].replace("|", "\\|")
                lines.append(f"| `{name}` | {k['calls']:.3g} | {k['total_us']:.1f} | {k['pct']:.1f} |")
            lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Providers and ratios
# ---------------------------------------------------------------------------------------------------
def providers(device: str) -> list[str]:
    """The per-op providers to time on ``device``."""
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


def time_provider(provider: str, fn: Callable[[], object], device: str, quick: bool) -> Optional[Timing]:
    """:func:`try_time` of ``fn`` with ``provider`` selected; None where the provider is unavailable or fails."""
    with use_provider(provider) as ok:
        return try_time(fn, device, quick) if ok else None


def ratio(base: Optional[float], other: Optional[float]) -> Optional[float]:
    return None if base is None or other is None or other == 0 else base / other


def speedups(base: Optional[Timing], timing: Optional[Timing]) -> tuple:
    """``(base median / median, base min / min)``; None where either side was not measured."""
    if base is None or timing is None:
        return None, None
    return ratio(base.median, timing.median), ratio(base.min, timing.min)


def find_row(rows: list, **match) -> Optional[dict]:
    """The first row whose values equal ``match`` (a missing key reads as None), or None."""
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def memory_ratios(row: dict, base: dict) -> None:
    """``peak_mem_ratio_vs_dense`` and ``act_mem_ratio_vs_dense``: ``base``'s memory over ``row``'s, where both
    were measured."""
    if row.get("peak_mb") and base.get("peak_mb"):
        row["peak_mem_ratio_vs_dense"] = base["peak_mb"] / row["peak_mb"]
    if row.get("act_mb") and base.get("act_mb"):
        row["act_mem_ratio_vs_dense"] = base["act_mb"] / row["act_mb"]


def fmt_ms(seconds: Optional[float]) -> str:
    return "      -" if seconds is None else f"{seconds * 1e3:9.3f}"


def fmt_ratio(r: Optional[float]) -> str:
    return "     -" if r is None else f"{r:6.1f}x"
