"""The C++ CPU kernels (csrc/cpu), called directly as ``torch.ops.sparsegen.*``, against reference.py.

Every compiled copy of the hot loops is checked, selected per call with ``SPARSEGEN_CPU_ISA``: "auto" (the
widest the CPU has: the convolutions' AVX-512 copy, with 16-float chunks, where Cout is wide enough), "avx2"
(AVX2+FMA, 8-float chunks) and "default" (the baseline build).
Selection and layout must match the reference bit for bit (values and indices). Convolutions and their gradients
follow the rule of tolerance.py: every element against a float64 reference, float32 results at most twice the
largest error of PyTorch's own op in float32 on the CPU (``F.conv_transpose2d``, ``F.interpolate`` +
``F.conv2d``, and their autograd gradients), float64 results tightly.
"""
import pytest
import torch

pytest.importorskip("sparsegen_kernels._C", reason="the C++ extension is not built")

from sparsegen_kernels import reference as R  # noqa: E402
from sparsegen_kernels import geometry  # noqa: E402
from tolerance import assert_accurate, torch_conv_transpose2d, torch_upsample_conv2d  # noqa: E402

ops = torch.ops.sparsegen
F64 = torch.float64


@pytest.fixture(params=["auto", "avx2", "default"])
def isa(request, monkeypatch):
    monkeypatch.setenv("SPARSEGEN_CPU_ISA", request.param)
    return request.param


# ------------------------------------------------------------------------------------------------ top-k

# (shape, k, mode): cover the three threshold searches (bisection; running top-k for k <= 32 with
# group >= 16 k; an 11-bit histogram first for groups > 4096), k = 1 and k = group size, odd shapes.
TOPK_CASES = [
    ((3, 7, 5, 9), 11, "spatial"),
    ((3, 7, 5, 9), 1, "spatial"),
    ((3, 7, 5, 9), 45, "spatial"),
    ((2, 5, 8, 8), 3, "spatial"),  # running top-k
    ((2, 33, 3, 5), 4, "channel"),
    ((2, 600, 2, 3), 8, "channel"),  # running top-k, channel tiles
    ((2, 600, 2, 3), 600, "channel"),
    ((2, 3, 4, 5), 17, "global"),
    ((2, 50, 10, 10), 1234, "global"),  # histogram pass (group 5000 > 4096)
    ((1, 2, 200, 90), 20, "global"),  # group 36000 > 32767: int32 indices
]


def _topk_input(shape, dtype, kind):
    if kind == "randn":
        return torch.randn(shape, dtype=dtype)
    # Many exact ties (and, after ReLU, many zeros): the lower index must win.
    return torch.randint(-3, 4, shape).to(dtype)


