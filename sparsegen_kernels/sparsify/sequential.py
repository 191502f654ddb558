"""The fast path: sites inside ``nn.Sequential`` chains, rewritten by swapping modules (the ``forward`` code of the
model is left as it is).

At a site the activation becomes a :class:`~.layers.TopKActivation` that hands its survivors on in compact form, a
nearest x2 upsampling becomes ``nn.Identity`` and the convolution its sparse twin (sharing the ``Parameter``
objects). Nested ``nn.Sequential`` are read as one chain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from torch import nn

from ..modules import SparseConv2d, SparseConvTranspose2d, SparseUpsampleConv2d
from .layers import BIAS_DEFERRED, rebuild_conv, topk_module
from .sites import (is_nearest_up2_module, is_plain_sequential, module_activation, module_conv_kind,
                    plain_forward)


@dataclass
class Leaf:
    name: str  # qualified name in the root module
    parent: nn.Module  # the nn.Sequential holding it
    key: str  # its key in parent._modules
    module: nn.Module


@dataclass
class SeqSite:
    act: Leaf
    consumer: Leaf
    kind: str  # "upsample" | "conv" | "transposed"
    upsample: Optional[Leaf]  # the nn.Upsample between them (removed), if any
    producer: Optional[Leaf]  # the conv before a ReLU whose bias can be fused, if any


def is_bias_producer(m: nn.Module) -> bool:
    """A convolution whose per-channel bias can move into the following top-k."""
    ok = (plain_forward(m, nn.Conv2d) or plain_forward(m, nn.ConvTranspose2d)
          or isinstance(m, (SparseUpsampleConv2d, SparseConvTranspose2d, SparseConv2d)))
    return ok and type(m) not in BIAS_DEFERRED and getattr(m, "bias", None) is not None


def _flatten(seq: nn.Sequential, prefix: str, out: list, nested: list) -> None:
    """The leaves of a (nested) nn.Sequential in execution order; non-Sequential leaves go to ``nested``."""
    for key, m in seq._modules.items():
        if m is None:
            continue
        name = f"{prefix}{key}"
        if is_plain_sequential(m):
            _flatten(m, name + ".", out, nested)
        else:
            out.append(Leaf(name, seq, key, m))
            nested.append((m, name + "."))


def find_sequential_sites(root: nn.Module, prefix: str = "", stop: Iterable[int] = ()) -> "dict[str, SeqSite]":
    """Every site inside the ``nn.Sequential`` chains of ``root`` (not looking into the modules whose ids are in
    ``stop``), keyed by the qualified name of its activation, in module order."""
    sites: dict = {}
    todo = [(root, prefix)]
    seen = set(stop)
    while todo:
        m, pre = todo.pop(0)
        if id(m) in seen:
            continue
        seen.add(id(m))
        if not is_plain_sequential(m):
            todo.extend((c, f"{pre}{n}.") for n, c in m._modules.items() if c is not None)
            continue
        leaves: list = []
        nested: list = []
        _flatten(m, pre, leaves, nested)
        todo.extend(nested)
        for i, leaf in enumerate(leaves):
            act = module_activation(leaf.module)
            if act is None or act.kind == "other" or act.reason or i + 1 >= len(leaves):
                continue
            up = None
            j = i + 1
            if is_nearest_up2_module(leaves[j].module) and j + 1 < len(leaves):
                up, j = leaves[j], j + 1
            kind, _ = module_conv_kind(leaves[j].module, up is not None)
            if kind is None:
                continue
            producer = leaves[i - 1] if i > 0 and act.kind == "relu" and is_bias_producer(leaves[i - 1].module) \
                else None
            sites[leaf.name] = SeqSite(leaf, leaves[j], kind, up, producer)
    return sites


def apply_sequential(sites: "dict[str, SeqSite]", chosen: dict, fuse_bias: bool) -> None:
    """Swap the modules of the chosen sites (``{name: (k, mode)}``) in place."""
    role: dict = {}  # id(conv) -> what it becomes
    for name in chosen:
        s = sites[name]
        r = role.setdefault(id(s.consumer.module), {"leaf": s.consumer, "kind": None, "bias": False})
        r["kind"] = s.kind
        if fuse_bias and s.producer is not None:
            role.setdefault(id(s.producer.module), {"leaf": s.producer, "kind": None, "bias": False})["bias"] = True
    new_modules = {key: rebuild_conv(r["leaf"].module, r["kind"], r["bias"]) for key, r in role.items()}
    for key, r in role.items():
        leaf = r["leaf"]
        leaf.parent._modules[leaf.key] = new_modules[key]
    for name, (spec, mode) in chosen.items():
        s = sites[name]
        src = new_modules[id(s.producer.module)] if fuse_bias and s.producer is not None else None
        act = module_activation(s.act.module)
        s.act.parent._modules[s.act.key] = topk_module(spec, mode or "spatial", act.kind, act.slope, src,
                                                       s.producer.name if src is not None else "", site=name)
        if s.upsample is not None:
            s.upsample.parent._modules[s.upsample.key] = nn.Identity()

