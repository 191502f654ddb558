"""sparsify on generators as people write them, each written here from its published architecture description:

* DCGAN (Radford et al. 2016): transposed convs, BatchNorm, ReLU, in an ``nn.Sequential``;
* the upsample + conv DCGAN variant (nearest x2 upsampling + 3x3 convs, BatchNorm, LeakyReLU(0.2)), once in an
  ``nn.Sequential`` and once with a custom ``forward`` calling ``F.leaky_relu`` / ``F.interpolate``;
* a ResNet GAN generator (Miyato et al. 2018, after Gulrajani et al. 2017) whose blocks have a custom ``forward``:
  BN -> ReLU -> upsample -> conv 3x3 -> BN -> ReLU -> conv 3x3, plus an upsample -> 1x1 conv shortcut;
* a BigGAN-style generator (Brock et al. 2019): blocks built with the activation module passed in (one ReLU
  object called everywhere), ``F.interpolate``, spectral-normed convs (both PyTorch APIs) and class-conditional
  BatchNorm written with ``F.batch_norm`` (so its trace depends on the training flag).

For each, in float64: every activation -> conv chain is sparsified (coverage 100%); ``sparsify(G, k=1.0)`` equals
``G``; ``sparsify(G, k=0.25)`` equals an independent reference -- the dense ``G`` with the top-k of every
activation output per channel kept by forward hooks (activation modules) and a ``TorchFunctionMode`` (functional
activations), written with a stable ``torch.sort`` -- forward and all gradients; and an EMA update of the parameters and
buffers changes the sparse output exactly as it changes the reference's.
"""
import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import sparsegen_kernels as sk

F64 = torch.float64
K = 0.25


# ---------------------------------------------------------------------------------------------------
# The generators
# ---------------------------------------------------------------------------------------------------
class DCGAN(nn.Module):
    """z -> 4x4 -> 8x8 -> 16x16 -> 32x32: ConvTranspose2d (4, stride 2, padding 1), BatchNorm, ReLU; Tanh out."""

    def __init__(self, nz=8, ngf=4):
        super().__init__()
        self.nz = nz
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, 3, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, z):
        return self.main(z.view(-1, self.nz, 1, 1))


class DCGANUpsample(nn.Module):
    """Linear -> 4x4 map -> BN -> [nearest x2 -> conv 3x3 -> BN(eps 0.8) -> LeakyReLU(0.2)] x 2 -> conv 3x3 -> Tanh."""

    def __init__(self, nz=8, ch=8, init=4):
        super().__init__()
        self.ch, self.init = ch, init
        self.l1 = nn.Linear(nz, ch * init * init)
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ch),
            nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, 3, 1, 1), nn.BatchNorm2d(ch, 0.8), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch // 2, 3, 1, 1), nn.BatchNorm2d(ch // 2, 0.8),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ch // 2, 3, 3, 1, 1), nn.Tanh())

    def forward(self, z):
        out = self.l1(z)
        return self.conv_blocks(out.view(out.shape[0], self.ch, self.init, self.init))