@pytest.mark.parametrize("shape, k, mode", TOPK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_topk_matches_reference(isa, shape, k, mode, dtype, kind):
    x = _topk_input(shape, dtype, kind)
    for bias in (None, _topk_input((shape[1],), dtype, kind)):
        for relu in (False, True):
            v, i = ops.topk_compact(x, k, mode, bias, relu)
            vr, ir = R.topk_compact_ref(x, k, mode, bias, relu)
            assert i.dtype == ir.dtype == geometry.index_dtype(geometry.group_geometry(mode, *shape[1:])[1])
            assert torch.equal(i, ir), (mode, k, relu, bias is not None)
            assert torch.equal(v, vr)
            out, i2 = ops.topk_mask(x, k, mode, bias, relu)
            assert torch.equal(i2, ir)
            assert torch.equal(out, R.topk_mask_ref(x, k, mode, bias, relu))


def test_topk_signed_zero_and_nan_order(isa):
    # -0.0 == +0.0 (ties by index); NaN ranks above everything, as in torch.sort.
    x = torch.tensor([0.0, -0.0, -1.0, float("nan"), 2.0, -0.0, 0.0, float("-inf")]).view(1, 1, 2, 4)
    for k in range(1, 9):
        v, i = ops.topk_compact(x, k, "spatial", None, False)
        vr, ir = R.topk_compact_ref(x, k, "spatial")
        assert torch.equal(i, ir), k
        torch.testing.assert_close(v, vr, rtol=0, atol=0, equal_nan=True)  # exact, NaN where the reference has it


def test_topk_non_contiguous_input(isa):
    base = torch.randn(2, 9, 6, 10)
    for x in (base[:, ::2, :, 1:8], base.transpose(2, 3), base.contiguous(memory_format=torch.channels_last)):
        for mode, k in (("spatial", 5), ("channel", 2), ("global", 30)):
            v, i = ops.topk_compact(x, k, mode, None, True)
            vr, ir = R.topk_compact_ref(x, k, mode, None, True)
            assert torch.equal(i, ir) and torch.equal(v, vr)


@pytest.mark.parametrize("mode, k", [("spatial", 0), ("spatial", 21), ("channel", 4), ("global", 61)])
def test_topk_k_out_of_range(mode, k):
    x = torch.randn(2, 3, 4, 5)
    size = geometry.group_geometry(mode, 3, 4, 5)[1]
    with pytest.raises(ValueError, match=rf"(?s)k = {k}.*'{mode}'.*group size {size}"):
        ops.topk_compact(x, k, mode, None, False)
    with pytest.raises(ValueError, match=rf"k = {k}"):
        ops.topk_mask(x, k, mode, None, False)


def test_topk_bad_arguments():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="4-D"):
        ops.topk_compact(x[0], 2, "spatial", None, False)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.topk_compact(x.to(torch.int32), 2, "spatial", None, False)
    with pytest.raises(ValueError, match=r"bias must be \[C\]"):
        ops.topk_compact(x, 2, "spatial", torch.zeros(4), False)
    with pytest.raises(TypeError, match="bias dtype"):
        ops.topk_compact(x, 2, "spatial", torch.zeros(3, dtype=torch.float64), False)
    with pytest.raises(ValueError, match="unknown mode"):
        ops.topk_compact(x, 2, "rows", None, False)


# ----------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("mode, k", [("spatial", 6), ("channel", 2), ("global", 25)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layout_matches_reference(mode, k, dtype):
    x = torch.randn(2, 5, 3, 7, dtype=dtype)
    v, i = R.topk_compact_ref(x, k, mode)
    for idx in (i, i.long(), i.int()):
        d = ops.compact_to_dense(v, idx, mode, list(x.shape))
        assert torch.equal(d, R.compact_to_dense_ref(v, idx, mode, x.shape))
    dense = torch.randn(2, 7, 3, 5, dtype=dtype).transpose(1, 3)  # non-contiguous
    assert torch.equal(ops.compact_gather(dense, i, mode), R.compact_gather_ref(dense, i, mode))
    expanded = torch.randn(1, 5, 1, 7, dtype=dtype).expand(2, 5, 3, 7)
    assert torch.equal(ops.compact_gather(expanded, i, mode), R.compact_gather_ref(expanded, i, mode))


def test_layout_rejects_out_of_range_indices():
    v = torch.randn(1, 2, 3)
    for bad in (-1, 12):
        i = torch.tensor([[[0, 1, bad], [0, 1, 2]]], dtype=torch.int16)
        with pytest.raises(ValueError, match=rf"index {bad} out of range.*group size 12"):
            ops.compact_to_dense(v, i, "spatial", [1, 2, 3, 4])
        with pytest.raises(ValueError, match=rf"index {bad} out of range"):
            ops.compact_gather(torch.randn(1, 2, 3, 4), i, "spatial")
    with pytest.raises(ValueError, match="do not match"):
        ops.compact_to_dense(v, torch.zeros(1, 2, 3, dtype=torch.int16), "channel", [1, 2, 3, 4])
    with pytest.raises(TypeError, match="indices must be int16"):
        ops.compact_to_dense(v, torch.zeros(1, 2, 3), "spatial", [1, 2, 3, 4])


# --------------------------------------------------------------------------------- sparse transposed conv

