"""End-to-end generator benchmark: dense vs sparse, eager vs ``torch.compile``, side by side in one process.

Workloads (``paper64`` by default, per batch size):

* ``forward``     ``G(z)`` under ``torch.no_grad()`` (sampling);
* ``langevin``    one Langevin step: forward + d/dZ with the weights frozen (Algorithm 1 step 2, Eq. 13);
* ``train_iter``  one full Algorithm 1 iteration, ``sparsegen.Trainer.step()``: critic step (Eq. 21, WGAN-GP),
  ``l_G`` Langevin steps, generator step (Eq. 15 + 20) with Adam.

Providers (the same weights: every generator is built from the same seed):

* ``dense``           ``SparseGenerator(config, sparse=False)``: the network without top-k, plain PyTorch;
* ``dense_compile``   the same under ``torch.compile``;
* ``masked``          the sparse network computed densely, as a PyTorch model would (``torch.topk`` +
  ``scatter_`` masks, ``F.interpolate`` + ``F.conv2d``; ``use_kernels=False``);
* ``sparse``          ``sparsify(dense)``: compact top-k and the sparse kernels of ``sparsegen_kernels``;
* ``sparse_compile``  the same under ``torch.compile``.

The critic is the same eager ``EnergyCritic`` for every provider (its gradient penalty needs double
backward, which ``torch.compile`` does not support). Times are the median of ``--repeats`` runs taken round
robin over the providers after one warm-up run each (which includes compilation; ``train_iter`` warms up with
``l_G = 1``). Memory, from further runs: ``peak_mb`` is the peak of memory allocated during a run above what was
allocated before it (CPU: the allocator events recorded by ``torch.profiler``; GPU:
``torch.cuda.max_memory_allocated``; ``train_iter``: an iteration with ``l_G = 1``, whose peak is the full
iteration's); for ``train_iter``, ``act_mb`` is what the generator step's forward keeps for backward (memory
held after it, batch 2B as in step 3).

    python benchmarks/bench_generator.py                  # CPU: forward, langevin at 16, 64; train_iter at 16, l_G=5
    python benchmarks/bench_generator.py --quick          # CPU: batch 16, l_G = 2, one repeat
    python benchmarks/bench_generator.py --device cuda    # GPU: batches 16, 64 and 256, l_G = 20
    python benchmarks/bench_generator.py --device cuda --budget 140   # stop starting new blocks after 140 s

Results: each run is appended to ``benchmarks/results/generator_<device>[_quick].json`` (``common.write_results``);
``.md`` (the table) and ``.png`` (the plot) show the latest. While running, ``.partial.json`` holds what has been
measured so far (an interrupted run keeps it; ``--replot`` draws it).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: environment and result files shared by the benchmarks)
from common import RESULTS, ROOT  # noqa: E402

PROVIDERS = ("dense", "dense_compile", "masked", "sparse", "sparse_compile")
WORKLOADS = ("forward", "langevin", "train_iter")


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


def environment(device: torch.device, fallback_ops: list) -> dict:
    """:func:`common.environment` plus the kernel status, versions and commit."""
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
    })
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_backend"] = sk.get_backend()
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


# ---------------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------------
def random_dataset(n: int, shape: tuple, seed: int):
    from sparsegen.data import ImageDataset

    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), name="random")


def make_trainer(provider: str, config: str, batch: int, langevin_steps: int, device: torch.device, seed: int = 0):
    """A :class:`sparsegen.Trainer` whose generator is ``provider``'s (the same weights for every provider)."""
    from sparsegen import RunConfig, TrainConfig, Trainer, model_config
    from sparsegen_kernels.sparsify import sparsify

    mcfg = model_config(config)
    train = TrainConfig(batch_size=batch, langevin_steps=langevin_steps, device=str(device), seed=seed)
    run = RunConfig(model=mcfg, sparse=False, data="random", train=train)
    trainer = Trainer(run, random_dataset(batch, mcfg.image_shape, seed), log=lambda s: None)
    gen = trainer.generator
    if provider in ("masked", "sparse", "sparse_compile"):
        gen = sparsify(gen)  # the model's own top-k layers (channel top-8 at the FC map, spatial HW/4 after)
        if provider == "masked":
            gen.use_kernels = False
    trainer.raw_generator = gen
    if provider.endswith("_compile"):
        gen = torch.compile(gen, dynamic=False)
    trainer.generator = trainer.gen_train = gen
    return trainer


