"""sparsify through torch.fx: sites in custom forward methods and functional calls, rewritten in the traced graph.

Each model is checked in float64 against the dense model with the top-k kept at the activation outputs
(``TopKReference`` of test_sparsify_generators: forward hooks and a TorchFunctionMode, ties to the lower position).
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegen_kernels as sk
from sparsegen_kernels.sparsify import TopKReLU, TracedForward, sparsify, sparsify_sites
from test_sparsify_generators import TopKReference, check_outputs_and_grads, keep_topk

F64 = torch.float64
K = 0.25


def assert_matches_reference(g, args, k=K, **kw):
    """sparsify(g, k) against the reference, outputs and every gradient."""
    s = sparsify(g, k=k, **kw)
    dense = copy.deepcopy(g)
    check_outputs_and_grads(g, s, dense, TopKReference(dense, k), args)
    return s


class Functional(nn.Module):
    """conv -> BN -> <activation> -> conv 3x3, with the activation written in several ways."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c0, self.bn, self.c1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        h = self.bn(self.c0(x))
        if self.how == "F.relu":
            a = F.relu(h)
        elif self.how == "torch.relu":
            a = torch.relu(h)
        elif self.how == "Tensor.relu":
            a = h.relu()
        elif self.how == "F.relu6":
            a = F.relu6(h * 4)
        elif self.how == "F.leaky_relu":
            a = F.leaky_relu(h, 0.1)
        elif self.how == "F.relu(inplace)":
            a = F.relu(h, inplace=True)
        elif self.how == "torch.relu_":  # the input is read again afterwards: the in-place ReLU must stay
            a = torch.relu_(h)
            return self.c1(a) + h.mean()
        return self.c1(a)


@pytest.mark.parametrize("how", ["F.relu", "torch.relu", "Tensor.relu", "F.relu6", "F.leaky_relu", "F.relu(inplace)",
                                 "torch.relu_"])
def test_functional_activations_are_sites(how):
    g = Functional(how).to(F64)
    sites = sparsify_sites(g)
    assert len(sites) == 1 and "conv (3, 3), stride (1, 1), padding (1, 1) 'c1'" in next(iter(sites.values()))
    s = assert_matches_reference(g, (torch.randn(2, 3, 8, 8, dtype=F64),))
    assert isinstance(s.forward, TracedForward)