# (N, Cin, Cout, H, W, kh, kw, stride, padding, output_padding, mode, k)
CONV_CASES = [
    (2, 8, 16, 4, 4, 4, 4, (2, 2), (1, 1), (0, 0), "spatial", 4),  # the folded upsample geometry
    (2, 40, 20, 3, 5, 3, 3, (1, 1), (0, 0), (0, 0), "spatial", 9),  # many entries per channel: packed weight
    (2, 64, 33, 2, 2, 4, 4, (2, 2), (1, 1), (0, 0), "channel", 2),  # few entries per channel: weight in place
    (2, 64, 32, 2, 2, 4, 4, (2, 2), (1, 1), (0, 0), "channel", 2),  # weight in place, whole chunks of any width
    (3, 6, 7, 5, 6, 3, 2, (2, 3), (1, 0), (1, 2), "global", 17),
    (1, 5, 18, 4, 5, 5, 5, (3, 2), (2, 3), (2, 1), "spatial", 7),
    (2, 3, 1, 1, 1, 1, 1, (1, 1), (0, 0), (0, 0), "spatial", 1),
    (1, 300, 16, 3, 3, 4, 4, (2, 2), (1, 1), (0, 0), "spatial", 5),  # packed weight walked in channel blocks
]


def _conv_case(case, dtype, weight_layout="contiguous"):
    N, Cin, Cout, H, W, kh, kw, s, p, op, mode, k = case
    x = torch.randn(N, Cin, H, W, dtype=dtype)
    v, i = R.topk_compact_ref(x, k, mode, None, True)  # ReLU: some selected values are exact zeros
    dense = R.compact_to_dense_ref(v, i, mode, x.shape)
    w = torch.randn(Cin, Cout, kh, kw, dtype=dtype)
    if weight_layout == "cout_last":  # [Cin, kh, kw, Cout] storage, as the folded weight
        w = w.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    elif weight_layout == "strided":
        w = torch.randn(Cout, kh, Cin, kw, dtype=dtype).permute(2, 0, 1, 3)
    b = torch.randn(Cout, dtype=dtype)
    return x, v, i, dense, w, b, list(s), list(p), list(op), mode


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weight_layout", ["contiguous", "cout_last", "strided"])
def test_conv_forward_matches_conv_transpose2d(isa, case, dtype, weight_layout):
    x, v, i, dense, w, b, s, p, op, mode = _conv_case(case, dtype, weight_layout)
    out = ops.sparse_conv_transpose2d(v, i, mode, list(x.shape), w, b, s, p, op)
    assert_accurate(out, torch_conv_transpose2d(F64, dense, w, b, s, p, op),
                    torch_conv_transpose2d(dtype, dense, w, b, s, p, op), "compact input")
    out_dense_in = ops.sparse_conv_transpose2d(dense, None, mode, list(x.shape), w, None, s, p, op)
    assert_accurate(out_dense_in, torch_conv_transpose2d(F64, dense, w, None, s, p, op),
                    torch_conv_transpose2d(dtype, dense, w, None, s, p, op), "dense input, no bias")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_folded_upsample_weight(isa, dtype):
    # The folded weight is a non-contiguous view; the op must equal interpolate + conv2d.
    for mode, k, cin in (("spatial", 4, 24), ("channel", 3, 40)):
        x = torch.randn(2, cin, 4, 4, dtype=dtype)
        v, i = R.topk_compact_ref(x, k, mode, None, True)
        dense = R.compact_to_dense_ref(v, i, mode, x.shape)
        w3, b = torch.randn(32, cin, 3, 3, dtype=dtype), torch.randn(32, dtype=dtype)
        out = ops.sparse_conv_transpose2d(v, i, mode, list(x.shape), geometry.fold_upsample_weight(w3), b, [2, 2], [1, 1],
                                          [0, 0])
        assert_accurate(out, torch_upsample_conv2d(F64, dense, w3, b), torch_upsample_conv2d(dtype, dense, w3, b),
                        f"{mode}, k={k}")


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_gradients_match_autograd(isa, case, dtype):
    x, v, i, dense, w, b, s, p, op, mode = _conv_case(case, dtype, "cout_last")
    go = torch.randn_like(torch_conv_transpose2d(dtype, dense, w, None, s, p, op))
    # (output, input gradient at the entries, weight gradient, None): the float64 reference and PyTorch's own
    _, gv_ref, gw_ref, _ = torch_conv_transpose2d(F64, dense, w, None, s, p, op, go, i, mode)
    _, gv_torch, gw_torch, _ = torch_conv_transpose2d(dtype, dense, w, None, s, p, op, go, i, mode)
    gv = ops.sparse_conv_transpose2d_input_grad(go, i, mode, list(x.shape), w, s, p)
    assert_accurate(gv, gv_ref, gv_torch, "input gradient")
    gw = ops.sparse_conv_transpose2d_weight_grad(go, v, i, mode, list(x.shape), list(w.shape), s, p)
    assert_accurate(gw, gw_ref, gw_torch, "weight gradient")
    assert gw.is_contiguous()
    gw_dense = ops.sparse_conv_transpose2d_weight_grad(go, dense, None, mode, list(x.shape), list(w.shape), s, p)
    assert_accurate(gw_dense, gw_ref, gw_torch, "weight gradient, dense input")
    # A non-contiguous grad_out gives the same result.
    go_t = go.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(ops.sparse_conv_transpose2d_input_grad(go_t, i, mode, list(x.shape), w, s, p), gv)


