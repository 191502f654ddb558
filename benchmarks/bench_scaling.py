"""Scaling study: sparse vs dense throughput and memory against density and against resolution.

Three sweeps, each side by side in one process:

* ``layer``       one upsample + conv layer of ``paper64`` (``Cin -> Cout`` at ``H x W -> 2H x 2W``): dense
  ``relu(x + b)`` + ``F.interpolate`` + ``F.conv2d`` against the fused top-k (``topk_compact``) +
  ``sparse_upsample_conv2d``, with k from 1% to 100% of each channel's H*W positions;
* ``density``     the whole generator (``paper64``) sparsified at density d on every top-k layer
  (``sparsify(dense, k=d)``: channel top-(d * 3200) at the FC map, spatial top-(d * HW) after each block)
  against the dense generator;
* ``resolution``  generators of the ``paper64`` family at 32, 64 and 128 pixels (one block fewer / more),
  at the paper's sparsity (channel top-8, spatial 25%), against their dense twins.

Each measures ``forward`` (no grad) and ``train`` (forward + backward to the weights, the generator step of
Algorithm 1 without the critic). Reported per point: median time, images/s, speed-up over dense, peak memory
above the start of the run, and for ``train`` the memory held after the forward (what backward needs).
From the density sweeps: the *crossover density* (the smallest density at which sparse is no longer faster
than dense, interpolated linearly between measured points) and a least-squares fit ``time = a + b * density``
(``a``: the work that does not shrink with k; ``b``: the work proportional to k).

    python benchmarks/bench_scaling.py                 # CPU
    python benchmarks/bench_scaling.py --quick         # fewer points, smaller batch
    python benchmarks/bench_scaling.py --device cuda

Results: each run is appended to ``benchmarks/results/scaling_<device>[_quick].json``; ``.md`` and ``.png`` show
the latest (``.partial.json`` while running).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: the benchmark library)
from common import MB, MemoryMeter, find_row, memory_ratios, peak_mb, ratio, round_robin, timed  # noqa: E402

DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
QUICK_DENSITIES = (0.01, 0.05, 0.25, 0.5, 1.0)
RESOLUTIONS = {32: (512, 256), 64: (512, 256, 128), 128: (512, 256, 128, 64)}


def measure(fns: dict, device, repeats: int) -> dict:
    """``{name: (run, memory_fn or None)}`` -> ``{name: row}``: warm-up, round-robin timing, then memory."""
    for run, _ in fns.values():
        run()  # warm-up
    times = round_robin({name: (lambda run=run: timed(run, device)) for name, (run, _) in fns.items()}, repeats)
    out = {}
    for name, (run, held) in fns.items():
        row = out[name] = {"times_s": times[name]}
        row["median_s"] = statistics.median(row["times_s"])
        row["peak_mb"] = peak_mb(run, device)
        if held is not None:
            row["act_mb"] = held() / MB
    return out


def _held_after(fn, device):
    def held():
        with MemoryMeter(device) as m:
            keep = fn()
        del keep
        return m.held
    return held


# ---------------------------------------------------------------------------------------------------
# Layer level
# ---------------------------------------------------------------------------------------------------
def layer_sweep(device, batch, densities, repeats, cin=256, cout=128, size=16, log=print):
    import sparsegen_kernels as sk

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, cin, size, size, generator=g).to(device)
    b0 = (torch.randn(cin, generator=g) * 0.1).to(device)
    w0 = (torch.randn(cout, cin, 3, 3, generator=g) / (cin * 9) ** 0.5).to(device)
    cb0 = torch.zeros(cout).to(device)
    x = x0.clone().requires_grad_(True)
    w = w0.clone().requires_grad_(True)

    def dense_fwd(xx, ww):
        h = F.relu(xx + b0.view(1, -1, 1, 1))
        return F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), ww, cb0, padding=1)

    def sparse_fwd(k):
        def f(xx, ww):
            sa = sk.topk_compact(xx, k, "spatial", bias=b0, relu=True)
            return sk.sparse_upsample_conv2d(sa, ww, cb0)
        return f

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(x0, w0)
        return run

    def train(fn):
        def run():
            y = fn(x, w)
            y.backward(torch.ones_like(y))
            x.grad = w.grad = None
        return run

    rows = []
    meta = {"shape_in": [batch, cin, size, size], "shape_out": [batch, cout, 2 * size, 2 * size]}
    base = measure({"dense/forward": (fwd(dense_fwd), None),
                    "dense/train": (train(dense_fwd), _held_after(lambda: dense_fwd(x, w), device))}, device, repeats)
    for key, r in base.items():
        p, wl = key.split("/")
        rows.append({"sweep": "layer", "provider": p, "workload": wl, "density": 1.0, **r})
    for d in densities:
        k = max(1, int(round(d * size * size)))
        fn = sparse_fwd(k)
        res = measure({"sparse/forward": (fwd(fn), None),
                       "sparse/train": (train(fn), _held_after(lambda: fn(x, w), device))}, device, repeats)
        for key, r in res.items():
            p, wl = key.split("/")
            rows.append({"sweep": "layer", "provider": p, "workload": wl, "density": d, "k": k, **r})
        log(f"  layer d={d:5.2f} k={k:4d}: forward {res['sparse/forward']['median_s']:.4f} s "
            f"(dense {base['dense/forward']['median_s']:.4f}), train {res['sparse/train']['median_s']:.4f} s "
            f"(dense {base['dense/train']['median_s']:.4f})")
    return rows, meta


# ---------------------------------------------------------------------------------------------------
# Generator level
# ---------------------------------------------------------------------------------------------------
def generator_fns(gen, batch, device):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, gen.z_dim, generator=g).to(device)

    def fwd():
        with torch.no_grad():
            return gen(z)

    def train():
        y = gen(z)
        y.square().mean().backward()
        for p in gen.parameters():
            p.grad = None

    return {"forward": (fwd, None), "train": (train, _held_after(lambda: gen(z), device))}


def density_sweep(device, batch, densities, repeats, config="paper64", log=print):
    from sparsegen import SparseGenerator
    from sparsegen_kernels.sparsify import sparsify

    torch.manual_seed(0)
    dense = SparseGenerator(config, sparse=False).to(device)
    rows = []
    base = measure({f"dense/{k}": v for k, v in generator_fns(dense, batch, device).items()}, device, repeats)
    for key, r in base.items():
        rows.append({"sweep": "density", "provider": "dense", "workload": key.split("/")[1], "density": 1.0, **r})
    for d in densities:
        sp = sparsify(dense, k=d)
        res = measure({f"sparse/{k}": v for k, v in generator_fns(sp, batch, device).items()}, device, repeats)
        for key, r in res.items():
            rows.append({"sweep": "density", "provider": "sparse", "workload": key.split("/")[1], "density": d,
                         "layer_topk": {n: list(v) for n, v in sp.layer_topk.items()}, **r})
        log(f"  generator d={d:5.2f}: forward {res['sparse/forward']['median_s']:.4f} s "
            f"(dense {base['dense/forward']['median_s']:.4f}), train {res['sparse/train']['median_s']:.4f} s "
            f"(dense {base['dense/train']['median_s']:.4f})")
        del sp
        gc.collect()
    return rows


def resolution_sweep(device, batch, resolutions, repeats, log=print):
    from sparsegen import SparseGenerator, model_config
    from sparsegen_kernels.sparsify import sparsify

    rows = []
    for res in resolutions:
        cfg = model_config("paper64").replace(name=f"res{res}", block_channels=RESOLUTIONS[res])
        torch.manual_seed(0)
        dense = SparseGenerator(cfg, sparse=False).to(device)
        sp = sparsify(dense)
        fns = {f"dense/{k}": v for k, v in generator_fns(dense, batch, device).items()}
        fns.update({f"sparse/{k}": v for k, v in generator_fns(sp, batch, device).items()})
        out = measure(fns, device, repeats)
        for key, r in out.items():
            p, wl = key.split("/")
            rows.append({"sweep": "resolution", "provider": p, "workload": wl, "resolution": res,
                         "layer_topk": {n: list(v) for n, v in sp.layer_topk.items()} if p == "sparse" else None,
                         **r})
        log(f"  resolution {res}: forward dense {out['dense/forward']['median_s']:.4f} s, sparse "
            f"{out['sparse/forward']['median_s']:.4f} s; train dense {out['dense/train']['median_s']:.4f} s, "
            f"sparse {out['sparse/train']['median_s']:.4f} s")
        del dense, sp
        gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------
def dense_of(rows, r):
    """The dense row of ``r``'s sweep, workload and resolution, or None."""
    return find_row(rows, sweep=r["sweep"], provider="dense", workload=r["workload"], resolution=r.get("resolution"))