class DCGANUpsampleFunctional(nn.Module):
    """The same network with a custom forward: F.interpolate and F.leaky_relu between the module calls."""

    def __init__(self, nz=8, ch=8, init=4):
        super().__init__()
        self.ch, self.init = ch, init
        self.l1 = nn.Linear(nz, ch * init * init)
        self.bn0 = nn.BatchNorm2d(ch)
        self.conv1, self.bn1 = nn.Conv2d(ch, ch, 3, 1, 1), nn.BatchNorm2d(ch, 0.8)
        self.conv2, self.bn2 = nn.Conv2d(ch, ch // 2, 3, 1, 1), nn.BatchNorm2d(ch // 2, 0.8)
        self.conv3 = nn.Conv2d(ch // 2, 3, 3, 1, 1)

    def forward(self, z):
        h = self.bn0(self.l1(z).view(-1, self.ch, self.init, self.init))
        h = F.leaky_relu(self.bn1(self.conv1(F.interpolate(h, scale_factor=2))), 0.2)
        h = F.leaky_relu(self.bn2(self.conv2(F.interpolate(h, scale_factor=2))), negative_slope=0.2)
        return torch.tanh(self.conv3(h))


class ResBlockUp(nn.Module):
    """BN -> ReLU -> nearest x2 -> conv 3x3 -> BN -> ReLU -> conv 3x3, plus nearest x2 -> conv 1x1 on the input."""

    def __init__(self, cin, cout):
        super().__init__()
        self.b1, self.c1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.b2, self.c2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.c_sc = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = F.relu(self.b1(x))
        h = self.c1(F.interpolate(h, scale_factor=2))
        h = self.c2(F.relu(self.b2(h)))
        return h + self.c_sc(F.interpolate(x, scale_factor=2))


class ResNetGenerator(nn.Module):
    """z -> Linear -> 4x4 map -> 3 up-blocks -> BN -> ReLU -> conv 3x3 -> Tanh (32x32)."""

    def __init__(self, nz=8, ch=8):
        super().__init__()
        self.ch = ch
        self.l1 = nn.Linear(nz, 4 * 4 * ch)
        self.blocks = nn.ModuleList([ResBlockUp(ch, ch) for _ in range(3)])
        self.b5, self.relu = nn.BatchNorm2d(ch), nn.ReLU()
        self.c5 = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z):
        h = self.l1(z).view(-1, self.ch, 4, 4)
        for block in self.blocks:
            h = block(h)
        return torch.tanh(self.c5(self.relu(self.b5(h))))


def sn_conv(api, *args, **kwargs):
    conv = nn.Conv2d(*args, **kwargs)
    if api == "parametrize":
        return nn.utils.parametrizations.spectral_norm(conv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.utils.spectral_norm(conv)


class CCBN(nn.Module):
    """Class-conditional BatchNorm: batch statistics (F.batch_norm on stored buffers), gain 1 + g(y), bias b(y)."""

    def __init__(self, ch, ydim, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.gain, self.bias = nn.Linear(ydim, ch, bias=False), nn.Linear(ydim, ch, bias=False)
        self.register_buffer("stored_mean", torch.zeros(ch))
        self.register_buffer("stored_var", torch.ones(ch))

    def forward(self, x, y):
        gain = (1 + self.gain(y)).view(y.size(0), -1, 1, 1)
        bias = self.bias(y).view(y.size(0), -1, 1, 1)
        out = F.batch_norm(x, self.stored_mean, self.stored_var, None, None, self.training, self.momentum, self.eps)
        return out * gain + bias


class GBlock(nn.Module):
    def __init__(self, cin, cout, which_conv, which_bn, activation, upsample):
        super().__init__()
        self.activation, self.upsample = activation, upsample
        self.conv1, self.conv2 = which_conv(cin, cout), which_conv(cout, cout)
        self.conv_sc = which_conv(cin, cout, kernel_size=1, padding=0)
        self.bn1, self.bn2 = which_bn(cin), which_bn(cout)

    def forward(self, x, y):
        h = self.activation(self.bn1(x, y))
        h = self.upsample(h)
        x = self.upsample(x)
        h = self.conv1(h)
        h = self.activation(self.bn2(h, y))
        h = self.conv2(h)
        return h + self.conv_sc(x)


class BigGANStyle(nn.Module):
    """Shared class embedding; z -> SN linear -> 4x4 map -> 2 GBlocks -> BN -> ReLU -> SN conv 3x3 -> Tanh."""

    def __init__(self, api="parametrize", nz=8, ch=8, n_classes=5, ydim=4):
        super().__init__()
        self.ch = ch
        self.activation = nn.ReLU(inplace=False)  # one module, passed to every block and called everywhere
        which_conv = functools.partial(sn_conv, api, kernel_size=3, padding=1)
        which_bn = functools.partial(CCBN, ydim=ydim)
        self.shared = nn.Embedding(n_classes, ydim)
        self.linear = nn.utils.parametrizations.spectral_norm(nn.Linear(nz, 16 * ch))
        self.blocks = nn.ModuleList([GBlock(ch, ch, which_conv, which_bn, self.activation,
                                            functools.partial(F.interpolate, scale_factor=2)) for _ in range(2)])
        self.output_layer = nn.Sequential(nn.BatchNorm2d(ch), self.activation, which_conv(ch, 3))

    def forward(self, z, y):
        y = self.shared(y)
        h = self.linear(z).view(z.size(0), -1, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.output_layer(h))


GENERATORS = {
    # name: (constructor, number of sites, input maker)
    "dcgan": (DCGAN, 3, lambda n: (torch.randn(n, 8, dtype=F64),)),
    "dcgan_upsample": (DCGANUpsample, 2, lambda n: (torch.randn(n, 8, dtype=F64),)),
    "dcgan_upsample_functional": (DCGANUpsampleFunctional, 2, lambda n: (torch.randn(n, 8, dtype=F64),)),
    "resnet": (ResNetGenerator, 7, lambda n: (torch.randn(n, 8, dtype=F64),)),
    "biggan_parametrize": (functools.partial(BigGANStyle, "parametrize"), 5,
                           lambda n: (torch.randn(n, 8, dtype=F64), torch.arange(n) % 5)),
    "biggan_hooks": (functools.partial(BigGANStyle, "hooks"), 5,
                     lambda n: (torch.randn(n, 8, dtype=F64), torch.arange(n) % 5)),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    g = GENERATORS[name][0]().to(F64)
    with torch.no_grad():  # biases and norm parameters away from their defaults, so that every one matters
        for n, p in g.named_parameters():
            if "bias" in n or n.endswith("bn.weight") or ".b" in n:
                p.add_(torch.randn_like(p) * 0.3)
    return g


def inputs(name, n=3):
    torch.manual_seed(1)
    return GENERATORS[name][2](n)


# ---------------------------------------------------------------------------------------------------
# The reference: the dense generator with the top-k of every activation output per channel
# ---------------------------------------------------------------------------------------------------
ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ReLU6)
ACT_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.leaky_relu, F.leaky_relu_, F.relu6, torch.Tensor.relu,
                 torch.Tensor.relu_)


def keep_topk(a, frac):
    """Keep the round(frac * H * W) largest entries of each channel, zero the rest. Ties go to the lower position
    (a stable sort), as the kernels break them: they are common, since a conv whose window holds no survivor
    outputs exactly its bias."""
    n, c, h, w = a.shape
    k = max(1, round(frac * h * w))
    flat = a.reshape(n, c, h * w)
    top = torch.sort(flat, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(flat).scatter_(-1, top, 1.0)
    return (flat * mask).view(n, c, h, w)


class TopKReference(TorchFunctionMode):
    """Call ``model`` with the top-k applied to the output of every ReLU-family activation: forward hooks on the
    activation modules, and this mode for the functional calls made outside them."""

    def __init__(self, model, frac):
        super().__init__()
        self.model, self.frac, self.inside = model, frac, 0
        self.handles = []
        for m in model.modules():
            if isinstance(m, ACT_MODULES):
                self.handles.append(m.register_forward_pre_hook(self._enter))
                self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, m, args):
        self.inside += 1

    def _leave(self, m, args, out):
        self.inside -= 1
        return keep_topk(out, self.frac)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in ACT_FUNCTIONS and not self.inside and out.dim() == 4:
            out = keep_topk(out, self.frac)
        return out

    def __call__(self, *args):
        with self:
            return self.model(*args)

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------
def weighted_sum(out):
    torch.manual_seed(2)
    return (out * torch.randn_like(out)).sum()


def check_outputs_and_grads(model_a, a, model_b, b, args):
    """``a`` and ``b`` share no parameters: compare outputs and every parameter's gradient by name, and the input's."""
    z = args[0]
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    out_a, out_b = a(za, *args[1:]), b(zb, *args[1:])
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-12)
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    assert pa.keys() == pb.keys()
    names = list(pa)
    ga = torch.autograd.grad(weighted_sum(out_a), [za] + [pa[n] for n in names], allow_unused=True)
    gb = torch.autograd.grad(weighted_sum(out_b), [zb] + [pb[n] for n in names], allow_unused=True)
    for name, x, y in zip(["input"] + names, ga, gb):
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=1e-10, msg=name)


