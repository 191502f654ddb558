"""The report of a run: everything :mod:`sparsegen.readout` computes, on one self-contained HTML page.

The report compares a sparse run with its dense twin (the same network trained with ``sparse=False``) when
one is given or found (:func:`~sparsegen.readout.runs.find_runs`). It uses, by job:

* :mod:`.runs`: finding and loading runs;
* :mod:`.export`: the AND-OR export (parse graphs, trees, dictionaries);
* :mod:`.evaluate`: the metrics;
* :mod:`.html`: the page.

    build_report("runs/demo/sparse", dense="runs/demo/dense")        # -> runs/demo/sparse/report.html

Everything is computed on the CPU unless a device is given; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import torch

from . import metrics as M
from .andor import part_layer
from .evaluate import evaluate, jsonable
from .export import part_level_bases, write_andor
from .html import render_page
from .render import render_side_by_side, save_image_grid
from .runs import find_runs, is_run, load, run_dir_of


def build_report(path: str, dense: Optional[str] = None, out: Optional[str] = None, *, device: str = "cpu",
                 n_eval: int = 64, steps: int = 100, fid_samples: int = 0, inception: Optional[str] = None,
                 bench_dir: Optional[str] = None, seed: int = 0, eval_options: Optional[dict] = None,
                 andor_options: Optional[dict] = None, log: Callable[[str], None] = print) -> str:
    """Analyse the run at ``path`` (and its dense twin) and write one self-contained HTML page.

    ``path``: a run directory or a folder with ``sparse/`` and ``dense/`` runs (:func:`find_runs`). The
    pictures and ``eval.json`` go to ``<sparse run>/report_files/``; the page (default
    ``<sparse run>/report.html``, or ``<path>/report.html`` for a pair folder) embeds every picture as
    base64, so it can be moved or mailed alone. ``eval_options`` / ``andor_options``: further keyword
    arguments of :func:`evaluate` / :func:`write_andor` (sizes of the samples behind each number). Returns the
    page's path.
    """
    eval_options, andor_options = dict(eval_options or {}), dict(andor_options or {})
    sparse_path, dense_path = find_runs(path, dense)
    base = run_dir_of(path) if not is_run(path) else run_dir_of(sparse_path)
    out = out or os.path.join(base, "report.html")
    files = os.path.join(os.path.dirname(os.path.abspath(out)), "report_files")
    os.makedirs(files, exist_ok=True)
    bench_dir = bench_dir or os.path.join(os.getcwd(), "benchmarks", "results")
    runs = [load(sparse_path, device)]
    if dense_path:
        runs.append(load(dense_path, device))
    t_start = time.perf_counter()
    results, figs = [], {}
    for run in runs:
        log(f"analysing {run.path} ({run.kind}, {run.loaded.config.model.name}, iteration {run.loaded.iteration})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            res = evaluate(run, n_eval=n_eval, steps=steps, fid_samples=fid_samples, inception=inception, seed=seed,
                           log=log, **eval_options)
        yt, rec = res.pop("_recon")
        k = run.kind
        rows = []
        for s in range(0, min(32, yt.shape[0]), 8):
            rows += [yt[s:s + 8], rec[s:s + 8]]
        figs[f"recon_{k}"] = save_image_grid(torch.cat(rows), os.path.join(files, f"reconstructions_{k}.png"))
        figs[f"samples_{k}"] = save_image_grid(M.sample_images(run.g, 64, seed=seed),
                                               os.path.join(files, f"samples_{k}.png"))
        loss = os.path.join(run.path, "loss.png")
        figs[f"loss_{k}"] = loss if os.path.isfile(loss) else None
        results.append(res)
    log("drawing the AND-OR tree and dictionaries")
    andor = write_andor(runs[0], os.path.join(files, "andor_sparse"), seed=seed, log=log, **andor_options)
    andor_dense = None
    if len(runs) > 1:
        andor_dense = write_andor(runs[1], os.path.join(files, "andor_dense"), seed=seed, log=log,
                                  **{**andor_options, "trees": 1})
        figs["fig7"] = render_side_by_side(
            part_level_bases(runs[0], seed=seed), part_level_bases(runs[1], seed=seed),
            os.path.join(files, "sparse_vs_dense_bases.png"),
            f"sparse: {part_layer(runs[0].g)} bases", f"dense: {part_layer(runs[1].g)} bases",
            title="Part-level basis functions of the strongest units of 8 samples (cf. CVPR Figure 7)")
    with open(os.path.join(files, "eval.json"), "w") as f:
        json.dump({"results": [jsonable(r) for r in results],
                   "andor": {k: v for k, v in andor.items() if not isinstance(v, str)}}, f, indent=1)
    html_text = render_page(runs, results, figs, andor, andor_dense, bench_dir, n_eval, steps,
                            time.perf_counter() - t_start)
    with open(out, "w", encoding="utf-8") as f:
        f.write(html_text)
    return out
