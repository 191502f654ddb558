"""End-to-end generator benchmark: dense vs sparse; eager, ``torch.compile`` and CUDA graphs; in one process.

Workloads (``paper64`` by default, per batch size):

* ``forward``     ``G(z)`` under ``torch.no_grad()`` (sampling);
* ``langevin``    one Langevin step: forward + d/dZ with the weights frozen (Algorithm 1 step 2, Eq. 13);
* ``train_iter``  one full Algorithm 1 iteration, ``sparsegen.Trainer.step()``: critic step (Eq. 21, WGAN-GP),
  ``l_G`` Langevin steps, generator step (Eq. 15 + 20) with Adam.

Providers (the same weights: every generator is built from the same seed; ``forward`` and ``langevin`` share
one set of parameter tensors, ``train_iter`` builds one ``Trainer`` per provider):

* ``dense``               ``SparseGenerator(config, sparse=False)``: the network without top-k, plain PyTorch
  (``F.interpolate`` + ``F.conv2d`` for every upsample + 3x3 conv);
* ``dense_folded``        the same with ``dense_upsample="folded"``: each upsample + 3x3 conv as one stride-2
  ``F.conv_transpose2d`` on the folded 4x4 weight (cuDNN; 2.25x fewer MACs): the best dense formulation;
* ``dense_compile``       ``dense`` under ``torch.compile``;
* ``masked``              the sparse network computed densely, as a PyTorch model would (``torch.topk`` +
  ``scatter_`` masks, ``F.interpolate`` + ``F.conv2d``; ``use_kernels=False``);
* ``sparse``              ``sparsify(dense)``: compact top-k and the sparse kernels of ``sparsegen_kernels``;
* ``sparse_compile``      ``sparse`` under ``torch.compile``;
* ``dense_graph``, ``dense_folded_graph``, ``sparse_graph`` (GPU; ``forward`` and ``langevin``): the eager
  models of ``dense`` / ``dense_folded`` / ``sparse``, one call captured in a ``torch.cuda.CUDAGraph``
  (static inputs; 3 warm-up calls on a side stream first) and timed as ``graph.replay()``: what is left
  once kernel launches cost nothing. ``langevin`` captures ``langevin_infer(..., n_steps=1, noise=True,
  rng=None)`` itself (the noise comes from the device's default generator, which graphs support). A call
  that synchronises with the host (an ``.item()``, a pageable host-to-device copy) cannot be captured: that
  is checked first with ``torch.cuda``'s sync debug mode and reported in the row's ``error`` (a failed
  capture could leave the CUDA context unusable for the rest of the run). GPU rows of the other providers
  record the same count as ``host_syncs``.

Defaults: CPU: every provider but the graphs, batches 16 and 64 (``train_iter`` at 16, ``l_G = 5``). GPU:
``dense dense_folded dense_compile sparse dense_graph dense_folded_graph sparse_graph``, batches 64 and 256,
``l_G = 20``; the ``_compile`` providers run ``forward`` only (``--compile-everywhere`` adds ``langevin`` and
``train_iter``: each compilation takes tens of seconds); ``train_iter`` is eager.

Precision: ``--dtype float32`` (default; ``--tf32`` lets cuDNN convolutions and matrix products, Triton kernels
included, use TF32 alike) or ``--dtype bfloat16`` (GPU only): ``forward`` and ``langevin`` cast every provider's
generator and inputs to bfloat16; ``train_iter`` trains with ``TrainConfig(amp=True)`` (bfloat16 autocast of
the forward passes, float32 weights and Adam) for every provider.

Timing: after one warm-up run per provider (which includes compilation and capture), ``--repeats`` timed runs
round robin over the providers; each GPU run is a CUDA-event interval over enough back-to-back calls to last
about 20 ms (``train_iter``: one call), reported per call; the median is the result. Memory, from further
runs: ``peak_mb`` is the peak of memory allocated during a run above what was allocated before it (CPU: the
allocator events recorded by ``torch.profiler``; GPU: ``torch.cuda.max_memory_allocated``; graph rows: the
captured call, whose buffers the graph keeps; ``train_iter``: an iteration with ``l_G = 1``, whose peak is the
full iteration's); for ``train_iter``, ``act_mb`` is what the generator step's forward keeps for backward
(memory held after it, batch 2B as in step 3).

``--budget SECONDS``: no new measurement (block or provider warm-up) starts after that; what was measured is
written. Blocks run in order of importance: per batch size (ascending) ``forward``, ``langevin``,
``train_iter``. ``--profile``: after the first batch size, ``torch.profiler`` tables of the top kernels (GPU:
device time; CPU: operators' self CPU time) of ``dense``, ``dense_folded`` and ``sparse`` for ``forward`` and
for one training-style forward + backward (``out.float().square().mean()``, gradients of the parameters), in
``<stem>_profile.md`` and under ``"profile"`` in the results.

    python benchmarks/bench_generator.py                  # CPU: forward, langevin at 16, 64; train_iter at 16, l_G=5
    python benchmarks/bench_generator.py --quick          # CPU: batch 16, l_G = 2, one repeat
    python benchmarks/bench_generator.py --device cuda --dtype bfloat16 --budget 150 --profile

Results: each run is appended to ``benchmarks/results/generator_<device>[_<dtype>][_quick].json``
(``common.write_results``; the dtype is named unless float32); ``.md`` (the table) and ``.png`` (the plot) show
the latest. While running, ``.partial.json`` holds what has been measured so far (an interrupted run keeps it;
``--replot`` draws it).
"""
from __future__ import annotations

