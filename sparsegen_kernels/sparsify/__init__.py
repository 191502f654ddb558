"""Turn a dense generator into its sparsely activated twin: :func:`sparsify`, :func:`sparsify_sites`,
:func:`sparsify_report`.

A *site* is an activation of the ReLU family (``ReLU``, ``ReLU6``, ``LeakyReLU``, as a module or a functional call)
whose output reaches a convolution through ops that keep zeros zero:

* nearest x2 upsampling (``nn.Upsample``, ``F.interpolate(scale_factor=2)``) + a 3x3 conv, stride 1, padding 1,
* a stride-1 conv with zero padding ``p <= kernel - 1`` ("same" for odd kernels), run as a transposed conv of the
  flipped, transposed weight,
* a transposed conv (``groups=1``, ``dilation=1``, zero padding).

At a chosen site the top-k keeps the ``k`` largest *activation outputs* of each group (for a LeakyReLU the negative
outputs are ranked too) and zeroes the rest; the conv runs on the survivors only. A conv bias right before a ReLU is
added inside the top-k. Sites are found in two ways:

* inside ``nn.Sequential`` chains (the fast path): the modules are swapped for sparse ones sharing the parameters;
* anywhere else, through custom ``forward`` methods and functional calls, in a ``torch.fx`` trace (the graph path):
  the module gets the generated code of the rewritten graph as its ``forward``. A submodule that cannot be traced
  is kept as an opaque call and sparsified on its own; what could not be reached is reported, never skipped silently.

    import sparsegen_kernels as sk
    sparse_g = sk.sparsify(dense_g, k=0.25)                    # a quarter of each channel's positions
    sk.sparsify_report(dense_g, z, k=0.25)                     # per site: where, dense MACs, sparse MACs
"""
from __future__ import annotations

import copy
import itertools
import warnings
from collections import OrderedDict
from typing import Mapping, Optional, Union

from torch import nn

from .graph import TracedForward, install, make_plan
from .layers import TopKActivation, TopKReLU
from .runtime import SparsifyWarning
from .sequential import apply_sequential, find_sequential_sites
from .sites import foreign_hooks, is_parametrized, reparam_memo
from .spec import KSpec, per_site, resolve_k
from .switch import has_switch, sparsify_switch, switch_sites

__all__ = ["SparsifyWarning", "TopKActivation", "TopKReLU", "resolve_k", "sparsify", "sparsify_report",
           "sparsify_sites"]


