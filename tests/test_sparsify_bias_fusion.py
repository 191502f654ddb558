"""sparsify: the bias of a transposed convolution right before a ReLU moves into the top-k, and is added once.

``ConvTranspose2d(bias) -> ReLU -> ConvTranspose2d(bias) -> ReLU -> ConvTranspose2d``, with plain and with
:class:`~sparsegen_kernels.SparseConvTranspose2d` layers: both ReLUs are sites, and the conv before each hands
its bias to the top-k (the middle conv is at once the consumer of one site and the bias producer of the next).
Checked against the dense model (``k=1.0``) and against an independent reference written with
``F.conv_transpose2d`` and a ``torch.topk`` mask (``k=0.25``), outputs and gradients, in float64.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegen_kernels as sk
from sparsegen_kernels.sparsify import TopKReLU, sparsify, sparsify_sites

F64 = torch.float64
# (in, out, kernel, stride, padding): 1x1 -> 4x4 -> 8x8 -> 16x16
LAYERS = [(6, 10, 4, 1, 0), (10, 7, 4, 2, 1), (7, 3, 4, 2, 1)]


def chain(conv_cls):
    torch.manual_seed(0)
    convs = [conv_cls(i, o, k, s, p, bias=True).to(F64) for i, o, k, s, p in LAYERS]
    with torch.no_grad():
        for c in convs:  # biases far from zero and of both signs: adding one twice cannot go unnoticed
            c.bias.copy_(torch.randn(c.out_channels, dtype=F64) * 0.8)
    return nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2])


def reference(model, z, k_frac):
    """The network written out with F.conv_transpose2d, ReLU and a per-channel spatial top-k from torch.topk."""
    h = z
    for j, (_, _, _, s, p) in enumerate(LAYERS):
        conv = model[2 * j]
        h = F.conv_transpose2d(h, conv.weight, conv.bias, stride=s, padding=p)
        if j == len(LAYERS) - 1:
            return h
        h = torch.relu(h)
        if k_frac is not None:
            n, c, hh, ww = h.shape
            k = max(1, round(k_frac * hh * ww))
            flat = h.reshape(n, c, hh * ww)
            idx = torch.topk(flat, k, dim=-1).indices
            mask = torch.zeros_like(flat).scatter_(-1, idx, 1.0)
            h = (flat * mask).reshape(n, c, hh, ww)


def grads(out, params):
    return torch.autograd.grad((out * torch.linspace(-1, 2, out.numel(), dtype=F64).view_as(out)).sum(), params)


@pytest.mark.parametrize("conv_cls", [nn.ConvTranspose2d, sk.SparseConvTranspose2d], ids=["plain", "sparse"])
@pytest.mark.parametrize("k", [1.0, 0.25])
def test_fused_transposed_conv_bias_is_added_once(conv_cls, k):
    g = chain(conv_cls)
    assert list(sparsify_sites(g)) == ["1", "3"]
    s = sparsify(g, k=k)
    # Both sites were rewritten and both biases fused: the top-k reads the bias of the conv before it ...
    assert isinstance(s[1], TopKReLU) and isinstance(s[3], TopKReLU)
    assert s[1]._bias_from is s[0] and s[3]._bias_from is s[2]
    assert "bias of '0'" in repr(s[1]) and "bias of '2'" in repr(s[3])
    # ... which no longer adds it itself (the parameter stays registered there, shared with the original).
    assert "bias added by the next top-k" in repr(s[0]) and "bias added by the next top-k" in repr(s[2])
    assert isinstance(s[2], sk.SparseConvTranspose2d) and isinstance(s[4], sk.SparseConvTranspose2d)
    assert s[0].bias is g[0].bias and s[2].bias is g[2].bias and s[4].bias is g[4].bias
    assert type(s[4]) is sk.SparseConvTranspose2d  # no top-k after it: it keeps its own bias

    z = torch.randn(3, LAYERS[0][0], 1, 1, dtype=F64)
    ref = reference(g, z, None if k == 1.0 else k)
    if k == 1.0:
        torch.testing.assert_close(g(z), ref, rtol=0, atol=1e-12)  # the reference is the dense model
    out = s(z)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    params = list(g.parameters())
    for (name, _), a, b in zip(g.named_parameters(), grads(out, params), grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("conv_cls", [nn.ConvTranspose2d, sk.SparseConvTranspose2d], ids=["plain", "sparse"])
def test_unfused_transposed_conv_bias_gives_the_same_result(conv_cls):
    g = chain(conv_cls)
    fused, unfused = sparsify(g, k=0.25), sparsify(g, k=0.25, fuse_bias=False)
    assert unfused[1]._bias_from is None and unfused[3]._bias_from is None
    assert type(unfused[0]) is conv_cls and type(unfused[2]) is sk.SparseConvTranspose2d
    z = torch.randn(2, LAYERS[0][0], 1, 1, dtype=F64)
    ref = reference(g, z, 0.25)
    torch.testing.assert_close(unfused(z), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(fused(z), ref, rtol=0, atol=1e-12)
