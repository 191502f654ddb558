"""The Table 2/3/4-style numbers of a run: reconstruction MSE, template matching (NCC), part purity, FID and
the sparsity of its parses.

    metrics = evaluate(run, n_eval=64)              # a dict; jsonable(metrics) drops the pictures' tensors
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from ..data import load_dataset
from . import metrics as M
from .andor import part_layer, tree_layers
from .basis import FixedParse
from .runs import Run, heldout_spec


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
    z = run.sample_latents(n_templates_latents, seed + 2)
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
    fp = FixedParse(g, run.sample_latents(16, seed + 3))
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


def jsonable(d: dict) -> dict:
    """``d`` without its private entries (keys starting with ``_``: tensors kept for the pictures)."""
    return {k: v for k, v in d.items() if not k.startswith("_")}
