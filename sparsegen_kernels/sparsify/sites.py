"""What the sparse kernels can consume: recognisers for the pieces of a site, on modules and on ``torch.fx`` nodes.

A *site* is an activation of the ReLU family (``ReLU``, ``ReLU6``, ``LeakyReLU``; as a module or as a functional
call) whose output reaches a convolution through ops that keep zeros zero (identity-like ops and at most one
nearest x2 upsampling). The convolution is one of

* ``"upsample"``: nearest x2 upsampling + 3x3 convolution, stride 1, padding 1 (folded into a stride-2 transposed
  convolution by the kernels);
* ``"conv"``: a stride-1 convolution with zero padding ``p <= kernel - 1`` (``"same"`` for odd kernels, ``"valid"``),
  computed as a transposed convolution of the flipped, transposed weight with padding ``kernel - 1 - p``;
* ``"transposed"``: a transposed convolution (``groups=1``, ``dilation=1``, zero padding).

Every recogniser returns either what it found or the reason it cannot be used, so that nothing is skipped silently.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..modules import SparseConv2d, SparseConvTranspose2d, SparseUpsampleConv2d, conv2d_zero_padding

try:  # the hook-based reparametrisations: their pre-hooks recompute ``weight`` before each call
    from torch.nn.utils.spectral_norm import SpectralNorm as _HookSpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm as _HookWeightNorm

    REPARAM_HOOKS: tuple = (_HookSpectralNorm, _HookWeightNorm)
except ImportError:  # pragma: no cover
    REPARAM_HOOKS = ()

UPSAMPLE, CONV, TRANSPOSED = "upsample", "conv", "transposed"


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------
def plain_forward(m: nn.Module, cls: type) -> bool:
    """``m`` is a ``cls`` whose ``forward`` is ``cls.forward`` (a subclass may add methods, not a forward)."""
    return isinstance(m, cls) and type(m).forward is cls.forward


def is_plain_sequential(m: nn.Module) -> bool:
    return plain_forward(m, nn.Sequential)


def foreign_hooks(m: nn.Module) -> list:
    """The hooks of ``m`` that a sparse call would bypass (the spectral / weight norm pre-hooks are run instead)."""
    out = []
    if m._forward_hooks:
        out.append("forward hooks")
    if any(not isinstance(h, REPARAM_HOOKS) for h in m._forward_pre_hooks.values()):
        out.append("forward pre-hooks")
    if m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
        out.append("backward hooks")
    return out


def reparam_hooks(m: nn.Module) -> list:
    """The spectral / weight norm pre-hooks (hook API) of ``m``: they set ``m.weight`` before each call."""
    return [h for h in m._forward_pre_hooks.values() if isinstance(h, REPARAM_HOOKS)]


def reparam_memo(module: nn.Module) -> dict:
    """A ``copy.deepcopy`` memo that keeps the weights the hook API recomputes before every call: a hook-based
    weight norm leaves a non-leaf tensor there, which ``deepcopy`` refuses (the copy recomputes it anyway)."""
    memo = {}
    for m in module.modules():
        for hook in reparam_hooks(m):
            t = m.__dict__.get(getattr(hook, "name", "weight"))
            if isinstance(t, torch.Tensor):
                memo[id(t)] = t
    return memo


def is_parametrized(m: nn.Module) -> bool:
    return torch.nn.utils.parametrize.is_parametrized(m) or bool(reparam_hooks(m))


def _conv_reason(m: nn.Module, after_upsample: bool) -> Optional[str]:
    """Why the ``nn.Conv2d`` ``m`` cannot run on a compact input, or None."""
    if m.groups != 1:
        return f"grouped conv (groups={m.groups})"
    if tuple(m.dilation) != (1, 1):
        return f"dilated conv (dilation {tuple(m.dilation)})"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (the kernels pad with zeros)"
    if tuple(m.stride) != (1, 1):
        return f"strided conv (stride {tuple(m.stride)}): the kernels compute stride-1 and transposed convs"
    if after_upsample:
        if tuple(m.kernel_size) != (3, 3) or conv2d_zero_padding(tuple(m.kernel_size), m.padding) != (1, 1):
            return (f"nearest x2 upsampling then a {tuple(m.kernel_size)} conv with padding {m.padding}: the kernels "
                    "fold the upsampling only into 3x3 convs with padding 1")
        return None
    if conv2d_zero_padding(tuple(m.kernel_size), m.padding) is None:
        return (f"padding {m.padding} with kernel {tuple(m.kernel_size)} (needs 0 <= padding <= kernel - 1, the same "
                "on both sides)")
    return None


def module_conv_kind(m: nn.Module, after_upsample: bool) -> tuple[Optional[str], Optional[str]]:
    """``(kind, None)`` when the module ``m`` can run on the compact output of an activation (``after_upsample``:
    through a nearest x2 upsampling), ``(None, reason)`` when it is a convolution that cannot, ``(None, None)``
    when it is no 2-d convolution at all."""
    if isinstance(m, SparseUpsampleConv2d):
        return (None, "nearest x2 upsampling before an upsample-conv") if after_upsample else (UPSAMPLE, None)
    if isinstance(m, SparseConvTranspose2d):
        return (None, "nearest x2 upsampling before a transposed conv") if after_upsample else (TRANSPOSED, None)
    if isinstance(m, SparseConv2d) or plain_forward(m, nn.Conv2d):
        reason = _conv_reason(m, after_upsample)
        return (None, reason) if reason else (UPSAMPLE if after_upsample else CONV, None)
    if plain_forward(m, nn.ConvTranspose2d):
        if after_upsample:
            return None, "nearest x2 upsampling before a transposed conv"
        if m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros":
            return None, (f"transposed conv with groups={m.groups}, dilation {tuple(m.dilation)}, "
                          f"padding_mode={m.padding_mode!r} (the kernels need 1, (1, 1), 'zeros')")
        return TRANSPOSED, None
    return None, None


def describe_module_conv(name: str, m: nn.Module, kind: Optional[str]) -> str:
    """``"conv (3, 3), padding (1, 1) 'main.4' (6 -> 3 channels)"`` and the like."""
    ch = f"({m.in_channels} -> {m.out_channels} channels)"
    if kind == UPSAMPLE or isinstance(m, SparseUpsampleConv2d):
        what = "upsample x2 + conv 3x3"
    elif isinstance(m, nn.ConvTranspose2d):
        what = f"transposed conv {tuple(m.kernel_size)}, stride {tuple(m.stride)}"
    else:
        pad = m.padding if isinstance(m.padding, str) else tuple(m.padding)
        what = f"conv {tuple(m.kernel_size)}, stride {tuple(m.stride)}, padding {pad}"
    return f"{what} '{name}' {ch}"


# The activations of the ReLU family (plain forwards), and others that are reported when they feed a conv.
ACT_MODULES = ((nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.LeakyReLU, "leaky_relu"))
OTHER_ACT_MODULES = (nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.PReLU, nn.RReLU,
                     nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign,
                     nn.Tanhshrink, nn.GLU)


@dataclass(frozen=True)
class Act:
    """An activation call: ``kind`` ``relu`` / ``relu6`` / ``leaky_relu`` (sites) or ``other``."""

    kind: str
    label: str  # "ReLU", "F.leaky_relu(0.2)", "GELU", ...
    slope: float = 0.0
    inplace: bool = False
    reason: Optional[str] = None  # why it cannot be a site


def _other_reason(label: str) -> str:
    return f"{label} is not of the ReLU family (sites are ReLU, ReLU6 and LeakyReLU)"


def module_activation(m: nn.Module) -> Optional[Act]:
    for cls, kind in ACT_MODULES:
        if plain_forward(m, cls):
            slope = float(m.negative_slope) if kind == "leaky_relu" else 0.0
            label = f"LeakyReLU({slope:g})" if kind == "leaky_relu" else cls.__name__
            hooks = foreign_hooks(m)
            reason = f"the {label} module has {' and '.join(hooks)}" if hooks else None
            return Act(kind, label, slope, bool(getattr(m, "inplace", False)), reason)
    if isinstance(m, OTHER_ACT_MODULES):
        return Act("other", type(m).__name__, reason=_other_reason(type(m).__name__))
    return None


def is_nearest_up2_module(m: nn.Module) -> Optional[bool]:
    """True for nearest x2 upsampling modules, False for other resampling modules, None for anything else."""
    if isinstance(m, nn.Upsample):
        if type(m).forward is not nn.Upsample.forward or foreign_hooks(m):
            return False
        return m.size is None and m.mode == "nearest" and _is_two(m.scale_factor)
    return None


def _is_two(sf) -> bool:
    sf = tuple(sf) if isinstance(sf, (tuple, list)) else (sf, sf)
    return len(sf) == 2 and all(isinstance(s, (int, float)) and not isinstance(s, bool) and float(s) == 2.0
                                for s in sf)


# ---------------------------------------------------------------------------------------------------
# Functional calls (argument binding by signature: positional and keyword arguments alike)
# ---------------------------------------------------------------------------------------------------
def _sig(fn):
    return inspect.signature(fn)


def _s_relu(input, inplace=False): ...
def _s_relu_t(input): ...
def _s_leaky(input, negative_slope=0.01, inplace=False): ...
def _s_leaky_(input, negative_slope=0.01): ...
def _s_interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                   recompute_scale_factor=None, antialias=False): ...
def _s_upsample_nearest(input, size=None, scale_factor=None): ...
def _s_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _s_conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1): ...
def _s_first(input, *args, **kwargs): ...


SIGNATURES = {
    F.relu: _sig(_s_relu), F.relu6: _sig(_s_relu), torch.relu: _sig(_s_relu_t), torch.relu_: _sig(_s_relu_t),
    F.leaky_relu: _sig(_s_leaky), F.leaky_relu_: _sig(_s_leaky_),
    F.interpolate: _sig(_s_interpolate), F.upsample: _sig(_s_interpolate),
    F.upsample_nearest: _sig(_s_upsample_nearest),
    torch.conv2d: _sig(_s_conv2d), torch.conv_transpose2d: _sig(_s_conv_transpose2d),
}
FUNCTION_ACTS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
                 F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu"}
INPLACE_FUNCTIONS = (torch.relu_, F.leaky_relu_)
OTHER_FUNCTION_ACTS = {F.elu: "F.elu", F.selu: "F.selu", F.celu: "F.celu", F.gelu: "F.gelu", F.silu: "F.silu",
                       F.mish: "F.mish", F.softplus: "F.softplus", F.prelu: "F.prelu", F.rrelu: "F.rrelu",
                       F.hardswish: "F.hardswish", F.hardtanh: "F.hardtanh", torch.tanh: "torch.tanh",
                       torch.sigmoid: "torch.sigmoid", F.tanh: "F.tanh", F.sigmoid: "F.sigmoid", F.glu: "F.glu"}
METHOD_ACTS = {"relu": False, "relu_": True}
OTHER_METHOD_ACTS = ("tanh", "tanh_", "sigmoid", "sigmoid_")
RESAMPLING_FUNCTIONS = (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, F.pixel_shuffle,
                        F.pad, F.dropout, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout)
RESAMPLING_MODULES = (nn.Upsample, nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.ZeroPad2d, nn.ConstantPad2d,
                      nn.ReflectionPad2d, nn.ReplicationPad2d, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
                      nn.FeatureAlphaDropout) + ((nn.CircularPad2d,) if hasattr(nn, "CircularPad2d") else ())
IDENTITY_METHODS = ("contiguous", "clone")


def bind(target, args, kwargs) -> Optional[dict]:
    """The call's arguments by name (defaults filled in), or None for a target without a known signature."""
    sig = SIGNATURES.get(target)
    if sig is None:
        return None
    try:
        b = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    b.apply_defaults()
    return dict(b.arguments)