# ---------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------
def workload(name: str, trainer, batch: int, device: torch.device, seed: int = 0):
    """``(run, warmup, memory)``: callables for one workload of one provider.

    ``memory()`` (None: measure one ``run()``) returns ``{"peak_bytes": ..., "act_bytes": ...}``, each measured
    inside its own meter.
    """
    from sparsegen.langevin import langevin_infer

    g = torch.Generator().manual_seed(seed)
    gen = trainer.generator
    zdim = trainer.raw_generator.z_dim
    z = torch.randn(batch, zdim, generator=g).to(device)
    images = (torch.rand(batch, *trainer.raw_generator.image_shape, generator=g) * 2 - 1).to(device)
    cfg = trainer.cfg

    if name == "forward":
        def run():
            with torch.no_grad():
                return gen(z)
        return run, run, None

    if name == "langevin":
        def run():
            return langevin_infer(gen, images, z, n_steps=1, step_size=cfg.step_size, sigma=cfg.sigma)
        return run, run, None

    if name == "train_iter":
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
            zz = torch.cat([z, torch.randn(batch, zdim, generator=g).to(device)])
            with MemoryMeter(device) as m:
                out = trainer.gen_train(zz)
            del out
            return {"peak_bytes": peak.peak, "act_bytes": m.held}

        return trainer.step, one_langevin_step, memory
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")


# ---------------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------------
def ratios(rows: list, base: str = "dense") -> None:
    """Add ``speedup`` and ``mem_ratio`` (vs ``base`` at the same workload and batch) to every row."""
    for r in rows:
        b = next((x for x in rows if x["workload"] == r["workload"] and x["batch"] == r["batch"]
                  and x["provider"] == base and x.get("median_s")), None)
        if b is None or not r.get("median_s"):
            continue
        r["speedup_vs_dense"] = b["median_s"] / r["median_s"]
        if r.get("peak_mb") and b.get("peak_mb"):
            r["peak_mem_ratio_vs_dense"] = b["peak_mb"] / r["peak_mb"]
        if r.get("act_mb") and b.get("act_mb"):
            r["act_mem_ratio_vs_dense"] = b["act_mb"] / r["act_mb"]


def markdown_table(rows: list) -> str:
    head = ("| workload | batch | provider | time (s) | images/s | speedup vs dense | peak MB | "
            "mem ratio vs dense | act MB | act ratio |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        def f(key, fmt):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        t = f("median_s", ".4g") if r.get("median_s") else (r.get("error") or r.get("skipped") or "-")
        lines.append(f"| {r['workload']} | {r['batch']} | {r['provider']} | {t} | {f('images_per_s', '.1f')} | "
                     f"{f('speedup_vs_dense', '.2f')}x | {f('peak_mb', '.1f')} | {f('peak_mem_ratio_vs_dense', '.2f')}x"
                     f" | {f('act_mb', '.1f')} | {f('act_mem_ratio_vs_dense', '.2f')}x |")
    return "\n".join(lines).replace("| -x |", "| - |")


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
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 16 64; on a GPU 16 64 256)")
    p.add_argument("--train-batch", type=int, nargs="+",
                   help="batch sizes of train_iter (default: those of --batch; on a CPU only the smallest)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--repeats", type=int, help="timed runs per provider (default 3; CPU 2; --quick 1)")
    p.add_argument("--langevin-steps", type=int,
                   help="l_G of the train_iter workload (default: TrainConfig's 20 on a GPU, 5 on a CPU, "
                   "2 with --quick)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; stop starting new measurements after this (results so far are kept)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tf32", action="store_true", help="let float32 matrix products and convolutions use TF32 "
                   "on a GPU, dense and sparse alike (default: IEEE float32 for both)")
    p.add_argument("--out", default=None, help="results path without extension "
                   "(default benchmarks/results/generator_<device>[_quick])")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", metavar="JSON", help="only redraw the table (.md) and plot (.png) of a results "
                   "file's last run")
    return p.parse_args(argv)


def plot_title(run: dict) -> str:
    env = run["environment"]
    return (f"{run['config']}, {env['device_name']} ({env['device']}, {env['torch_threads']} threads), torch "
            f"{env['torch']}, l_G={run['settings']['langevin_steps_train_iter']} in train_iter"
            + (" [reference fallbacks]" if env["reference_fallback_ops"] else ""))


