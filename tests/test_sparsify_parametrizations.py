"""sparsify on convs under spectral norm and weight norm, in both PyTorch APIs (``torch.nn.utils.parametrizations``
and the hook-based ``torch.nn.utils.spectral_norm`` / ``weight_norm``).

The parametrised weight is computed at every call (the pre-hooks of the hook API run first), the parametrisation's
parameters and buffers are the dense model's, and the result equals the dense model (k=1) and the top-k reference
(k=0.25), outputs and gradients, in float64. Every kind of site is covered: transposed conv, stride-1 conv and
upsample + conv consumers, and a parametrised conv whose bias moves into the next top-k.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegen_kernels as sk
from sparsegen_kernels.sparsify import sparsify
from test_sparsify_generators import TopKReference, check_outputs_and_grads

F64 = torch.float64
PARAM = nn.utils.parametrizations


def reparametrize(conv, how):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook API is deprecated
        if how == "spectral_norm":
            return PARAM.spectral_norm(conv)
        if how == "weight_norm":
            return PARAM.weight_norm(conv)
        if how == "spectral_norm_hook":
            return nn.utils.spectral_norm(conv)
        if how == "weight_norm_hook":
            return nn.utils.weight_norm(conv)
    raise ValueError(how)


HOWS = ["spectral_norm", "weight_norm", "spectral_norm_hook", "weight_norm_hook"]


def chain(how):
    """ConvT (bias) -> ReLU -> conv 3x3 -> BN -> ReLU -> up x2 -> conv 3x3 -> LeakyReLU -> ConvT, all reparametrised."""
    torch.manual_seed(0)
    r = lambda c: reparametrize(c, how)  # noqa: E731
    return nn.Sequential(
        r(nn.ConvTranspose2d(4, 6, 4, 1, 0)), nn.ReLU(),
        r(nn.Conv2d(6, 6, 3, padding=1)), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Upsample(scale_factor=2), r(nn.Conv2d(6, 5, 3, padding=1)), nn.LeakyReLU(0.2),
        r(nn.ConvTranspose2d(5, 3, 4, 2, 1))).to(F64)


class Custom(nn.Module):
    """The same layers, wired in a custom forward with functional activations and upsampling."""

    def __init__(self, how):
        super().__init__()
        self.seq = chain(how)

    def forward(self, z):
        c = self.seq
        h = F.relu(c[0](z))
        h = F.relu(c[3](c[2](h)))
        h = F.leaky_relu(c[6](F.interpolate(h, scale_factor=2)), 0.2)
        return c[8](h)


@pytest.mark.parametrize("wrap", ["sequential", "custom"])
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("k", [1.0, 0.25])
def test_reparametrised_convs(how, wrap, k):
    make = (lambda: chain(how)) if wrap == "sequential" else (lambda: Custom(how))
    g, dense = make().train(), make().train()  # the same seed (a hook-based weight norm cannot be deep-copied)
    assert len(sk.sparsify_sites(g)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", sk.SparsifyWarning)
        s = sparsify(g, k=k)
    assert list(s.state_dict()) == list(g.state_dict())
    assert all(a is b for a, b in zip(s.state_dict(keep_vars=True).values(), g.state_dict(keep_vars=True).values()))
    ref = dense if k == 1.0 else TopKReference(dense, k)
    z = torch.randn(3, 4, 1, 1, dtype=F64)
    check_outputs_and_grads(g, s, dense, ref, (z,))  # one training forward each: the power iterations match
    for (n, a), b in zip(g.named_buffers(), dense.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=n)


@pytest.mark.parametrize("how", HOWS)
def test_the_weight_is_computed_at_every_call(how):
    g = Custom(how).eval()
    s = sparsify(g, k=0.25)
    z = torch.randn(2, 4, 1, 1, dtype=F64)
    with torch.no_grad():
        before = s(z)
        for n, p in g.named_parameters():  # every parametrisation input: original, weight_orig, weight_g, weight_v
            if "bias" not in n and "running" not in n:
                p.data.mul_(1.5).add_(0.01)
        after = s(z)
    assert (after - before).abs().max() > 1e-6
    torch.testing.assert_close(after, TopKReference(g, 0.25)(z), rtol=1e-13, atol=1e-12)
