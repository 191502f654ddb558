"""AND-OR export of a run: parse graphs as JSON, AND-OR tree figures and per-layer dictionaries.

    paths = write_andor(run, "runs/demo/andor")     # parse.json, tree_<i>.png, bases_/kernels_<layer>.png
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch

from .andor import part_layer, select_units
from .basis import FixedParse, basis_dictionary, crop, energy_center, kernel_dictionary, receptive_center
from .render import layer_crop_size, render_andor_tree, render_dictionary, save_image_grid
from .runs import Run


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
    z = run.sample_latents(n_images, seed)
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
    zd = run.sample_latents(dict_latents, seed + 1)
    for name in g.layer_names:
        t0 = time.perf_counter()
        bases, counts, centers, mass = basis_dictionary(g, zd, name)
        order = torch.argsort(-mass, stable=True)[:max_channels]
        order = order[counts[order] > 0]
        S = g.image_shape[-1]
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
    g = run.g
    fp = FixedParse(g, run.sample_latents(n_latents, seed))
    layer = part_layer(g)
    lp = fp.graph[layer]
    rows = select_units(lp, per_image)
    b = fp.bases(layer, rows)
    S = g.image_shape[-1]
    size = size or max(8, S // 2)
    return crop(b, receptive_center(lp, rows, S), size)
