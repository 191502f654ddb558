"""The Triton kernels against the references: CPU tensors under TRITON_INTERPRET=1 (CUDA tensors on a GPU).

Small shapes with large blocks keep the interpreter (whose cost is per program) fast. Selection and layout are
checked bit for bit; convolutions and their gradients by the rule of tolerance.py: every element against a float64
reference, at most twice the largest error of PyTorch's own op at that dtype on the same device
(F.conv_transpose2d, F.interpolate + F.conv2d and their autograd gradients); float64 results tightly.
"""
import os

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.triton_kernels

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from sparsegen_kernels import ops  # noqa: E402
from sparsegen_kernels import reference as R  # noqa: E402
from sparsegen_kernels import geometry  # noqa: E402
from sparsegen_kernels.triton import PROVIDERS  # noqa: E402
from sparsegen_kernels.triton import sparse_conv, topk, upsample_conv  # noqa: E402
from tolerance import assert_accurate, no_tf32, torch_conv_transpose2d, torch_upsample_conv2d  # noqa: E402

MODES = ("spatial", "channel", "global")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
F64 = torch.float64


@pytest.fixture(autouse=True)
def _ieee_float32():
    """float32 in IEEE precision on a GPU, for the kernels (their tl.dot follows allow_tf32) and PyTorch alike."""
    with no_tf32():
        yield


def sample_x(shape, dtype, ties=True):
    x = torch.randn(shape, dtype=torch.float32)
    if ties:  # coarse values: many exact ties, zeros of both signs
        x = (x * 2).round() / 2
        x[..., ::5] = -0.0
    return x.to(dtype).to(DEVICE)


def k_for(mode, shape, frac=0.3):
    N, C, H, W = shape
    return max(1, int(geometry.group_geometry(mode, C, H, W)[1] * frac))


# ---------------------------------------------------------------------------------------------------
# Providers table
# ---------------------------------------------------------------------------------------------------
def test_providers_complete():
    assert set(PROVIDERS) == set(ops.PROVIDER_OPS)


# ---------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------
def check_topk(x, k, mode, bias, relu):
    values, indices = PROVIDERS["topk_compact"](x, k, mode, bias, relu)
    out, indices2 = PROVIDERS["topk_mask"](x, k, mode, bias, relu)
    xr, br = x.cpu(), None if bias is None else bias.cpu()
    rv, ri = R.topk_compact_ref(xr, k, mode, br, relu)
    assert indices.dtype == ri.dtype and values.dtype == x.dtype and out.dtype == x.dtype
    assert torch.equal(indices.cpu(), ri)
    assert torch.equal(indices2.cpu(), ri)
    assert torch.equal(values.cpu(), rv)
    assert torch.equal(out.cpu(), R.topk_mask_ref(xr, k, mode, br, relu))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,relu", [(False, False), (True, True)])
def test_topk_exact(mode, dtype, bias, relu):
    shape = (2, 5, 6, 7)
    x = sample_x(shape, dtype)
    b = (torch.randn(shape[1]).round() / 2).to(dtype).to(DEVICE) if bias else None
    check_topk(x, k_for(mode, shape), mode, b, relu)


@pytest.mark.parametrize("mode", MODES)
def test_topk_edge_k(mode):
    shape = (2, 3, 4, 5)
    x = sample_x(shape, torch.float32)
    size = geometry.group_geometry(mode, *shape[1:])[1]
    for k in (1, size):
        check_topk(x, k, mode, None, False)
    check_topk(torch.zeros(shape, device=DEVICE), 3, mode, None, True)  # all ties
    special = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45, 3.0e38, -3.0e38])
    xs = special[torch.randint(0, len(special), shape)].to(DEVICE)
    check_topk(xs, min(4, size), mode, None, False)


def test_topk_bias_rounding_half():
    # x + bias must round to the input dtype before selection, exactly as torch computes it.
    shape = (1, 4, 8, 8)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(shape).to(dtype).to(DEVICE)
        b = (torch.randn(shape[1]) * 100).to(dtype).to(DEVICE)
        check_topk(x, 16, "spatial", b, False)


@pytest.mark.parametrize("mode,dtype", [("spatial", torch.float32), ("channel", torch.bfloat16),
                                        ("global", torch.float32), ("global", torch.float64)])