class SharedActivation(nn.Module):
    """One ReLU object called three times: before a conv (a site), before a Linear (not one), and on a map
    that is also read by a sum (a site whose dense output the sum gets, masked)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.c1, self.c2 = nn.Conv2d(3, 5, 3, padding=1), nn.ConvTranspose2d(5, 4, 4, 2, 1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = self.c1(self.act(x))
        v = self.fc(self.act(h).mean((2, 3)))  # not a site: nothing of it reaches a conv
        a = self.act(h)
        return self.c2(a) + a.sum() + v.sum()


def test_one_module_called_at_several_places():
    g = SharedActivation().to(F64)
    assert list(sparsify_sites(g)) == ["act", "act@2"]  # the second call feeds a Linear
    s = sparsify(g, k=K)
    assert type(s.act) is nn.ReLU  # the module stays: each call is rewritten on its own
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    with torch.no_grad():  # by hand: the top-k at the first and third calls only
        h = g.c1(keep_topk(torch.relu(x), K))
        v = g.fc(torch.relu(h).mean((2, 3)))
        a = keep_topk(torch.relu(h), K)
        expected = g.c2(a) + a.sum() + v.sum()
        torch.testing.assert_close(s(x), expected, rtol=0, atol=1e-12)


class FaceGenerator(nn.Module):
    """A WGAN-style face generator: Linear, a view, a ReLU in forward, then Sequential upsample + conv blocks."""

    def __init__(self, nz=6, ch=8):
        super().__init__()
        self.ch = ch
        self.fc = nn.Linear(nz, ch * 16)
        self.main = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(True),
            nn.Upsample(scale_factor=2), nn.Conv2d(ch, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(True),
            nn.Conv2d(4, 3, 3, padding=1), nn.Tanh())

    def forward(self, z):
        x = self.fc(z).view(-1, self.ch, 4, 4)
        return self.main(F.relu(x))


def test_site_across_a_module_boundary_and_the_sequential_fast_path_together():
    g = FaceGenerator().to(F64)
    assert list(sparsify_sites(g)) == [":relu", "main.3", "main.7"]
    s = assert_matches_reference(g, (torch.randn(3, 6, dtype=F64),))
    # The ReLU in forward feeds the Sequential's upsample + conv: the graph path; the Sequential's own sites
    # are swapped modules (and the generated forward calls them).
    assert isinstance(s.forward, TracedForward)
    assert isinstance(s.main[3], TopKReLU) and isinstance(s.main[4], nn.Identity)
    assert isinstance(s.main[5], sk.SparseUpsampleConv2d) and isinstance(s.main[8], sk.SparseConv2d)
    assert type(s.main[1]) is nn.Conv2d  # consumed by the graph path's site: the module itself stays


class BiasChain(nn.Module):
    """conv (bias) -> ReLU -> conv (bias) -> ReLU -> conv, through a module and a functional call."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.w1 = nn.Parameter(torch.randn(5, 6, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(5))
        self.c2 = nn.ConvTranspose2d(5, 2, 4, 2, 1)
        with torch.no_grad():
            self.c0.bias.normal_(0, 0.8)

    def forward(self, x):
        h = F.relu(self.c0(x))
        h = F.relu(F.conv2d(h, self.w1, self.b1, padding=1))
        return self.c2(h)


@pytest.mark.parametrize("fuse_bias", [True, False])
def test_bias_fusion_in_the_graph(fuse_bias):
    g = BiasChain().to(F64)
    sites = sparsify_sites(g)
    assert list(sites) == [":relu", ":relu@1"]
    assert "F.conv2d (functional, weight 'w1')" in sites[":relu"]
    s = assert_matches_reference(g, (torch.randn(2, 3, 6, 6, dtype=F64),), fuse_bias=fuse_bias)
    assert s.forward.sites == {":relu": (K, None), ":relu@1": (K, None)}
    code = s.forward.code
    # Fused: the first conv runs without its bias (module_conv(..., 'dense', False)) and the top-k gets c0.bias;
    # the functional conv runs sparse without b1, which the second top-k adds.
    assert ("'dense', False" in code) == fuse_bias
    assert ("c0_bias" in code) == fuse_bias


class CustomConv(nn.Conv2d):
    """A conv subclass with its own forward (weight scaled at every call, like a hand-written spectral norm)."""

    def forward(self, x):
        return F.conv2d(x, self.weight * 0.5, self.bias, self.stride, self.padding)


class FunctionalConvs(nn.Module):
    def __init__(self, k2=3, p2=1):
        super().__init__()
        self.c1 = CustomConv(3, 6, 3, padding=1)
        self.c2 = CustomConv(6, 6, k2, padding=p2)
        self.w3 = nn.Parameter(torch.randn(6, 2, 4, 4) * 0.3)

    def forward(self, x):
        h = self.c1(F.relu(x))  # a stride-1 functional conv
        h = self.c2(F.interpolate(F.relu(h), scale_factor=2))  # upsample + functional conv
        return F.conv_transpose2d(F.relu(h), self.w3, stride=2, padding=1)  # a functional transposed conv


def test_functional_convs_are_consumers():
    g = FunctionalConvs().to(F64)
    assert len(sparsify_sites(g)) == 3
    assert_matches_reference(g, (torch.randn(2, 3, 5, 5, dtype=F64),))