def test_conv_results_do_not_depend_on_thread_count():
    x, v, i, dense, w, b, s, p, op, mode = _conv_case(CONV_CASES[1], torch.float32)
    out = ops.sparse_conv_transpose2d(v, i, mode, list(x.shape), w, b, s, p, op)
    go = torch.randn_like(out)
    args = [(ops.sparse_conv_transpose2d, (v, i, mode, list(x.shape), w, b, s, p, op)),
            (ops.sparse_conv_transpose2d_input_grad, (go, i, mode, list(x.shape), w, s, p)),
            (ops.sparse_conv_transpose2d_weight_grad, (go, v, i, mode, list(x.shape), list(w.shape), s, p))]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [f(*a) for f, a in args]
    finally:
        torch.set_num_threads(n)
    for (f, a), r in zip(args, single):
        assert torch.equal(f(*a), r)


def test_conv_bad_arguments():
    v, i = R.topk_compact_ref(torch.randn(1, 4, 3, 3), 2, "spatial")
    w = torch.randn(4, 5, 3, 3)
    shape = [1, 4, 3, 3]
    conv = ops.sparse_conv_transpose2d
    with pytest.raises(ValueError, match="Cin = 3"):
        conv(v, i, "spatial", shape, torch.randn(3, 5, 3, 3), None, [1], [0], [0])
    with pytest.raises(ValueError, match=r"bias must be \[Cout\]"):
        conv(v, i, "spatial", shape, w, torch.randn(4), [1], [0], [0])
    with pytest.raises(ValueError, match="output_padding"):
        conv(v, i, "spatial", shape, w, None, [2], [0], [2])
    with pytest.raises(TypeError, match="weight dtype"):
        conv(v, i, "spatial", shape, w.double(), None, [1], [0], [0])
    with pytest.raises(ValueError, match="index 9 out of range"):
        conv(v, torch.full_like(i, 9), "spatial", shape, w, None, [1], [0], [0])
    with pytest.raises(ValueError, match="do not match"):
        conv(v, i, "channel", shape, w, None, [1], [0], [0])
    with pytest.raises(ValueError, match="without indices"):
        conv(v, None, "spatial", shape, w, None, [1], [0], [0])
    with pytest.raises(ValueError, match="grad_out shape"):
        ops.sparse_conv_transpose2d_input_grad(torch.randn(1, 5, 4, 4), i, "spatial", shape, w, [1], [0])
    with pytest.raises(ValueError, match="index -1 out of range"):
        ops.sparse_conv_transpose2d_weight_grad(torch.randn(1, 5, 5, 5), v, torch.full_like(i, -1), "spatial", shape,
                                                list(w.shape), [1], [0])