def test_topk_chunked_radix(mode, dtype, monkeypatch):
    # Force the multi-program radix path (used for group sizes above SINGLE_BLOCK_MAX) on small groups.
    monkeypatch.setattr(topk, "SINGLE_BLOCK_MAX", 16)
    monkeypatch.setattr(topk, "CHUNK", 32)
    shape = (2, 3, 7, 5)
    x = sample_x(shape, dtype)
    b = torch.randn(shape[1]).to(dtype).to(DEVICE)
    check_topk(x, k_for(mode, shape), mode, b, True)
    check_topk(x, 1, mode, None, False)


def test_topk_large_global():
    shape = (1, 3, 96, 96)  # 27648 elements per group: the chunked path at its real chunk size
    x = sample_x(shape, torch.float32)
    check_topk(x, 5000, "global", None, True)


def test_topk_rejects_bad_input():
    x = torch.randn(1, 2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="k=10"):
        PROVIDERS["topk_compact"](x, 10, "spatial", None, False)
    with pytest.raises(ValueError, match="mode"):
        PROVIDERS["topk_compact"](x, 1, "rows", None, False)
    with pytest.raises(TypeError):
        PROVIDERS["topk_compact"](x.to(torch.int32), 1, "spatial", None, False)


# ---------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_layout(mode, dtype):
    shape = (2, 5, 4, 3)
    x = torch.randn(shape).to(dtype)
    v, i = R.topk_compact_ref(x, k_for(mode, shape), mode)
    dense = PROVIDERS["compact_to_dense"](v.to(DEVICE), i.to(DEVICE), mode, list(shape))
    assert torch.equal(dense.cpu(), R.compact_to_dense_ref(v, i, mode, shape))
    y = torch.randn(shape).to(dtype)
    g = PROVIDERS["compact_gather"](y.to(DEVICE), i.to(DEVICE), mode)
    assert torch.equal(g.cpu(), R.compact_gather_ref(y, i, mode))
    # a non-contiguous dense input
    yt = y.to(DEVICE).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.equal(PROVIDERS["compact_gather"](yt, i.to(DEVICE), mode).cpu(), R.compact_gather_ref(y, i, mode))


def test_compact_layout_int32_indices():
    shape = (1, 2, 140, 120)  # global group of 33600 > 32767: int32 indices
    x = torch.randn(shape)
    v, i = R.topk_compact_ref(x, 300, "global")
    assert i.dtype == torch.int32
    dense = PROVIDERS["compact_to_dense"](v.to(DEVICE), i.to(DEVICE), "global", list(shape))
    assert torch.equal(dense.cpu(), R.compact_to_dense_ref(v, i, "global", shape))
    assert torch.equal(PROVIDERS["compact_gather"](x.to(DEVICE), i.to(DEVICE), "global").cpu(), v)


# ---------------------------------------------------------------------------------------------------
# Sparse transposed convolution
# ---------------------------------------------------------------------------------------------------
# (N, Cin, H, W, Cout, kh, kw, stride, padding, output_padding); kh = 0 means the folded 3x3 upsample weight.
GEOMETRIES = [
    (2, 6, 5, 4, 7, 0, 0, (2, 2), (1, 1), (0, 0)),
    (1, 5, 3, 4, 9, 3, 3, (1, 1), (1, 1), (0, 0)),
    (2, 4, 4, 3, 5, 3, 2, (3, 2), (2, 0), (1, 1)),
    (1, 3, 3, 5, 17, 1, 1, (2, 2), (0, 0), (1, 0)),  # phases without taps: bias only
    (1, 7, 2, 3, 6, 5, 4, (2, 3), (1, 2), (1, 2)),
]


def make_conv_case(geo, mode, density, dtype, seed=0):
    N, Cin, H, W, Cout, kh, kw, stride, padding, output_padding = geo
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((N, Cin, H, W), generator=gen)
    if kh == 0:
        weight = geometry.fold_upsample_weight(torch.randn((Cout, Cin, 3, 3), generator=gen))  # non-contiguous view
    else:
        weight = torch.randn((Cin, Cout, kh, kw), generator=gen)
    bias = torch.randn((Cout,), generator=gen)
    k = max(1, int(geometry.group_geometry(mode, Cin, H, W)[1] * density))
    values, indices = R.topk_compact_ref(x, k, mode)
    return dict(mode=mode, values=values.to(dtype), indices=indices, weight=weight.to(dtype), bias=bias.to(dtype),
                stride=list(stride), padding=list(padding), output_padding=list(output_padding),
                in_shape=[N, Cin, H, W])


def dev(t):
    return None if t is None else t.to(DEVICE)