def _copy_sharing_parameters(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are the original objects, held in the original
    ``_parameters`` / ``_buffers`` dicts: a ``.to()`` of either twin, which puts new buffer tensors in those dicts,
    moves both. Modules, their training flags and their submodule dicts are the copy's own."""
    memo = reparam_memo(module)
    memo.update({id(t): t for t in itertools.chain(module.parameters(), module.buffers())})
    for m in module.modules():
        memo[id(m._parameters)] = m._parameters
        memo[id(m._buffers)] = m._buffers
    return copy.deepcopy(module, memo)


def _sites(plan) -> "OrderedDict":
    """``{name: (unit, site)}`` of every sparsifiable site of the plan."""
    out: OrderedDict = OrderedDict()
    for unit in plan.units:
        for name, s in unit.sites().items():
            if s.ok:
                out.setdefault(name, (unit, s))
    return out


def _left_dense(plan) -> list:
    """``(site name, what, reason)`` of every activation -> conv chain that cannot run sparse."""
    out = []
    for unit in plan.units:
        for name, s in unit.sites().items():
            for c in s.chains:
                if c.kind is None:
                    out.append((name, f"{s.act.label} -> {c.conv_desc}", c.reason))
    return out


def _summary(plan, limit: int = 6) -> str:
    lines = [f.describe() for f in plan.failures]
    lines += [f"{name}: {what}: {reason}" for name, what, reason in _left_dense(plan)]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return "; ".join(lines)


def _fast_path_ok(unit, site, seq, prefix: str) -> bool:
    """Whether a site can be rewritten by swapping modules in its ``nn.Sequential``: it is one there, its graph
    is exactly that chain, each module is called once, and no module has a parametrisation or hooks."""
    if seq is None or site.name not in unit.primary.sites or site.keep_act or site.node.op != "call_module":
        return False
    if len(site.chains) != 1 or not site.ok:
        return False
    c = site.chains[0]
    if c.conv.op != "call_module" or c.kind != seq.kind or prefix + c.conv.target != seq.consumer.name:
        return False
    want = [seq.upsample.name] if seq.upsample is not None else []
    if [prefix + v.target if v.op == "call_module" else None for v in c.via] != want:
        return False
    if any(len(n.users) != 1 for n in [site.node] + c.via):
        return False
    targets = [site.node.target, c.conv.target] + [v.target for v in c.via]
    if (site.producer is None) != (seq.producer is None):
        return False
    if site.producer is not None:
        if site.producer.target is None or prefix + site.producer.target != seq.producer.name:
            return False
        targets.append(site.producer.target)
    calls = unit.primary.calls
    mods = [unit.module.get_submodule(t) for t in targets]
    return all(calls[t] == 1 for t in targets) and not any(is_parametrized(m) or foreign_hooks(m) for m in mods)


def sparsify(module: nn.Module, k: Optional[Union[KSpec, Mapping[str, Optional[KSpec]]]] = None,
             mode: Optional[str] = None, *, fuse_bias: bool = True, inplace: bool = False) -> nn.Module:
    """The sparsely activated twin of a dense generator, sharing its parameters.

    Finds every *site* of ``module`` -- an activation of the ReLU family feeding a convolution the sparse kernels
    can run (see the module docstring) -- inside ``nn.Sequential`` chains and, through a ``torch.fx`` trace, in
    custom ``forward`` methods and functional calls; :func:`sparsify_sites` lists them by name. At each chosen site
    the activation's top-k is taken and the convolution runs on the survivors. Sequential chains are rewritten by
    swapping modules (the activation becomes a :class:`TopKActivation`, the upsampling ``nn.Identity``, the conv
    its sparse twin); any other site is rewritten in the traced graph of the module holding it, which then runs
    the generated code as its ``forward``. Activation -> conv chains that cannot run sparse, and submodules that
    cannot be traced, are named in a :class:`SparsifyWarning` (:func:`sparsify_report` gives the details).

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

    Returns the sparsified module (same class as ``module``; its ``state_dict`` keys are unchanged). Every weight
    is read at each call (spectral and weight norm, both APIs, included); nothing is cached across calls. Forward
    hooks on swapped submodules are not carried over; a conv or activation with hooks of its own is left dense.
    Raises ``ValueError`` when nothing can be sparsified or a dict names something that is not a site.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(module).__name__}")
    if not isinstance(fuse_bias, bool) or not isinstance(inplace, bool):
        raise TypeError("fuse_bias and inplace must be bools")
    out = module if inplace else _copy_sharing_parameters(module)

    if has_switch(out):
        sparsify_switch(out, k, mode)
        return out

    plan = make_plan(out)
    sites = _sites(plan)
    if not sites:
        why = _summary(plan)
        raise ValueError(f"sparsify found no ReLU-family activation feeding a convolution the sparse kernels can run "
                         f"in {type(module).__name__}" + (f": {why}" if why else ""))
    if k is None:
        raise ValueError("sparsify needs k: an int, a fraction in (0, 1], or a dict {site name: k} "
                         f"over the sites {list(sites)}")
    chosen = per_site(k, mode, list(sites), "sparsify")
    if plan.failures or _left_dense(plan):
        warnings.warn(f"sparsify: in {type(module).__name__}, activation -> conv chains stay dense or could not be "
                      f"examined (sk.sparsify_report(model, example_input) has the details): {_summary(plan)}",
                      SparsifyWarning, stacklevel=2)

    for unit in plan.units:
        mine = {n: v for n, v in chosen.items() if sites[n][0] is unit}
        if not mine:
            continue
        prefix = f"{unit.path}." if unit.path else ""
        seq = find_sequential_sites(unit.module, prefix, stop=unit.opaque.keys())
        fast = {n: v for n, v in mine.items() if _fast_path_ok(unit, sites[n][1], seq.get(n), prefix)}
        slow = {n: v for n, v in mine.items() if n not in fast}
        if fast:
            apply_sequential(seq, fast, fuse_bias)
        if slow:
            install(unit, slow, (k, mode, fuse_bias, frozenset(fast)))
    return out


def sparsify_sites(module: nn.Module) -> "OrderedDict[str, str]":
    """The activations :func:`sparsify` can sparsify: ``{site name: what it feeds}``, in the order they run.

    A site is named after its activation: the module's name in ``named_modules()`` (``"main.2"``), with ``@1``,
    ``@2`` ... for its second, third ... call; a functional call is ``"<module whose forward calls it>:<function>"``
    (``"blocks.0:relu"``, ``":relu"`` in the top module's own forward). For a module with its own sparse path (see
    :func:`sparsify`): ``{layer name: "(C, H, W), mode, k"}``.
    """
    if has_switch(module):
        return switch_sites(module)
    return OrderedDict((n, s.describe()) for n, (_, s) in _sites(make_plan(module, both_modes=False)).items())


from .report import SparsifyReport, sparsify_report  # noqa: E402

__all__ += ["SparsifyReport", "TracedForward"]
