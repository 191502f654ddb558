"""The accuracy rule for results computed in a working precision (float32, float16, bfloat16).

Every element is compared with a float64 reference computed from the same inputs (upcast exactly). The largest
absolute element error of our result may be at most twice the largest element error that PyTorch's own op
makes at that dtype on those inputs (e.g. ``F.conv_transpose2d`` run in that dtype on that device, measured
against the same float64 reference), plus one unit in the last place of the reference's largest
magnitude, for the case where PyTorch's result happens to be exact. No norm ratios: one bad element fails.

The yardsticks are :func:`torch_conv_transpose2d` and :func:`torch_upsample_conv2d`: PyTorch's op (and its
autograd gradients) run at the dtype under test on the device under test; called with ``torch.float64`` they give
the reference. PyTorch's CPU convolutions run in float16 and bfloat16 too (checked with torch 2.13), so no
yardstick has to be emulated.

Selections (top-k indices and the values they pick) and layout ops are not subject to this rule; they are
compared exactly. float64 results are compared with the tight tolerances of :func:`assert_close_float64` instead
(there is no higher precision to measure PyTorch's error against).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

TORCH_ERROR_FACTOR = 2.0
FLOOR_ULPS = 1
FLOAT64_TOL = dict(atol=1e-12, rtol=1e-12)  # float64 results against float64 references


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """float32 matrix products and cuDNN convolutions in IEEE float32 (no TF32) inside the block.

    cuDNN allows TF32 for float32 convolutions by default, which would make "PyTorch's error at float32" a
    TF32 error; the kernels under test use TF32 only where ``torch.backends.cuda.matmul.allow_tf32`` says so.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def ulp(magnitude: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` numbers at ``magnitude`` (the smallest normal number's spacing at 0)."""
    info = torch.finfo(dtype)
    if magnitude < info.tiny:
        return info.eps * info.tiny
    _, exponent = math.frexp(magnitude)  # magnitude = m * 2**exponent, 0.5 <= m < 1
    return info.eps * 2.0 ** (exponent - 1)


def _unravel(flat: int, shape) -> tuple:
    index = []
    for size in reversed(shape):
        flat, r = divmod(flat, size)
        index.append(r)
    return tuple(reversed(index))


def error_bound(ref64: torch.Tensor, torch_result: torch.Tensor) -> tuple[float, float, float]:
    """``(bound, torch's max error, floor)`` for results of ``torch_result``'s dtype against ``ref64``."""
    ref = ref64.detach().double()
    torch_err = (torch_result.detach().double() - ref).abs().max().item() if ref.numel() else 0.0
    floor = FLOOR_ULPS * ulp(ref.abs().max().item() if ref.numel() else 0.0, torch_result.dtype)
    return TORCH_ERROR_FACTOR * torch_err + floor, torch_err, floor


def assert_within_torch_error(ours: torch.Tensor, ref64: torch.Tensor, torch_result: torch.Tensor,
                              msg: str = "") -> None:
    """Assert ``max |ours - ref64| <= 2 * max |torch_result - ref64| + FLOOR_ULPS ulp(max |ref64|)``.

    ``ours`` and ``torch_result`` (PyTorch's own op, same dtype, same inputs, same device) are compared with the
    float64 reference ``ref64`` element by element. On failure the message names the worst element: its index,
    our value, the reference, PyTorch's value and PyTorch's error there.
    """
    where = f"{msg}: " if msg else ""
    assert ours.shape == ref64.shape == torch_result.shape, (f"{where}shapes differ: ours {tuple(ours.shape)}, "
                                                             f"reference {tuple(ref64.shape)}, "
                                                             f"torch {tuple(torch_result.shape)}")
    assert ours.dtype == torch_result.dtype, f"{where}dtype {ours.dtype}, but PyTorch's result is {torch_result.dtype}"
    assert ref64.dtype == torch.float64, f"{where}the reference must be float64, got {ref64.dtype}"
    if ours.numel() == 0:
        return
    a, ref, theirs = ours.detach().double(), ref64.detach(), torch_result.detach().double()
    assert torch.isfinite(ref).all(), f"{where}the float64 reference is not finite"
    bad = ~torch.isfinite(a)
    if bad.any():
        i = tuple(int(j) for j in torch.nonzero(bad)[0])
        raise AssertionError(f"{where}non-finite result at index {i}: ours {a[i].item()}, ref {ref[i].item():.9g}")
    err = (a - ref).abs()
    bound, torch_err, floor = error_bound(ref, torch_result)
    worst = err.max().item()
    if worst > bound:
        i = _unravel(int(err.argmax()), err.shape)
        raise AssertionError(
            f"{where}max |ours - ref| = {worst:.3e} exceeds {TORCH_ERROR_FACTOR:g} x PyTorch's max error "
            f"{torch_err:.3e} + floor {floor:.3e} = {bound:.3e} ({ours.dtype}, {ours.device}). Worst element at "
            f"index {i}: ours {a[i].item():.9g}, ref {ref[i].item():.9g}, torch {theirs[i].item():.9g} "
            f"(torch's error there {abs(theirs[i].item() - ref[i].item()):.3e}); max |ref| "
            f"{ref.abs().max().item():.3e}")


def assert_all_within_torch_error(named: dict, msg: str = "") -> None:
    """:func:`assert_within_torch_error` for ``{name: (ours, ref64, torch_result)}``, e.g. every gradient."""
    for name, (ours, ref64, theirs) in named.items():
        assert_within_torch_error(ours, ref64, theirs, f"{msg} {name}".strip())


def assert_close_float64(ours: torch.Tensor, ref64: torch.Tensor, msg: str = "") -> None:
    """A float64 result against a float64 reference, within :data:`FLOAT64_TOL`."""
    assert ours.dtype == ref64.dtype == torch.float64, f"{msg}: expected float64, got {ours.dtype}, {ref64.dtype}"
    torch.testing.assert_close(ours, ref64, **FLOAT64_TOL, msg=lambda m: f"{msg}: {m}" if msg else m)


def assert_accurate(ours: torch.Tensor, ref64: torch.Tensor, torch_result: torch.Tensor, msg: str = "") -> None:
    """The rule for a result of any floating dtype: float64 results by :func:`assert_close_float64`, the working
    precisions by :func:`assert_within_torch_error` (``torch_result``: PyTorch's op at ``ours``'s dtype)."""
    if ours.dtype == torch.float64:
        assert_close_float64(ours, ref64, msg)
    else:
        assert_within_torch_error(ours, ref64, torch_result, msg)


def _yardstick(op, dtype, tensors, grad_out, indices, mode):
    """``op(*tensors)`` with every tensor cast to ``dtype`` (None stays None), IEEE float32 (no TF32). Without
    ``grad_out`` the output; with it ``(output, *gradients)``, a gradient per tensor (None for a None tensor), the
    first one gathered at ``indices`` (``reference.compact_gather_ref``) when those are given."""
    need_grad = grad_out is not None
    args = [None if t is None else t.detach().to(dtype).requires_grad_(need_grad) for t in tensors]
    with no_tf32(), torch.enable_grad():
        out = op(*args)
        if not need_grad:
            return out.detach()
        leaves = [a for a in args if a is not None]
        grads = iter(torch.autograd.grad(out, leaves, grad_out.detach().to(dtype)))
    grads = [None if a is None else next(grads) for a in args]
    if indices is not None:
        from sparsegen_kernels.reference import compact_gather_ref

        grads[0] = compact_gather_ref(grads[0], indices, mode)
    return (out.detach(), *grads)


def torch_conv_transpose2d(dtype, dense, weight, bias, stride, padding, output_padding, grad_out=None, indices=None,
                           mode=None):
    """``F.conv_transpose2d`` at ``dtype`` on the inputs' device: the output, or with ``grad_out`` the tuple
    ``(output, input gradient, weight gradient, bias gradient)``; the input gradient is gathered at ``indices``
    (the compact entries of ``mode``) when those are given. ``dtype=torch.float64`` gives the reference."""
    def op(d, w, b):
        return torch.nn.functional.conv_transpose2d(d, w, b, stride=stride, padding=padding,
                                                    output_padding=output_padding)

    return _yardstick(op, dtype, (dense, weight, bias), grad_out, indices, mode)


def torch_upsample_conv2d(dtype, dense, weight3, bias, grad_out=None, indices=None, mode=None):
    """Like :func:`torch_conv_transpose2d` for ``F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"),
    weight3, bias, padding=1)``."""
    def op(d, w3, b):
        up = torch.nn.functional.interpolate(d, scale_factor=2, mode="nearest")
        return torch.nn.functional.conv2d(up, w3, b, padding=1)

    return _yardstick(op, dtype, (dense, weight3, bias), grad_out, indices, mode)
