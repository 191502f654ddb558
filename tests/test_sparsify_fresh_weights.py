"""A sparsified generator never runs on stale weights: every way of changing the dense model's parameters and
buffers -- ``.data`` edits, ``copy_`` under ``no_grad``, ``load_state_dict``, an optimizer step on the sparse twin,
``.to()`` of either twin -- changes the sparse output exactly as it changes the top-k reference. Checked on the
nn.Sequential fast path (swapped modules) and on the graph path (a rewritten forward), in float64.
"""
import pytest
import torch

from sparsegen_kernels.sparsify import sparsify
from test_sparsify_generators import DCGANUpsample, ResNetGenerator, TopKReference, weighted_sum

F64 = torch.float64
K = 0.25


def _copy_data(g, src):
    for p, q in zip(g.parameters(), src.parameters()):
        p.data.mul_(0.5).add_(q.data, alpha=0.5)
    for b, c in zip(g.buffers(), src.buffers()):
        b.data.copy_(c.data)


def _copy_(g, src):
    with torch.no_grad():
        for p, q in zip(g.parameters(), src.parameters()):
            p.copy_(q)
        for b, c in zip(g.buffers(), src.buffers()):
            b.copy_(c)


def _optimizer_step(s, z):
    opt = torch.optim.SGD(s.parameters(), lr=0.5)
    weighted_sum(s(z)).backward()
    opt.step()


EDITS = {
    ".data": lambda g, s, src, z: _copy_data(g, src),
    "copy_": lambda g, s, src, z: _copy_(g, src),
    "load_state_dict": lambda g, s, src, z: g.load_state_dict(src.state_dict()),
    "optimizer step on the twin": lambda g, s, src, z: _optimizer_step(s, z),
    ".to() of the dense model": lambda g, s, src, z: g.to(torch.float32).to(F64),
    ".to() of the twin": lambda g, s, src, z: s.to(torch.float32).to(F64),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("cls", [DCGANUpsample, ResNetGenerator], ids=["sequential", "graph"])
def test_every_weight_change_is_seen(cls, edit):
    torch.manual_seed(0)
    g = cls().to(F64).eval()
    with torch.no_grad():  # weights that float32 cannot hold, so that a round trip through it changes them
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    src = cls().to(F64).eval()  # other weights (and, after a few forwards, other batch statistics)
    src.train()
    for _ in range(3):
        src(torch.randn(4, 8, dtype=F64))
    src.eval()
    s = sparsify(g, k=K).eval()
    ref = TopKReference(g, K)  # reads g itself
    z = torch.randn(3, 8, dtype=F64)
    with torch.no_grad():
        before = s(z)
    torch.testing.assert_close(before, ref(z).detach(), rtol=0, atol=1e-12)
    EDITS[edit](g, s, src, z)
    with torch.no_grad():
        after = s(z)
        assert (after - before).abs().max() > 1e-9
        torch.testing.assert_close(after, ref(z), rtol=0, atol=1e-12)
    assert all(p.dtype == F64 for p in s.parameters()) and all(b.dtype == F64 for b in g.buffers()
                                                              if b.is_floating_point())