import argparse
import copy
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
import traceback
import warnings
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: environment and result files shared by the benchmarks)
from common import RESULTS, ROOT  # noqa: E402

PROVIDERS = ("dense", "dense_folded", "dense_compile", "masked", "sparse", "sparse_compile",
             "dense_graph", "dense_folded_graph", "sparse_graph")
CPU_DEFAULT = ("dense", "dense_folded", "dense_compile", "masked", "sparse", "sparse_compile")
GPU_DEFAULT = ("dense", "dense_folded", "dense_compile", "sparse", "dense_graph", "dense_folded_graph", "sparse_graph")
WORKLOADS = ("forward", "langevin", "train_iter")
GRAPH_WORKLOADS = ("forward", "langevin")
PROFILED = ("dense", "dense_folded", "sparse")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GRAPH_WARMUP = 3  # calls on a side stream before a capture
TARGET_S = 0.02  # a GPU timing run lasts about this long (back-to-back calls)
MAX_CALLS = 200


def mode_of(provider: str) -> str:
    """``"graph"``, ``"compile"`` or ``"eager"``."""
    return "graph" if provider.endswith("_graph") else ("compile" if provider.endswith("_compile") else "eager")


def model_of(provider: str) -> str:
    """The eager model a provider runs: ``dense``, ``dense_folded``, ``masked`` or ``sparse``."""
    for suffix in ("_graph", "_compile"):
        if provider.endswith(suffix):
            return provider[:-len(suffix)]
    return provider


def same_mode_dense(provider: str) -> str:
    """The dense provider run the same way: ``dense_graph`` for graphs, ``dense_compile`` for compiled, else
    ``dense``."""
    return {"graph": "dense_graph", "compile": "dense_compile", "eager": "dense"}[mode_of(provider)]


def applies(provider: str, workload_name: str, gpu: bool, compile_everywhere: bool) -> bool:
    """Whether ``provider`` is measured on ``workload_name`` (graphs: forward and langevin; on a GPU the
    ``_compile`` providers only on forward unless ``compile_everywhere``)."""
    mode = mode_of(provider)
    if mode == "graph":
        return workload_name in GRAPH_WORKLOADS
    if mode == "compile" and gpu and not compile_everywhere:
        return workload_name == "forward"
    return True


def error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0][:300]}"


