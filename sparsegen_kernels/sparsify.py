"""Turn a dense generator into its sparsely activated twin: :func:`sparsify`.

A *site* is a ReLU whose output feeds a convolution that the sparse kernels can consume directly:

* ``nn.ReLU -> nn.Upsample(scale_factor=2, mode="nearest") -> nn.Conv2d(3x3, stride 1, padding 1)``
  (also ``nn.UpsamplingNearest2d``, or a :class:`~sparsegen_kernels.SparseUpsampleConv2d` right after the ReLU),
* ``nn.ReLU -> nn.ConvTranspose2d`` (``groups=1``, ``dilation=1``, zero padding).

At each chosen site the ReLU becomes a :class:`TopKReLU` that keeps the ``k`` largest activations per group
and hands them on in compact form, the upsampling disappears into the convolution, and the convolution
becomes :class:`~sparsegen_kernels.SparseUpsampleConv2d` / :class:`~sparsegen_kernels.SparseConvTranspose2d`,
which skip the zeros. A convolution right before the ReLU has its bias moved into the top-k (added in the
same pass as the selection). Every replacement shares the *same* ``Parameter`` objects, so the state dict
keeps its keys and a pretrained dense generator can be sparsified and fine-tuned.

    import sparsegen_kernels as sk
    sparse_g = sk.sparsify(dense_g, k=0.25)                    # a quarter of each channel's positions
    sparse_g = sk.sparsify(dense_g, k={"main.2": 8, "main.5": 0.25}, mode="spatial")
"""
from __future__ import annotations

import copy
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as SF
from .modules import SparseConvTranspose2d, SparseUpsampleConv2d
from .geometry import MODES, group_geometry

KSpec = Union[int, float, tuple]

__all__ = ["TopKReLU", "sparsify", "sparsify_sites"]


# ---------------------------------------------------------------------------------------------------
# k: a count, a fraction of the group, or per site
# ---------------------------------------------------------------------------------------------------
def _check_k(where: str, k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"{where}: k must be an int (entries kept per group) or a float in (0, 1] (fraction of "
                        f"the group), got {k!r}")
    if isinstance(k, int) and k < 1:
        raise ValueError(f"{where}: k must be >= 1 when given as an int, got {k}")
    if isinstance(k, float) and not (0.0 < k <= 1.0 and math.isfinite(k)):
        raise ValueError(f"{where}: k must be in (0, 1] when given as a float (a fraction of the group), got {k}")


def _check_mode(where: str, mode) -> None:
    if mode not in MODES:
        raise ValueError(f"{where}: unknown mode {mode!r}; expected one of {MODES}")


def resolve_k(k: Union[int, float], group_size: int) -> int:
    """Entries kept per group: ``k`` itself (an int) or ``max(1, round(k * group_size))`` (a float fraction)."""
    if isinstance(k, float):
        return max(1, min(group_size, int(round(k * group_size))))
    return k


# ---------------------------------------------------------------------------------------------------
# Modules that replace the dense ones
# ---------------------------------------------------------------------------------------------------
class TopKReLU(nn.Module):
    """``ReLU`` followed by a top-k: keeps the ``k`` largest of ``relu(x + bias)`` per group.

    ``forward(x [N, C, H, W])`` -> :class:`~sparsegen_kernels.SparseActivation` (``compact=True``) or the dense
    masked ``[N, C, H, W]`` tensor. ``k`` is an int (entries per group) or a float in (0, 1] (a fraction of the
    group size, resolved at each call so the module works at any resolution). When built by :func:`sparsify`
    with a fused bias, ``bias`` is read from the preceding convolution (which then skips adding it).
    """

    def __init__(self, k: Union[int, float], mode: str = "spatial", compact: bool = True,
                 bias_from: Optional[nn.Module] = None, bias_from_name: str = ""):
        super().__init__()
        _check_k("TopKReLU", k)
        _check_mode("TopKReLU", mode)
        self.k, self.mode, self.compact = k, mode, compact
        # A plain reference, not a submodule: the bias stays registered (and saved) where it was.
        object.__setattr__(self, "_bias_from", bias_from)
        self.bias_from_name = bias_from_name

    def group_k(self, shape) -> int:
        """Entries kept per group for an input of ``shape = [N, C, H, W]``."""
        _, size = group_geometry(self.mode, *shape[1:])
        return resolve_k(self.k, size)

    def forward(self, x: Tensor):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"TopKReLU expects a [N, C, H, W] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        bias = None if self._bias_from is None else self._bias_from.bias
        k = self.group_k(x.shape)
        if self.compact:
            return SF.topk_compact(x, k, self.mode, bias, relu=True)
        return SF.topk_mask(x, k, self.mode, bias, relu=True)

    def extra_repr(self) -> str:
        kind = "fraction of the group" if isinstance(self.k, float) else "per group"
        s = f"k={self.k} ({kind}), mode={self.mode!r}, compact={self.compact}"
        return s + (f", bias of {self.bias_from_name!r}" if self._bias_from is not None else "")