def sparsify_quietly(g, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", sk.SparsifyWarning)  # nothing may be left dense here
        return sk.sparsify(g, **kw)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_every_chain_is_sparsified(name, capsys):
    g = make(name)
    sites = sk.sparsify_sites(g)
    assert len(sites) == GENERATORS[name][1], sites
    report = sk.sparsify_report(g, inputs(name), k=K)
    assert report.coverage == 1.0 and not report.left_dense and not report.failures and report.error is None
    assert [r.name for r in report.sites] == list(sites)
    assert all(0 < r.sparse_macs < r.dense_macs for r in report.sites)
    printed = capsys.readouterr().out
    assert "(100.0%)" in printed and all(n in printed for n in sites)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(GENERATORS))
def test_full_k_equals_the_dense_generator(name, train):
    g = make(name).train(train)
    dense = copy.deepcopy(g)  # batch statistics and power iterations advance once in each
    s = sparsify_quietly(g, k=1.0)
    assert type(s) is type(g) and list(s.state_dict()) == list(g.state_dict())
    assert all(a is b for a, b in zip(s.state_dict(keep_vars=True).values(), g.state_dict(keep_vars=True).values()))
    check_outputs_and_grads(g, s, dense, dense, inputs(name))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(GENERATORS))
def test_quarter_k_equals_the_topk_reference(name, train):
    g = make(name).train(train)
    dense = copy.deepcopy(g)
    s = sparsify_quietly(g, k=K)
    ref = TopKReference(dense, K)
    check_outputs_and_grads(g, s, dense, ref, inputs(name))


@pytest.mark.parametrize("name", list(GENERATORS))
def test_ema_update_changes_the_sparse_output_like_the_reference(name):
    g = make(name).train()
    g_ema = copy.deepcopy(g).eval()
    s = sparsify_quietly(g_ema, k=K)  # shares g_ema's parameters and buffers
    ref = TopKReference(g_ema, K)  # reads g_ema itself: its hooks are added after sparsify copied it
    args = inputs(name)
    with torch.no_grad():
        before = s(*args)
        torch.testing.assert_close(before, ref(*args), rtol=0, atol=1e-12)

    # A training step of g (its batch statistics and power iterations advance too).
    opt = torch.optim.Adam(g.parameters(), lr=0.05)
    weighted_sum(g(*args)).backward()
    opt.step()

    # The EMA update of GAN code: parameters through .data, buffers with copy_ under no_grad.
    with torch.no_grad():
        for p_ema, p in zip(g_ema.parameters(), g.parameters()):
            p_ema.data.mul_(0.5).add_(p.data, alpha=0.5)
        for b_ema, b in zip(g_ema.buffers(), g.buffers()):
            b_ema.copy_(b)
        after = s(*args)
        assert (after - before).abs().max() > 1e-3
        torch.testing.assert_close(after, ref(*args), rtol=0, atol=1e-12)
    ref.remove()