def is_static(v) -> bool:
    """A value fixed at trace time (no graph node inside)."""
    if isinstance(v, fx.Node):
        return False
    if isinstance(v, (tuple, list)):
        return all(is_static(x) for x in v)
    return True


def _label(target) -> str:
    name = getattr(target, "__name__", repr(target))
    return f"F.{name}" if getattr(F, name, None) is target else f"torch.{name}"


def node_activation(node: fx.Node, modules) -> Optional[Act]:
    """The activation a graph node applies to its first argument, if any."""
    if node.op == "call_module":
        return module_activation(modules(node.target))
    if node.op == "call_function":
        if node.target in FUNCTION_ACTS:
            a = bind(node.target, node.args, node.kwargs)
            kind = FUNCTION_ACTS[node.target]
            label = _label(node.target)
            if a is None:
                return Act(kind, label, reason=f"{label} called with unexpected arguments")
            slope = a.get("negative_slope", 0.0)
            inplace = a.get("inplace", node.target in INPLACE_FUNCTIONS)
            if not is_static(slope) or not is_static(inplace):
                return Act(kind, label, reason=f"{label} with a slope or inplace flag computed at run time")
            if kind == "leaky_relu":
                label = f"{label}({float(slope):g})"
            return Act(kind, label, float(slope), bool(inplace) or node.target in INPLACE_FUNCTIONS)
        if node.target in OTHER_FUNCTION_ACTS:
            label = OTHER_FUNCTION_ACTS[node.target]
            return Act("other", label, reason=_other_reason(label))
        return None
    if node.op == "call_method":
        if node.target in METHOD_ACTS and len(node.args) == 1 and not node.kwargs:
            return Act("relu", f"Tensor.{node.target}", inplace=METHOD_ACTS[node.target])
        if node.target in OTHER_METHOD_ACTS:
            return Act("other", f"Tensor.{node.target}", reason=_other_reason(f"Tensor.{node.target}"))
    return None


