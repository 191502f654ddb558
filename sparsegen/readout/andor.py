"""AND-OR parse graphs of a sparse generator (CVPR 2020 Sec. 3.2, Figure 1; AAAI 2019 Sec. 2.1).

For a latent ``Z`` every sparsified layer of :class:`~sparsegen.model.generator.SparseGenerator` keeps a few
activations. Read as a grammar, the layer's feature map is an AND node over its spatial positions (an image
needs content at every position) and each position is an OR node whose children are the channels that
survive there, each with its coefficient (the activation value). This module reads that structure directly
from the activations the forward pass returns (the compact :class:`sparsegen_kernels.SparseActivation`
the kernels produced, or the dense masked map of the dense / torch-baseline paths): no second pass
re-derives the selection.

    images, graph = parse(generator, z)              # graph: ParseGraph over generator.layer_names
    lp = graph["block1"]                             # LayerParse: one row per surviving unit
    lp.and_nodes(0)                                  # {(h, w): [(channel, coefficient), ...]} of image 0
    graph.save_json("parse.json")                    # documented JSON, see ParseGraph.to_dict

A *unit* is one surviving activation ``(image, channel, position)`` with a positive coefficient (an entry
that the top-k kept but whose ReLU output is 0 contributes nothing and is not a unit).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

import sparsegen_kernels as sk
import torch
from torch import Tensor

Activation = Union[sk.SparseActivation, Tensor]

JSON_FORMAT = "sparsegen.andor/1"


@dataclass
class LayerParse:
    """The surviving units of one sparsified layer, for a batch of images.

    All per-unit tensors are ``[M]`` (``M`` units over the batch), on the CPU, sorted by image, then
    position, then decreasing coefficient:

    * ``image`` (int64): batch index ``n``;
    * ``channel`` (int64) and ``position`` (int64, ``h * W + w``): where the unit sits in the ``[C, H, W]`` map;
    * ``coefficient`` (float): the activation value ``s`` (AAAI Eq. 1-3), always ``> 0``;
    * ``slot`` (int64): where the unit lives in the activation it was read from: the flat index into
      ``values[n]`` (``[G, k]``) of a compact activation, or into ``[C, H, W]`` of a dense one.

    ``shape = (C, H, W)``; ``mode`` / ``k``: the layer's top-k grouping and k (``None`` for a dense layer).
    """

    name: str
    shape: tuple
    mode: Optional[str]
    k: Optional[int]
    image: Tensor
    channel: Tensor
    position: Tensor
    coefficient: Tensor
    slot: Tensor
    compact: bool

    def __len__(self) -> int:
        return int(self.image.numel())

    @property
    def grid(self) -> tuple:
        """``(H, W)`` of the layer's AND node."""
        return tuple(self.shape[1:])

    def units_of(self, n: int) -> Tensor:
        """Row indices (int64 ``[m]``) of the units of image ``n``."""
        return torch.nonzero(self.image == n).flatten()

    def hw(self, rows: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(h, w)`` of the units at ``rows`` (all units by default)."""
        p = self.position if rows is None else self.position[rows]
        W = self.shape[2]
        return p // W, p % W

    def and_nodes(self, n: int) -> "OrderedDict[tuple, list]":
        """The AND node of image ``n``: ``{(h, w): [(channel, coefficient), ...]}``, OR children by
        decreasing coefficient, positions in raster order (only positions with a surviving unit)."""
        rows = self.units_of(n)
        out: OrderedDict = OrderedDict()
        h, w = self.hw(rows)
        for r, hh, ww in zip(rows.tolist(), h.tolist(), w.tolist()):
            out.setdefault((hh, ww), []).append((int(self.channel[r]), float(self.coefficient[r])))
        return out

    def or_node(self, n: int, h: int, w: int) -> Tensor:
        """Row indices of the OR children at position ``(h, w)`` of image ``n`` (by decreasing coefficient)."""
        p = h * self.shape[2] + w
        return torch.nonzero((self.image == n) & (self.position == p)).flatten()

    def strongest_or_node(self, n: int) -> tuple:
        """``(h, w)`` of image ``n``'s position with the largest sum of coefficients."""
        rows = self.units_of(n)
        if rows.numel() == 0:
            raise ValueError(f"layer {self.name!r} has no surviving unit in image {n}")
        C, H, W = self.shape
        tot = torch.zeros(H * W, dtype=self.coefficient.dtype).index_add_(0, self.position[rows],
                                                                          self.coefficient[rows])
        p = int(torch.argmax(tot))
        return p // W, p % W

    def channel_counts(self) -> Tensor:
        """``[C]`` int64: how often each channel survives over the batch (its use as an OR child)."""
        return torch.bincount(self.channel, minlength=self.shape[0])

    def to_dict(self, n: int, max_or: Optional[int] = None) -> dict:
        """JSON-able description of image ``n``'s AND node at this layer (see :meth:`ParseGraph.to_dict`)."""
        nodes = []
        for (h, w), children in self.and_nodes(n).items():
            kids = children if max_or is None else children[:max_or]
            nodes.append({"position": [h, w],
                          "or": [{"channel": c, "coefficient": round(v, 6)} for c, v in kids],
                          "n_or": len(children)})
        C, H, W = self.shape
        return {"name": self.name, "channels": C, "grid": [H, W], "mode": self.mode, "k": self.k,
                "n_units": int((self.image == n).sum()), "and": nodes}


class ParseGraph:
    """Parse graphs of a batch of images: one :class:`LayerParse` per sparsified layer, top-down.

    ``graph[name]`` is the layer's :class:`LayerParse`; ``graph.names`` the layer names in generation order.
    """

    def __init__(self, layers: "OrderedDict[str, LayerParse]", n_images: int, meta: Optional[dict] = None):
        if not layers:
            raise ValueError("a parse graph needs at least one layer")
        self.layers = layers
        self.n_images = n_images
        self.meta = dict(meta or {})

    @property
    def names(self) -> list:
        """Layer names, top-down."""
        return list(self.layers)

    def __getitem__(self, name: str) -> LayerParse:
        if name not in self.layers:
            raise KeyError(f"no layer {name!r} in this parse graph; layers: {self.names}")
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers.values())

    def summary(self) -> list:
        """Per layer: ``{"name", "shape", "mode", "k", "units_per_image", "density", "channels_used"}``."""
        out = []
        for lp in self:
            C, H, W = lp.shape
            upi = len(lp) / max(1, self.n_images)
            out.append({"name": lp.name, "shape": [C, H, W], "mode": lp.mode, "k": lp.k,
                        "units_per_image": upi, "density": upi / (C * H * W),
                        "channels_used": int((lp.channel_counts() > 0).sum())})
        return out

    def to_dict(self, images: Optional[Iterable[int]] = None, max_or: Optional[int] = None) -> dict:
        """JSON-able parse graphs.

        ``{"format": "sparsegen.andor/1", "meta": {...}, "layers": [summary per layer],
        "images": [{"index": n, "layers": [{"name", "channels", "grid": [H, W], "mode", "k", "n_units",
        "and": [{"position": [h, w], "n_or": m, "or": [{"channel": c, "coefficient": s}, ...]}]}]}]}``.
        ``and`` lists the positions (AND children) that keep at least one unit, in raster order; ``or`` the
        surviving channels there (OR children) by decreasing coefficient, at most ``max_or`` of them.
        """
        idx = range(self.n_images) if images is None else list(images)
        return {"format": JSON_FORMAT, "meta": self.meta, "layers": self.summary(),
                "images": [{"index": n, "layers": [lp.to_dict(n, max_or) for lp in self]} for n in idx]}

    def to_json(self, images: Optional[Iterable[int]] = None, max_or: Optional[int] = None, indent: int = 1) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(images, max_or), indent=indent)

    def save_json(self, path: str, images: Optional[Iterable[int]] = None, max_or: Optional[int] = None) -> str:
        """Write :meth:`to_dict` as JSON to ``path``; returns ``path``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(self.to_json(images, max_or))
        return path


def layer_parse(name: str, act: Activation, topk: Optional[tuple] = None) -> LayerParse:
    """Read the units of one layer from its activation.

    ``act``: a :class:`sparsegen_kernels.SparseActivation` (the kernels' compact output: its indices *are*
    the top-k mask) or a dense ``[N, C, H, W]`` post-ReLU map (units = its positive entries).
    ``topk``: ``(k, mode)`` of the layer for the record (taken from a compact ``act`` when absent).
    """
    if isinstance(act, sk.SparseActivation):
        N, C, H, W = act.shape
        ch, pos = act.channel_and_position()
        vals = act.values.detach()
        keep = vals > 0
        n_idx = torch.arange(N, device=vals.device).view(N, 1, 1).expand_as(vals)
        slot = torch.arange(vals[0].numel(), device=vals.device).view(1, *vals.shape[1:]).expand_as(vals)
        image, channel, position = n_idx[keep], ch[keep], pos[keep]
        coef, slot = vals[keep], slot[keep]
        mode, k, compact = act.mode, act.k, True
    elif isinstance(act, Tensor):
        if act.dim() != 4:
            raise ValueError(f"a dense activation must be [N, C, H, W], got {tuple(act.shape)}")
        N, C, H, W = act.shape
        a = act.detach()
        nz = torch.nonzero(a > 0)
        image, channel = nz[:, 0], nz[:, 1]
        position = nz[:, 2] * W + nz[:, 3]
        coef = a[nz[:, 0], nz[:, 1], nz[:, 2], nz[:, 3]]
        slot = (channel * H + nz[:, 2]) * W + nz[:, 3]
        (k, mode), compact = (topk if topk else (None, None)), False
    else:
        raise TypeError(f"activation of layer {name!r} must be a SparseActivation or a tensor, "
                        f"got {type(act).__name__}")
    # Sort: image, then position, then decreasing coefficient.
    image, channel, position, coef, slot = (t.cpu() for t in (image, channel, position, coef, slot))
    order = torch.argsort(-coef.double(), stable=True)
    for key in (position, image):
        order = order[torch.argsort(key[order], stable=True)]
    return LayerParse(name, (C, H, W), mode, k, image[order].long(), channel[order].long(),
                      position[order].long(), coef[order], slot[order].long(), compact)


def parse_activations(acts: Mapping[str, Activation], layer_topk: Optional[Mapping[str, tuple]] = None,
                      meta: Optional[dict] = None) -> ParseGraph:
    """:class:`ParseGraph` of the activations ``forward(z, return_activations=True)`` returned."""
    layers: OrderedDict = OrderedDict()
    n = None
    for name, act in acts.items():
        lp = layer_parse(name, act, None if layer_topk is None else layer_topk.get(name))
        layers[name] = lp
        n = act.shape[0]
    return ParseGraph(layers, int(n), meta)


def model_meta(generator) -> dict:
    """What a parse graph records about its generator."""
    cfg = generator.config
    return {"config": cfg.name, "arch": cfg.arch, "sparse": bool(generator.sparse),
            "image_shape": list(cfg.image_shape),
            "layers": {n: {"shape": list(generator.layer_shapes[n]),
                           "k": generator.layer_topk[n][0] if generator.sparse else None,
                           "mode": generator.layer_topk[n][1] if generator.sparse else None}
                       for n in generator.layer_names}}


@torch.no_grad()
def parse(generator, z: Tensor) -> tuple[Tensor, ParseGraph]:
    """Generate ``z [N, z_dim]`` and read the parse graph: ``(images [N, C, S, S], ParseGraph)``."""
    images, acts = generator(z, return_activations=True)
    topk = dict(generator.layer_topk) if generator.sparse else None
    return images, parse_activations(acts, topk, model_meta(generator))


def tree_layers(generator, depth: int = 3) -> list:
    """The layers an AND-OR tree figure shows, top-down: the last ``depth`` sparsified layers.

    For ``paper64`` these are the 8x8, 16x16 and 32x32 maps (CVPR Figure 1's layers 3, 2, 1); for a
    network with fewer sparsified layers, all of them.
    """
    names = list(generator.layer_names)
    return names[-depth:] if len(names) >= depth else names


def part_layer(generator) -> str:
    """The *part level* of CVPR Table 4 / Figure 1: the top layer of :func:`tree_layers`."""
    return tree_layers(generator)[0]


def select_units(lp: LayerParse, per_image: Optional[int] = None, images: Optional[Sequence[int]] = None) -> Tensor:
    """Rows of ``lp``: for each image (all by default), its ``per_image`` units with the largest
    coefficients (all when ``None``). Returns int64 ``[m]`` sorted by image, then decreasing coefficient."""
    imgs = sorted(set(lp.image.tolist())) if images is None else list(images)
    out = []
    for n in imgs:
        rows = lp.units_of(n)
        if rows.numel() == 0:
            continue
        order = torch.argsort(-lp.coefficient[rows].double(), stable=True)
        rows = rows[order]
        out.append(rows if per_image is None else rows[:per_image])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