def test_functional_conv_with_an_unexpected_kernel_runs_dense_with_a_warning():
    g = FunctionalConvs(k2=5, p2=1).to(F64)  # padding 1 after the upsampling, but a 5x5 kernel: known only at run time
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    s = sparsify(g, k=K)
    with pytest.warns(sk.SparsifyWarning, match=r"after site ':relu@1' runs dense: a \(5, 5\) kernel"):
        out = s(x)
    dense = copy.deepcopy(g)
    torch.testing.assert_close(out, TopKReference(dense, K)(x), rtol=0, atol=1e-12)


class ModeDependent(nn.Module):
    """Python control flow on the training flag, and an optional argument that defaults to None."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.embed = nn.Linear(2, 6)

    def forward(self, x, y=None):
        h = self.c0(x)
        if self.training:
            h = h * 2.0
        if y is not None:
            h = h + self.embed(y)[:, :, None, None]
        return self.c1(F.relu(h))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_training_flag_and_none_arguments_select_their_own_trace(train):
    g = ModeDependent().to(F64).train(train)
    s = sparsify(g, k=K)
    assert set(s.forward.graphs) == {(True, frozenset()), (False, frozenset())}  # both flags traced up front
    x, y = torch.randn(2, 3, 6, 6, dtype=F64), torch.randn(2, 2, dtype=F64)
    dense = copy.deepcopy(g)
    ref = TopKReference(dense, K)
    check_outputs_and_grads(g, s, dense, ref, (x, y))
    check_outputs_and_grads(g, s, dense, ref, (x,))  # y omitted: a trace with y = None, made at this call
    assert (train, frozenset({"y"})) in s.forward.graphs
    s.train(not train), dense.train(not train)
    check_outputs_and_grads(g, s, dense, ref, (x, y))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward. Its Sequential child can be sparsified."""

    def __init__(self, ch):
        super().__init__()
        self.seq = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1))
        self.c = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        if x.mean() > 100:
            x = x * 0
        return self.c(F.relu(self.seq(x)))


class WithUntraceable(nn.Module):
    def __init__(self, ch=4):
        super().__init__()
        self.c0 = nn.Conv2d(3, ch, 3, padding=1)
        self.block = Untraceable(ch)
        self.c1 = nn.ConvTranspose2d(ch, 3, 4, 2, 1)

    def forward(self, x):
        return self.c1(F.relu(self.block(F.relu(self.c0(x)))))


def test_untraceable_submodule_is_named_and_the_rest_is_sparsified():
    g = WithUntraceable().to(F64)
    with pytest.warns(sk.SparsifyWarning, match=r"'block' \(Untraceable\) stopped the trace at "
                                                 r"test_sparsify_graph.py:\d+ \(if x.mean\(\) > 100:\)"):
        s = sparsify(g, k=1.0)
    # The top module is traced with the block as an opaque call; the block's Sequential child on its own.
    assert list(sparsify_sites(g)) == [":relu@1", "block.seq.0"]
    assert isinstance(s.block.seq[0], TopKReLU) and isinstance(s.forward, TracedForward)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    torch.testing.assert_close(s(x), g(x), rtol=0, atol=1e-12)
    # ':relu' feeds the opaque block: no chain is seen there (the report finds it at run time).
    assert ":relu" not in sparsify_sites(g)


def test_sparsified_model_copies_pickles_and_has_nothing_left_to_sparsify():
    g = FaceGenerator().to(F64)
    s = sparsify(g, k=K)
    z = torch.randn(2, 6, dtype=F64)
    y = s(z)
    c = copy.deepcopy(s)
    assert c.forward.owner is c and c.fc.weight is not g.fc.weight
    torch.testing.assert_close(c(z), y, rtol=0, atol=0)
    p = pickle.loads(pickle.dumps(s))
    torch.testing.assert_close(p(z), y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="found no ReLU"):
        sparsify(s, k=K)


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.c2 = (nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                                     nn.Conv2d(4, 2, 3, padding=1))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.c2(F.relu(self.c1(self.act(self.c0(x)))))