def main_input(node: fx.Node) -> Any:
    """The tensor an op transforms: its first argument (``input``)."""
    if node.op in ("call_module", "call_method"):
        return node.args[0] if node.args else node.kwargs.get("input")
    if node.op == "call_function":
        a = bind(node.target, node.args, node.kwargs)
        if a is not None:
            return a.get("input")
        return node.args[0] if node.args else node.kwargs.get("input")
    return None


def pass_through(node: fx.Node, modules) -> Optional[tuple[str, Optional[str]]]:
    """How a node between an activation and a conv treats zeros: ``("identity", None)``, ``("upsample", None)``
    (nearest x2), ``("other", reason)`` (resampling, padding, dropout: zeros do not stay where they were, or
    the kernels do not take them), or None (any other op: the chain ends there)."""
    if node.op == "call_module":
        m = modules(node.target)
        if plain_forward(m, nn.Identity):
            return "identity", None
        up = is_nearest_up2_module(m)
        if up:
            return "upsample", None
        if isinstance(m, RESAMPLING_MODULES):
            return "other", (f"{type(m).__name__} '{node.target}' between them (only nearest x2 upsampling keeps "
                             "zeros where the kernels expect them)")
        return None
    if node.op == "call_method" and node.target in IDENTITY_METHODS:
        return "identity", None
    if node.op == "call_function":
        if node.target in (F.interpolate, F.upsample, F.upsample_nearest):
            a = bind(node.target, node.args, node.kwargs)
            if a is not None and is_static([v for k, v in a.items() if k != "input"]) and a.get("size") is None \
                    and a.get("mode", "nearest") == "nearest" and not a.get("antialias", False) \
                    and _is_two(a.get("scale_factor")):
                return "upsample", None
            return "other", f"{_label(node.target)} between them that is not a nearest x2 upsampling"
        if node.target in RESAMPLING_FUNCTIONS:
            return "other", f"{_label(node.target)} between them (only nearest x2 upsampling is folded in)"
    return None


