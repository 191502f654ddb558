"""The Triton kernels on a CUDA device at the model's sizes (skipped without a GPU): exact selection; convolutions
and their gradients by the rule of tolerance.py (every element against a float64 reference, at most twice the
largest error of PyTorch's own F.conv_transpose2d and its autograd gradients at that dtype on the GPU, float32 in
IEEE precision on both sides); float64 results tightly."""
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.gpu

from sparsegen_kernels import reference as R  # noqa: E402
from sparsegen_kernels import geometry  # noqa: E402
from tolerance import assert_accurate, no_tf32, torch_conv_transpose2d  # noqa: E402

if torch.cuda.is_available():
    from sparsegen_kernels.triton import PROVIDERS, sparse_conv, topk  # noqa: E402

DEV = "cuda"
F64 = torch.float64


@pytest.fixture(autouse=True)
def _ieee_float32():
    """float32 in IEEE precision, for the kernels (their tl.dot follows allow_tf32) and PyTorch alike."""
    with no_tf32():
        yield


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


def _check_conv(c, dtype, strides, what):
    """Forward (every strategy), input gradient and weight gradient of the Triton kernels for case ``c`` (inputs
    at ``dtype``) against F.conv_transpose2d: its float64 result on the same inputs is the reference, its result
    at ``dtype`` the yardstick (float64 results: the tight tolerance)."""
    v, i, w, b, mode, in_shape = c
    stride, padding, output_padding = strides
    dense = R.compact_to_dense_ref(v, i, mode, in_shape)
    ref = torch_conv_transpose2d(F64, dense, w, b, stride, padding, output_padding)
    theirs = torch_conv_transpose2d(dtype, dense, w, b, stride, padding, output_padding)
    for strategy in (["gather"] if mode == "channel" else []) + ["scatter", "gemm"]:
        out = sparse_conv.sparse_conv_transpose2d(v, i, mode, in_shape, w, b, stride, padding, output_padding,
                                                  strategy=strategy)
        assert out.dtype == dtype
        assert_accurate(out, ref, theirs, f"{what}, forward, {strategy}")
    go = torch.randn(ref.shape, device=DEV).to(dtype)
    # (output, input gradient at the entries, weight gradient, None)
    _, gi_ref, gw_ref, _ = torch_conv_transpose2d(F64, dense, w, None, stride, padding, output_padding, go, i, mode)
    _, gi_torch, gw_torch, _ = torch_conv_transpose2d(dtype, dense, w, None, stride, padding, output_padding, go, i,
                                                      mode)
    for strategy in ("entries", "gemm"):
        gi = sparse_conv.sparse_conv_transpose2d_input_grad(go, i, mode, in_shape, w, stride, padding,
                                                            strategy=strategy)
        assert gi.dtype == dtype
        assert_accurate(gi, gi_ref, gi_torch, f"{what}, input gradient, {strategy}")
    for strategy in ("segment", "gemm"):
        gw = sparse_conv.sparse_conv_transpose2d_weight_grad(go, v, i, mode, in_shape, list(w.shape), stride, padding,
                                                             strategy=strategy)
        assert gw.dtype == dtype
        assert_accurate(gw, gw_ref, gw_torch, f"{what}, weight gradient, {strategy}")


@pytest.mark.parametrize("in_shape,Cout,mode,k", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_conv_accuracy_gpu(in_shape, Cout, mode, k, dtype):
    v, i, w, b = _case(in_shape, Cout, mode, k, dtype)
    c = (v.to(dtype), i, w.to(dtype), b.to(dtype), mode, in_shape)
    _check_conv(c, dtype, ([2, 2], [1, 1], [0, 0]), f"{mode}, {in_shape}, Cout={Cout}, k={k}")


@pytest.mark.parametrize("mode", ["spatial", "channel", "global"])
def test_conv_float64_gpu(mode):
    in_shape, Cout = (2, 16, 6, 5), 8
    v, i, w, b = _case(in_shape, Cout, mode, 4, F64)
    _check_conv((v, i, w, b, mode, in_shape), F64, ([2, 2], [1, 1], [1, 1]), mode)


def test_topk_chunked_matches_single_block_gpu(monkeypatch):
    x = torch.randn(4, 64, 32, 32, device=DEV)
    expect = PROVIDERS["topk_compact"](x, 300, "spatial", None, True)
    monkeypatch.setattr(topk, "SINGLE_BLOCK_MAX", 256)
    monkeypatch.setattr(topk, "CHUNK", 256)
    got = PROVIDERS["topk_compact"](x, 300, "spatial", None, True)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