def add_ratios(rows):
    for r in rows:
        if r["provider"] == "dense":
            continue
        b = dense_of(rows, r)
        if b is not None:
            r["speedup_vs_dense"] = b["median_s"] / r["median_s"]
            r["peak_mem_ratio_vs_dense"] = ratio(b["peak_mb"], r["peak_mb"])  # None where the row's peak is 0
            memory_ratios(r, b)


def analyse(rows):
    """Crossover density and the linear fit ``time = a + b * density`` per (sweep, workload)."""
    out = {}
    for sweep in ("layer", "density"):
        for wl in ("forward", "train"):
            dense = [r for r in rows if r["sweep"] == sweep and r["provider"] == "dense" and r["workload"] == wl]
            pts = sorted((r["density"], r["median_s"]) for r in rows
                         if r["sweep"] == sweep and r["provider"] == "sparse" and r["workload"] == wl)
            if not dense or len(pts) < 2:
                continue
            td = dense[0]["median_s"]
            cross = None
            if pts[0][1] >= td:
                cross = f"< {pts[0][0]:g}"
            else:
                for (d0, t0), (d1, t1) in zip(pts, pts[1:]):
                    if t1 >= td:
                        cross = d0 + (td - t0) * (d1 - d0) / (t1 - t0) if t1 != t0 else d1
                        break
                if cross is None:
                    cross = f"> {pts[-1][0]:g} (sparse wins everywhere)"
            n = len(pts)
            mx = sum(d for d, _ in pts) / n
            my = sum(t for _, t in pts) / n
            sxx = sum((d - mx) ** 2 for d, _ in pts)
            b = sum((d - mx) * (t - my) for d, t in pts) / sxx if sxx else 0.0
            a = my - b * mx
            out[f"{sweep}/{wl}"] = {
                "dense_s": td, "crossover_density": cross, "fit_a_s": a, "fit_b_s_per_density": b,
                "fixed_fraction_at_25pct": a / (a + 0.25 * b) if a + 0.25 * b > 0 else None,
                "sparse_s_at": {f"{d:g}": t for d, t in pts},
            }
    return out


