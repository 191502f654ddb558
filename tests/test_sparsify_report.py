"""sparsify_report: per site where it is, its dense MACs and the MACs the sparse kernels run; every activation -> conv
chain left dense with the reason; the submodules that stopped a trace; the coverage. Never a crash."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegen_kernels as sk
from sparsegen_kernels.sparsify import sparsify_report

F64 = torch.float64


def small():
    """1x1 -> 4x4 -> 8x8 -> (up) 16x16, every MAC countable by hand."""
    return nn.Sequential(nn.ConvTranspose2d(4, 6, 4, 1, 0), nn.ReLU(), nn.ConvTranspose2d(6, 5, 4, 2, 1), nn.ReLU(),
                         nn.Upsample(scale_factor=2), nn.Conv2d(5, 3, 3, padding=1))


def test_macs_by_hand(capsys):
    r = sparsify_report(small(), torch.randn(2, 4, 1, 1), k=0.25)
    # Site "1": ReLU on [2, 6, 4, 4] -> transposed conv 6 -> 5, 4x4 taps: dense 2*6*16 inputs * 5 * 16;
    # 4 of 16 positions kept per channel: 2*6*4 survivors * 5 * 16.
    # Site "3": ReLU on [2, 5, 8, 8] -> up x2 + conv 3x3 5 -> 3: dense 2*3*16*16 outputs * 5 * 9;
    # 16 of 64 kept: 2*5*16 survivors * 3 outputs * 16 folded taps.
    assert [(s.name, s.dense_macs, s.sparse_macs, s.calls) for s in r.sites] == [
        ("1", 2 * 6 * 16 * 5 * 16, 2 * 6 * 4 * 5 * 16, 1), ("3", 2 * 3 * 256 * 5 * 9, 2 * 5 * 16 * 3 * 16, 1)]
    assert r.sites[0].kept == "4 of 16 per channel" and r.sites[1].kept == "16 of 64 per channel"
    assert r.conv_macs == 2 * 4 * 6 * 16 + r.behind_activation_macs  # the first conv reads z, no activation
    assert r.coverage == 1.0 and r.left_dense == [] and r.failures == [] and r.error is None
    out = capsys.readouterr().out
    assert "ReLU -> transposed conv (4, 4), stride (2, 2) '2' (6 -> 5 channels)" in out
    assert "ReLU -> upsample x2 + conv 3x3 '5' (5 -> 3 channels)" in out
    assert "sparsified: 84.5 k (100.0%), run by the sparse kernels as 11.5 k" in out


def test_a_site_left_out_of_the_dict_counts_as_dense():
    r = sparsify_report(small(), torch.randn(2, 4, 1, 1), k={"1": (2, "channel")}, verbose=False)
    assert [s.name for s in r.sites] == ["1"] and r.sites[0].kept == "2 of 6 per position"
    assert r.sites[0].sparse_macs == 2 * 16 * 2 * 5 * 16  # 2 of 6 channels at each of the 16 positions
    (left,) = r.left_dense
    assert left.name == "3" and "not chosen" in left.reason
    assert r.coverage == pytest.approx(r.sites[0].dense_macs / (r.sites[0].dense_macs + left.dense_macs))


class Block(nn.Module):
    """Data-dependent control flow: cannot be traced. Its input (an activation) reaches a conv, and so does its
    own ReLU; both run as they are."""

    def __init__(self, ch):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        if x.sum() > 1e9:
            x = -x
        return self.c2(F.relu(self.c1(x)))


class Unsupported(nn.Module):
    """One activation -> conv chain of every kind the kernels cannot run, and one they can."""

    def __init__(self, ch=4):
        super().__init__()
        self.c0 = nn.Conv2d(3, ch, 3, padding=1)
        self.strided = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(ch, ch, 3, padding=2, dilation=2)
        self.after_bilinear = nn.Conv2d(ch, ch, 3, padding=1)
        self.after_gelu = nn.Conv2d(ch, ch, 3, padding=1)
        self.pad, self.after_pad = nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3)
        self.hooked = nn.Conv2d(ch, ch, 1)
        self.hooked.register_forward_hook(lambda m, i, o: None)
        self.block = Block(ch)
        self.ok = nn.Conv2d(ch, 3, 1)

    def forward(self, x):
        h = self.c0(x)
        a = F.relu(h)
        h = self.strided(a)  # 8x8 -> 4x4
        h = self.dilated(F.leaky_relu(h, 0.2))
        h = self.after_bilinear(F.interpolate(F.relu(h), scale_factor=2, mode="bilinear"))  # 8x8
        h = self.after_gelu(F.gelu(h))
        h = self.after_pad(self.pad(torch.relu(h)))
        h = self.hooked(F.relu(h))
        h = self.block(F.relu(h))  # an activation handed to untraced code, which convolves it
        return self.ok(F.relu(h))


def test_every_unsupported_chain_is_named_with_its_reason():
    g = Unsupported()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sk.SparsifyWarning)
        r = sparsify_report(g, torch.randn(2, 3, 8, 8), k=0.25, verbose=False)
    assert [s.name for s in r.sites] == [":relu@5"]
    reasons = {row.name: row.reason for row in r.left_dense}
    assert "strided conv (stride (2, 2))" in reasons[":relu"]
    assert "dilated conv (dilation (2, 2))" in reasons[":leaky_relu"]
    assert "not a nearest x2 upsampling" in reasons[":relu@1"]
    assert "F.gelu is not of the ReLU family" in reasons[":gelu"]
    assert "ReflectionPad2d 'pad' between them" in reasons[":relu@2"]  # torch.relu: the third relu
    assert "the conv 'hooked' has forward hooks" in reasons[":relu@3"]
    # The ReLU handed to the untraced block reaches its first conv, and the block's own ReLU its second: both found
    # at run time and named by the block.
    assert "'block' could not be traced" in reasons[":relu@4"]
    assert "'block' could not be traced" in reasons["block:relu"]
    (failure,) = r.failures
    assert failure.path == "block" and "if x.sum() > 1e9:" in failure.where and "TraceError" in failure.reason
    assert 0 < r.coverage < 1 and r.error is None
    text = str(r)
    assert "left dense (8 activation -> conv chains)" in text and "-> F.conv2d in 'block'" in text
    assert "'block' (Block) stopped the trace" in text


def test_nothing_sparsifiable_and_a_failing_model_are_reported_not_raised():
    only_gelu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 2, 3))
    r = sparsify_report(only_gelu, torch.randn(1, 3, 8, 8), verbose=False)
    assert r.sites == [] and r.coverage == 0.0 and "GELU is not of the ReLU family" in r.left_dense[0].reason
    assert "sites: none" in str(r)
    r = sparsify_report(small(), torch.randn(1, 3, 1, 1), verbose=False)  # 3 channels where 4 are expected
    assert r.error is not None and "the model failed on the example input: RuntimeError" in r.error
    r = sparsify_report(small(), torch.randn(1, 4, 1, 1), k=40, verbose=False)  # k beyond a 4x4 map's 16
    assert r.error is not None and "site '1'" in r.error and "group size is 16" in r.error


def test_the_model_is_left_as_it_was():
    g = nn.Sequential(nn.Linear(4, 48), nn.Unflatten(1, (3, 4, 4)), nn.BatchNorm2d(3), nn.ReLU(),
                      nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 3, 3, padding=1))).train()
    state = copy.deepcopy(g.state_dict())
    sparsify_report(g, torch.randn(5, 4), verbose=False)
    for n, v in g.state_dict().items():
        assert torch.equal(v, state[n]), n
    assert g.training and g[4].training and type(g[3]) is nn.ReLU and "forward" not in g.__dict__


def test_hook_based_weight_norm_is_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = nn.utils.weight_norm(nn.Conv2d(4, 3, 3, padding=1))
    g = nn.Sequential(nn.ConvTranspose2d(2, 4, 4), nn.ReLU(), conv)
    r = sparsify_report(g, torch.randn(2, 2, 1, 1), verbose=False)
    assert [s.name for s in r.sites] == ["1"] and r.coverage == 1.0 and r.error is None


class TopUntraceable(nn.Module):
    """The top module's own forward cannot be traced: its children are sparsified on their own."""

    def __init__(self):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(4, 6, 4, 1, 0), nn.ReLU(), nn.ConvTranspose2d(6, 3, 4, 2, 1))

    def forward(self, z):
        if z.norm() > 1e9:
            z = z / z.norm()
        return self.up(z)


def test_an_untraceable_top_module_leaves_its_children_to_themselves():
    g = TopUntraceable()
    with pytest.warns(sk.SparsifyWarning, match=r"the top module \(TopUntraceable\) stopped the trace"):
        s = sk.sparsify(g, k=1.0)
    assert isinstance(s.up[1], sk.TopKReLU)
    r = sparsify_report(g, torch.randn(2, 4, 1, 1), verbose=False)
    assert [x.name for x in r.sites] == ["up.1"] and r.coverage == 1.0
    assert "the top module (TopUntraceable) stopped the trace" in str(r)


def test_a_module_with_its_own_sparse_path_is_described():
    sparsegen = pytest.importorskip("sparsegen")
    g = sparsegen.SparseGenerator("tiny16", sparse=False)
    r = sparsify_report(g, torch.randn(2, g.z_dim), verbose=False)
    assert r.sites == [] and "has its own sparse path" in r.note and "'block1'" in r.note and r.note in str(r)