# ---------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------
def import_kernels() -> list:
    """Import ``sparsegen_kernels``; return the ops that fell back to the pure-PyTorch references."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import sparsegen_kernels  # noqa: F401
    missing = []
    for w in caught:
        msg = str(w.message)
        if "no compiled CPU kernel" in msg:
            missing = [s.strip(" '[]") for s in msg.split("for ", 1)[1].split(";")[0].split(",")]
        elif "could not be loaded" in msg:
            missing = ["all (sparsegen_kernels._C not loaded)"]
    return missing


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, fallback_ops: list, dtype: str = "float32", tf32: bool = False) -> dict:
    """:func:`common.environment` (device name, torch / triton versions, date) plus the kernel status, versions,
    commit and the precision of the run."""
    import numpy

    import sparsegen_kernels as sk

    info = common.environment(device.type)
    info.update({
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "sparsegen_kernels": getattr(sk, "__version__", None),
        "git_commit": _git_commit(),
        "reference_fallback_ops": fallback_ops,
        "dtype": dtype,
        "tf32": tf32,
    })
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu_backend"] = sk.get_backend()
        info["device_capability"] = list(torch.cuda.get_device_capability(device))
    return info


def save_run(run: dict, stem: str, final: bool, markdown: Callable[[dict], str]) -> Optional[str]:
    """While running: ``<stem>.partial.json`` (this run only). At the end: the run is appended to
    ``<stem>.json`` (:func:`common.write_results`; earlier runs are kept), ``<stem>.md`` gets its table and the
    partial file goes."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    partial = stem + ".partial.json"
    if not final:
        with open(partial, "w") as f:
            json.dump(run, f, indent=1)
        return None
    extra = {k: v for k, v in run.items() if k not in ("benchmark", "rows", "quick")}
    path = common.write_results(run["benchmark"], run["rows"], run["environment"]["device"], out=stem + ".json",
                                extra=extra, quick=run.get("quick", False))
    with open(stem + ".md", "w") as f:
        f.write(markdown(run) + "\n")
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
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"plot: {draw(run, stem + '.png')}")
    return run


# ---------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------
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


MB = 1024.0 ** 2


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


