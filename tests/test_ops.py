"""The public API of sparsegen_kernels against independent references, on the CPU and once per GPU provider.

References: a stable-sort top-k (reference.topk_compact_ref), torch.topk for the selected set,
F.conv_transpose2d, F.interpolate + F.conv2d; gradcheck in float64; torch.library.opcheck.

The ``device`` parameter is "cpu", and on a CUDA machine "cuda-triton" and "cuda-cuda" (marked ``gpu``): the
tests then run on "cuda" with that provider selected (see conftest.py). Selections are compared exactly;
float32/float16/bfloat16 results (forward and gradients) obey the rule of tolerance.py (at most twice PyTorch's
own error at that dtype against a float64 reference); float64 results are compared with tight tolerances.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsegen_kernels as sk
from sparsegen_kernels import ops, reference
from sparsegen_kernels import geometry
from conftest import device_dtype_params, device_params, gpu_params
from tolerance import assert_all_within_torch_error, assert_close_float64, assert_within_torch_error, no_tf32

MODES = ["spatial", "channel", "global"]
SHAPES = [(2, 3, 5, 7), (1, 8, 4, 4), (3, 7, 1, 9)]
TOL64 = dict(atol=1e-12, rtol=1e-12)  # float64 results against float64 references
F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
# The CPU kernels take float32 and float64; the GPU providers also float16 and bfloat16.
ALL_DTYPES = device_dtype_params([F32, F64], [F32, F64, F16, BF16])
WORKING_DTYPES = device_dtype_params([F32], [F32, F16, BF16])  # precisions checked with the tolerance rule

on_devices = pytest.mark.parametrize("device", device_params(), indirect=True)
on_gpus = pytest.mark.parametrize("device", gpu_params(), indirect=True)


def with_dtypes(params):
    return pytest.mark.parametrize("device, dtype", params, indirect=["device"])


def assert_equal(actual, expected, what):
    """Exact equality (values, dtype, shape), naming ``what`` and the first mismatches on failure."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def group_size(shape, mode):
    return geometry.group_geometry(mode, *shape[1:])[1]


