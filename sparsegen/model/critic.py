"""The energy-based critic f(Y; Phi) of CVPR 2020 (Table 1, right column; Eq. 16-21)."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import ModelConfig, model_config


class EnergyCritic(nn.Module):
    """Bottom-up ConvNet ``images [N, C, S, S] -> energies [N]``; trained to give observed images lower energy.

    Table 1: conv + LReLU (``critic_stem``) at full resolution, then per entry of ``critic_channels``:
    average-pool /2, conv + LReLU, conv + LReLU; then FC to one number. All convs 3x3, LReLU slope 0.2.
    The model of Eq. 16 is ``P(Y; Phi) ~ exp(-f(Y; Phi)) q(Y)``.

    Args:
        config: a name from :data:`sparsegen.model.configs.MODEL_CONFIGS`, a
            :class:`~sparsegen.model.configs.ModelConfig` or a dict of its fields (uses ``image_channels``,
            ``image_size``, ``critic_*``).
    """

    def __init__(self, config: Union[str, ModelConfig, dict] = "paper64"):
        super().__init__()
        self.config = cfg = model_config(config)
        self.slope = cfg.critic_slope
        self.stem = nn.Conv2d(cfg.image_channels, cfg.critic_stem, 3, padding=1)
        convs = []
        prev = cfg.critic_stem
        for ch in cfg.critic_channels:
            convs.append(nn.ModuleList([nn.Conv2d(prev, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)]))
            prev = ch
        self.stages = nn.ModuleList(convs)
        s = cfg.image_size // 2 ** len(cfg.critic_channels)
        self.fc = nn.Linear(prev * s * s, 1)

    def forward(self, y: Tensor) -> Tensor:
        """Energies ``f(y) [N]`` of images ``y [N, C, S, S]``."""
        c, s = self.config.image_channels, self.config.image_size
        if y.dim() != 4 or tuple(y.shape[1:]) != (c, s, s):
            raise ValueError(f"images must be [N, {c}, {s}, {s}], got {tuple(y.shape)}")
        h = F.leaky_relu(self.stem(y), self.slope)
        for conv1, conv2 in self.stages:
            h = F.avg_pool2d(h, 2)
            h = F.leaky_relu(conv1(h), self.slope)
            h = F.leaky_relu(conv2(h), self.slope)
        return self.fc(h.flatten(1)).squeeze(1)


def critic_loss(critic: nn.Module, real: Tensor, fake: Tensor, *, gp_weight: float = 10.0,
                eps: Optional[Tensor] = None, energy_l2: float = 0.0, gp_batch: Optional[int] = None) -> tuple:
    """Critic objective of Algorithm 1 step 1 (Eq. 21), to be minimised over Phi.

    ``mean f(real) - mean f(fake)`` (observed images get lower energy than syntheses)
    ``+ gp_weight * mean((||grad_x f(x)|| - 1)^2)`` at ``x = eps * real + (1 - eps) * fake`` (WGAN-GP)
    ``+ energy_l2 * mean(f(real)^2)`` (keeps the energies near zero). ``real, fake [N, C, S, S]``,
    ``eps [N, 1, 1, 1]`` uniform in [0, 1] (required when ``gp_weight > 0``). Returns ``(loss, stats)``,
    ``stats`` a dict of detached scalars: ``energy_real``, ``energy_fake``, ``gp``.

    ``gp_batch``: the penalty on the first ``gp_batch`` examples only (their ``x`` from ``eps[:gp_batch]``), in a
    forward pass of its own, so that the double backward keeps the activations of ``gp_batch`` images only;
    ``None`` or ``>= N``: on all of them, in one forward pass over ``[real, fake, x]`` (as DistributedDataParallel
    likes best).
    """
    n = real.shape[0]
    m = n if gp_batch is None else min(int(gp_batch), n)
    if gp_weight > 0 and m < 1:
        raise ValueError(f"critic_loss: gp_batch must be >= 1, got {gp_batch}")
    parts = [real, fake.detach()]
    x = None
    if gp_weight > 0:
        if eps is None:
            raise ValueError("critic_loss needs eps [N, 1, 1, 1] when gp_weight > 0")
        x = (eps[:m] * real[:m] + (1 - eps[:m]) * fake[:m].detach()).detach().requires_grad_(True)
        if m == n:
            parts.append(x)
    with torch.enable_grad():
        f = critic(torch.cat(parts))
        f_real, f_fake = f[:n], f[n:2 * n]
        loss = f_real.mean() - f_fake.mean()
        gp = torch.zeros((), device=real.device)
        if x is not None:
            f_x = f[2 * n:] if m == n else critic(x)
            (g,) = torch.autograd.grad(f_x.sum(), x, create_graph=True)
            gp = ((g.float().flatten(1).norm(dim=1) - 1) ** 2).mean()
            loss = loss + gp_weight * gp
        if energy_l2 > 0:
            loss = loss + energy_l2 * (f_real.float() ** 2).mean()
    stats = {"energy_real": f_real.mean().detach(), "energy_fake": f_fake.mean().detach(), "gp": gp.detach()}
    return loss, stats