class _Conv2dBiasInTopK(nn.Conv2d):
    """``nn.Conv2d`` whose bias is added by the following :class:`TopKReLU` (fused into its selection)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, None)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bias added by the next top-k"

    def _get_name(self) -> str:
        return "Conv2d"


class _ConvTranspose2dBiasInTopK(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose bias is added by the following :class:`TopKReLU`."""

    def forward(self, x: Tensor, output_size=None) -> Tensor:  # type: ignore[override]
        if output_size is not None:
            raise ValueError("a sparsified ConvTranspose2d does not take output_size; set output_padding instead")
        return F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bias added by the next top-k"

    def _get_name(self) -> str:
        return "ConvTranspose2d"


class _SparseUpsampleConv2dBiasInTopK(SparseUpsampleConv2d):
    """:class:`SparseUpsampleConv2d` whose bias is added by the following :class:`TopKReLU`."""

    def forward(self, inp) -> Tensor:  # type: ignore[override]
        return SF.sparse_upsample_conv2d(inp, self.weight, None, folded_weight=self._reused_fold())

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bias added by the next top-k"

    def _get_name(self) -> str:
        return "SparseUpsampleConv2d"


class _SparseConvTranspose2dBiasInTopK(SparseConvTranspose2d):
    """:class:`SparseConvTranspose2d` whose bias is added by the following :class:`TopKReLU`."""

    def forward(self, inp, output_size=None) -> Tensor:  # type: ignore[override]
        if output_size is not None:
            raise ValueError("SparseConvTranspose2d does not take output_size; set output_padding instead")
        return SF.sparse_conv_transpose2d(inp, self.weight, None, self.stride, self.padding, self.output_padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bias added by the next top-k"

    def _get_name(self) -> str:
        return "SparseConvTranspose2d"


def _share_params(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` (built on the meta device) the very ``Parameter`` objects of ``old``."""
    new.weight = old.weight
    if old.bias is None:
        new.register_parameter("bias", None)
    else:
        new.bias = old.bias
    new.train(old.training)
    return new


def _rebuild_conv(old: nn.Module, *, sparse: bool, bias_in_topk: bool) -> nn.Module:
    """A replacement for the conv ``old`` (sparse input and/or bias deferred), sharing its parameters."""
    has_bias = old.bias is not None
    kw = dict(bias=has_bias, device="meta", dtype=old.weight.dtype)
    if isinstance(old, SparseUpsampleConv2d) or (sparse and not isinstance(old, nn.ConvTranspose2d)):
        # An upsample-conv: a plain Conv2d after nn.Upsample, or already a SparseUpsampleConv2d.
        cls = _SparseUpsampleConv2dBiasInTopK if bias_in_topk else SparseUpsampleConv2d
        return _share_params(cls(old.in_channels, old.out_channels, 3, **kw), old)
    if isinstance(old, nn.ConvTranspose2d):
        if sparse or isinstance(old, SparseConvTranspose2d):
            cls = _SparseConvTranspose2dBiasInTopK if bias_in_topk else SparseConvTranspose2d
        else:
            cls = _ConvTranspose2dBiasInTopK
        return _share_params(cls(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                 old.output_padding, old.groups, dilation=old.dilation,
                                 padding_mode=old.padding_mode, **kw), old)
    return _share_params(_Conv2dBiasInTopK(old.in_channels, old.out_channels, old.kernel_size, old.stride,
                                           old.padding, old.dilation, old.groups,
                                           padding_mode=old.padding_mode, **kw), old)


# ---------------------------------------------------------------------------------------------------
# Finding sites in nn.Sequential chains
# ---------------------------------------------------------------------------------------------------
def _plain_forward(m: nn.Module, cls: type) -> bool:
    return isinstance(m, cls) and type(m).forward is cls.forward


def _is_plain_sequential(m: nn.Module) -> bool:
    return _plain_forward(m, nn.Sequential)


def _is_relu(m: nn.Module) -> bool:
    return _plain_forward(m, nn.ReLU)


def _is_nearest_up2(m: nn.Module) -> bool:
    if not isinstance(m, nn.Upsample) or type(m).forward is not nn.Upsample.forward:
        return False
    sf = m.scale_factor
    sf = tuple(sf) if isinstance(sf, (tuple, list)) else (sf, sf)
    return m.size is None and m.mode == "nearest" and all(float(s) == 2.0 for s in sf) and len(sf) == 2


def _is_conv3x3_same(m: nn.Module) -> bool:
    return (_plain_forward(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3) and tuple(m.stride) == (1, 1)
            and (m.padding == "same" or tuple(m.padding) == (1, 1)) and tuple(m.dilation) == (1, 1)
            and m.groups == 1 and m.padding_mode == "zeros")


def _is_sparse_ready_deconv(m: nn.Module) -> bool:
    plain = _plain_forward(m, nn.ConvTranspose2d) or isinstance(m, SparseConvTranspose2d)
    return plain and m.groups == 1 and tuple(m.dilation) == (1, 1) and m.padding_mode == "zeros"


def _is_bias_producer(m: nn.Module) -> bool:
    """A convolution whose per-channel bias can move into the following top-k."""
    ok = (_plain_forward(m, nn.Conv2d) or _plain_forward(m, nn.ConvTranspose2d)
          or isinstance(m, (SparseUpsampleConv2d, SparseConvTranspose2d)))
    return ok and type(m) not in (_Conv2dBiasInTopK, _ConvTranspose2dBiasInTopK, _SparseUpsampleConv2dBiasInTopK,
                                  _SparseConvTranspose2dBiasInTopK) and getattr(m, "bias", None) is not None


@dataclass
class _Leaf:
    name: str  # qualified name in the root module
    parent: nn.Module  # the nn.Sequential holding it
    key: str  # its key in parent._modules
    module: nn.Module


@dataclass
class _Site:
    relu: _Leaf
    consumer: _Leaf
    upsample: Optional[_Leaf]  # the nn.Upsample between them (removed), if any
    producer: Optional[_Leaf]  # the conv before the ReLU whose bias can be fused, if any

    def describe(self) -> str:
        c = self.consumer.module
        kind = "upsample x2 + conv 3x3" if self.upsample is not None or isinstance(c, SparseUpsampleConv2d) \
            else f"transposed conv {tuple(c.kernel_size)}, stride {tuple(c.stride)}"
        return f"ReLU -> {kind} '{self.consumer.name}' ({c.in_channels} -> {c.out_channels} channels)"


def _flatten(seq: nn.Sequential, prefix: str, out: list, nested: list) -> None:
    """The leaves of a (nested) nn.Sequential in execution order; non-Sequential leaves go to ``nested``."""
    for key, m in seq._modules.items():
        if m is None:
            continue
        name = f"{prefix}{key}"
        if _is_plain_sequential(m):
            _flatten(m, name + ".", out, nested)
        else:
            out.append(_Leaf(name, seq, key, m))
            nested.append((m, name + "."))


def _find_sites(root: nn.Module) -> "OrderedDict[str, _Site]":
    """Every site of ``root``, keyed by the qualified name of its ReLU, in module order."""
    sites: "OrderedDict[str, _Site]" = OrderedDict()
    todo = [(root, "")]
    seen = set()
    while todo:
        m, prefix = todo.pop(0)
        if id(m) in seen:
            continue
        seen.add(id(m))
        if not _is_plain_sequential(m):
            todo.extend((c, f"{prefix}{n}.") for n, c in m._modules.items() if c is not None)
            continue
        leaves: list = []
        nested: list = []
        _flatten(m, prefix, leaves, nested)
        todo.extend(nested)
        for i, leaf in enumerate(leaves):
            if not _is_relu(leaf.module) or i + 1 >= len(leaves):
                continue
            nxt = leaves[i + 1]
            up = None
            if _is_nearest_up2(nxt.module) and i + 2 < len(leaves) and _is_conv3x3_same(leaves[i + 2].module):
                up, consumer = nxt, leaves[i + 2]
            elif isinstance(nxt.module, SparseUpsampleConv2d) or _is_sparse_ready_deconv(nxt.module):
                consumer = nxt
            else:
                continue
            producer = leaves[i - 1] if i > 0 and _is_bias_producer(leaves[i - 1].module) else None
            sites[leaf.name] = _Site(leaf, consumer, up, producer)
    return sites


def sparsify_sites(module: nn.Module) -> "OrderedDict[str, str]":
    """The activations :func:`sparsify` can sparsify: ``{name of the ReLU: what it feeds}``, in module order.

    For a module with its own sparse path (see :func:`sparsify`): ``{layer name: "(C, H, W), mode, k"}``.
    """
    if _has_switch(module):
        return OrderedDict((n, f"{tuple(module.layer_shapes[n])}, mode={m!r}, k={k}")
                           for n, (k, m) in module.layer_topk.items())
    return OrderedDict((n, s.describe()) for n, s in _find_sites(module).items())


# ---------------------------------------------------------------------------------------------------
# Modules that carry their own sparse path
# ---------------------------------------------------------------------------------------------------
def _has_switch(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "sparse", None), bool) and isinstance(getattr(m, "layer_topk", None), Mapping)
            and isinstance(getattr(m, "layer_shapes", None), Mapping))


def _per_site(k, mode: Optional[str], names: list, where: str) -> dict:
    """``{site name: (k spec, mode or None)}`` for the chosen sites, from ``k`` and ``mode``."""
    if mode is not None:
        _check_mode(where, mode)
    if isinstance(k, Mapping):
        unknown = [n for n in k if n not in names]
        if unknown:
            raise ValueError(f"{where}: {unknown} are not sparsifiable activations of this module; "
                             f"they are {names} (see sparsegen_kernels.sparsify.sparsify_sites)")
        out = {}
        for n, v in k.items():
            if v is None:
                continue
            if isinstance(v, tuple):
                if len(v) != 2:
                    raise ValueError(f"{where}: k[{n!r}] must be k or a pair (k, mode), got {v!r}")
                _check_k(f"{where}: k[{n!r}]", v[0])
                _check_mode(f"{where}: k[{n!r}]", v[1])
                out[n] = (v[0], v[1])
            else:
                _check_k(f"{where}: k[{n!r}]", v)
                out[n] = (v, mode)
        return out
    _check_k(where, k)
    return {n: (k, mode) for n in names}


def _sparsify_switch(module: nn.Module, k, mode: Optional[str]) -> None:
    """Turn on the sparse path of a module with ``sparse`` / ``layer_topk`` / ``layer_shapes``."""
    names = list(module.layer_topk)
    where = f"sparsify({type(module).__name__})"
    if k is None:
        chosen = {n: (module.layer_topk[n][0], mode) for n in names}
        if mode is not None:
            _check_mode(where, mode)
            if any(mode != module.layer_topk[n][1] for n in names):
                raise ValueError(f"{where}: with k=None every layer keeps its own k; give k too when changing "
                                 f"the mode to {mode!r}")
    else:
        chosen = _per_site(k, mode, names, where)
    new = OrderedDict()
    for n in names:
        own_k, own_mode = module.layer_topk[n]
        C, H, W = module.layer_shapes[n]
        spec, m = chosen.get(n, (1.0, None))  # not chosen: the whole group (the dense layer's output)
        m = own_mode if m is None else m
        _, size = group_geometry(m, C, H, W)
        kk = resolve_k(spec, size)
        if not 1 <= kk <= size:
            raise ValueError(f"{where}: k={kk} is out of range for layer {n!r} (mode {m!r}, shape {(C, H, W)}): "
                             f"the group size is {size}")
        new[n] = (kk, m)
    module.layer_topk = new
    module.sparse = True
    if isinstance(getattr(module, "use_kernels", None), bool):
        module.use_kernels = True


# ---------------------------------------------------------------------------------------------------
# The front door
# ---------------------------------------------------------------------------------------------------
def _copy_sharing_parameters(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are the original objects."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def sparsify(module: nn.Module, k: Optional[Union[KSpec, Mapping[str, Optional[KSpec]]]] = None,
             mode: Optional[str] = None, *, fuse_bias: bool = True, inplace: bool = False) -> nn.Module:
    """The sparsely activated twin of a dense generator, sharing its parameters.

    Finds every *site* of ``module`` (a ReLU feeding nearest x2 upsampling + a 3x3 convolution, or feeding a
    transposed convolution, inside an ``nn.Sequential`` at any depth; nested ``nn.Sequential`` are read as one
    chain) and, at the chosen ones, replaces the ReLU with :class:`TopKReLU` and the convolution with
    :class:`~sparsegen_kernels.SparseUpsampleConv2d` / :class:`~sparsegen_kernels.SparseConvTranspose2d` (the
    ``nn.Upsample`` becomes ``nn.Identity``). Layers wired in a custom ``forward`` are not rewritten.
    :func:`sparsify_sites` lists the sites by name.

    Args:
        module: the dense generator. A module with its own sparse path -- a bool attribute ``sparse``, and
            ``layer_topk`` ``{layer: (k, mode)}`` / ``layer_shapes`` ``{layer: (C, H, W)}`` mappings, like
            ``sparsegen.SparseGenerator(..., sparse=False)`` -- is switched to it instead: its layers are the
            sites and every layer not chosen keeps the whole group (the dense output).
        k: what survives at each chosen site:

            * an ``int``: that many entries per group, at every site;
            * a ``float`` in (0, 1]: that fraction of the group, ``max(1, round(k * group size))``, at every site
              (``1.0`` keeps everything: the outputs equal the dense module's);
            * a ``dict`` ``{site name: k}`` (values as above, a pair ``(k, mode)``, or ``None``): only the named
              sites; the others stay dense;
            * ``None``: for a module with its own sparse path, its own ``layer_topk``; otherwise an error.
        mode: the grouping of the top-k: ``"spatial"`` (per channel, over its H*W positions), ``"channel"``
            (per position, over the C channels) or ``"global"`` (per sample). Default: ``"spatial"`` (a
            module with its own sparse path: each layer's own mode).
        fuse_bias: move the bias of a convolution right before a chosen ReLU into its top-k (selected on
            ``relu(x + bias)`` in one pass). The parameter stays where it was.
        inplace: rewrite ``module`` itself instead of a copy. The copy (default) shares every parameter and
            buffer with ``module``: training one trains the other.

    Returns the sparsified module (same class as ``module``; its ``state_dict`` keys are unchanged). Forward
    hooks on replaced submodules are not carried over. Raises ``ValueError`` when nothing can be sparsified
    or a dict names something that is not a site.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(module).__name__}")
    if not isinstance(fuse_bias, bool) or not isinstance(inplace, bool):
        raise TypeError("fuse_bias and inplace must be bools")
    out = module if inplace else _copy_sharing_parameters(module)

    if _has_switch(out):
        _sparsify_switch(out, k, mode)
        return out

    sites = _find_sites(out)
    if not sites:
        raise ValueError(f"sparsify found no ReLU -> (nearest x2 Upsample ->) Conv2d 3x3 / ConvTranspose2d chain in "
                         f"{type(module).__name__}: it rewrites nn.Sequential containers (at any depth); layers "
                         "wired in a custom forward are not rewritten")
    if k is None:
        raise ValueError("sparsify needs k: an int, a fraction in (0, 1], or a dict {site name: k} "
                         f"over the sites {list(sites)}")
    chosen = _per_site(k, mode, list(sites), "sparsify")

    # What each replaced leaf becomes: consumers take compact input, producers hand their bias on.
    role: "OrderedDict[int, dict]" = OrderedDict()
    for name, (spec, m) in chosen.items():
        s = sites[name]
        role.setdefault(id(s.consumer.module), {"leaf": s.consumer, "sparse": False, "bias": False})["sparse"] = True
        if fuse_bias and s.producer is not None:
            role.setdefault(id(s.producer.module), {"leaf": s.producer, "sparse": False, "bias": False})["bias"] = True

    new_modules = {key: _rebuild_conv(r["leaf"].module, sparse=r["sparse"], bias_in_topk=r["bias"])
                   for key, r in role.items()}
    for key, r in role.items():
        leaf = r["leaf"]
        leaf.parent._modules[leaf.key] = new_modules[key]
    for name, (spec, m) in chosen.items():
        s = sites[name]
        src = new_modules[id(s.producer.module)] if fuse_bias and s.producer is not None else None
        s.relu.parent._modules[s.relu.key] = TopKReLU(spec, m or "spatial", compact=True, bias_from=src,
                                                      bias_from_name=s.producer.name if src is not None else "")
        if s.upsample is not None:
            s.upsample.parent._modules[s.upsample.key] = nn.Identity()
    return out
