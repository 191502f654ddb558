"""sparsify: dense generator -> sparsely activated twin sharing its parameters."""
import copy
import pickle

import pytest
import torch
from torch import nn

import sparsegen_kernels as sk
from sparsegen_kernels.reference import topk_mask_ref
from sparsegen_kernels.sparsify import TopKReLU, sparsify, sparsify_sites

F64 = torch.float64


def dcgan(nz=8, ngf=8, bias=False):
    """DCGAN-style generator (Radford et al.): ConvTranspose2d + BatchNorm + ReLU, 1x1 -> 16x16."""
    return nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=bias), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=bias), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, 3, 4, 2, 1, bias=bias), nn.Tanh())


class UpsampleGenerator(nn.Module):
    """Linear -> 4x4 map, then nested blocks of upsample + conv (biases on), in a custom module."""

    def __init__(self, nz=6, ch=(12, 10, 6)):
        super().__init__()
        self.ch0 = ch[0]
        self.fc = nn.Linear(nz, ch[0] * 16)
        blocks = [nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i], ch[i + 1], 3, padding=1),
                                nn.ReLU()) for i in range(len(ch) - 1)]
        # The ReLU after the reshape starts the chain; each block's ReLU feeds the next block's upsample.
        self.main = nn.Sequential(nn.Unflatten(1, (ch[0], 4, 4)), nn.ReLU(), *blocks,
                                  nn.Conv2d(ch[-1], 3, 3, padding=1), nn.Tanh())

    def forward(self, z):
        return self.main(self.fc(z))