# ---------------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------------
def share_parameters(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are the original tensors."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def make_generators(names, config: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """``{provider: generator}`` for the ``forward`` / ``langevin`` workloads: one dense ``SparseGenerator`` built
    from ``seed`` exactly as :class:`sparsegen.Trainer` builds it, cast to ``dtype``; every other model shares its
    parameter tensors. A ``_graph`` provider runs its eager model (captured per workload and batch)."""
    from sparsegen import SparseGenerator
    from sparsegen_kernels.sparsify import sparsify

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = SparseGenerator(config, sparse=False)
    base = base.to(device=device, dtype=dtype)
    eager = {"dense": base}

    def model(name):
        if name not in eager:
            if name == "dense_folded":
                m = share_parameters(base)
                m.dense_upsample = "folded"
            elif name == "sparse":
                m = sparsify(base)  # the model's own top-k layers (channel top-8 at the FC map, spatial HW/4 after)
            elif name == "masked":
                m = sparsify(base)
                m.use_kernels = False
            else:
                raise ValueError(f"unknown model {name!r}")
            eager[name] = m
        return eager[name]

    out = {}
    for p in names:
        m = model(model_of(p))
        out[p] = torch.compile(m, dynamic=False) if mode_of(p) == "compile" else m
    return out


def random_dataset(n: int, shape: tuple, seed: int):
    from sparsegen.data import ImageDataset

    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), name="random")


def make_trainer(provider: str, config: str, batch: int, langevin_steps: int, device: torch.device, seed: int = 0,
                 amp: bool = False):
    """A :class:`sparsegen.Trainer` whose generator is ``provider``'s (the same weights for every provider);
    ``amp``: ``TrainConfig(amp=True)``, bfloat16 autocast of the forward passes."""
    from sparsegen import RunConfig, TrainConfig, Trainer, model_config
    from sparsegen_kernels.sparsify import sparsify

    if mode_of(provider) == "graph":
        raise ValueError(f"{provider}: CUDA graphs are measured on forward and langevin only")
    mcfg = model_config(config)
    train = TrainConfig(batch_size=batch, langevin_steps=langevin_steps, device=str(device), seed=seed, amp=amp)
    run = RunConfig(model=mcfg, sparse=False, data="random", train=train)
    trainer = Trainer(run, random_dataset(batch, mcfg.image_shape, seed), log=lambda s: None)
    gen = trainer.generator
    base = model_of(provider)
    if base == "dense_folded":
        gen.dense_upsample = "folded"
    elif base in ("masked", "sparse"):
        gen = sparsify(gen)  # shares the trainer's parameters (its optimiser steps them)
        if base == "masked":
            gen.use_kernels = False
    trainer.raw_generator = gen
    if mode_of(provider) == "compile":
        gen = torch.compile(gen, dynamic=False)
    trainer.generator = trainer.gen_train = gen
    return trainer


# ---------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------
def static_inputs(gen, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple:
    """``(z, images)``: fixed latents ``[B, z_dim]`` and target images in [-1, 1] (the same for every provider)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, gen.z_dim, generator=g).to(device=device, dtype=dtype)
    images = (torch.rand(batch, *gen.image_shape, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    return z, images


def sampling_call(name: str, gen, z, images) -> Callable[[], object]:
    """One call of the ``forward`` or ``langevin`` workload on fixed inputs (capturable as it stands)."""
    from sparsegen import TrainConfig
    from sparsegen.langevin import langevin_infer

    cfg = TrainConfig()
    if name == "forward":
        def call():
            with torch.no_grad():
                return gen(z)
        return call
    if name == "langevin":
        def call():
            return langevin_infer(gen, images, z, n_steps=1, step_size=cfg.step_size, sigma=cfg.sigma, noise=True,
                                  rng=None)
        return call
    raise ValueError(f"unknown sampling workload {name!r}")


def train_workload(trainer, batch: int, device: torch.device, seed: int = 0):
    """``(run, warmup, memory)`` of ``train_iter``: ``memory()`` returns ``{"peak_bytes", "act_bytes"}``, each
    measured inside its own meter."""
    g = torch.Generator().manual_seed(seed)
    zdim = trainer.raw_generator.z_dim

    def one_langevin_step():
        # The same iteration with l_G = 1: warms up (and compiles) every graph of it; its memory peak is the
        # full iteration's (the Langevin steps run one after the other and keep nothing).
        full = trainer.cfg
        trainer.cfg = full.replace(langevin_steps=1)
        try:
            trainer.step()
        finally:
            trainer.cfg = full

    def memory():
        with MemoryMeter(device) as peak:
            one_langevin_step()
        # What the generator step's forward keeps for backward (batch 2B: [Z_i; Z_hat], as in step 3).
        zz = torch.randn(2 * batch, zdim, generator=g).to(device)
        with MemoryMeter(device) as m:
            with trainer._autocast():
                out = trainer.gen_train(zz)
        del out
        return {"peak_bytes": peak.peak, "act_bytes": m.held}

    return trainer.step, one_langevin_step, memory


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


def profile_generators(gens: dict, batch: int, device: torch.device, dtype: torch.dtype,
                       iterations: int = 3) -> dict:
    """``torch.profiler`` of ``forward`` (no grad) and one training-style forward + backward
    (``out.float().square().mean()``, gradients of the parameters) per provider of ``gens``."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    out = {"batch": batch, "iterations": iterations, "dtype": str(dtype).replace("torch.", ""), "providers": {}}
    for p, gen in gens.items():
        z, _ = static_inputs(gen, batch, device, dtype)
        params = [q for q in gen.parameters() if q.requires_grad]

        def forward():
            with torch.no_grad():
                gen(z)

        def forward_backward():
            loss = gen(z).float().square().mean()
            torch.autograd.grad(loss, params, allow_unused=True)

        phases = {}
        for phase, fn in (("forward", forward), ("forward_backward", forward_backward)):
            try:
                fn()
                sync(device)
                with profile(activities=activities) as prof:
                    for _ in range(iterations):
                        fn()
                    sync(device)
                phases[phase] = top_kernels(prof, gpu, iterations)
                if gpu and not phases[phase]["top"]:
                    phases[phase]["note"] = "no device activity recorded (CUPTI unavailable?)"
            except Exception as exc:  # noqa: BLE001  (a diagnostic; never stops the benchmark)
                phases[phase] = {"error": error_text(exc)}
            print(f"  profile {phase:16s} B={batch:<4d} {p:15s} " + (
                f"{phases[phase]['total_us']:10.1f} us {phases[phase]['time']} time per call"
                if "total_us" in phases[phase] else phases[phase].get("error", "")), flush=True)
        out["providers"][p] = phases
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
# Tables and plots
# ---------------------------------------------------------------------------------------------------
def ratios(rows: list) -> None:
    """Add to every row, at the same workload and batch: ``speedup_vs_dense`` (vs eager ``dense``),
    ``speedup_vs_dense_folded`` (vs eager ``dense_folded``), ``speedup_vs_dense_same_mode`` (vs ``dense_graph``
    for a graph, ``dense_compile`` for a compiled provider, ``dense`` for an eager one) and the memory ratios vs
    ``dense``."""
    def base_row(r, provider):
        return next((x for x in rows if x["workload"] == r["workload"] and x["batch"] == r["batch"]
                     and x["provider"] == provider and x.get("median_s")), None)

    for r in rows:
        if not r.get("median_s"):
            continue
        for key, provider in (("speedup_vs_dense", "dense"), ("speedup_vs_dense_folded", "dense_folded"),
                              ("speedup_vs_dense_same_mode", same_mode_dense(r["provider"]))):
            b = base_row(r, provider)
            if b is not None:
                r[key] = b["median_s"] / r["median_s"]
        b = base_row(r, "dense")
        if b is None:
            continue
        if r.get("peak_mb") and b.get("peak_mb"):
            r["peak_mem_ratio_vs_dense"] = b["peak_mb"] / r["peak_mb"]
        if r.get("act_mb") and b.get("act_mb"):
            r["act_mem_ratio_vs_dense"] = b["act_mb"] / r["act_mb"]


TABLE_NOTE = ("vs dense / vs dense_folded: speed-up over the eager `dense` / `dense_folded` provider at the same "
              "workload and batch; vs dense (same mode): over the dense provider run the same way (graph rows vs "
              "`dense_graph`, compiled rows vs `dense_compile`, eager rows vs `dense`). Graph rows time one CUDA "
              "graph replay; their peak MB is the captured call's. Memory ratios are vs eager `dense`.")


def markdown_table(rows: list) -> str:
    head = ("| workload | batch | provider | time (s) | images/s | vs dense | vs dense_folded | vs dense (same mode) "
            "| peak MB | mem ratio vs dense | act MB | act ratio |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        def f(key, fmt, suffix=""):
            v = r.get(key)
            return format(v, fmt) + suffix if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"
        t = f("median_s", ".4g") if r.get("median_s") else (r.get("error") or r.get("skipped") or "-")
        t = str(t).replace("|", "/")
        lines.append(f"| {r['workload']} | {r['batch']} | {r['provider']} | {t} | {f('images_per_s', '.1f')} | "
                     f"{f('speedup_vs_dense', '.2f', 'x')} | {f('speedup_vs_dense_folded', '.2f', 'x')} | "
                     f"{f('speedup_vs_dense_same_mode', '.2f', 'x')} | {f('peak_mb', '.1f')} | "
                     f"{f('peak_mem_ratio_vs_dense', '.2f', 'x')} | {f('act_mb', '.1f')} | "
                     f"{f('act_mem_ratio_vs_dense', '.2f', 'x')} |")
    return "\n".join(lines + ["", TABLE_NOTE])


def plot(rows: list, path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = []
    for r in rows:
        key = (r["workload"], r["batch"])
        if key not in groups:
            groups.append(key)
    provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(groups) * 2), 4.5))
    width = 0.8 / max(1, len(provs))
    for ax, key, label in ((axes[0], "speedup_vs_dense", "speed-up vs dense eager (x)"),
                           (axes[1], "peak_mem_ratio_vs_dense", "peak-memory reduction vs dense eager (x)")):
        for j, p in enumerate(provs):
            vals = []
            for gkey in groups:
                r = next((x for x in rows if (x["workload"], x["batch"]) == gkey and x["provider"] == p), {})
                vals.append(r.get(key) or 0.0)
            xs = [i + (j - (len(provs) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, vals, width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{w}\nB={b}" for w, b in groups], fontsize=8)
        ax.set_ylabel(label)
        if key == "speedup_vs_dense":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--quick", action="store_true",
                   help="smallest batch only, l_G = 2, one repeat (a few minutes on 2 CPU cores)")
    p.add_argument("--config", default="paper64", help="model config (default paper64)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="float32 (default) or bfloat16 (GPU only): forward and langevin run every generator and "
                   "its inputs in bfloat16, train_iter uses bfloat16 autocast (TrainConfig(amp=True))")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 16 64; on a GPU 64 256)")
    p.add_argument("--train-batch", type=int, nargs="+",
                   help="batch sizes of train_iter (default: those of --batch; on a CPU only the smallest)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS,
                   help=f"default on a CPU: {' '.join(CPU_DEFAULT)}; on a GPU: {' '.join(GPU_DEFAULT)}")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--compile-everywhere", action="store_true",
                   help="on a GPU, run the _compile providers on langevin and train_iter too (default: forward "
                   "only; every compilation takes tens of seconds)")
    p.add_argument("--repeats", type=int,
                   help="timed runs per provider (default: GPU 7, train_iter 3; CPU 2; --quick 1)")
    p.add_argument("--langevin-steps", type=int,
                   help="l_G of the train_iter workload (default: TrainConfig's 20 on a GPU, 5 on a CPU, "
                   "2 with --quick)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; no new measurement starts after this (results so far are kept)")
    p.add_argument("--profile", action="store_true",
                   help="after the first batch size, torch.profiler tables of the top kernels of dense, "
                   "dense_folded and sparse (forward; forward + backward) in <stem>_profile.md")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tf32", action="store_true", help="let float32 matrix products and convolutions use TF32 "
                   "on a GPU, dense and sparse alike (default: IEEE float32 for both)")
    p.add_argument("--out", default=None, help="results path without extension "
                   "(default benchmarks/results/generator_<device>[_<dtype>][_quick])")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", metavar="JSON", help="only redraw the table (.md) and plot (.png) of a results "
                   "file's last run")
    args = p.parse_args(argv)
    if args.replot:
        return args
    try:
        gpu = torch.device(args.device).type == "cuda"
    except RuntimeError as exc:
        p.error(f"--device {args.device}: {exc}")
    if args.dtype != "float32" and not gpu:
        p.error(f"--dtype {args.dtype}: the CPU kernels take float32 and float64 (bfloat16 needs --device cuda)")
    graphs = [q for q in (args.providers or []) if mode_of(q) == "graph"]
    if graphs and not gpu:
        p.error(f"--providers {' '.join(graphs)}: CUDA graphs need --device cuda")
    chosen = args.providers or (GPU_DEFAULT if gpu else CPU_DEFAULT)
    args.providers = [q for q in PROVIDERS if q in chosen]  # table order; graphs are set up last
    return args


def plot_title(run: dict) -> str:
    env = run["environment"]
    settings = run["settings"]
    return (f"{run['config']}, {env['device_name']} ({env['device']}, {env['torch_threads']} threads), "
            f"{settings.get('dtype', 'float32')}{' tf32' if settings.get('tf32') else ''}, torch {env['torch']}, "
            f"l_G={settings['langevin_steps_train_iter']} in train_iter"
            + (" [reference fallbacks]" if env["reference_fallback_ops"] else ""))


def _markdown(run: dict) -> str:
    ratios(run["rows"])
    return markdown_table(run["rows"])


def progress_line(row: dict) -> str:
    def x(key):
        v = row.get(key)
        return f"x{v:6.2f}" if v else "     -"
    line = (f"  {row['workload']:10s} B={row['batch']:<4d} {row['provider']:18s} {row['median_s']:9.5f} s "
            f"{row['images_per_s']:9.1f} img/s  vs dense {x('speedup_vs_dense')}  vs folded "
            f"{x('speedup_vs_dense_folded')}  same mode {x('speedup_vs_dense_same_mode')}")
    if "peak_mb" in row:
        line += f"  peak {row['peak_mb']:8.1f} MB"
    if "act_mb" in row:
        line += f"  act {row['act_mb']:.1f} MB"
    if row.get("host_syncs"):
        line += f"  host syncs {row['host_syncs']}"
    return line


class Budget:
    def __init__(self, seconds: Optional[float]):
        self.deadline = time.monotonic() + seconds if seconds else None

    def spent(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def measure_block(block: list, setups: dict, repeats: int, device: torch.device, budget: Budget) -> None:
    """Warm up, time (round robin) and measure the memory of one workload at one batch size.

    ``setups``: ``{provider: setup()}``, each returning a dict with ``run`` (one call), ``warmup`` (the first
    call: compiles or captures), ``calls`` (None: from a timed call after the warm-up), ``memory`` (None: one
    ``run`` under a :class:`MemoryMeter`; a callable returning ``{"peak_bytes", "act_bytes"}``) and optionally
    ``peak_bytes`` (measured already) and ``host_syncs`` (bool: count them once).
    """
    gpu = device.type == "cuda"
    runners = {}
    rows = {row["provider"]: row for row in block}
    # Set up eager providers first, then graphs, then the compiled ones (the slowest warm-ups, the first to go
    # when the budget runs out); the rows keep the table's order.
    for row in sorted(block, key=lambda r: ("eager", "graph", "compile").index(mode_of(r["provider"]))):
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
            row["error"] = error_text(exc)
            print(f"  {row['workload']} B={row['batch']} {p}: {row['error']}", flush=True)
    times = {p: [] for p in runners}
    for _ in range(repeats):
        for p, r in list(runners.items()):
            try:
                times[p].append(time_calls(r["run"], r["calls"], device))
            except Exception as exc:  # noqa: BLE001
                rows[p]["error"] = error_text(exc)
                print(f"  {rows[p]['workload']} B={rows[p]['batch']} {p}: {rows[p]['error']}", flush=True)
                del runners[p]
    for p, r in runners.items():
        row = rows[p]
        row["times_s"] = times[p]
        row["median_s"] = statistics.median(times[p])
        row["min_s"] = min(times[p])
        row["images_per_s"] = row["batch"] / row["median_s"]
        try:
            if r.get("peak_bytes") is not None:
                row["peak_mb"] = r["peak_bytes"] / MB
            elif r.get("memory") is None:
                with MemoryMeter(device) as m:
                    r["run"]()
                row["peak_mb"] = m.peak / MB
            else:
                figures = r["memory"]()
                row["peak_mb"] = figures["peak_bytes"] / MB
                row["act_mb"] = figures["act_bytes"] / MB
        except Exception as exc:  # noqa: BLE001
            row["memory_error"] = error_text(exc)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, _markdown, lambda run, png: plot(run["rows"], png, plot_title(run)))
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if gpu and device.index is not None:
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.set_float32_precision(args.tf32)
    dtype = DTYPES[args.dtype]
    amp = args.dtype == "bfloat16"
    from sparsegen import TrainConfig

    batches = args.batch or ([64, 256] if gpu else [16, 64])
    if args.quick:
        batches = sorted(batches)[:1]
    train_batches = args.train_batch or (batches if gpu else sorted(batches)[:1])
    repeats = args.repeats or (1 if args.quick else (7 if gpu else 2))
    train_repeats = args.repeats or (1 if args.quick else (3 if gpu else 2))
    l_g = args.langevin_steps or (2 if args.quick else (TrainConfig().langevin_steps if gpu else 5))
    budget = Budget(args.budget)
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)

    fallback = import_kernels()
    env = environment(device, fallback, args.dtype, args.tf32)
    kind = "cuda" if gpu else "cpu"
    dtype_tag = "" if args.dtype == "float32" else "_" + args.dtype
    stem = args.out or os.path.join(RESULTS, f"generator_{kind}{dtype_tag}{'_quick' if args.quick else ''}")
    result = {"benchmark": "generator", "quick": args.quick, "config": args.config, "environment": env,
              "settings": {"batches": batches, "train_batches": train_batches, "repeats": repeats,
                           "train_repeats": train_repeats, "langevin_steps_train_iter": l_g,
                           "providers": args.providers, "workloads": args.workloads,
                           "compile_everywhere": args.compile_everywhere,
                           "dtype": args.dtype, "tf32": args.tf32,
                           "precision": ("forward/langevin: generator and inputs cast to bfloat16; train_iter: "
                                         "TrainConfig(amp=True), bfloat16 autocast") if amp else "float32",
                           "budget_s": args.budget,
                           "timing": ("median of repeats, round robin over providers, after 1 warm-up each; "
                                      + (f"GPU: CUDA events over back-to-back calls lasting ~{TARGET_S * 1e3:.0f} "
                                         "ms (train_iter: 1 call), per call; graphs: replay of one captured call"
                                         if gpu else "CPU: wall clock of one call")),
                           "memory": "peak allocated above the start of the run (CPU: torch.profiler "
                                     "allocator events; GPU: max_memory_allocated; graphs: the captured call)"},
              "rows": []}
    print(f"# generator benchmark: {args.config} on {env['device_name']} ({env['device']}, "
          f"{env['torch_threads']} threads), torch {env['torch']}, {args.dtype}{' tf32' if args.tf32 else ''}, "
          f"l_G={l_g} in train_iter", flush=True)
    if fallback:
        print(f"# WARNING: no compiled CPU kernel for {fallback}: the sparse providers run the slow references")
    skipped = [p for p in args.providers if not any(applies(p, w, gpu, args.compile_everywhere)
                                                    for w in args.workloads)]
    if gpu and not args.compile_everywhere and any(mode_of(p) == "compile" for p in args.providers):
        print("# the _compile providers run forward only (--compile-everywhere for langevin and train_iter)")
    if skipped:
        print(f"# nothing to measure for {skipped} on {args.workloads}")

    sampling = [w for w in args.workloads if w in GRAPH_WORKLOADS]
    gens = {}
    if sampling:
        names = {p for p in args.providers if any(applies(p, w, gpu, args.compile_everywhere) for w in sampling)}
        if args.profile:
            names |= set(PROFILED)
        try:
            gens = make_generators(sorted(names, key=PROVIDERS.index), args.config, device, dtype)
        except Exception as exc:  # noqa: BLE001  (every forward / langevin row then says why; train_iter still runs)
            result["generators_error"] = error_text(exc)
            traceback.print_exc()

    try:
        for bi, batch in enumerate(sorted(set(batches) | set(train_batches))):
            trainers = {}
            for wl in args.workloads:
                if batch not in (train_batches if wl == "train_iter" else batches):
                    continue
                block = []
                for p in args.providers:
                    if applies(p, wl, gpu, args.compile_everywhere):
                        row = {"workload": wl, "batch": batch, "provider": p, "mode": mode_of(p)}
                        block.append(row)
                        result["rows"].append(row)
                if not block:
                    continue
                if budget.spent():
                    for row in block:
                        row["skipped"] = "budget"
                    continue
                setups = {}
                if wl == "train_iter":
                    def train_setup(p=None, batch=batch, trainers=trainers):
                        if p not in trainers:
                            trainers[p] = make_trainer(p, args.config, batch, l_g, device, amp=amp)
                        run, warm, mem = train_workload(trainers[p], batch, device)
                        return {"run": run, "warmup": warm, "memory": mem, "calls": 1}
                    for row in block:
                        setups[row["provider"]] = (lambda p=row["provider"]: train_setup(p))
                else:
                    def sampling_setup(p, wl=wl, batch=batch):
                        if p not in gens:
                            raise RuntimeError(f"no model: {result.get('generators_error', 'not built')}")
                        gen = gens[p]
                        z, images = static_inputs(gen, batch, device, dtype)
                        call = sampling_call(wl, gen, z, images)
                        if mode_of(p) == "graph":
                            replay, peak = capture_graph(call, device)
                            return {"run": replay, "warmup": None, "peak_bytes": peak}
                        return {"run": call, "warmup": call, "host_syncs": True}
                    for row in block:
                        setups[row["provider"]] = (lambda p=row["provider"]: sampling_setup(p))
                try:
                    measure_block(block, setups, train_repeats if wl == "train_iter" else repeats, device, budget)
                except Exception as exc:  # noqa: BLE001  (keep what the other blocks measure)
                    for row in block:
                        if not row.get("median_s"):
                            row.setdefault("error", error_text(exc))
                    traceback.print_exc()
                ratios(result["rows"])
                for row in block:
                    if row.get("median_s"):
                        print(progress_line(row), flush=True)
                del setups
                env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
                save_run(result, stem, False, _markdown)
            trainers.clear()
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
            if args.profile and bi == 0:
                title = (f"Generator profile: {args.config}, {env['device_name']} ({env['device']}), "
                         f"{args.dtype}{' tf32' if args.tf32 else ''}, torch {env['torch']}")
                if budget.spent():
                    result["profile"] = {"skipped": "budget"}
                else:
                    try:
                        result["profile"] = profile_generators({p: gens[p] for p in PROFILED if p in gens},
                                                               min(batches), device, dtype)
                    except Exception as exc:  # noqa: BLE001
                        result["profile"] = {"error": error_text(exc)}
                        traceback.print_exc()
                os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
                with open(stem + "_profile.md", "w") as f:
                    f.write(profile_markdown(result["profile"], title) + "\n")
                print(f"profile: {stem}_profile.md", flush=True)
                save_run(result, stem, False, _markdown)
    finally:
        results_path = save_run(result, stem, True, _markdown)
    print()
    print(_markdown(result))
    if not args.no_plot:
        path = plot(result["rows"], stem + ".png", plot_title(result))
        if path:
            print(f"plot: {os.path.relpath(path, ROOT)}")
    print(f"results: {os.path.relpath(results_path, ROOT)} (this run appended)")
    return result


if __name__ == "__main__":
    main()