def function_conv_kind(node: fx.Node, after_upsample: bool) -> tuple[Optional[str], Optional[str], Optional[dict]]:
    """``(kind, reason, bound arguments)`` of a functional ``conv2d`` / ``conv_transpose2d`` call (kind and reason
    None when the node is no such call). The weight is a graph value: its kernel size is checked at run time."""
    if node.op != "call_function" or node.target not in (torch.conv2d, torch.conv_transpose2d):
        return None, None, None
    a = bind(node.target, node.args, node.kwargs)
    name = _label(node.target)
    if a is None:
        return None, f"{name} called with unexpected arguments", None
    static = {k: v for k, v in a.items() if k not in ("input", "weight", "bias")}
    if not is_static(list(static.values())):
        return None, f"{name} with stride, padding, dilation or groups computed at run time", a
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    if a["groups"] != 1 or pair(a["dilation"]) != (1, 1):
        return None, f"{name} with groups={a['groups']}, dilation {a['dilation']} (the kernels need 1 and 1)", a
    if node.target is torch.conv_transpose2d:
        if after_upsample:
            return None, "nearest x2 upsampling before a transposed conv", a
        return TRANSPOSED, None, a
    if pair(a["stride"]) != (1, 1):
        return None, f"strided {name} (stride {a['stride']}): the kernels compute stride-1 and transposed convs", a
    if isinstance(a["padding"], str) and a["padding"] not in ("same", "valid"):
        return None, f"{name} with padding {a['padding']!r}", a
    if after_upsample and not (a["padding"] == "same" or pair(a["padding"]) == (1, 1)):
        return None, f"nearest x2 upsampling then {name} with padding {a['padding']} (needs 3x3, padding 1)", a
    return (UPSAMPLE if after_upsample else CONV), None, a
