"""SparseUpsampleConv2d reads its weight afresh at every call; inside sk.fold_cache(...) a forward that cannot train
the weight reuses one fold of it, and leaving the block drops it."""
import torch

import sparsegen_kernels as sk
from sparsegen_kernels import reference


def _layer_and_input():
    torch.manual_seed(0)
    layer = sk.SparseUpsampleConv2d(6, 4).double()
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    return layer, sk.topk_compact(x, 2, "spatial", relu=True)


def _expected(layer, sa):
    return reference.sparse_upsample_conv2d_ref(sa.to_dense(), layer.weight.detach(), layer.bias.detach())


def test_without_the_block_no_fold_is_kept_and_every_weight_edit_is_seen():
    """The EMA pattern of GAN code edits parameters through .data, which bumps no version counter."""
    layer, sa = _layer_and_input()
    ema = sk.SparseUpsampleConv2d(6, 4).double()
    with torch.no_grad():
        for _ in range(3):
            layer(sa)
            assert layer._folded is None
            for p_ema, p in zip(ema.parameters(), layer.parameters()):
                p_ema.data.mul_(0.9).add_(p.data, alpha=0.1)
            torch.testing.assert_close(ema(sa), _expected(ema, sa))
        layer.weight.data.mul_(-2.0)
        torch.testing.assert_close(layer(sa), _expected(layer, sa))


def test_inside_the_block_one_fold_serves_every_frozen_forward():
    layer, sa = _layer_and_input()
    with sk.fold_cache(layer), torch.no_grad():
        out1 = layer(sa)
        folded = layer._folded
        assert folded is not None
        out2 = layer(sa)
        assert layer._folded is folded
        torch.testing.assert_close(out1, _expected(layer, sa))
        torch.testing.assert_close(out2, out1)
    assert layer._folded is None and not layer._fold_cached


def test_a_forward_that_trains_the_weight_folds_afresh_even_inside_the_block():
    layer, sa = _layer_and_input()
    with sk.fold_cache(layer):
        with torch.no_grad():
            layer(sa)
        out = layer(sa)
        out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), _expected(layer, sa))


def test_frozen_weight_with_grad_enabled_uses_the_fold_and_trains_the_input():
    """Langevin inference: gradients flow to the input only, the weights are frozen."""
    layer, sa = _layer_and_input()
    layer.requires_grad_(False)
    values = sa.values.clone().requires_grad_()
    with sk.fold_cache(layer):
        out = layer(sk.SparseActivation(values, sa.indices, sa.shape, sa.mode))
        assert layer._folded is not None
    out.sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0


def test_blocks_nest():
    layer, sa = _layer_and_input()
    with sk.fold_cache(layer), torch.no_grad():
        layer(sa)
        outer = layer._folded
        with sk.fold_cache(layer):
            layer(sa)
            assert layer._folded is outer
        assert layer._fold_cached and layer._folded is outer
    assert not layer._fold_cached and layer._folded is None
