"""SparseGenerator against the architectures written out independently, with every bias random and non-zero.

The reference uses only ``F.linear``, ``F.conv2d``, ``F.conv_transpose2d``, ``F.interpolate``, ``torch.relu``,
``torch.tanh`` and top-k masks built from ``torch.topk``, reading the generator's parameters by name:

* cvpr (CVPR 2020 Table 1): FC -> ReLU -> channel top-``fc_k`` -> per block [nearest x2, conv 3x3 + ReLU,
  conv 3x3 + ReLU, spatial top-k = round(H*W*density)] -> nearest x2, conv + ReLU, conv + ReLU -> conv + tanh;
* aaai (AAAI 2019 workshop): FC -> ReLU -> global top-K -> per layer [transposed conv 4x4 stride 2 + ReLU,
  global top-K] -> transposed conv 4x4 stride 2 + tanh.

Biases start at zero in the generator, so they are drawn at random here: a bias added twice or dropped shows.
Float64, forward and gradients (parameters and latents), sparse (with the kernels and with the torch baseline)
and dense (``sparse=False``: no masks).
"""
import pytest
import torch
import torch.nn.functional as F

from sparsegen import ModelConfig, SparseGenerator

F64 = torch.float64

CVPR = ModelConfig(name="ref-cvpr", z_dim=6, fc_channels=12, fc_k=3, block_channels=(8, 6), final_channels=5,
                   critic_stem=4, critic_channels=(4, 8))  # 4x4 -> 8x8 -> 16x16 -> 32x32
AAAI = ModelConfig(name="ref-aaai", arch="aaai", z_dim=6, fc_channels=10, block_channels=(8, 5),
                   global_k=(20, 60, 150), critic_stem=4, critic_channels=(4, 8))  # 4x4 -> 8x8 -> 16x16 -> 32x32


def topk_mask(h, k, mode):
    """Keep the k largest entries of each group of ``h [N, C, H, W]`` (values here are distinct or zero)."""
    n, c, hh, ww = h.shape
    if mode == "channel":
        g = h.permute(0, 2, 3, 1).reshape(n, hh * ww, c)
    elif mode == "spatial":
        g = h.reshape(n, c, hh * ww)
    else:
        g = h.reshape(n, 1, c * hh * ww)
    mask = torch.zeros_like(g).scatter_(-1, torch.topk(g, k, dim=-1).indices, 1.0)
    if mode == "channel":
        mask = mask.reshape(n, hh, ww, c).permute(0, 3, 1, 2)
    return h * mask.reshape(n, c, hh, ww)


def up_conv(h, p, name):
    return F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), p[f"{name}.weight"], p[f"{name}.bias"],
                    padding=1)


def cvpr_reference(p, cfg, z, sparse):
    b = cfg.base_size
    h = torch.relu(F.linear(z, p["fc.weight"], p["fc.bias"]).view(z.shape[0], cfg.fc_channels, b, b))
    if sparse:
        h = topk_mask(h, cfg.fc_k, "channel")
    for i in range(len(cfg.block_channels)):
        h = torch.relu(up_conv(h, p, f"blocks.{i}.up"))
        h = torch.relu(F.conv2d(h, p[f"blocks.{i}.conv.weight"], p[f"blocks.{i}.conv.bias"], padding=1))
        if sparse:
            s = h.shape[-1]
            h = topk_mask(h, max(1, round(s * s * cfg.block_density)), "spatial")
    h = torch.relu(up_conv(h, p, "final.up"))
    h = torch.relu(F.conv2d(h, p["final.conv.weight"], p["final.conv.bias"], padding=1))
    return torch.tanh(F.conv2d(h, p["out.weight"], p["out.bias"], padding=1))


def aaai_reference(p, cfg, z, sparse):
    b = cfg.base_size
    h = torch.relu(F.linear(z, p["fc.weight"], p["fc.bias"]).view(z.shape[0], cfg.fc_channels, b, b))
    if sparse:
        h = topk_mask(h, cfg.global_k[0], "global")
    for i in range(len(cfg.block_channels)):
        h = torch.relu(F.conv_transpose2d(h, p[f"deconvs.{i}.weight"], p[f"deconvs.{i}.bias"], stride=2, padding=1))
        if sparse:
            h = topk_mask(h, cfg.global_k[i + 1], "global")
    return torch.tanh(F.conv_transpose2d(h, p["out.weight"], p["out.bias"], stride=2, padding=1))


REFERENCES = {"cvpr": cvpr_reference, "aaai": aaai_reference}


def randomized(cfg, sparse, use_kernels):
    torch.manual_seed(0)
    g = SparseGenerator(cfg, sparse=sparse, use_kernels=use_kernels).to(F64)
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, dtype=F64) * 0.5)
    return g


@pytest.mark.parametrize("sparse, use_kernels", [(True, True), (True, False), (False, True)],
                         ids=["sparse-kernels", "sparse-torch", "dense"])
@pytest.mark.parametrize("cfg", [CVPR, AAAI], ids=["cvpr", "aaai"])
def test_generator_matches_the_architecture_written_out(cfg, sparse, use_kernels):
    g = randomized(cfg, sparse, use_kernels)
    names = [n for n, _ in g.named_parameters()]
    params = dict(g.named_parameters())
    assert all(params[n].abs().min() > 0 for n in names if n.endswith(".bias"))
    z = torch.randn(3, cfg.z_dim, dtype=F64, requires_grad=True)

    y = g(z)
    y_ref = REFERENCES[cfg.arch](params, cfg, z, sparse)
    assert y.shape == (3,) + cfg.image_shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)

    # Gradients of a fixed, non-symmetric function of the images, w.r.t. every parameter and the latents.
    w = torch.linspace(-1.0, 2.0, y.numel(), dtype=F64).view_as(y)
    wrt = [params[n] for n in names] + [z]
    got = torch.autograd.grad((y * w).sum(), wrt)
    want = torch.autograd.grad((y_ref * w).sum(), wrt)
    for name, a, b in zip(names + ["z"], got, want):
        assert b.abs().sum() > 0, name  # every parameter reaches the images
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)

