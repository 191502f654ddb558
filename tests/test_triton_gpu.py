"""The Triton kernels on a CUDA device at the model's sizes: exact selection, half-precision accuracy,
float64 against autograd of the reference (skipped without a GPU)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytestmark = pytest.mark.gpu

from sparsegen_kernels import reference as R  # noqa: E402
from sparsegen_kernels import geometry  # noqa: E402

if torch.cuda.is_available():
    from sparsegen_kernels.triton import PROVIDERS, sparse_conv, topk  # noqa: E402

DEV = "cuda"


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


# (shape, k, mode): the paper64 generator's selections and the AAAI global one.
TOPK_CASES = [
    ((16, 3200, 4, 4), 8, "channel"),
    ((8, 256, 16, 16), 64, "spatial"),
    ((8, 64, 64, 64), 1024, "spatial"),
    ((4, 128, 32, 32), 4096, "global"),  # 131072 per group: the chunked radix path
    ((2, 512, 32, 32), 20000, "global"),  # int32 indices
]


@pytest.mark.parametrize("shape,k,mode", TOPK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_topk_exact_gpu(shape, k, mode, dtype):
    x = torch.randn(shape, device=DEV).to(dtype)
    x[:, :, ::3] = (x[:, :, ::3] * 4).round() / 4  # plenty of ties
    bias = torch.randn(shape[1], device=DEV).to(dtype)
    for b, relu in ((None, False), (bias, True)):
        values, indices = PROVIDERS["topk_compact"](x, k, mode, b, relu)
        out, indices2 = PROVIDERS["topk_mask"](x, k, mode, b, relu)
        rv, ri = R.topk_compact_ref(x, k, mode, b, relu)
        assert indices.dtype == ri.dtype
        assert torch.equal(indices, ri) and torch.equal(indices2, ri)
        assert torch.equal(values, rv)
        assert torch.equal(out, R.compact_to_dense_ref(rv, ri, mode, shape))


# (in_shape, Cout, mode, k): the folded upsample convs of paper64.
CONV_CASES = [
    ((8, 3200, 4, 4), 512, "channel", 8),
    ((8, 256, 16, 16), 128, "spatial", 64),
    ((4, 128, 32, 32), 64, "spatial", 256),
]


def _case(in_shape, Cout, mode, k, dtype):
    N, Cin, H, W = in_shape
    x = torch.randn(in_shape, device=DEV, dtype=torch.float64)
    w3 = torch.randn(Cout, Cin, 3, 3, device=DEV, dtype=torch.float64) / (Cin * 9) ** 0.5
    w = geometry.fold_upsample_weight(w3)
    b = torch.randn(Cout, device=DEV, dtype=torch.float64)
    v, i = R.topk_compact_ref(x, k, mode)
    return v, i, w, b


@pytest.mark.parametrize("in_shape,Cout,mode,k", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_conv_accuracy_gpu(in_shape, Cout, mode, k, dtype):
    """Error against float64 at most twice what PyTorch's own conv_transpose2d makes at that dtype."""
    v, i, w, b = _case(in_shape, Cout, mode, k, dtype)
    dense = R.compact_to_dense_ref(v, i, mode, in_shape)
    ref = F.conv_transpose2d(dense, w, b, 2, 1)
    torch_err = rel_err(F.conv_transpose2d(dense.to(dtype), w.to(dtype), b.to(dtype), 2, 1), ref)
    strategies = (["gather"] if mode == "channel" else []) + ["scatter", "gemm"]
    for strategy in strategies:
        out = sparse_conv.sparse_conv_transpose2d(v.to(dtype), i, mode, in_shape, w.to(dtype), b.to(dtype),
                                                  [2, 2], [1, 1], [0, 0], strategy=strategy)
        assert rel_err(out, ref) <= max(2 * torch_err, 1e-5), strategy
    go = torch.randn_like(ref)
    dd = dense.clone().requires_grad_()
    wd = w.clone().requires_grad_()
    F.conv_transpose2d(dd, wd, None, 2, 1).backward(go)
    gi_ref = R.compact_gather_ref(dd.grad, i, mode)
    for strategy in ("entries", "gemm"):
        gi = sparse_conv.sparse_conv_transpose2d_input_grad(go.to(dtype), i, mode, in_shape, w.to(dtype),
                                                            [2, 2], [1, 1], strategy=strategy)
        assert rel_err(gi, gi_ref) <= max(2 * torch_err, 1e-5) * 4, strategy
    for strategy in ("segment", "gemm"):
        gw = sparse_conv.sparse_conv_transpose2d_weight_grad(go.to(dtype), v.to(dtype), i, mode, in_shape,
                                                             list(w.shape), [2, 2], [1, 1], strategy=strategy)
        assert rel_err(gw, wd.grad) <= max(2 * torch_err, 1e-5) * 4, strategy


@pytest.mark.parametrize("mode", ["spatial", "channel", "global"])
def test_conv_float64_gpu(mode):
    in_shape, Cout = (2, 16, 6, 5), 8
    v, i, w, b = _case(in_shape, Cout, mode, 4, torch.float64)
    dense = R.compact_to_dense_ref(v, i, mode, in_shape)
    ref = F.conv_transpose2d(dense, w, b, 2, 1, 1)
    for strategy in (["gather"] if mode == "channel" else []) + ["scatter", "gemm"]:
        out = sparse_conv.sparse_conv_transpose2d(v, i, mode, in_shape, w, b, [2, 2], [1, 1], [1, 1],
                                                  strategy=strategy)
        assert rel_err(out, ref) < 1e-12, strategy
    go = torch.randn_like(ref)
    dd = dense.clone().requires_grad_()
    wd = w.clone().requires_grad_()
    F.conv_transpose2d(dd, wd, None, 2, 1, 1).backward(go)
    for strategy in ("entries", "gemm"):
        gi = sparse_conv.sparse_conv_transpose2d_input_grad(go, i, mode, in_shape, w, [2, 2], [1, 1],
                                                            strategy=strategy)
        assert rel_err(gi, R.compact_gather_ref(dd.grad, i, mode)) < 1e-12, strategy
    for strategy in ("segment", "gemm"):
        gw = sparse_conv.sparse_conv_transpose2d_weight_grad(go, v, i, mode, in_shape, list(w.shape), [2, 2],
                                                             [1, 1], strategy=strategy)
        assert rel_err(gw, wd.grad) < 1e-12, strategy


def test_topk_chunked_matches_single_block_gpu(monkeypatch):
    x = torch.randn(4, 64, 32, 32, device=DEV)
    expect = PROVIDERS["topk_compact"](x, 300, "spatial", None, True)
    monkeypatch.setattr(topk, "SINGLE_BLOCK_MAX", 256)
    monkeypatch.setattr(topk, "CHUNK", 256)
    got = PROVIDERS["topk_compact"](x, 300, "spatial", None, True)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
