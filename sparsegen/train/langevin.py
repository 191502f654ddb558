"""Langevin inference of the latents (CVPR 2020 Eq. 13-14; alternating back-propagation, Han et al. 2017).

Only the gradient with respect to Z is computed: the generator's parameters are made not to require
gradients for the duration, so no weight gradient is formed (the kernels skip that work too).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Union

import sparsegen_kernels as sk
import torch
from torch import Tensor, nn

GeneratorLike = Union[nn.Module, Callable[[Tensor], Tensor]]


@contextlib.contextmanager
def frozen(module: GeneratorLike) -> Iterator[None]:
    """Within the block, no parameter of ``module`` requires a gradient (restored afterwards)."""
    params = list(module.parameters()) if isinstance(module, nn.Module) else []
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def log_joint(generator: GeneratorLike, images: Tensor, z: Tensor, sigma: float) -> Tensor:
    """Eq. 14 without its constant: ``-||Y - g(Z)||^2 / (2 sigma^2) - ||Z||^2 / 2`` per example.

    ``images [N, ...]`` (the shape ``generator(z)`` returns), ``z [N, d]`` -> ``[N]`` (float32 or wider).
    """
    y = generator(z)
    if y.shape != images.shape:
        raise ValueError(f"generator(z) has shape {tuple(y.shape)} but images have shape {tuple(images.shape)}")
    r = (images - y).flatten(1)
    dt = torch.promote_types(r.dtype, torch.float32)
    return -(r.to(dt) ** 2).sum(1) / (2 * sigma ** 2) - (z.to(dt) ** 2).sum(1) / 2


def langevin_infer(generator: GeneratorLike, images: Tensor, z: Tensor, *, n_steps: int, step_size: float,
                   sigma: float, noise: bool = True, rng: Optional[torch.Generator] = None) -> Tensor:
    """Run ``n_steps`` of Langevin dynamics on the posterior p(Z | Y) of each example (Eq. 13).

    ``Z <- Z + (delta^2 / 2) * d/dZ log p(Y, Z) + delta * E``, ``E ~ N(0, I)``, with ``log p(Y, Z)`` of Eq. 14
    (:func:`log_joint`), ``delta = step_size`` and observation noise ``sigma``. ``noise=False`` drops the
    ``delta * E`` term: gradient ascent to the posterior mode.

    Args:
        generator: module or callable ``z [N, d] -> [N, ...]`` shaped like ``images``; its parameters get
            no gradient (they are frozen for the duration).
        images: observed ``Y [N, ...]``.
        z: starting latents ``[N, d]`` (not modified).
        rng: generator of the noise draws (on any device; default: the global one).

    Returns the new latents ``[N, d]``, detached. Works inside ``torch.no_grad()`` too.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if z.dim() != 2 or z.shape[0] != images.shape[0]:
        raise ValueError(f"z must be [N, d] with N = {images.shape[0]} (the images), got {tuple(z.shape)}")
    images = images.detach()
    z = z.detach().clone()
    half = 0.5 * step_size ** 2
    # The weights are frozen for the whole loop, so each upsample-conv folds its weight once for all steps.
    reuse_folds = sk.fold_cache(generator) if isinstance(generator, nn.Module) else contextlib.nullcontext()
    with frozen(generator), reuse_folds, torch.enable_grad():
        for _ in range(n_steps):
            z.requires_grad_(True)
            (grad,) = torch.autograd.grad(log_joint(generator, images, z, sigma).sum(), z)
            z = z.detach().add_(grad.to(z.dtype), alpha=half)
            if noise:
                e = torch.randn(z.shape, generator=rng, dtype=z.dtype,
                                device=rng.device if rng is not None else z.device)
                z.add_(e.to(z.device), alpha=step_size)
    return z.detach()