def dense_of(c):
    """The dense input of a case (at its dtype, on DEVICE), by the reference scatter."""
    return dev(R.compact_to_dense_ref(c["values"], c["indices"], c["mode"], c["in_shape"]))


def torch_conv(c, dtype, bias=True, grad_out=None):
    """F.conv_transpose2d on the case's inputs at ``dtype`` on DEVICE (float64: the reference); with ``grad_out``
    also the gradients (input gradient at the compact entries, weight)."""
    return torch_conv_transpose2d(dtype, dense_of(c), dev(c["weight"]), dev(c["bias"]) if bias else None,
                                  c["stride"], c["padding"], c["output_padding"], dev(grad_out),
                                  None if grad_out is None else dev(c["indices"]), c["mode"])


def check(ours, c, what, grad_out=None, bias=True):
    """``ours`` (the output, or with ``grad_out`` a dict {"input": ..., "weight": ...} of gradients) against the
    float64 reference, with PyTorch's conv_transpose2d at the dtype of ``ours`` as the yardstick."""
    dtype = next(iter(ours.values())).dtype if isinstance(ours, dict) else ours.dtype
    ref, theirs = torch_conv(c, F64, bias, grad_out), torch_conv(c, dtype, bias, grad_out)
    if grad_out is None:
        assert_accurate(ours, ref, theirs, what)
        return
    for name, slot in (("input", 1), ("weight", 2)):
        if name in ours:
            assert_accurate(ours[name], ref[slot], theirs[slot], f"{what}, {name} gradient")


STRATEGIES = {"spatial": ("scatter", "gemm"), "channel": ("gather", "scatter", "gemm"), "global": ("scatter", "gemm")}


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("mode", MODES)
def test_conv_forward_strategies(geo, mode):
    c = make_conv_case(geo, mode, 0.3, torch.float32)
    out_shape = torch_conv(c, F64).shape
    for strategy in STRATEGIES[mode]:
        out = sparse_conv.sparse_conv_transpose2d(dev(c["values"]), dev(c["indices"]), mode, c["in_shape"],
                                                  dev(c["weight"]), dev(c["bias"]), c["stride"], c["padding"],
                                                  c["output_padding"], strategy=strategy)
        assert out.shape == out_shape and out.dtype == torch.float32
        check(out, c, strategy)
    # default strategy through the provider, no bias
    out = PROVIDERS["sparse_conv_transpose2d"](dev(c["values"]), dev(c["indices"]), mode, c["in_shape"],
                                               dev(c["weight"]), None, c["stride"], c["padding"],
                                               c["output_padding"])
    check(out, c, "default strategy, no bias", bias=False)


