"""The upsample-conv after a very sparse channel/global top-k (the FC layer): on the CPU it runs on the 3x3 weight
without folding it, reading only the surviving channels' weights; denser inputs fold the weight.

Checked against the dense reference (top-k mask, F.interpolate + F.conv2d) in float64 with the float64 tolerance
of tolerance.py, forward and every gradient, on both sides of the density threshold, plus gradcheck and
torch.compile (the compiled model runs the same kernels as the eager one: equal bit for bit).
"""
import pytest
import torch

import sparsegen_kernels as sk
from sparsegen_kernels import ops, reference
from conftest import devices
from tolerance import assert_close_float64


def _inputs(device, C, k, mode, N=2, H=3, W=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b0 = torch.randn(C, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w3 = torch.randn(5, C, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b3 = torch.randn(5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    grad = torch.randn(N, 5, 2 * H, 2 * W, generator=g, dtype=torch.float64).to(device)
    return x, b0, w3, b3, grad, k, mode


def _grads(fn, x, b0, w3, b3, grad):
    for t in (x, b0, w3, b3):
        t.grad = None
    out = fn()
    out.backward(grad)
    return [out.detach()] + [t.grad.clone() for t in (x, b0, w3, b3)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode,C,k", [("channel", 40, 2), ("global", 40, 5), ("channel", 6, 4), ("global", 6, 40)])
def test_matches_dense_reference(device, mode, C, k):
    x, b0, w3, b3, grad, k, mode = _inputs(device, C, k, mode)
    ours = _grads(lambda: sk.sparse_upsample_conv2d(sk.topk_compact(x, k, mode, b0, True), w3, b3), x, b0, w3, b3,
                  grad)
    expected = _grads(lambda: reference.sparse_upsample_conv2d_ref(reference.topk_mask_ref(x, k, mode, b0, True),
                                                                   w3, b3), x, b0, w3, b3, grad)
    for name, a, e in zip(("output", "grad x", "grad bias", "grad weight", "grad conv bias"), ours, expected):
        assert_close_float64(a, e, name)
    if device == "cpu":  # 40 channels with few picks: the fold-free kernels ran; 6 channels, most picked: the fold
        indices = sk.topk_compact(x.detach(), k, mode, b0.detach(), True).indices
        assert ops._uses_direct_cpu_kernels(indices, mode, list(x.shape)) == (C == 40)


@pytest.mark.parametrize("device", devices())
def test_untouched_channels_get_zero_weight_gradient(device):
    x, b0, w3, b3, grad, k, mode = _inputs(device, 40, 2, "channel")
    sa = sk.topk_compact(x, k, mode, b0, True)
    sk.sparse_upsample_conv2d(sa, w3, b3).backward(grad)
    picked = torch.zeros(40, dtype=torch.bool, device=device)
    picked[sa.indices.long().flatten()] = True
    assert not picked.all()
    assert torch.all(w3.grad[:, ~picked] == 0)
    assert torch.any(w3.grad[:, picked] != 0)


@pytest.mark.parametrize("device", devices())
def test_gradcheck_through_the_fold_free_kernels(device):
    x, b0, w3, b3, grad, k, mode = _inputs(device, 40, 2, "channel")
    sa = sk.topk_compact(x.detach(), k, mode, b0.detach(), True)
    if device == "cpu":
        assert ops._uses_direct_cpu_kernels(sa.indices, mode, list(sa.shape))
    values = sa.values.detach().requires_grad_()

    def f(values, w3, b3):
        return sk.sparse_upsample_conv2d(sk.SparseActivation(values, sa.indices, sa.shape, mode), w3, b3)

    assert torch.autograd.gradcheck(f, (values, w3, b3))


def test_compile_fullgraph_with_channel_topk():
    torch._dynamo.reset()
    model = torch.nn.Sequential(sk.TopK(2, "channel", relu=True), sk.SparseUpsampleConv2d(40, 5))
    x = torch.randn(2, 40, 3, 3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    xg, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert torch.equal(compiled(xg), model(xe))
    compiled(xg).sum().backward()
    model(xe).sum().backward()
    assert torch.equal(xg.grad, xe.grad)