def _markdown(run: dict) -> str:
    ratios(run["rows"])
    return markdown_table(run["rows"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, _markdown, lambda run, png: plot(run["rows"], png, plot_title(run)))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    common.set_float32_precision(args.tf32)
    gpu = device.type == "cuda"
    from sparsegen import TrainConfig

    batches = args.batch or ([16] if args.quick else ([16, 64, 256] if gpu else [16, 64]))
    train_batches = args.train_batch or (batches if gpu else batches[:1])
    repeats = args.repeats or (1 if args.quick else (3 if gpu else 2))
    l_g = args.langevin_steps or (2 if args.quick else (TrainConfig().langevin_steps if gpu else 5))
    deadline = time.monotonic() + args.budget if args.budget else None
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)

    fallback = import_kernels()
    env = environment(device, fallback)
    kind = "cuda" if gpu else "cpu"
    stem = args.out or os.path.join(RESULTS, f"generator_{kind}{'_quick' if args.quick else ''}")
    result = {"benchmark": "generator", "quick": args.quick, "config": args.config, "environment": env,
              "settings": {"batches": batches, "train_batches": train_batches, "repeats": repeats,
                           "langevin_steps_train_iter": l_g,
                           "providers": args.providers, "workloads": args.workloads,
                           "dtype": "float32", "tf32": args.tf32,
                           "timing": "median of repeats, round robin over providers, after 1 warm-up each",
                           "memory": "peak allocated above the start of the run (CPU: torch.profiler "
                                     "allocator events; GPU: max_memory_allocated)"},
              "rows": []}
    print(f"# generator benchmark: {args.config} on {env['device_name']} ({env['device']}, "
          f"{env['torch_threads']} threads), torch {env['torch']}, l_G={l_g} in train_iter")
    if fallback:
        print(f"# WARNING: no compiled CPU kernel for {fallback}: the sparse providers run the slow references")

    for batch in sorted(set(batches) | set(train_batches)):
        trainers = {}
        for wl in args.workloads:
            if batch not in (train_batches if wl == "train_iter" else batches):
                continue
            block = []
            for p in args.providers:
                row = {"workload": wl, "batch": batch, "provider": p}
                block.append(row)
                result["rows"].append(row)
            if deadline and time.monotonic() > deadline:
                for row in block:
                    row["skipped"] = "budget"
                continue
            runners = {}
            for row in block:
                p = row["provider"]
                try:
                    if p not in trainers:
                        trainers[p] = make_trainer(p, args.config, batch, l_g, device)
                    run, warm, mem = workload(wl, trainers[p], batch, device)
                    row["warmup_s"] = timed(warm, device)  # includes compilation
                    runners[p] = (run, mem)
                except Exception as exc:  # noqa: BLE001  (one provider failing must not stop the others)
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    print(f"  {wl} B={batch} {p}: {row['error']}")
            times = {p: [] for p in runners}
            for _ in range(repeats):
                for p, (run, _) in runners.items():
                    times[p].append(timed(run, device))
            for row in block:
                p = row["provider"]
                if p not in runners:
                    continue
                row["times_s"] = times[p]
                row["median_s"] = statistics.median(times[p])
                row["images_per_s"] = batch / row["median_s"]
                run, mem = runners[p]
                try:
                    if mem is None:
                        with MemoryMeter(device) as m:
                            run()
                        row["peak_mb"] = m.peak / MB
                    else:
                        figures = mem()
                        row["peak_mb"] = figures["peak_bytes"] / MB
                        row["act_mb"] = figures["act_bytes"] / MB
                except Exception as exc:  # noqa: BLE001
                    row["memory_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            ratios(result["rows"])
            for row in block:
                if row.get("median_s"):
                    print(f"  {wl:10s} B={batch:<4d} {row['provider']:15s} {row['median_s']:9.4f} s "
                          f"{row['images_per_s']:9.1f} img/s  x{row.get('speedup_vs_dense', float('nan')):6.2f}  "
                          f"peak {row.get('peak_mb', float('nan')):8.1f} MB "
                          f"(x{row.get('peak_mem_ratio_vs_dense', float('nan')):5.2f})"
                          + (f"  act {row['act_mb']:.1f} MB (x{row.get('act_mem_ratio_vs_dense', float('nan')):.2f})"
                             if "act_mb" in row else ""), flush=True)
            env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
            save_run(result, stem, False, _markdown)
        del trainers
        gc.collect()

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