def test_modules_with_hooks_stay_dense_and_keep_their_hooks():
    g = Hooked().to(F64)
    seen = []
    g.act.register_forward_hook(lambda m, i, o: seen.append("act"))
    g.c2.register_forward_hook(lambda m, i, o: seen.append("c2"))
    with pytest.raises(ValueError, match=r"found no ReLU.*the ReLU module has forward hooks.*the conv 'c2' has "
                                         r"forward hooks"):
        sparsify(g, k=K)
    g2 = Hooked().to(F64)
    g2.c2.register_forward_pre_hook(lambda m, i: seen.append("c2 pre"))
    with pytest.warns(sk.SparsifyWarning, match=r"the conv 'c2' has forward pre-hooks"):
        s = sparsify(g2, k=K)
    assert list(sparsify_sites(g2)) == ["act"]
    s(torch.randn(1, 3, 4, 4, dtype=F64))
    assert seen == ["c2 pre"]


@pytest.mark.slow
def test_graph_path_compiles_fullgraph():
    g = FaceGenerator()
    s = sparsify(g, k=K).eval()
    z = torch.randn(2, 6)
    c = torch.compile(s, fullgraph=True)
    torch.testing.assert_close(c(z), s(z), rtol=1e-5, atol=1e-5)


class HandWrittenSNConv(nn.Conv2d):
    """A spectral norm written by hand, as in BigGAN's code: one power iteration under no_grad, the singular vector
    stored in place in training, the weight divided by the estimate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("u", torch.randn(1, self.out_channels))

    def forward(self, x):
        w = self.weight.view(self.weight.size(0), -1)
        with torch.no_grad():
            v = F.normalize(self.u @ w)
            u = F.normalize(v @ w.t())
            if self.training:
                self.u[:] = u
        sigma = (v @ w.t() @ u.t()).squeeze()
        return F.conv2d(x, self.weight / sigma, self.bias, self.stride, self.padding)


class HandWrittenSN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.c1 = HandWrittenSNConv(3, 5, 3, padding=1), HandWrittenSNConv(5, 2, 3, padding=1)

    def forward(self, x):
        return self.c1(F.relu(self.c0(x)))


def test_gradient_mode_switches_in_a_forward_are_kept():
    """Tracing drops ``with torch.no_grad()`` unless told otherwise: the power iteration would then carry
    gradients, and the weight gradients would silently change."""
    g = HandWrittenSN().to(F64).train()
    dense = copy.deepcopy(g)
    s = sparsify(g, k=K)
    check_outputs_and_grads(g, s, dense, TopKReference(dense, K), (torch.randn(2, 3, 6, 6, dtype=F64),))
    torch.testing.assert_close(g.c0.u, dense.c0.u, rtol=0, atol=0)  # one power iteration each
    with torch.no_grad():
        out = s(torch.randn(1, 3, 6, 6, dtype=F64))
    assert torch.is_grad_enabled() and not out.requires_grad  # the caller's mode, restored after the block


class Signatures(nn.Module):
    """*args, keyword-only arguments and a None default: torch.fx reorders and renames these parameters."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x, *extra, scale=1.0, y=None):
        h = self.c(x) if y is None else self.c(x) + y
        return {"out": self.d(F.relu(h)) * scale + extra[0]}


@pytest.mark.parametrize("kwargs", [{}, {"scale": 2.0}, {"y": None, "scale": 3.0}, {"y": "tensor"}])
def test_calls_with_any_signature(kwargs):
    g = Signatures().to(F64)
    s = sparsify(g, k=1.0)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    if kwargs.get("y") == "tensor":
        kwargs = {"y": torch.randn(1, 4, 1, 1, dtype=F64)}
    torch.testing.assert_close(s(x, 0.5, **kwargs)["out"], g(x, 0.5, **kwargs)["out"], rtol=0, atol=1e-12)
    report = sk.sparsify_report(g, (x, 0.5), verbose=False)
    assert report.coverage == 1.0 and [r.name for r in report.sites] == [":relu"]