@pytest.mark.parametrize("geo", GEOMETRIES[:3])
def test_conv_forward_dense_input(geo):
    c = make_conv_case(geo, "spatial", 0.25, torch.float32)
    dense = dense_of(c)
    for x in (dense, dense.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
        out = PROVIDERS["sparse_conv_transpose2d"](x, None, "spatial", c["in_shape"], dev(c["weight"]),
                                                   dev(c["bias"]), c["stride"], c["padding"], c["output_padding"])
        check(out, c, f"dense input, contiguous={x.is_contiguous()}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_forward_dtypes(mode, dtype):
    c = make_conv_case(GEOMETRIES[0], mode, 0.3, dtype)
    for strategy in STRATEGIES[mode]:
        out = sparse_conv.sparse_conv_transpose2d(dev(c["values"]), dev(c["indices"]), mode, c["in_shape"],
                                                  dev(c["weight"]), dev(c["bias"]), c["stride"], c["padding"],
                                                  c["output_padding"], strategy=strategy)
        assert out.dtype == dtype
        check(out, c, strategy)


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("mode", MODES)
def test_conv_backward(geo, mode):
    c = make_conv_case(geo, mode, 0.3, torch.float32)
    grad_out = torch.randn(torch_conv(c, F64).shape, dtype=torch.float32)
    args = (dev(grad_out), dev(c["indices"]), mode, c["in_shape"], dev(c["weight"]), c["stride"], c["padding"])
    for strategy in ("entries", "gemm"):
        gi = sparse_conv.sparse_conv_transpose2d_input_grad(*args, strategy=strategy)
        assert gi.shape == c["indices"].shape and gi.dtype == torch.float32
        check({"input": gi}, c, strategy, grad_out)
    check({"input": PROVIDERS["sparse_conv_transpose2d_input_grad"](*args)}, c, "provider", grad_out)
    wshape = list(c["weight"].shape)
    for strategy in ("segment", "gemm"):
        gw = sparse_conv.sparse_conv_transpose2d_weight_grad(
            dev(grad_out), dev(c["values"]), dev(c["indices"]), mode, c["in_shape"], wshape, c["stride"],
            c["padding"], strategy=strategy)
        assert list(gw.shape) == wshape and gw.is_contiguous()
        check({"weight": gw}, c, strategy, grad_out)
    gw = PROVIDERS["sparse_conv_transpose2d_weight_grad"](dev(grad_out), dense_of(c), None, mode,
                                                          c["in_shape"], wshape, c["stride"], c["padding"])
    check({"weight": gw}, c, "provider, dense input", grad_out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["spatial", "channel"])
def test_conv_backward_dtypes(dtype, mode):
    c = make_conv_case(GEOMETRIES[0], mode, 0.3, dtype)
    grad_out = torch.randn(torch_conv(c, F64).shape).to(dtype)
    args = (dev(grad_out), dev(c["indices"]), mode, c["in_shape"], dev(c["weight"]), c["stride"], c["padding"])
    for strategy in ("entries", "gemm"):
        gi = sparse_conv.sparse_conv_transpose2d_input_grad(*args, strategy=strategy)
        assert gi.dtype == dtype
        check({"input": gi}, c, strategy, grad_out)
    for strategy in ("segment", "gemm"):
        gw = sparse_conv.sparse_conv_transpose2d_weight_grad(
            dev(grad_out), dev(c["values"]), dev(c["indices"]), mode, c["in_shape"], list(c["weight"].shape),
            c["stride"], c["padding"], strategy=strategy)
        assert gw.dtype == dtype
        check({"weight": gw}, c, strategy, grad_out)


@pytest.mark.parametrize("dtype", [torch.float32])
def test_weight_grad_split_k(dtype, monkeypatch):
    # The N*H*W reduction split over several programs, partial sums added afterwards.
    monkeypatch.setattr(sparse_conv, "WGRAD_TARGET_PROGRAMS", 10**6)
    c = make_conv_case((2, 3, 16, 16, 4, 3, 3, (1, 1), (1, 1), (0, 0)), "spatial", 0.25, dtype)
    grad_out = torch.randn(torch_conv(c, F64).shape).to(dtype)
    gw = sparse_conv.sparse_conv_transpose2d_weight_grad(
        dev(grad_out), dev(c["values"]), dev(c["indices"]), "spatial", c["in_shape"], list(c["weight"].shape),
        c["stride"], c["padding"], strategy="gemm")
    check({"weight": gw}, c, "split k", grad_out)


def test_conv_rejects_bad_input():
    c = make_conv_case(GEOMETRIES[1], "spatial", 0.3, torch.float32)
    with pytest.raises(TypeError):
        PROVIDERS["sparse_conv_transpose2d"](dev(c["values"]), dev(c["indices"]), "spatial", c["in_shape"],
                                             dev(c["weight"].double()), None, c["stride"], c["padding"],
                                             c["output_padding"])
    with pytest.raises(ValueError):
        PROVIDERS["sparse_conv_transpose2d"](dev(c["values"]), dev(c["indices"]), "channel", c["in_shape"],
                                             dev(c["weight"]), None, c["stride"], c["padding"],
                                             c["output_padding"])


# ---------------------------------------------------------------------------------------------------
# Upsample-conv on the 3x3 weight (very sparse channel-mode inputs: no fold) and through the fold
# ---------------------------------------------------------------------------------------------------
def upsample_case(mode, C, k, H, W, dtype, N=2, Cout=5, seed=0, zeros=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    values, indices = R.topk_compact_ref(x, k, mode, None, True)  # ReLU: some kept values are exact zeros
    if zeros:
        values[..., 0] = 0.0
    w3 = torch.randn(Cout, C, 3, 3, generator=g, dtype=torch.float64) / (3 * C ** 0.5)
    b = torch.randn(Cout, generator=g, dtype=torch.float64)
    grad_out = torch.randn(N, Cout, 2 * H, 2 * W, generator=g, dtype=torch.float64)
    return values.to(dtype), indices, w3.to(dtype), b.to(dtype), grad_out.to(dtype), [N, C, H, W]


def torch_upsample(dtype, values, indices, w3, b, mode, in_shape, grad_out=None):
    """F.interpolate + F.conv2d on the case's inputs at ``dtype`` on DEVICE (float64: the reference); with
    ``grad_out`` ``(output, input gradient at the entries, weight gradient, bias gradient)``."""
    dense = dev(R.compact_to_dense_ref(values, indices, mode, in_shape))
    return torch_upsample_conv2d(dtype, dense, dev(w3), dev(b), dev(grad_out), dev(indices), mode)


# (mode, C, k, H, W): channel top-k at low density takes the 3x3-weight kernels, the others the fold.
UPSAMPLE_CASES = [("channel", 40, 2, 3, 4), ("channel", 64, 3, 4, 4), ("channel", 33, 1, 1, 5),
                  ("channel", 8, 4, 3, 3), ("spatial", 6, 5, 4, 3), ("global", 8, 7, 3, 3)]


@pytest.mark.parametrize("case", UPSAMPLE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_upsample_conv(case, dtype):
    mode, C, k, H, W = case
    values, indices, w3, b, grad_out, in_shape = upsample_case(mode, C, k, H, W, dtype)
    direct = upsample_conv.uses_direct_kernels(mode, indices, in_shape)
    assert direct == (mode == "channel" and k <= C / 16)
    ref = torch_upsample(F64, values, indices, w3, b, mode, in_shape, grad_out)
    theirs = torch_upsample(dtype, values, indices, w3, b, mode, in_shape, grad_out)
    out = PROVIDERS["sparse_upsample_conv2d"](dev(values), dev(indices), mode, in_shape, dev(w3), dev(b))
    assert out.shape == ref[0].shape and out.dtype == dtype and out.is_contiguous()
    assert_accurate(out, ref[0], theirs[0], "output")
    out = PROVIDERS["sparse_upsample_conv2d"](dev(values), dev(indices), mode, in_shape, dev(w3), None)
    assert_accurate(out, torch_upsample(F64, values, indices, w3, None, mode, in_shape),
                    torch_upsample(dtype, values, indices, w3, None, mode, in_shape), "output without bias")
    gi = PROVIDERS["sparse_upsample_conv2d_input_grad"](dev(grad_out), dev(indices), mode, in_shape, dev(w3))
    assert gi.shape == indices.shape and gi.dtype == dtype
    assert_accurate(gi, ref[1], theirs[1], "input gradient")
    gw = PROVIDERS["sparse_upsample_conv2d_weight_grad"](dev(grad_out), dev(values), dev(indices), mode, in_shape)
    assert gw.shape == w3.shape and gw.dtype == dtype and gw.is_contiguous()
    assert_accurate(gw, ref[2], theirs[2], "weight gradient")


def test_upsample_conv_untouched_channels_get_zero_gradient():
    values, indices, w3, b, grad_out, in_shape = upsample_case("channel", 64, 2, 2, 2, torch.float64, N=1)
    gw = PROVIDERS["sparse_upsample_conv2d_weight_grad"](dev(grad_out), dev(values), dev(indices), "channel",
                                                         in_shape).cpu()
    picked = torch.zeros(64, dtype=torch.bool)
    picked[indices.long().flatten()] = True
    assert not picked.all() and torch.all(gw[:, ~picked] == 0)


def test_upsample_conv_dense_input():
    values, indices, w3, b, grad_out, in_shape = upsample_case("spatial", 6, 5, 4, 3, torch.float64)
    dense = R.compact_to_dense_ref(values, indices, "spatial", in_shape)
    ref = torch_upsample(F64, values, indices, w3, b, "spatial", in_shape, grad_out)
    out = PROVIDERS["sparse_upsample_conv2d"](dev(dense), None, "spatial", in_shape, dev(w3), dev(b))
    assert_accurate(out, ref[0], ref[0], "output")
    gw = PROVIDERS["sparse_upsample_conv2d_weight_grad"](dev(grad_out), dev(dense), None, "spatial", in_shape)
    assert_accurate(gw, ref[2], ref[2], "weight gradient")


def test_upsample_conv_rejects_bad_input():
    values, indices, w3, b, grad_out, in_shape = upsample_case("channel", 40, 2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="weight must have shape"):
        PROVIDERS["sparse_upsample_conv2d"](dev(values), dev(indices), "channel", in_shape, dev(w3[:, :-1]), None)
    with pytest.raises(TypeError, match="dtype"):
        PROVIDERS["sparse_upsample_conv2d"](dev(values), dev(indices), "channel", in_shape, dev(w3.double()), None)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        PROVIDERS["sparse_upsample_conv2d_input_grad"](dev(grad_out[..., :-1]), dev(indices), "channel", in_shape,
                                                       dev(w3))