def ks_for(shape, mode):
    size = group_size(shape, mode)
    return sorted({1, max(1, size // 4), size})


def sample_inputs(device, requires_grad=False, dtype=torch.float64):
    """(x, k, mode, bias, relu) tuples covering every mode, k in {1, size/4, size}, bias/relu on and off."""
    out = []
    for shape in SHAPES:
        for mode in MODES:
            for k in ks_for(shape, mode):
                for relu, with_bias in ((False, False), (True, True)):
                    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad)
                    b = torch.randn(shape[1], device=device, dtype=dtype, requires_grad=requires_grad) \
                        if with_bias else None
                    out.append((x, k, mode, b, relu))
    return out


def id_of(args):
    x, k, mode, b, relu = args
    return f"{tuple(x.shape)}-{mode}-k{k}-bias{b is not None}-relu{relu}-{x.dtype}"


def topk_reference(x, k, mode, b, relu):
    """The reference selection for ``x`` of any dtype: ``x + b`` formed exactly in float64 from the same inputs,
    rounded once to ``x``'s dtype (the kernels add the bias in float32 and round to the input dtype, which for
    float16/bfloat16/float32 inputs is the same correctly rounded sum), ReLU, then the stable-sort top-k of
    ``reference.topk_compact_ref`` in float64. Returns ``values`` (dtype of x) and ``indices``."""
    pre = x.double()
    if b is not None:
        pre = (pre + b.double().view(1, -1, 1, 1)).to(x.dtype).double()
    values, indices = reference.topk_compact_ref(pre, k, mode, None, relu)
    return values.to(x.dtype), indices


# ----------------------------------------------------------------------------------------------- top-k
@with_dtypes(ALL_DTYPES)
def test_topk_matches_stable_sort_reference(device, dtype):
    # float16/bfloat16 too (GPU): the selected set and the selected values are exact in every dtype.
    for x, k, mode, b, relu in sample_inputs(device, dtype=dtype):
        case = id_of((x, k, mode, b, relu))
        v_ref, i_ref = topk_reference(x, k, mode, b, relu)
        v_same, i_same = reference.topk_compact_ref(x, k, mode, b, relu)  # the same, computed in x's dtype
        assert_equal(i_same, i_ref, f"{case}: reference indices in {dtype} vs float64")
        assert_equal(v_same, v_ref, f"{case}: reference values in {dtype} vs float64")
        sa = sk.topk_compact(x, k, mode, b, relu)
        assert_equal(sa.indices, i_ref, f"{case}: indices")
        assert_equal(sa.values, v_ref, f"{case}: values")
        dense = sk.topk_mask(x, k, mode, b, relu)
        assert_equal(dense, reference.compact_to_dense_ref(v_ref, i_ref, mode, x.shape), f"{case}: topk_mask")
        assert_equal(sa.to_dense(), dense, f"{case}: to_dense")


@on_devices
@pytest.mark.parametrize("mode", MODES)
def test_topk_selected_set_equals_torch_topk_without_ties(device, mode):
    # Distinct values: the selected set is unique, so torch.topk is an independent reference.
    x = torch.randperm(4 * 6 * 5 * 3, device=device).reshape(4, 6, 5, 3).double()
    for k in ks_for(x.shape, mode):
        sa = sk.topk_compact(x, k, mode)
        g = reference.to_groups(x, mode)
        expected = torch.topk(g, k, dim=-1).indices.sort(-1).values
        assert torch.equal(sa.indices.long(), expected)


@with_dtypes(WORKING_DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_topk_ties_go_to_lower_index(device, dtype, mode):
    # Integer-valued inputs with many exact ties, and ReLU zeros.
    x = torch.randint(-2, 3, (3, 6, 4, 5), device=device).to(dtype)
    for k in ks_for(x.shape, mode):
        for relu in (False, True):
            sa = sk.topk_compact(x, k, mode, relu=relu)
            _, i_ref = reference.topk_compact_ref(x, k, mode, relu=relu)
            assert torch.equal(sa.indices, i_ref), (mode, k, relu)
    # All-equal group: the first k indices.
    z = torch.zeros(2, 4, 3, 3, device=device, dtype=dtype)
    sa = sk.topk_compact(z, 5, "spatial")
    assert torch.equal(sa.indices.long(), torch.arange(5, device=device).expand(2, 4, 5))


@on_devices
def test_topk_non_contiguous_input(device):
    base = torch.randn(3, 5, 6, 8, device=device)
    x = base.permute(0, 1, 3, 2)  # non-contiguous [3, 5, 8, 6]
    b = torch.randn(10, device=device)[::2]
    for mode in MODES:
        k = max(1, group_size(x.shape, mode) // 4)
        sa = sk.topk_compact(x, k, mode, b, True)
        v_ref, i_ref = reference.topk_compact_ref(x.contiguous(), k, mode, b.contiguous(), True)
        assert_equal(sa.indices, i_ref, f"{mode}: indices")
        assert_equal(sa.values, v_ref, f"{mode}: values")


@on_devices
def test_int32_indices_for_large_groups(device):
    x = torch.randn(1, 3, 128, 128, device=device)  # global group of 49152 > 32767
    sa = sk.topk_compact(x, 100, "global")
    assert sa.indices.dtype == torch.int32
    _, i_ref = reference.topk_compact_ref(x, 100, "global")
    assert torch.equal(sa.indices, i_ref)


@on_devices
def test_topk_gradcheck(device):
    for x, k, mode, b, relu in sample_inputs(device, requires_grad=True)[::3]:
        # Keep values apart so a finite-difference step never changes the selection.
        with torch.no_grad():
            x.copy_(torch.randperm(x.numel(), dtype=torch.float64).reshape(x.shape) / x.numel())
        assert torch.autograd.gradcheck(lambda x, b: sk.topk_compact(x, k, mode, b, relu).values, (x, b),
                                        eps=1e-7), id_of((x, k, mode, b, relu))
        assert torch.autograd.gradcheck(lambda x, b: sk.topk_mask(x, k, mode, b, relu), (x, b), eps=1e-7)


@on_devices
def test_topk_gradient_is_the_mask(device):
    x = torch.randn(2, 4, 5, 5, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    g = torch.randn(2, 4, 5, 5, device=device)
    y = sk.topk_mask(x, 6, "spatial", b, True)
    y.backward(g)
    mask = (y > 0).float()
    assert_equal(x.grad, g * mask, "x.grad")
    assert_within_torch_error(b.grad, (g.double() * mask).sum((0, 2, 3)), (g * mask).sum((0, 2, 3)), "bias.grad")


# ----------------------------------------------------------------------------------------------- convs
CONV_CASES = [
    # (N, Cin, H, W, Cout, kh, kw, stride, padding, output_padding)
    (2, 5, 4, 3, 6, 4, 4, 2, 1, 0),
    (1, 3, 5, 5, 4, 3, 3, 1, 1, 0),
    (2, 4, 3, 4, 3, 3, 5, (2, 3), (0, 2), (1, 0)),
    (3, 2, 2, 2, 5, 1, 1, 1, 0, 0),
]


def conv_inputs(case, mode, device, dtype=torch.float64, requires_grad=False):
    N, Cin, H, W, Cout, kh, kw, stride, padding, op = case
    x = torch.randn(N, Cin, H, W, device=device, dtype=dtype)
    k = max(1, group_size(x.shape, mode) // 4)
    sa = sk.topk_compact(x, k, mode, relu=True)
    values = sa.values.detach().clone().requires_grad_(requires_grad)
    sa = sk.SparseActivation(values, sa.indices, sa.shape, sa.mode)
    w = torch.randn(Cin, Cout, kh, kw, device=device, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(Cout, device=device, dtype=dtype, requires_grad=requires_grad)
    return sa, w, b, stride, padding, op


def dense_of(sa):
    """The dense input of a compact activation, by the reference scatter (not by the op under test)."""
    return reference.compact_to_dense_ref(sa.values.detach(), sa.indices, sa.mode, sa.shape)


def torch_conv_transpose2d(dtype, dense, w, b, stride, padding, op, grad_out=None, indices=None, mode=None):
    """PyTorch's F.conv_transpose2d on the inputs cast to ``dtype`` (IEEE float32, no TF32): the output, and with
    ``grad_out`` also the gradients (input gradient gathered at ``indices`` when given, weight, bias)."""
    d, w, b = (t.detach().to(dtype).requires_grad_(grad_out is not None) for t in (dense, w, b))
    with no_tf32(), torch.enable_grad():
        out = F.conv_transpose2d(d, w, b, stride=stride, padding=padding, output_padding=op)
        if grad_out is None:
            return out.detach()
        gd, gw, gb = torch.autograd.grad(out, (d, w, b), grad_out.to(dtype))
    if indices is not None:
        gd = reference.compact_gather_ref(gd, indices, mode)
    return out.detach(), gd, gw, gb


def torch_upsample_conv2d(dtype, dense, w3, b, grad_out=None, indices=None, mode=None):
    """Like :func:`torch_conv_transpose2d` for F.interpolate(x2, nearest) + F.conv2d(padding=1)."""
    d, w3, b = (t.detach().to(dtype).requires_grad_(grad_out is not None) for t in (dense, w3, b))
    with no_tf32(), torch.enable_grad():
        out = F.conv2d(F.interpolate(d, scale_factor=2, mode="nearest"), w3, b, padding=1)
        if grad_out is None:
            return out.detach()
        gd, gw, gb = torch.autograd.grad(out, (d, w3, b), grad_out.to(dtype))
    if indices is not None:
        gd = reference.compact_gather_ref(gd, indices, mode)
    return out.detach(), gd, gw, gb


def by_name(out, our_grads, ref, theirs):
    """``{name: (ours, float64 reference, PyTorch's)}`` for the output and the gradients (values, weight, bias)."""
    names = ("output", "grad values", "grad weight", "grad bias")
    return {name: triple for name, triple in zip(names, zip((out,) + tuple(our_grads), ref, theirs))}


@with_dtypes(ALL_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_sparse_conv_transpose2d_matches_f_conv_transpose2d(device, dtype, mode, case):
    sa, w, b, stride, padding, op = conv_inputs(case, mode, device, dtype)
    dense = dense_of(sa)
    out = sk.sparse_conv_transpose2d(sa, w, b, stride, padding, op)
    out_from_dense = sk.sparse_conv_transpose2d(dense, w, b, stride, padding, op)  # zeros of a dense input skipped
    ref = torch_conv_transpose2d(F64, dense, w, b, stride, padding, op)
    if dtype == F64:
        torch.testing.assert_close(out, ref, **TOL64)
        torch.testing.assert_close(out_from_dense, ref, **TOL64)
    else:
        theirs = torch_conv_transpose2d(dtype, dense, w, b, stride, padding, op)
        assert_within_torch_error(out, ref, theirs, f"compact input, {mode}, {case}")
        assert_within_torch_error(out_from_dense, ref, theirs, f"dense input, {mode}, {case}")


@with_dtypes(WORKING_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_sparse_conv_transpose2d_gradients_within_torch_error(device, dtype, mode, case):
    sa, w, b, stride, padding, op = conv_inputs(case, mode, device, dtype, requires_grad=True)
    out = sk.sparse_conv_transpose2d(sa, w, b, stride, padding, op)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (sa.values, w, b), g)
    dense = dense_of(sa)
    ref = torch_conv_transpose2d(F64, dense, w, b, stride, padding, op, g, sa.indices, mode)
    theirs = torch_conv_transpose2d(dtype, dense, w, b, stride, padding, op, g, sa.indices, mode)
    assert_all_within_torch_error(by_name(out, ours, ref, theirs), f"{mode}, {case}")


@on_devices
@pytest.mark.parametrize("mode", MODES)
def test_sparse_upsample_conv2d_matches_interpolate_conv2d(device, mode):
    x = torch.randn(2, 6, 5, 4, device=device, dtype=torch.float64)
    sa = sk.topk_compact(x, max(1, group_size(x.shape, mode) // 4), mode, relu=True)
    w3 = torch.randn(7, 6, 3, 3, device=device, dtype=torch.float64)
    b = torch.randn(7, device=device, dtype=torch.float64)
    expected = F.conv2d(F.interpolate(sa.to_dense(), scale_factor=2, mode="nearest"), w3, b, padding=1)
    torch.testing.assert_close(sk.sparse_upsample_conv2d(sa, w3, b), expected, atol=1e-12, rtol=1e-12)


# (N, Cin, H, W, Cout, kdiv), k = group size // kdiv: odd sizes; channel counts that are multiples of 8 (the
# tensor-core paths); a very sparse channel top-k (2 of 64 channels, the kernels that skip the fold).
UPSAMPLE_CASES = [(2, 6, 5, 4, 7, 4), (2, 16, 6, 6, 8, 4), (2, 64, 4, 4, 16, 32)]


@with_dtypes(WORKING_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", UPSAMPLE_CASES)
def test_sparse_upsample_conv2d_within_torch_error(device, dtype, mode, case):
    N, Cin, H, W, Cout, kdiv = case
    x = torch.randn(N, Cin, H, W, device=device, dtype=dtype)
    sa = sk.topk_compact(x, max(1, group_size(x.shape, mode) // kdiv), mode, relu=True)
    values = sa.values.detach().clone().requires_grad_()
    sa = sk.SparseActivation(values, sa.indices, sa.shape, mode)
    w3 = torch.randn(Cout, Cin, 3, 3, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(Cout, device=device, dtype=dtype, requires_grad=True)
    out = sk.sparse_upsample_conv2d(sa, w3, b)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (values, w3, b), g)
    dense = dense_of(sa)
    ref = torch_upsample_conv2d(F64, dense, w3, b, g, sa.indices, mode)
    theirs = torch_upsample_conv2d(dtype, dense, w3, b, g, sa.indices, mode)
    assert_all_within_torch_error(by_name(out, ours, ref, theirs), f"{mode}, {case}")


def test_fold_is_exact_in_float64():
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    w3 = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    folded = F.conv_transpose2d(x, sk.fold_upsample_weight(w3), stride=2, padding=1)
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w3, padding=1)
    assert (folded - expected).abs().max().item() < 1e-13


@on_devices
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_sparse_conv_gradcheck(device, mode, case):
    sa, w, b, stride, padding, op = conv_inputs(case, mode, device, requires_grad=True)
    idx, shape = sa.indices, sa.shape

    def f(values, w, b):
        return sk.sparse_conv_transpose2d(sk.SparseActivation(values, idx, shape, mode), w, b, stride, padding, op)

    assert torch.autograd.gradcheck(f, (sa.values, w, b))


@on_devices
def test_sparse_conv_dense_input_gradcheck(device):
    x = torch.relu(torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64)).requires_grad_()
    w = torch.randn(3, 4, 4, 4, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: sk.sparse_conv_transpose2d(x, w, None, 2, 1), (x, w))


@on_devices
def test_upsample_conv_gradients_match_dense(device):
    x = torch.randn(2, 6, 4, 4, device=device, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(6, device=device, dtype=torch.float64, requires_grad=True)
    w3 = torch.randn(5, 6, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    b3 = torch.randn(5, device=device, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 8, 8, device=device, dtype=torch.float64)
    sk.sparse_upsample_conv2d(sk.topk_compact(x, 4, "spatial", b0, True), w3, b3).backward(g)
    ours = [t.grad.clone() for t in (x, b0, w3, b3)]
    for t in (x, b0, w3, b3):
        t.grad = None
    reference.sparse_upsample_conv2d_ref(reference.topk_mask_ref(x, 4, "spatial", b0, True), w3, b3).backward(g)
    for a, t in zip(ours, (x, b0, w3, b3)):
        torch.testing.assert_close(a, t.grad, atol=1e-12, rtol=1e-12)


@on_devices
def test_conv_backward_saves_only_the_compact_input(device):
    sa, w, b, stride, padding, op = conv_inputs(CONV_CASES[0], "spatial", device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sk.sparse_conv_transpose2d(sa, w, b, stride, padding, op)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([tuple(sa.values.shape), tuple(sa.indices.shape), tuple(w.shape)])


# ----------------------------------------------------------------------------------------------- opcheck
def opcheck_samples(device):
    """``[(op name, args)]`` covering every op of ``ops.OP_NAMES``."""
    x = torch.randn(2, 4, 3, 5, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    sa = sk.topk_compact(x.detach(), 4, "spatial", relu=True)
    values = sa.values.clone().requires_grad_()
    sc = sk.topk_compact(x.detach(), 2, "channel", relu=True)
    values_c = sc.values.clone().requires_grad_()
    xs = torch.randn(2, 64, 3, 5, device=device)  # 2 of 64 channels: the upsample-conv kernels without the fold
    ss = sk.topk_compact(xs, 2, "channel", relu=True)
    values_s = ss.values.clone().requires_grad_()
    w = torch.randn(4, 3, 4, 4, device=device, requires_grad=True)
    g = torch.randn(2, 3, 6, 10, device=device)
    shape = list(x.shape)
    samples = [
        ("topk_compact", (x, 4, "spatial", b, True)),
        ("topk_compact", (x, 3, "channel", None, False)),
        ("topk_mask", (x, 7, "global", b, True)),
        ("compact_to_dense", (values, sa.indices, "spatial", shape)),
        ("compact_gather", (x, sa.indices, "spatial")),
        ("sparse_conv_transpose2d", (values, sa.indices, "spatial", shape, w, None, [2, 2], [1, 1], [0, 0])),
        ("sparse_conv_transpose2d", (x, None, "spatial", shape, w, None, [2, 2], [1, 1], [0, 0])),
        ("sparse_conv_transpose2d_input_grad", (g, sa.indices, "spatial", shape, w.detach(), [2, 2], [1, 1])),
        ("sparse_conv_transpose2d_weight_grad",
         (g, values.detach(), sa.indices, "spatial", shape, list(w.shape), [2, 2], [1, 1])),
    ]
    if "sparse_upsample_conv2d" in ops.OP_NAMES:  # the upsample-conv as one op on the 3x3 weight
        w3 = torch.randn(3, 4, 3, 3, device=device, requires_grad=True)
        b3 = torch.randn(3, device=device, requires_grad=True)
        samples += [
            ("sparse_upsample_conv2d", (values, sa.indices, "spatial", shape, w3, b3)),
            ("sparse_upsample_conv2d", (values_c, sc.indices, "channel", shape, w3, None)),
            ("sparse_upsample_conv2d", (x, None, "spatial", shape, w3, b3)),
            ("sparse_upsample_conv2d_input_grad", (g, sa.indices, "spatial", shape, w3.detach())),
            ("sparse_upsample_conv2d_input_grad", (g, sc.indices, "channel", shape, w3.detach())),
            ("sparse_upsample_conv2d_weight_grad", (g, values.detach(), sa.indices, "spatial", shape)),
            ("sparse_upsample_conv2d_weight_grad", (g, values_c.detach(), sc.indices, "channel", shape)),
        ]
        w3s = torch.randn(3, 64, 3, 3, device=device, requires_grad=True)
        shape_s = list(xs.shape)
        samples += [
            ("sparse_upsample_conv2d", (values_s, ss.indices, "channel", shape_s, w3s, b3)),
            ("sparse_upsample_conv2d_input_grad", (g, ss.indices, "channel", shape_s, w3s.detach())),
            ("sparse_upsample_conv2d_weight_grad", (g, values_s.detach(), ss.indices, "channel", shape_s)),
        ]
    xr = torch.relu(torch.randn(2, 4, 5, 6, device=device)) * (torch.rand(2, 4, 5, 6, device=device) < 0.1)
    wc = torch.randn(3, 4, 3, 3, device=device, requires_grad=True)
    gc = torch.randn(2, 3, 5, 6, device=device)
    samples += [
        ("sparse_conv2d", (xr.clone().requires_grad_(), wc, b[:3].detach().clone().requires_grad_(), [1, 1])),
        ("sparse_conv2d", (torch.relu(torch.randn(2, 4, 5, 6, device=device)), wc, None, [0, 1])),
        ("sparse_conv2d_weight_grad", (gc, xr, list(wc.shape), [1, 1])),
    ]
    return samples


@on_devices
@pytest.mark.parametrize("density", [0.5, 0.03])
def test_sparse_conv2d_equals_conv2d_with_its_gradients(device, density):
    """Both sides of the density crossover (dense conv / sparse kernel on the CPU), against F.conv2d in float64."""
    x = torch.relu(torch.randn(2, 70, 6, 5, device=device, dtype=torch.float64))
    x = (x * (torch.rand_like(x) < 2 * density)).requires_grad_()
    w = torch.randn(6, 70, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, device=device, dtype=torch.float64, requires_grad=True)
    if device == "cpu":
        assert ops._sparse_enough(x.detach()) == (density < 0.1)
    go = torch.randn(2, 6, 6, 5, device=device, dtype=torch.float64)
    out = sk.sparse_conv2d(x, w, b, padding=1)
    ref = F.conv2d(x, w, b, padding=1)
    assert_close_float64(out, ref, "output")
    for name, a, e in zip(("input", "weight", "bias"), torch.autograd.grad(out, (x, w, b), go),
                          torch.autograd.grad(ref, (x, w, b), go)):
        assert_close_float64(a, e, f"grad {name}")
    assert torch.autograd.gradcheck(lambda x, w, b: sk.sparse_conv2d(x, w, b, (1, 0)),
                                    (x[:1, :8].detach().requires_grad_(), w[:2, :8].detach().requires_grad_(),
                                     b[:2].detach().requires_grad_()))


def test_sparse_conv2d_bad_inputs_name_the_problem():
    x, w = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match="does not match the input's 3 channels"):
        sk.sparse_conv2d(x, torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="bias must have shape"):
        sk.sparse_conv2d(x, w, torch.randn(3))
    with pytest.raises(TypeError, match="dtype"):
        sk.sparse_conv2d(x, w.double())
    with pytest.raises(ValueError, match="empty output"):
        sk.sparse_conv2d(x, torch.randn(2, 3, 7, 7))


def test_op_registry_matches_the_compiled_schemas():
    """One registry: ops.SCHEMAS declares every op as csrc/sparsegen.cpp does (the C++ block defines the ops
    whenever the extension is built); the internal CUDA provider ops have the public kernel ops' schemas."""
    from sparsegen_kernels._loader import load_error

    if load_error() is not None:
        pytest.skip(f"the compiled extension is not loaded: {load_error()}")
    registered = {name for name in dir(torch.ops.sparsegen) if not name.startswith("_")}
    assert set(ops.SCHEMAS) <= registered
    for name, schema in ops.SCHEMAS.items():
        assert ops._op(name)._schema == torch._C.parse_schema(f"sparsegen::{name}{schema}"), name
    from sparsegen_kernels import backend

    for name in backend.cuda_provider_ops(ops.PROVIDER_OPS):
        provider = getattr(torch.ops._sparsegen_cuda, name).default._schema
        assert provider == torch._C.parse_schema(f"_sparsegen_cuda::{name}{ops.SCHEMAS[name]}"), name
    assert not [n for n in dir(torch.ops.sparsegen) if n.endswith("_cuda")], "provider ops in the public namespace"


@on_devices
def test_opcheck(device):
    samples = opcheck_samples(device)
    assert {name for name, _ in samples} == set(ops.OP_NAMES), "an op without an opcheck sample"
    for name, args in samples:
        torch.library.opcheck(ops._op(name), args)


@on_devices
def test_compile_fullgraph_topk_then_upsample_conv(device):
    torch._dynamo.reset()
    model = torch.nn.Sequential(sk.TopK(4, "spatial", relu=True), sk.SparseUpsampleConv2d(6, 5)).to(device)
    x = torch.randn(2, 6, 4, 4, device=device)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)
    xg = x.clone().requires_grad_()
    compiled(xg).sum().backward()
    xe = x.clone().requires_grad_()
    model(xe).sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad)


# ----------------------------------------------------------------------------------------------- modules
@on_devices
def test_modules_match_dense_modules(device):
    torch.manual_seed(1)
    up = sk.SparseUpsampleConv2d(6, 5).to(device)
    dense_up = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(6, 5, 3, padding=1))
    dense_up[1].load_state_dict(up.state_dict())
    ct = sk.SparseConvTranspose2d(6, 3, 4, stride=2, padding=1).to(device)
    dense_ct = torch.nn.ConvTranspose2d(6, 3, 4, stride=2, padding=1)
    dense_ct.load_state_dict(ct.state_dict())
    x = torch.randn(2, 6, 4, 4, device=device)
    sa = sk.TopK(4, "spatial", relu=True)(x)
    dense = dense_of(sa)
    for name, ours, module in (("SparseUpsampleConv2d", up(sa), dense_up), ("SparseConvTranspose2d", ct(sa), dense_ct)):
        with torch.no_grad(), no_tf32():
            theirs = module.to(device=device, dtype=F32)(dense)
            ref = module.to(dtype=F64)(dense.double())
        assert_within_torch_error(ours, ref, theirs, name)
    assert torch.equal(sk.TopK(4, "spatial", relu=True, compact=False)(x), sa.to_dense())


@on_devices
def test_folded_weight_cache_follows_weight_updates(device):
    up = sk.SparseUpsampleConv2d(3, 2).to(device)
    x = torch.randn(1, 3, 4, 4, device=device)
    with torch.no_grad():
        a = up(x)
        up.weight.mul_(2)
        b = up(x)
    torch.testing.assert_close(b - up.bias.view(1, -1, 1, 1), 2 * (a - up.bias.view(1, -1, 1, 1)))


# ----------------------------------------------------------------------------------------------- errors
@on_devices
def test_bad_inputs_name_the_problem(device):
    def randn(*shape, **kw):
        return torch.randn(*shape, device=device, **kw)

    x = randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"k=10 .*'spatial'.*group size is 9"):
        sk.topk_compact(x, 10, "spatial")
    with pytest.raises(ValueError, match="k=0"):
        sk.topk_mask(x, 0, "channel")
    with pytest.raises(ValueError, match="unknown mode 'rows'"):
        sk.topk_compact(x, 2, "rows")
    with pytest.raises(ValueError, match="4 dimensions"):
        sk.topk_compact(randn(4, 3, 3), 2)
    with pytest.raises(TypeError, match="floating-point"):
        sk.topk_compact(torch.ones(2, 4, 3, 3, dtype=torch.int64, device=device), 2)
    with pytest.raises(ValueError, match=r"bias must have shape \[4\]"):
        sk.topk_compact(x, 2, bias=randn(5))
    with pytest.raises(TypeError, match="k must be an int"):
        sk.topk_compact(x, 2.5)
    with pytest.raises(ValueError, match="does not match the input's 4 channels"):
        sk.sparse_conv_transpose2d(x, randn(3, 2, 3, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \[2\]"):
        sk.sparse_conv_transpose2d(x, randn(4, 2, 3, 3), randn(3))
    with pytest.raises(ValueError, match="output_padding"):
        sk.sparse_conv_transpose2d(x, randn(4, 2, 3, 3), None, 1, 0, 1)
    with pytest.raises(ValueError, match=r"\[Cout, Cin, 3, 3\]"):
        sk.sparse_upsample_conv2d(x, randn(2, 4, 5, 5))
    with pytest.raises(TypeError, match="dtype"):
        sk.sparse_conv_transpose2d(x, randn(4, 2, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown backend"):
        sk.set_backend("opencl")


@on_gpus
def test_mixed_devices_rejected(device):
    with pytest.raises(ValueError, match="bias is on cpu but x is on cuda"):
        sk.topk_compact(torch.randn(1, 2, 3, 3, device=device), 2, bias=torch.randn(2))
    with pytest.raises(ValueError, match="weight is on cpu but input is on cuda"):
        sk.sparse_conv_transpose2d(torch.randn(1, 2, 3, 3, device=device), torch.randn(2, 3, 4, 4))


def test_mixed_devices_rejected_meta():
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        sk.topk_compact(torch.randn(1, 2, 3, 3), 2, bias=torch.randn(2, device="meta"))


# ----------------------------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 3), C=st.integers(1, 9), H=st.integers(1, 7), W=st.integers(1, 7),
       mode=st.sampled_from(MODES), kfrac=st.floats(0, 1), relu=st.booleans(), ties=st.booleans())
def test_property_topk(N, C, H, W, mode, kfrac, relu, ties):
    x = torch.randint(-3, 4, (N, C, H, W)).float() if ties else torch.randn(N, C, H, W)
    size = group_size(x.shape, mode)
    k = max(1, min(size, round(kfrac * size)))
    sa = sk.topk_compact(x, k, mode, relu=relu)
    _, i_ref = reference.topk_compact_ref(x, k, mode, relu=relu)
    assert torch.equal(sa.indices, i_ref)


@settings(max_examples=30, deadline=None)
@given(Cin=st.integers(1, 6), Cout=st.integers(1, 6), H=st.integers(1, 6), W=st.integers(1, 6),
       kh=st.integers(1, 5), kw=st.integers(1, 5), s=st.integers(1, 3), p=st.integers(0, 2),
       mode=st.sampled_from(MODES), kfrac=st.floats(0, 1))
def test_property_sparse_conv(Cin, Cout, H, W, kh, kw, s, p, mode, kfrac):
    p = min(p, (kh - 1) // 2, (kw - 1) // 2)
    x = torch.randn(2, Cin, H, W, dtype=torch.float64)
    size = group_size(x.shape, mode)
    sa = sk.topk_compact(x, max(1, min(size, round(kfrac * size))), mode)
    w = torch.randn(Cin, Cout, kh, kw, dtype=torch.float64)
    expected = F.conv_transpose2d(sa.to_dense(), w, stride=s, padding=p)
    torch.testing.assert_close(sk.sparse_conv_transpose2d(sa, w, None, s, p), expected, atol=1e-12, rtol=1e-12)


def test_autocast_on_the_cpu_widens_half_inputs_for_the_float32_kernels():
    """Under CPU autocast the ops take bfloat16 activations and float32 parameters together and compute in
    float32 (the CPU kernels' precision), with gradients reaching the float32 parameters."""
    x = torch.randn(2, 8, 4, 4).bfloat16()
    w = torch.randn(5, 8, 3, 3, dtype=torch.float32, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sa = sk.topk_compact(x, 4, "spatial", bias=b[:1].expand(8).contiguous(), relu=True)
        out = sk.sparse_upsample_conv2d(sa, w, b)
    assert sa.values.dtype == out.dtype == torch.float32
    expected = reference.sparse_upsample_conv2d_ref(
        reference.topk_mask_ref(x.float(), 4, "spatial", b[:1].expand(8).detach(), True), w.detach(), b.detach())
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_a_gpu_runs_the_ops_in_the_autocast_dtype(dtype):
    x = torch.randn(2, 8, 4, 4, device="cuda")
    w = torch.randn(5, 8, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(5, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        sa = sk.topk_compact(x, 4, "spatial", relu=True)
        out = sk.sparse_upsample_conv2d(sa, w, b)
    assert sa.values.dtype == out.dtype == dtype
    expected = reference.sparse_upsample_conv2d_ref(reference.topk_mask_ref(x.to(dtype), 4, "spatial", None, True),
                                                    w.detach().to(dtype), b.detach().to(dtype))
    torch.testing.assert_close(out.detach().float(), expected.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