def markdown(rows, summary) -> str:
    lines = ["| sweep | workload | point | dense s | sparse s | speed-up | peak MB dense / sparse "
             "| act MB dense / sparse |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["provider"] != "sparse":
            continue
        b = dense_of(rows, r)
        point = f"{r['resolution']} px" if r["sweep"] == "resolution" else f"{r['density']:.0%}"
        act = f"{b['act_mb']:.0f} / {r['act_mb']:.0f}" if r.get("act_mb") is not None and b.get("act_mb") else "-"
        lines.append(f"| {r['sweep']} | {r['workload']} | {point} | {b['median_s']:.4g} | {r['median_s']:.4g} | "
                     f"{r.get('speedup_vs_dense', float('nan')):.2f}x | {b['peak_mb']:.0f} / {r['peak_mb']:.0f} "
                     f"| {act} |")
    lines += ["", "| sweep/workload | crossover density | fit: a (s) + b (s) x density | fixed share at 25% |",
              "|---|---|---|---|"]
    for key, s in summary.items():
        c = s["crossover_density"]
        c = f"{c:.1%}" if isinstance(c, float) else c
        fs = s["fixed_fraction_at_25pct"]
        lines.append(f"| {key} | {c} | {s['fit_a_s']:.4g} + {s['fit_b_s_per_density']:.4g} d | "
                     f"{'-' if fs is None else format(fs, '.0%')} |")
    return "\n".join(lines)


def plot(rows, summary, path, title):
    plt = common.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.3))
    for ax, sweep, label in ((axes[0], "layer", "one upsample+conv layer"), (axes[1], "density", "whole generator")):
        for wl, c in (("forward", "C0"), ("train", "C1")):
            pts = sorted((r["density"], r["median_s"]) for r in rows
                         if r["sweep"] == sweep and r["provider"] == "sparse" and r["workload"] == wl)
            dense = [r["median_s"] for r in rows if r["sweep"] == sweep and r["provider"] == "dense"
                     and r["workload"] == wl]
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], "o-", color=c, label=f"sparse {wl}")
            if dense:
                ax.axhline(dense[0], color=c, ls="--", label=f"dense {wl}")
            cross = summary.get(f"{sweep}/{wl}", {}).get("crossover_density")
            if isinstance(cross, float):
                ax.axvline(cross * 100, color=c, ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density k / group size (%)")
        ax.set_ylabel("seconds")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    for wl, c in (("forward", "C0"), ("train", "C1")):
        pts = sorted((r["density"], r["peak_mb"], r.get("act_mb")) for r in rows
                     if r["sweep"] == "density" and r["provider"] == "sparse" and r["workload"] == wl)
        dense = [r for r in rows if r["sweep"] == "density" and r["provider"] == "dense" and r["workload"] == wl]
        if pts:
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], "o-", color=c, label=f"sparse {wl} peak")
            if wl == "train" and pts[0][2] is not None:
                ax.plot([p[0] * 100 for p in pts], [p[2] for p in pts], "s-", color="C2", label="sparse train act")
        if dense:
            ax.axhline(dense[0]["peak_mb"], color=c, ls="--", label=f"dense {wl} peak")
            if wl == "train" and dense[0].get("act_mb"):
                ax.axhline(dense[0]["act_mb"], color="C2", ls="--", label="dense train act")
    ax.set_xscale("log")
    ax.set_xlabel("density (%)")
    ax.set_ylabel("MB")
    ax.set_title("whole generator: memory", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[3]
    for wl, m in (("forward", "o"), ("train", "s")):
        pts = sorted((r["resolution"], r.get("speedup_vs_dense"), r.get("peak_mem_ratio_vs_dense")) for r in rows
                     if r["sweep"] == "resolution" and r["provider"] == "sparse" and r["workload"] == wl)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], m + "-", color="C0", label=f"speed-up {wl}")
            ax.plot([p[0] for p in pts], [p[2] or 0 for p in pts], m + "--", color="C3", label=f"peak-mem ratio {wl}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("image size (px)")
    ax.set_ylabel("dense / sparse (x)")
    ax.set_title("resolution (paper sparsity)", fontsize=9)
    ax.legend(fontsize=7)
    return common.save_figure(fig, path, title)


def plot_title(run: dict) -> str:
    env = run["environment"]
    return (f"sparse vs dense scaling, {common.describe(env)}, torch {env['torch']}, batch {run['settings']['batch']}"
            + common.fallback_note(env))


def _markdown(run: dict) -> str:
    add_ratios(run["rows"])
    run["summary"] = analyse(run["rows"])
    return markdown(run["rows"], run["summary"])


def draw(run: dict, png: str):
    return plot(run["rows"], run["summary"], png, plot_title(run))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer densities, batch 4, one repeat")
    p.add_argument("--batch", type=int, help="batch size (default 16; GPU 64; --quick 4)")
    p.add_argument("--repeats", type=int, help="timed runs per point (default 3; CPU 2; --quick 1)")
    p.add_argument("--sweeps", nargs="+", default=["layer", "density", "resolution"],
                   choices=["layer", "density", "resolution"])
    p.add_argument("--densities", type=float, nargs="+")
    p.add_argument("--resolutions", type=int, nargs="+", default=sorted(RESOLUTIONS), choices=sorted(RESOLUTIONS))
    common.add_run_args(p, "results path without extension (default benchmarks/results/scaling_<device>[_quick])")
    args = p.parse_args(argv)
    if args.replot:
        return common.replot(args.replot, _markdown, draw)
    device = common.start_device(args)
    gpu = device.type == "cuda"
    batch = args.batch or (4 if args.quick else (64 if gpu else 16))
    repeats = args.repeats or (1 if args.quick else (3 if gpu else 2))
    densities = tuple(args.densities or (QUICK_DENSITIES if args.quick else DENSITIES))
    for d in densities:
        if not 0 < d <= 1:
            raise SystemExit(f"--densities: {d} is not in (0, 1]")

    env = common.environment(device)
    stem = args.out or common.default_stem("scaling", env["device"], args.quick)
    print(f"# scaling: {common.describe(env)}, torch {env['torch']}, batch {batch}")
    common.warn_fallbacks(env, "the sparse side runs")
    result = {"benchmark": "scaling", "quick": args.quick, "environment": env,
              "settings": {"batch": batch, "repeats": repeats, "densities": densities, "sweeps": args.sweeps,
                           "resolutions": args.resolutions, "dtype": "float32"},
              "rows": [], "summary": {}}

    def save(final=False):
        _markdown(result)  # ratios and summary
        return common.save_run(result, stem, final, _markdown)

    t0 = time.perf_counter()
    if "layer" in args.sweeps:
        rows, meta = layer_sweep(device, batch, densities, repeats)
        result["settings"]["layer"] = meta
        result["rows"] += rows
        save()
    if "density" in args.sweeps:
        result["rows"] += density_sweep(device, batch, densities, repeats)
        save()
    if "resolution" in args.sweeps:
        result["rows"] += resolution_sweep(device, batch, args.resolutions, repeats)
        save()
    env["seconds"] = time.perf_counter() - t0
    env["load_average_end"] = common.load_average()
    results_path = save(final=True)
    common.report_run(result, stem, results_path, _markdown, draw, args.no_plot)
    return result


if __name__ == "__main__":
    main()
