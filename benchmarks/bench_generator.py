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
(``common.save_run``; the dtype is named unless float32); ``.md`` (the table) and ``.png`` (the plot) show
the latest. While running, ``.partial.json`` holds what has been measured so far (an interrupted run keeps it;
``--replot`` draws it).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import traceback
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: the benchmark library)
from common import TARGET_S, Budget, MemoryMeter, capture_graph, error_text, find_row, memory_ratios  # noqa: E402

PROVIDERS = ("dense", "dense_folded", "dense_compile", "masked", "sparse", "sparse_compile",
             "dense_graph", "dense_folded_graph", "sparse_graph")
CPU_DEFAULT = ("dense", "dense_folded", "dense_compile", "masked", "sparse", "sparse_compile")
GPU_DEFAULT = ("dense", "dense_folded", "dense_compile", "sparse", "dense_graph", "dense_folded_graph", "sparse_graph")
WORKLOADS = ("forward", "langevin", "train_iter")
GRAPH_WORKLOADS = ("forward", "langevin")
PROFILED = ("dense", "dense_folded", "sparse")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
                 amp: bool = False, gp_every: int = 1, gp_batch: int = 0):
    """A :class:`sparsegen.Trainer` whose generator is ``provider``'s (the same weights for every provider);
    ``amp``: ``TrainConfig(amp=True)``, bfloat16 autocast of the forward passes; ``gp_every``, ``gp_batch``: those
    of :class:`sparsegen.TrainConfig` (the gradient penalty's schedule and sub-batch)."""
    from sparsegen import RunConfig, TrainConfig, Trainer, model_config
    from sparsegen_kernels.sparsify import sparsify

    if mode_of(provider) == "graph":
        raise ValueError(f"{provider}: CUDA graphs are measured on forward and langevin only")
    mcfg = model_config(config)
    train = TrainConfig(batch_size=batch, langevin_steps=langevin_steps, device=str(device), seed=seed, amp=amp,
                        gp_every=gp_every, gp_batch=gp_batch)
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
    from sparsegen import TrainConfig, langevin_infer

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
def profile_generators(gens: dict, batch: int, device: torch.device, dtype: torch.dtype,
                       iterations: int = 3) -> dict:
    """``torch.profiler`` of ``forward`` (no grad) and one training-style forward + backward
    (``out.float().square().mean()``, gradients of the parameters) per provider of ``gens``."""
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
            phases[phase] = common.profile_call(fn, device, iterations)
            print(f"  profile {phase:16s} B={batch:<4d} {p:15s} " + (
                f"{phases[phase]['total_us']:10.1f} us {phases[phase]['time']} time per call"
                if "total_us" in phases[phase] else phases[phase].get("error", "")), flush=True)
        out["providers"][p] = phases
    return out


# ---------------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------------
def ratios(rows: list) -> None:
    """Add to every row, at the same workload and batch: ``speedup_vs_dense`` (vs eager ``dense``),
    ``speedup_vs_dense_folded`` (vs eager ``dense_folded``), ``speedup_vs_dense_same_mode`` (vs ``dense_graph``
    for a graph, ``dense_compile`` for a compiled provider, ``dense`` for an eager one) and the memory ratios vs
    ``dense``."""
    measured = [x for x in rows if x.get("median_s")]
    for r in measured:
        same_case = [x for x in measured if x["workload"] == r["workload"] and x["batch"] == r["batch"]]
        for key, provider in (("speedup_vs_dense", "dense"), ("speedup_vs_dense_folded", "dense_folded"),
                              ("speedup_vs_dense_same_mode", same_mode_dense(r["provider"]))):
            b = find_row(same_case, provider=provider)
            if b is not None:
                r[key] = b["median_s"] / r["median_s"]
        dense = find_row(same_case, provider="dense")
        if dense is not None:
            memory_ratios(r, dense)


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
    plt = common.pyplot()
    if plt is None:
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
    return common.save_figure(fig, path, title)


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
    p.add_argument("--gp-every", type=int, default=1,
                   help="train_iter: TrainConfig.gp_every (default 1). The measured iteration is a run's first, "
                   "so with N > 1 it is one without the gradient penalty (the penalty's iterations are N, 2N, ...)")
    p.add_argument("--gp-batch", type=int, default=0,
                   help="train_iter: TrainConfig.gp_batch, the penalty on the first M examples (default 0: all)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; no new measurement starts after this (results so far are kept)")
    p.add_argument("--profile", action="store_true",
                   help="after the first batch size, torch.profiler tables of the top kernels of dense, "
                   "dense_folded and sparse (forward; forward + backward) in <stem>_profile.md")
    p.add_argument("--tf32", action="store_true", help="let float32 matrix products and convolutions use TF32 "
                   "on a GPU, dense and sparse alike (default: IEEE float32 for both)")
    common.add_run_args(p, "results path without extension "
                        "(default benchmarks/results/generator_<device>[_<dtype>][_quick])")
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
    return (f"{run['config']}, {common.describe(env)}, "
            f"{settings.get('dtype', 'float32')}{' tf32' if settings.get('tf32') else ''}, torch {env['torch']}, "
            f"l_G={settings['langevin_steps_train_iter']} in train_iter" + common.fallback_note(env))


def _markdown(run: dict) -> str:
    ratios(run["rows"])
    return markdown_table(run["rows"])


def draw(run: dict, png: str) -> Optional[str]:
    return plot(run["rows"], png, plot_title(run))


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        return common.replot(args.replot, _markdown, draw)
    device = common.start_device(args)
    gpu = device.type == "cuda"
    if gpu and device.index is not None:
        torch.cuda.set_device(device)
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

    env = common.environment(device, args.dtype, args.tf32)
    dtype_tag = "" if args.dtype == "float32" else "_" + args.dtype
    stem = args.out or common.default_stem("generator", env["device"], args.quick, dtype_tag)
    result = {"benchmark": "generator", "quick": args.quick, "config": args.config, "environment": env,
              "settings": {"batches": batches, "train_batches": train_batches, "repeats": repeats,
                           "train_repeats": train_repeats, "langevin_steps_train_iter": l_g,
                           "gp_every": args.gp_every, "gp_batch": args.gp_batch,
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
    print(f"# generator benchmark: {args.config} on {common.describe(env)}, torch {env['torch']}, "
          f"{args.dtype}{' tf32' if args.tf32 else ''}, l_G={l_g} in train_iter", flush=True)
    common.warn_fallbacks(env, "the sparse providers run")
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
                            trainers[p] = make_trainer(p, args.config, batch, l_g, device, amp=amp,
                                                       gp_every=args.gp_every, gp_batch=args.gp_batch)
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
                    # Set up eager providers first, then graphs, then the compiled ones (the slowest warm-ups, the
                    # first to go when the budget runs out); the rows keep the table's order.
                    common.measure_block(block, setups, train_repeats if wl == "train_iter" else repeats, device,
                                         budget, setup_rank=lambda p: ("eager", "graph", "compile").index(mode_of(p)))
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
                env["load_average_end"] = common.load_average()
                common.save_run(result, stem, False, _markdown)
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
                common.write_text(stem + "_profile.md", common.profile_markdown(result["profile"], title))
                print(f"profile: {stem}_profile.md", flush=True)
                common.save_run(result, stem, False, _markdown)
    finally:
        results_path = common.save_run(result, stem, True, _markdown)
    common.report_run(result, stem, results_path, _markdown, draw, args.no_plot)
    return result


if __name__ == "__main__":
    main()