def dense_with_masks(model, ks, modes):
    """The dense model with the top-k applied to chosen ReLU outputs by hooks: the independent reference."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    for name, k in ks.items():
        mode = modes.get(name, "spatial")

        def hook(m, inp, out, k=k, mode=mode):
            size = {"spatial": out.shape[2] * out.shape[3], "channel": out.shape[1],
                    "global": out[0].numel()}[mode]
            kk = max(1, round(k * size)) if isinstance(k, float) else k
            return topk_mask_ref(out, kk, mode)

        mods[name].register_forward_hook(hook)
    return ref


def _params_are_shared(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(pa[n] is pb[n] for n in pa)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True])
def test_dcgan_full_k_reproduces_dense(train):
    g = dcgan().to(F64).train(train)
    s = sparsify(g, k=1.0)
    assert list(sparsify_sites(g)) == ["2", "5"]
    assert isinstance(s[2], TopKReLU) and isinstance(s[3], sk.SparseConvTranspose2d)
    assert isinstance(g[2], nn.ReLU) and type(g[3]) is nn.ConvTranspose2d  # the original is untouched
    assert _params_are_shared(g, s)
    z = torch.randn(3, 8, 1, 1, dtype=F64)
    y_d, y_s = g(z), s(z)
    torch.testing.assert_close(y_s, y_d, rtol=0, atol=1e-12)
    # Gradients reach the shared parameters the same way.
    gd = torch.autograd.grad(y_d.square().sum(), list(g.parameters()))
    gs = torch.autograd.grad(y_s.square().sum(), list(s.parameters()))
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_upsample_generator_full_k_and_bias_fusion():
    g = UpsampleGenerator().to(F64)
    sites = sparsify_sites(g)
    # The last block's ReLU feeds a stride-1 3x3 conv: a site too (run as a transposed conv).
    assert list(sites) == ["main.1", "main.2.2", "main.3.2"]
    assert "conv (3, 3), stride (1, 1), padding (1, 1) 'main.4' (6 -> 3 channels)" in sites["main.3.2"]
    s = sparsify(g, k=1.0)
    assert type(s) is UpsampleGenerator
    assert list(s.state_dict()) == list(g.state_dict())
    assert _params_are_shared(g, s)
    assert isinstance(s.main[2][0], nn.Identity) and isinstance(s.main[2][1], sk.SparseUpsampleConv2d)
    assert isinstance(s.main[4], sk.SparseConv2d) and s.main[4].weight is g.main[4].weight
    # The block-1 conv hands its bias to the top-k after it.
    assert s.main[2][2]._bias_from is s.main[2][1] and "bias of 'main.2.1'" in repr(s.main[2][2])
    z = torch.randn(4, 6, dtype=F64)
    torch.testing.assert_close(s(z), g(z), rtol=0, atol=1e-12)
    gd = torch.autograd.grad(g(z).sum(), list(g.parameters()))
    gs = torch.autograd.grad(s(z).sum(), list(s.parameters()))
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # Without fusion the conv keeps its bias and the result is the same.
    s2 = sparsify(g, k=1.0, fuse_bias=False)
    assert s2.main[2][2]._bias_from is None
    torch.testing.assert_close(s2(z), g(z), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k, modes", [
    (0.25, {}),
    ({"main.1": (3, "channel"), "main.2.2": 0.25}, {"main.1": "channel"}),
    ({"main.1": (5, "global")}, {"main.1": "global"}),
    ({"main.2.2": 1}, {}),
])
def test_partial_k_matches_masked_dense(k, modes):
    g = UpsampleGenerator().to(F64)
    s = sparsify(g, k=k)
    ks = {n: (v[0] if isinstance(v, tuple) else v) for n, v in k.items()} if isinstance(k, dict) else \
        {n: k for n in sparsify_sites(g)}
    ref = dense_with_masks(g, ks, modes)
    z = torch.randn(3, 6, dtype=F64)
    torch.testing.assert_close(s(z), ref(z), rtol=0, atol=1e-12)
    gr = torch.autograd.grad(ref(z).sum(), list(ref.parameters()))
    gs = torch.autograd.grad(s(z).sum(), list(s.parameters()))
    for a, b in zip(gs, gr):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # Sites left out of a dict stay dense.
    if isinstance(k, dict) and "main.2.2" not in k:
        assert isinstance(s.main[2][2], nn.ReLU)


def test_dcgan_spatial_quarter_matches_masked_dense():
    g = dcgan(bias=True).to(F64).eval()
    s = sparsify(g, k=0.25)
    # What was rewritten: both ReLUs became top-k and the transposed convs after them sparse ones. A BatchNorm
    # sits between each biased conv and its ReLU, so no bias is fused here: every conv keeps adding its own
    # (fusion of a transposed conv's bias is tested in test_sparsify_bias_fusion.py).
    assert list(sparsify_sites(g)) == ["2", "5"]
    assert isinstance(s[2], TopKReLU) and isinstance(s[5], TopKReLU)
    assert s[2]._bias_from is None and s[5]._bias_from is None
    assert type(s[0]) is nn.ConvTranspose2d and type(s[3]) is sk.SparseConvTranspose2d
    assert type(s[6]) is sk.SparseConvTranspose2d
    assert all(s[i].bias is g[i].bias and g[i].bias.abs().sum() > 0 for i in (0, 3, 6))
    ref = dense_with_masks(g, {"2": 0.25, "5": 0.25}, {})
    z = torch.randn(2, 8, 1, 1, dtype=F64)
    out = s(z)
    torch.testing.assert_close(out, ref(z), rtol=0, atol=1e-12)
    a = s[:3](z)  # the compact activation after the first top-k: 4 of the 16 positions of each channel
    assert isinstance(a, sk.SparseActivation) and a.k == 4 and a.shape == (2, 32, 4, 4)


def test_fraction_resolves_per_resolution():
    t = TopKReLU(0.25, "spatial")
    assert t.group_k((1, 3, 4, 4)) == 4 and t.group_k((1, 3, 8, 8)) == 16 and t.group_k((1, 3, 1, 1)) == 1
    assert TopKReLU(0.5, "channel").group_k((1, 6, 4, 4)) == 3
    assert TopKReLU(7, "global").group_k((1, 6, 4, 4)) == 7
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(TopKReLU(0.25, compact=False)(x), topk_mask_ref(torch.relu(x), 16, "spatial"))


def test_fine_tuning_trains_the_shared_parameters():
    g = UpsampleGenerator()
    s = sparsify(g, k=0.5)
    before = g.main[2][1].weight.detach().clone()
    opt = torch.optim.SGD(s.parameters(), lr=0.1)
    loss = s(torch.randn(4, 6)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in g.parameters())  # the grads land on the dense model's parameters
    opt.step()
    assert not torch.equal(g.main[2][1].weight, before)
    # A dense checkpoint loads into the sparse twin (same keys) and vice versa.
    g2 = UpsampleGenerator()
    s.load_state_dict(g2.state_dict())
    assert torch.equal(g.fc.weight, g2.fc.weight)


def test_inplace_and_copies():
    g = dcgan()
    s = sparsify(g, k=2, inplace=True)
    assert s is g and isinstance(g[2], TopKReLU) and g[2].k == 2
    z = torch.randn(2, 8, 1, 1)
    y = s(z)
    c = copy.deepcopy(s)  # the fused-bias reference follows the copy
    torch.testing.assert_close(c(z), y)
    p = pickle.loads(pickle.dumps(s))
    torch.testing.assert_close(p(z), y)
    # Sparsifying an already sparse module finds nothing more to do.
    with pytest.raises(ValueError, match="found no ReLU"):
        sparsify(s, k=1.0)


def test_bias_fusion_survives_copy():
    g = UpsampleGenerator()
    s = copy.deepcopy(sparsify(g, k=0.5))
    assert s.main[2][2]._bias_from is s.main[2][1]
    assert s.main[2][1].bias is not g.main[2][1].bias


def test_sparse_upsample_conv_after_relu_is_a_site():
    m = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), sk.SparseUpsampleConv2d(6, 5)).to(F64)
    assert list(sparsify_sites(m)) == ["1"]
    s = sparsify(m, k=1.0)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    torch.testing.assert_close(s(x), m(x), rtol=0, atol=1e-12)
    assert s[1]._bias_from is s[0]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(k=1.5), ValueError, r"in \(0, 1\]"),
    (dict(k=0.0), ValueError, r"in \(0, 1\]"),
    (dict(k=True), TypeError, "must be an int"),
    (dict(k="all"), TypeError, "must be an int"),
    (dict(k=None), ValueError, "needs k"),
    (dict(k=0.5, mode="rows"), ValueError, "unknown mode"),
    (dict(k={"nope": 2}), ValueError, "not sparsifiable"),
    (dict(k={"2": (2, "spatial", 1)}), ValueError, "pair"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sparsify(dcgan(), **kwargs)


def test_nothing_to_sparsify():
    with pytest.raises(ValueError, match=r"found no ReLU.*strided conv \(stride \(2, 2\)\)"):
        sparsify(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3, stride=2)), k=1)
    with pytest.raises(TypeError):
        sparsify(lambda z: z, k=1)


def test_k_too_large_for_group_fails_at_run_time():
    s = sparsify(dcgan(), k=17)  # the first map is 4x4: only 16 positions per channel
    with pytest.raises(ValueError, match="group size is 16"):
        s(torch.randn(1, 8, 1, 1))


# ---------------------------------------------------------------------------------------------------
# sparsegen.SparseGenerator (sparse=False): switched to its own sparse path
# ---------------------------------------------------------------------------------------------------
sparsegen = pytest.importorskip("sparsegen")


@pytest.mark.parametrize("config, batch", [("tiny16", 3), ("aaai", 1), ("paper64", 1)])
def test_sparse_generator_full_k_reproduces_dense(config, batch):
    g = sparsegen.SparseGenerator(config, sparse=False).to(F64)
    s = sparsify(g, k=1.0)
    assert s.sparse and not g.sparse and _params_are_shared(g, s)
    z = torch.randn(batch, g.z_dim, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(s(z), g(z), rtol=0, atol=1e-12)


def test_sparse_generator_default_k_is_its_own():
    g = sparsegen.SparseGenerator("tiny16", sparse=False).to(F64)
    s = sparsify(g)
    ref = sparsegen.SparseGenerator("tiny16", sparse=True).to(F64)
    ref.load_state_dict(g.state_dict())
    assert s.layer_topk == ref.layer_topk
    z = torch.randn(2, g.z_dim, dtype=F64)
    torch.testing.assert_close(s(z), ref(z), rtol=0, atol=1e-12)
    # Fine-tuning the sparse twin trains the dense generator's parameters.
    s(z).sum().backward()
    assert g.fc.weight.grad is not None
    assert list(sparsify_sites(g)) == g.layer_names


def test_sparse_generator_dict_and_errors():
    g = sparsegen.SparseGenerator("tiny16", sparse=False)
    s = sparsify(g, k={"block1": 0.5})
    c, h, w = g.layer_shapes["fc"]
    assert s.layer_topk["block1"] == (32, "spatial") and s.layer_topk["fc"] == (c, "channel")
    with pytest.raises(ValueError, match="not sparsifiable"):
        sparsify(g, k={"block9": 2})
    with pytest.raises(ValueError, match="out of range"):
        sparsify(g, k=10_000)


@pytest.mark.slow
def test_compiles_fullgraph():
    g = UpsampleGenerator()
    s = sparsify(g, k={"main.1": (3, "channel"), "main.2.2": 0.25})
    z = torch.randn(2, 6)
    c = torch.compile(s, fullgraph=True)
    torch.testing.assert_close(c(z), s(z), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# SparseConv2d: the stride-1 conv of a site
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel, padding", [(3, 1), (1, 0), ((3, 5), (1, 2)), (3, 0), (4, 1), (5, "same"),
                                             (3, "valid"), (3, 2)])
def test_sparse_conv2d_is_conv2d_on_the_survivors(kernel, padding):
    m = sk.SparseConv2d(6, 5, kernel, padding=padding).to(F64)
    x = torch.randn(2, 6, 7, 6, dtype=F64)
    sa = sk.topk_compact(x, 10, "spatial", None, True)
    values = sa.values.clone().requires_grad_()
    out = m(sk.SparseActivation(values, sa.indices, sa.shape, sa.mode))
    dense_in = sa.to_dense().requires_grad_()
    ref = torch.nn.functional.conv2d(dense_in, m.weight, m.bias, padding=padding)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [values, m.weight, m.bias], g)
    want = torch.autograd.grad(ref, [dense_in, m.weight, m.bias], g)
    # the input gradient at the surviving entries only
    torch.testing.assert_close(got[0], want[0].reshape(2, 6, -1).gather(2, sa.indices.long()), rtol=0, atol=1e-12)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(m(sa.to_dense()), ref, rtol=0, atol=1e-12)  # a dense input: its zeros skipped


@pytest.mark.parametrize("kwargs", [dict(stride=2), dict(dilation=2), dict(groups=2), dict(padding=3),
                                    dict(padding="same", kernel_size=4), dict(padding_mode="reflect", padding=1)])
def test_sparse_conv2d_refuses_what_the_kernels_cannot_compute(kwargs):
    kwargs = {"kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match="SparseConv2d supports stride 1"):
        sk.SparseConv2d(4, 4, **kwargs)
