"""The CUDA C++ kernels (the internal provider ops ``torch.ops._sparsegen_cuda.*``) against the pure-PyTorch
references.

Selection and layout must match bit for bit (ties to the lower index, ascending index order). Convolutions and
their gradients follow the rule of tolerance.py: every element against a float64 reference, float32/float16/bfloat16
results at most twice the largest error of PyTorch's own F.conv_transpose2d (and its autograd gradients) at that
dtype on the GPU, float64 results tightly. Skipped without a CUDA device or without the compiled kernels.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

from sparsegen_kernels import reference as R  # noqa: E402
from sparsegen_kernels import geometry  # noqa: E402
from tolerance import assert_accurate, no_tf32, torch_conv_transpose2d  # noqa: E402

from sparsegen_kernels import backend, ops  # noqa: E402

OPS = backend.cuda_provider_ops(ops.PROVIDER_OPS)


def _cuda_kernels_present() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import sparsegen_kernels  # noqa: F401  (loads _C, which registers the ops)
    except ImportError:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"_sparsegen_cuda::{op}", "CUDA") for op in OPS)


if not _cuda_kernels_present():
    pytest.skip("needs a CUDA device and sparsegen_kernels._C built with its CUDA kernels", allow_module_level=True)

OPS_NS = torch.ops._sparsegen_cuda
DEV = "cuda"
F64 = torch.float64
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _ieee_deterministic_cudnn():
    """Moderate densities run on cuDNN, which follows PyTorch's switches: float32 in IEEE precision (not TF32),
    for the kernels and PyTorch's yardstick alike, and deterministic algorithms, for the determinism checks below."""
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        with no_tf32():
            yield
    finally:
        torch.backends.cudnn.deterministic = saved


