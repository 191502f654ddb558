"""SparseUpsampleConv2d caches its folded weight for inference and lets go of it for training."""
import torch

import sparsegen_kernels as sk
from sparsegen_kernels import reference


def _layer_and_input():
    torch.manual_seed(0)
    layer = sk.SparseUpsampleConv2d(6, 4).double()
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    return layer, sk.topk_compact(x, 2, "spatial", relu=True), x


def _expected(layer, sa):
    return reference.sparse_upsample_conv2d_ref(sa.to_dense(), layer.weight.detach(), layer.bias.detach())


def test_inference_caches_from_the_second_use_until_the_weight_changes():
    layer, sa, _ = _layer_and_input()
    with torch.no_grad():
        out1 = layer(sa)
        assert layer._folded_cache is None  # one forward alone keeps no copy of the weight
        out2 = layer(sa)
        cached = layer._folded_cache[1]
        out3 = layer(sa)
        assert layer._folded_cache[1] is cached
        torch.testing.assert_close(out1, _expected(layer, sa))
        torch.testing.assert_close(out2, out1)
        torch.testing.assert_close(out3, out1)
        layer.weight.add_(1.0)  # what an optimizer step does
        out4 = layer(sa)
        assert layer._folded_cache is None
        torch.testing.assert_close(out4, _expected(layer, sa))
        layer(sa)
        assert layer._folded_cache is not None and layer._folded_cache[1] is not cached


def test_training_forward_drops_the_cache_and_trains_the_weight():
    layer, sa, _ = _layer_and_input()
    with torch.no_grad():
        layer(sa)
        layer(sa)
    assert layer._folded_cache is not None
    out = layer(sa)
    assert layer._folded_cache is None
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), _expected(layer, sa))


def test_frozen_weight_with_grad_enabled_still_uses_the_cache():
    """Langevin inference: gradients flow to the input only, the weights are frozen."""
    layer, sa, _ = _layer_and_input()
    layer.requires_grad_(False)
    values = sa.values.clone().requires_grad_()
    layer(sk.SparseActivation(values, sa.indices, sa.shape, sa.mode))
    out = layer(sk.SparseActivation(values, sa.indices, sa.shape, sa.mode))
    assert layer._folded_cache is not None
    out.sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