def with_ties(x):
    """Round a third of the entries to quarters so equal values (ties) are plentiful; keep a zero block."""
    x = x.clone()
    flat = x.view(-1)
    flat[::3] = (flat[::3] * 4).round() / 4
    flat[: max(1, flat.numel() // 50)] = 0.0
    return x


# ---- selection ----------------------------------------------------------------------------------------
# (shape, k, mode): every size class of the warp kernel (group <= 1024, 1..32 keys per lane), the block
# kernel with keys in shared memory (larger groups) and without (global groups beyond shared memory),
# odd shapes, k = 1 and k = group size, int32 indices (group > 32767).
TOPK_CASES = [
    ((2, 3, 4, 4), 4, "spatial"),
    ((3, 5, 7, 7), 12, "spatial"),
    ((2, 4, 8, 8), 1, "spatial"),
    ((2, 4, 8, 8), 64, "spatial"),
    ((2, 3, 10, 10), 25, "spatial"),
    ((2, 3, 13, 17), 55, "spatial"),
    ((2, 5, 32, 32), 256, "spatial"),
    ((1, 3, 45, 45), 506, "spatial"),
    ((2, 7, 3, 5), 3, "channel"),
    ((2, 100, 3, 3), 8, "channel"),
    ((2, 1000, 2, 3), 250, "channel"),
    ((4, 3200, 4, 4), 8, "channel"),
    ((2, 5, 3, 7), 17, "global"),
    ((2, 64, 16, 16), 4096, "global"),
    ((2, 16, 100, 100), 5000, "global"),  # 160000 per group: keys re-read from global memory
    ((1, 2, 200, 200), 1, "global"),
]


@pytest.mark.parametrize("shape,k,mode", TOPK_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_exact(shape, k, mode, dtype):
    x = with_ties(torch.randn(shape, device=DEV)).to(dtype)
    bias = torch.randn(shape[1], device=DEV).to(dtype)
    for b, relu in ((None, False), (bias, False), (None, True), (bias, True)):
        rv, ri = R.topk_compact_ref(x, k, mode, b, relu)
        values, indices = OPS_NS.topk_compact(x, k, mode, b, relu)
        out, indices2 = OPS_NS.topk_mask(x, k, mode, b, relu)
        assert indices.dtype == ri.dtype and indices2.dtype == ri.dtype
        assert values.dtype == dtype and out.dtype == dtype and out.shape == x.shape
        assert torch.equal(indices, ri), (b is not None, relu)
        assert torch.equal(indices2, ri), (b is not None, relu)
        assert torch.equal(values, rv), (b is not None, relu)
        assert torch.equal(out, R.compact_to_dense_ref(rv, ri, mode, shape)), (b is not None, relu)


@pytest.mark.parametrize("mode", ["spatial", "channel", "global"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_all_equal_and_special_values(mode, dtype):
    """All-equal groups (pure tie-breaking), +-0.0, +-inf and NaN (NaN ranks above +inf, as in torch.sort)."""
    shape = (2, 6, 5, 5)
    G, size = geometry.group_geometry(mode, *shape[1:])
    x = torch.zeros(shape, device=DEV, dtype=dtype)
    k = max(1, size // 3)
    for make in (lambda t: t.fill_(1.5), lambda t: t.fill_(0.0)):
        make(x)
        rv, ri = R.topk_compact_ref(x, k, mode)
        values, indices = OPS_NS.topk_compact(x, k, mode, None, False)
        assert torch.equal(indices, ri) and torch.equal(values, rv)
    y = torch.randn(shape, device=DEV).to(dtype)
    flat = y.view(-1)
    flat[::7] = 0.0
    flat[1::7] = -0.0
    flat[2::11] = float("inf")
    flat[3::11] = float("-inf")
    flat[5::13] = float("nan")
    for relu in (False, True):
        rv, ri = R.topk_compact_ref(y, k, mode, None, relu)
        values, indices = OPS_NS.topk_compact(y, k, mode, None, relu)
        assert torch.equal(indices, ri), relu
        torch.testing.assert_close(values, rv, rtol=0, atol=0, equal_nan=True)  # exact, NaN where the reference has it


def test_topk_bad_arguments():
    x = torch.randn(2, 3, 4, 4, device=DEV)
    with pytest.raises(ValueError, match="spatial"):
        OPS_NS.topk_compact(x, 17, "spatial", None, False)
    with pytest.raises(ValueError):
        OPS_NS.topk_compact(x, 0, "channel", None, False)
    with pytest.raises(ValueError):
        OPS_NS.topk_mask(x, 1, "rows", None, False)
    with pytest.raises(TypeError):
        OPS_NS.topk_compact(x, 2, "spatial", torch.zeros(3, device=DEV, dtype=torch.float64), False)
    with pytest.raises(ValueError):
        OPS_NS.topk_compact(x, 2, "spatial", torch.zeros(4, device=DEV), False)


def test_topk_noncontiguous_input():
    x = torch.randn(2, 8, 6, 10, device=DEV).transpose(2, 3)
    rv, ri = R.topk_compact_ref(x, 7, "spatial", None, True)
    values, indices = OPS_NS.topk_compact(x, 7, "spatial", None, True)
    assert torch.equal(indices, ri) and torch.equal(values, rv)


# ---- layout ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,k,mode", [((2, 3, 5, 7), 9, "spatial"), ((2, 40, 3, 3), 5, "channel"),
                                          ((2, 4, 3, 5), 11, "global")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
def test_layout(shape, k, mode, dtype, index_dtype):
    x = torch.randn(shape, device=DEV).to(dtype)
    rv, ri = R.topk_compact_ref(x, k, mode)
    idx = ri.to(index_dtype)
    dense = OPS_NS.compact_to_dense(rv, idx, mode, list(shape))
    assert torch.equal(dense, R.compact_to_dense_ref(rv, ri, mode, shape))
    other = torch.randn(shape, device=DEV).to(dtype)
    assert torch.equal(OPS_NS.compact_gather(other, idx, mode), R.compact_gather_ref(other, ri, mode))


# ---- sparse transposed convolution ----------------------------------------------------------------------------
# (in_shape, Cout, kernel, stride, padding, output_padding, mode, k, folded)
CONV_CASES = [
    ((2, 32, 8, 8), 16, (4, 4), 2, 1, 0, "spatial", 16, True),  # folded upsample conv, 25% density
    ((2, 48, 7, 5), 32, (4, 4), 2, 1, 0, "spatial", 9, True),  # odd sizes, 25%
    ((2, 320, 4, 4), 64, (4, 4), 2, 1, 0, "channel", 8, True),  # the FC layer's channel top-8 (2.5%)
    ((2, 16, 6, 6), 24, (4, 4), 2, 1, 0, "global", 100, True),
    ((2, 5, 6, 7), 3, (3, 3), 1, 1, 0, "spatial", 10, False),
    ((2, 6, 5, 4), 7, (5, 3), (3, 2), (2, 1), (2, 1), "channel", 2, False),
    ((3, 4, 5, 5), 9, (1, 1), 1, 0, 0, "global", 20, False),
    ((1, 33, 9, 9), 40, (2, 2), 2, 0, 1, "spatial", 20, False),
]


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _conv_case(case, dtype, seed=0):
    """Inputs at ``dtype`` (``*_lo``); the float64 reference upcasts them exactly (see :func:`_torch_conv`)."""
    in_shape, Cout, ks, stride, padding, out_pad, mode, k, folded = case
    g = torch.Generator(device=DEV).manual_seed(seed)
    N, Cin, H, W = in_shape
    x = torch.randn(in_shape, device=DEV, dtype=torch.float64, generator=g)
    if folded:
        w3 = torch.randn(Cout, Cin, 3, 3, device=DEV, dtype=torch.float64, generator=g) / (Cin * 9) ** 0.5
        w = geometry.fold_upsample_weight(w3)  # [Cin, Cout, 4, 4] view of [Cin, 4, 4, Cout] storage
        w_lo = w.permute(0, 2, 3, 1).contiguous().to(dtype).permute(0, 3, 1, 2)  # same layout at dtype
        assert not w_lo.is_contiguous()
    else:
        w_lo = (torch.randn(Cin, Cout, *ks, device=DEV, dtype=torch.float64, generator=g)
                / (Cin * ks[0] * ks[1]) ** 0.5).to(dtype)
    b_lo = torch.randn(Cout, device=DEV, dtype=torch.float64, generator=g).to(dtype)
    v, i = R.topk_compact_ref(x, k, mode, None, True)  # after ReLU: some selected values may be zero
    geo = dict(stride=_pair(stride), padding=_pair(padding), output_padding=_pair(out_pad))
    return dict(in_shape=in_shape, mode=mode, i=i, v_lo=v.to(dtype), w_lo=w_lo, b_lo=b_lo, geo=geo)


def _torch_conv(dtype, c, dense, bias, grad_out=None):
    """F.conv_transpose2d at ``dtype`` on the case's geometry (float64: the reference); with ``grad_out``
    ``(output, input gradient at the entries, weight gradient, bias gradient)``."""
    geo = c["geo"]
    return torch_conv_transpose2d(dtype, dense, c["w_lo"], bias, geo["stride"], geo["padding"],
                                  geo["output_padding"], grad_out, None if grad_out is None else c["i"], c["mode"])


def _run_conv(c, values, indices, bias):
    geo = c["geo"]
    return OPS_NS.sparse_conv_transpose2d(values, indices, c["mode"], list(c["in_shape"]), c["w_lo"], bias,
                                          geo["stride"], geo["padding"], geo["output_padding"])


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_forward(case, dtype):
    c = _conv_case(case, dtype)
    dense_lo = R.compact_to_dense_ref(c["v_lo"], c["i"], c["mode"], c["in_shape"])
    for bias in (c["b_lo"], None):
        ref, theirs = _torch_conv(F64, c, dense_lo, bias), _torch_conv(dtype, c, dense_lo, bias)
        what = f"bias={bias is not None}"
        out = _run_conv(c, c["v_lo"], c["i"], bias)
        assert out.dtype == dtype and out.shape == ref.shape
        assert_accurate(out, ref, theirs, f"compact input, {what}")
        # Dense input with zeros (indices = None): the same rule.
        out_d = _run_conv(c, dense_lo, None, bias)
        assert out_d.dtype == dtype and out_d.shape == ref.shape
        assert_accurate(out_d, ref, theirs, f"dense input, {what}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_tensor_core_path_large(dtype):
    """The folded conv at a paper64 size and 25% density (decompressed, then cuDNN on the tensor cores)."""
    case = ((4, 256, 16, 16), 128, (4, 4), 2, 1, 0, "spatial", 64, True)
    c = _conv_case(case, dtype, seed=1)
    dense_lo = R.compact_to_dense_ref(c["v_lo"], c["i"], c["mode"], c["in_shape"])
    out = _run_conv(c, c["v_lo"], c["i"], c["b_lo"])
    assert_accurate(out, _torch_conv(F64, c, dense_lo, c["b_lo"]), _torch_conv(dtype, c, dense_lo, c["b_lo"]))
    assert torch.equal(out, _run_conv(c, c["v_lo"], c["i"], c["b_lo"]))  # deterministic cuDNN algorithms


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_gradients(case, dtype):
    c = _conv_case(case, dtype)
    mode, i, geo, in_shape = c["mode"], c["i"], c["geo"], list(c["in_shape"])
    dense_lo = R.compact_to_dense_ref(c["v_lo"], i, mode, in_shape)
    g = torch.Generator(device=DEV).manual_seed(2)
    out_shape = _torch_conv(F64, c, dense_lo, None).shape
    gout_lo = torch.randn(out_shape, device=DEV, dtype=torch.float64, generator=g).to(dtype)
    # The float64 reference and PyTorch's own gradients at dtype: (output, input gradient at the entries, weight
    # gradient, None).
    _, ref_gv, ref_gw, _ = _torch_conv(F64, c, dense_lo, None, gout_lo)
    _, torch_gv, torch_gw, _ = _torch_conv(dtype, c, dense_lo, None, gout_lo)

    def input_grad():
        return OPS_NS.sparse_conv_transpose2d_input_grad(gout_lo, i, mode, in_shape, c["w_lo"], geo["stride"],
                                                         geo["padding"])

    def weight_grad(values, indices):
        return OPS_NS.sparse_conv_transpose2d_weight_grad(gout_lo, values, indices, mode, in_shape,
                                                          list(c["w_lo"].shape), geo["stride"], geo["padding"])

    gv = input_grad()
    assert gv.shape == c["v_lo"].shape and gv.dtype == dtype
    assert_accurate(gv, ref_gv, torch_gv, "input gradient")
    gw = weight_grad(c["v_lo"], i)
    assert gw.shape == c["w_lo"].shape and gw.dtype == dtype
    assert_accurate(gw, ref_gw, torch_gw, "weight gradient")
    # Dense input (indices = None): the same rule for the weight gradient.
    assert_accurate(weight_grad(dense_lo, None), ref_gw, torch_gw, "weight gradient, dense input")
    # Both backward kernels are deterministic.
    assert torch.equal(gv, input_grad())
    assert torch.equal(gw, weight_grad(c["v_lo"], i))


def test_conv_bad_arguments():
    v = torch.randn(2, 3, 4, device=DEV)
    i = torch.zeros(2, 3, 4, device=DEV, dtype=torch.int16)
    w = torch.randn(3, 5, 3, 3, device=DEV)
    with pytest.raises(ValueError, match="input channels"):  # weight's Cin differs from the input's
        OPS_NS.sparse_conv_transpose2d(v, i, "spatial", [2, 3, 3, 3], torch.randn(4, 5, 3, 3, device=DEV), None,
                                            [1], [0], [0])
    with pytest.raises(TypeError):
        OPS_NS.sparse_conv_transpose2d(v, i, "spatial", [2, 3, 3, 3], w.double(), None, [1], [0], [0])
    with pytest.raises(ValueError):  # values not [N, G, k] for the mode
        OPS_NS.sparse_conv_transpose2d(v, i, "channel", [2, 3, 3, 3], w, None, [1], [0], [0])
