"""Basis functions of a parse (AAAI 2019 Eq. 2-6; CVPR 2020 Figure 1) and per-layer dictionaries.

Once the parse of a latent ``Z`` is known, every top-k and ReLU of the generator below a layer is a fixed
0/1 mask (AAAI Eq. 2), so the map from that layer's activation ``a`` to the pre-tanh output is *affine*:
``logits(a) = L a + c``. The basis function of a surviving unit ``j`` (coefficient ``s_j``) is
``B_j = L e_j``: the generator's output when only that activation is kept and every downstream mask is the
parse's (Eq. 3-6). Hence the identity this module is built around (Eq. 5, with the bias term made explicit)::

    logits = sum_j s_j * B_j + c          (c: the output of the masked network from a zero activation)

:class:`FixedParse` holds the generator with its masks fixed to the parse of a batch of latents and computes
bases batched: many units share one pass (a batch of one-hot activations), and when the parse is compact the
later layers run on the sparse kernels restricted to the parse's selected entries.

Dictionaries (``[C, 3, h, w]`` per layer): :func:`kernel_dictionary` renders each channel's kernel in image
space without any parse (the plain dictionary, AAAI Figure 2); :func:`basis_dictionary` takes, for each
channel, the basis of its strongest occurrence over a batch of parses.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

import sparsegen_kernels as sk
import torch
import torch.nn.functional as F
from sparsegen_kernels.ops import compact_gather
from torch import Tensor

from .andor import LayerParse, ParseGraph, model_meta, parse_activations

Activation = Union[sk.SparseActivation, Tensor]


class FixedParse:
    """A generator with every top-k / ReLU mask below its sparsified layers fixed to one parse.

    ``FixedParse(generator, z)`` runs ``generator(z, return_activations=True)`` once: the selections are the
    activations it returns (compact from the kernels, or dense masked maps); the ReLU masks inside the
    blocks are the signs of the block's first convolution applied to those activations.

    Attributes: ``images [N, C, S, S]`` (tanh output), ``acts`` (layer name -> activation), ``graph``
    (:class:`~sparsegen.readout.andor.ParseGraph`), ``names`` (sparsified layers, top-down).
    """

    def __init__(self, generator, z: Tensor):
        self.g = generator
        self.names = list(generator.layer_names)
        self.arch = generator.config.arch
        with torch.no_grad():
            self.images, self.acts = generator(z, return_activations=True)
            self.z = z.detach()
            self.n_images = z.shape[0]
            self.graph: ParseGraph = parse_activations(
                self.acts, dict(generator.layer_topk) if generator.sparse else None, model_meta(generator))
            self._relu: dict = {}
            if self.arch == "cvpr":
                for j in range(1, len(self.names)):
                    h = generator.upsample_conv(generator.blocks[j - 1].up, self.acts[self.names[j - 1]])
                    self._relu[j] = h > 0
                fin = generator.final
                h1 = generator.upsample_conv(fin.up, self.acts[self.names[-1]])
                self._final1 = h1 > 0
                self._final2 = F.conv2d(torch.relu(h1), fin.conv.weight, fin.conv.bias, padding=1) > 0

    # ------------------------------------------------------------------------------------------------
    def layer_index(self, layer: str) -> int:
        """Position of ``layer`` in :attr:`names` (``ValueError`` for an unknown name)."""
        if layer not in self.names:
            raise ValueError(f"unknown layer {layer!r}; expected one of {self.names}")
        return self.names.index(layer)

    def _restrict(self, j: int, n: int, y: Tensor) -> Activation:
        """Apply layer ``j``'s selection (top-k and ReLU) of image ``n`` to ``y [U, C, H, W]``."""
        act = self.acts[self.names[j]]
        U = y.shape[0]
        if isinstance(act, sk.SparseActivation):
            idx = act.indices[n:n + 1].expand(U, -1, -1).contiguous()
            vals = compact_gather(y.contiguous(), idx, act.mode) * (act.values[n:n + 1] > 0).to(y.dtype)
            return sk.SparseActivation(vals.contiguous(), idx, (U,) + tuple(act.shape[1:]), act.mode)
        return y * (act[n:n + 1] > 0).to(y.dtype)

    def step(self, n: int, j: int, a: Activation, with_bias: bool = True) -> Activation:
        """Layer ``j`` (``>= 1``) of image ``n``'s masked network: activation of layer ``j - 1`` (batch ``U``)
        -> activation of layer ``j``. ``with_bias=False`` gives the linear part."""
        g = self.g
        if self.arch == "cvpr":
            blk = g.blocks[j - 1]
            h = g.upsample_conv(blk.up, a, with_bias)
            h = h * self._relu[j][n:n + 1].to(h.dtype)
            y = F.conv2d(h, blk.conv.weight, blk.conv.bias if with_bias else None, padding=1)
        else:
            y = g.conv_transpose(g.deconvs[j - 1], a, with_bias)
        return self._restrict(j, n, y)

    def head(self, n: int, a: Activation, with_bias: bool = True) -> Tensor:
        """The masked network from the last sparsified activation to the pre-tanh output ``[U, C, S, S]``."""
        g = self.g
        if self.arch == "cvpr":
            fin = g.final
            h = g.upsample_conv(fin.up, a, with_bias)
            h = h * self._final1[n:n + 1].to(h.dtype)
            h = F.conv2d(h, fin.conv.weight, fin.conv.bias if with_bias else None, padding=1)
            h = h * self._final2[n:n + 1].to(h.dtype)
            return F.conv2d(h, g.out.weight, g.out.bias if with_bias else None, padding=1)
        return g.conv_transpose(g.out, a, with_bias)

    def propagate(self, n: int, layer: str, a: Activation, with_bias: bool = True) -> Tensor:
        """Pre-tanh output of image ``n``'s masked network fed ``a`` (batch ``U``) at ``layer``."""
        i = self.layer_index(layer)
        with torch.no_grad():
            for j in range(i + 1, len(self.names)):
                a = self.step(n, j, a, with_bias)
            return self.head(n, a, with_bias)

    # ------------------------------------------------------------------------------------------------
    def unit_activation(self, layer: str, n: int, rows: Tensor, values: Optional[Tensor] = None) -> Activation:
        """A batch of activations at ``layer`` of image ``n``, one per unit ``rows`` of ``graph[layer]``: each
        holds only its unit, with its coefficient (or ``values [U]``). Compact when the parse is."""
        lp = self.graph[layer]
        act = self.acts[layer]
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.numel() and bool((lp.image[rows] != n).any()):
            raise ValueError(f"every unit must belong to image {n}")
        U = rows.numel()
        ref = act.values if isinstance(act, sk.SparseActivation) else act
        v = (lp.coefficient[rows] if values is None else torch.as_tensor(values)).to(ref.device, ref.dtype)
        slot = lp.slot[rows].to(ref.device)
        ar = torch.arange(U, device=ref.device)
        if isinstance(act, sk.SparseActivation):
            vals = ref.new_zeros((U,) + tuple(ref.shape[1:]))
            vals.view(U, -1)[ar, slot] = v
            idx = act.indices[n:n + 1].expand(U, -1, -1).contiguous()
            return sk.SparseActivation(vals, idx, (U,) + tuple(act.shape[1:]), act.mode)
        x = ref.new_zeros((U,) + tuple(ref.shape[1:]))
        x.view(U, -1)[ar, slot] = v
        return x

    def zero_activation(self, layer: str, n: int) -> Activation:
        """The all-zero activation at ``layer`` for image ``n`` (batch 1)."""
        act = self.acts[layer]
        if isinstance(act, sk.SparseActivation):
            return sk.SparseActivation(torch.zeros_like(act.values[n:n + 1]), act.indices[n:n + 1].contiguous(),
                                       (1,) + tuple(act.shape[1:]), act.mode)
        return torch.zeros_like(act[n:n + 1])

    def parse_activation(self, layer: str, n: int) -> Activation:
        """Image ``n``'s own activation at ``layer`` (batch 1)."""
        act = self.acts[layer]
        if isinstance(act, sk.SparseActivation):
            return sk.SparseActivation(act.values[n:n + 1].contiguous(), act.indices[n:n + 1].contiguous(),
                                       (1,) + tuple(act.shape[1:]), act.mode)
        return act[n:n + 1]

    # ------------------------------------------------------------------------------------------------
    def bias_term(self, layer: str, n: int) -> Tensor:
        """``c``: the pre-tanh output of image ``n``'s masked network from a zero activation at ``layer``
        (``[1, C, S, S]``): what the biases below ``layer`` contribute."""
        return self.propagate(n, layer, self.zero_activation(layer, n), with_bias=True)

    def logits(self, layer: str, n: int) -> Tensor:
        """The masked network fed image ``n``'s own activation at ``layer``: its pre-tanh output ``[1, C, S, S]``
        (equals the generator's, since the masks are the ones this activation produces)."""
        return self.propagate(n, layer, self.parse_activation(layer, n), with_bias=True)

    def contributions(self, layer: str, rows: Optional[Sequence[int]] = None, batch_size: int = 64,
                      unit_scale: bool = False) -> Tensor:
        """``s_j * B_j`` for the units ``rows`` of ``graph[layer]`` (all by default): ``[M, C, S, S]``.

        Batched: up to ``batch_size`` units of one image per pass. ``unit_scale=True`` returns the bases
        ``B_j`` themselves (coefficient 1).
        """
        lp = self.graph[layer]
        rows = torch.arange(len(lp)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        C, S, _ = self.g.image_shape
        ref = self.images
        out = ref.new_zeros((rows.numel(), C, S, S))
        if rows.numel() == 0:
            return out
        imgs = lp.image[rows]
        for n in torch.unique(imgs).tolist():
            where = torch.nonzero(imgs == n).flatten()
            for s in range(0, where.numel(), batch_size):
                w = where[s:s + batch_size]
                vals = torch.ones(w.numel()) if unit_scale else None
                a = self.unit_activation(layer, n, rows[w], vals)
                out[w.to(out.device)] = self.propagate(n, layer, a, with_bias=False)
        return out

    def bases(self, layer: str, rows: Optional[Sequence[int]] = None, batch_size: int = 64) -> Tensor:
        """The basis functions ``B_j`` (coefficient 1) of units ``rows``: ``[M, C, S, S]`` (pre-tanh space)."""
        return self.contributions(layer, rows, batch_size, unit_scale=True)

    def children(self, layer: str, row: int) -> tuple[Tensor, Tensor]:
        """The sparse connections of unit ``row`` of ``graph[layer]`` to the next sparsified layer.

        Returns ``(rows, weights)``: the next layer's units (rows of its :class:`LayerParse`) that receive a
        positive contribution from this unit (the linear part of one masked layer applied to ``s_j e_j``),
        by decreasing contribution. A unit of the last sparsified layer has no children.
        """
        i = self.layer_index(layer)
        if i + 1 >= len(self.names):
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        lp = self.graph[layer]
        n = int(lp.image[row])
        with torch.no_grad():
            a = self.step(n, i + 1, self.unit_activation(layer, n, torch.tensor([row])), with_bias=False)
        nxt = self.graph[self.names[i + 1]]
        rows = nxt.units_of(n)
        if isinstance(a, sk.SparseActivation):
            flat = a.values.reshape(-1).cpu()
        else:
            flat = a.reshape(-1).cpu()
        w = flat[nxt.slot[rows]]
        keep = w > 0
        rows, w = rows[keep], w[keep]
        order = torch.argsort(-w.double(), stable=True)
        return rows[order], w[order]


# ----------------------------------------------------------------------------------------------------
def unit_bases(generator, z: Tensor, layer: str, per_image: Optional[int] = None, batch_size: int = 64):
    """Contributions ``s_j B_j [M, C, S, S]`` of the ``per_image`` strongest units of ``layer`` (all when
    ``None``) for the latents ``z``. Returns ``(fixed_parse, rows, contributions)``."""
    from .andor import select_units

    fp = FixedParse(generator, z)
    rows = select_units(fp.graph[layer], per_image)
    return fp, rows, fp.contributions(layer, rows, batch_size)


def receptive_center(lp: LayerParse, rows: Tensor, image_size: int) -> Tensor:
    """Image-space centres ``[m, 2]`` (y, x) of the grid cells of units ``rows``."""
    h, w = lp.hw(rows)
    H, W = lp.grid
    return torch.stack([(h.double() + 0.5) * image_size / H, (w.double() + 0.5) * image_size / W], 1)


def energy_center(x: Tensor) -> Tensor:
    """Energy-weighted centroids ``[M, 2]`` (y, x) of images ``x [M, C, S, S]`` (energy = sum over C of x^2)."""
    e = (x.double() ** 2).sum(1)
    M, H, W = e.shape
    tot = e.sum((1, 2)).clamp_min(1e-30)
    ys = torch.arange(H, dtype=torch.float64) + 0.5
    xs = torch.arange(W, dtype=torch.float64) + 0.5
    cy = (e.sum(2) * ys).sum(1) / tot
    cx = (e.sum(1) * xs).sum(1) / tot
    return torch.stack([cy, cx], 1)


def crop(x: Tensor, centers: Tensor, size: int) -> Tensor:
    """Square ``size`` crops of ``x [M, C, S, S]`` around ``centers [M, 2]`` (y, x), kept inside the image."""
    M, C, H, W = x.shape
    size = int(min(size, H, W))
    out = x.new_zeros((M, C, size, size))
    for m in range(M):
        y0 = int(round(float(centers[m, 0]) - size / 2))
        x0 = int(round(float(centers[m, 1]) - size / 2))
        y0 = min(max(y0, 0), H - size)
        x0 = min(max(x0, 0), W - size)
        out[m] = x[m, :, y0:y0 + size, x0:x0 + size]
    return out


def support_size(x: Tensor, frac: float = 0.9) -> Tensor:
    """Side ``[M]`` of the smallest square around each image's energy centroid holding ``frac`` of its energy."""
    e = (x.double() ** 2).sum(1)
    M, H, W = e.shape
    c = energy_center(x)
    ys = torch.arange(H, dtype=torch.float64).view(1, H, 1) + 0.5
    xs = torch.arange(W, dtype=torch.float64).view(1, 1, W) + 0.5
    # Chebyshev distance of every pixel centre to the centroid: a square of side 2d + 1 covers the pixels within d.
    d = torch.maximum((ys - c[:, 0].view(M, 1, 1)).abs(), (xs - c[:, 1].view(M, 1, 1)).abs())
    order = torch.argsort(d.view(M, -1), dim=1)
    ce = torch.gather(e.view(M, -1), 1, order).cumsum(1)
    tot = ce[:, -1:].clamp_min(1e-30)
    k = (ce / tot < frac).sum(1).clamp(max=H * W - 1)
    dk = torch.gather(d.view(M, -1), 1, order)[torch.arange(M), k]
    return (2 * dk + 1).ceil().clamp(1, max(H, W))  # + 1: the pixels' own width


# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def kernel_dictionary(generator, layer: str, batch_size: int = 64, mode: str = "linear",
                      amplitude: float = 1.0) -> Tensor:
    """The plain dictionary of ``layer`` (AAAI Figure 2): each channel's kernel rendered in image space,
    without any parse.

    ``mode="linear"``: the generator's convolutions alone (biases, ReLUs and top-k removed) fed a unit
    impulse of channel ``c`` at the centre of ``layer``'s map. ``mode="impulse"``: the whole generator below
    ``layer`` (selections re-made) fed only that impulse, of height ``amplitude``, minus its output for an
    empty map (pre-tanh). ``layer`` may also be ``"final"``: the last hidden map, whose kernels are the
    output convolution's own filters. Returns ``[C, image_channels, S, S]`` (``"final"``:
    ``[C, image_channels, kh, kw]``).
    """
    g = generator
    if layer == "final":
        if g.config.arch == "cvpr":
            return g.out.weight.detach().transpose(0, 1).clone()  # [Cf, 3, 3, 3]
        return g.out.weight.detach().clone()  # ConvTranspose layout [Cin, 3, kh, kw]
    names = list(g.layer_names)
    if layer not in names:
        raise ValueError(f"unknown layer {layer!r}; expected one of {names} or 'final'")
    if mode not in ("linear", "impulse"):
        raise ValueError(f"unknown mode {mode!r}; expected 'linear' or 'impulse'")
    i = names.index(layer)
    C, H, W = g.layer_shapes[layer]
    p = next(g.parameters())
    empty = g.decode_from(layer, p.new_zeros((1, C, H, W)), logits=True) if mode == "impulse" else None
    outs = []
    for s in range(0, C, batch_size):
        cs = torch.arange(s, min(C, s + batch_size))
        x = p.new_zeros((cs.numel(), C, H, W))
        x[torch.arange(cs.numel()), cs, H // 2, W // 2] = 1.0 if mode == "linear" else float(amplitude)
        if mode == "impulse":
            outs.append(g.decode_from(layer, x, logits=True) - empty)
            continue
        for j in range(i + 1, len(names)):
            if g.config.arch == "cvpr":
                blk = g.blocks[j - 1]
                x = F.conv2d(g.upsample_conv(blk.up, x, bias=False), blk.conv.weight, None, padding=1)
            else:
                x = g.conv_transpose(g.deconvs[j - 1], x, bias=False)
        if g.config.arch == "cvpr":
            x = F.conv2d(g.upsample_conv(g.final.up, x, bias=False), g.final.conv.weight, None, padding=1)
            x = F.conv2d(x, g.out.weight, None, padding=1)
        else:
            x = g.conv_transpose(g.out, x, bias=False)
        outs.append(x)
    return torch.cat(outs)


@torch.no_grad()
def basis_dictionary(generator, z: Tensor, layer: str, batch_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Each channel's basis at its strongest occurrence over the parses of ``z``.

    Returns ``(bases [C, image_channels, S, S], counts [C], centers [C, 2], mass [C])``: for every channel
    of ``layer`` the basis ``B_j`` (coefficient 1) of its unit with the largest coefficient over the batch
    (zeros for a channel that never survives), how often the channel survives, the unit's grid-cell centre
    (y, x), and the channel's summed coefficients over the batch.
    """
    fp = FixedParse(generator, z)
    lp = fp.graph[layer]
    C = lp.shape[0]
    Cimg, S, _ = generator.image_shape
    best = torch.full((C,), -1, dtype=torch.long)
    if len(lp):
        # The strongest unit of each channel: sort by coefficient, keep the first row per channel.
        order = torch.argsort(-lp.coefficient.double(), stable=True)
        ch = lp.channel[order]
        first = torch.ones_like(ch, dtype=torch.bool)
        seen = torch.zeros(C, dtype=torch.bool)
        for t, c in enumerate(ch.tolist()):
            if seen[c]:
                first[t] = False
            seen[c] = True
        best[ch[first]] = order[first]
    have = best >= 0
    bases = fp.images.new_zeros((C, Cimg, S, S))
    centers = torch.zeros(C, 2, dtype=torch.float64)
    if bool(have.any()):
        rows = best[have]
        bases[have.to(bases.device)] = fp.bases(layer, rows, batch_size)
        centers[have] = receptive_center(lp, rows, S)
    mass = torch.zeros(C, dtype=torch.float64).index_add_(0, lp.channel, lp.coefficient.double())
    return bases, lp.channel_counts(), centers, mass


def layer_summary(fp: FixedParse) -> "OrderedDict[str, dict]":
    """Per layer: units per image and channels used, from a :class:`FixedParse`."""
    return OrderedDict((d["name"], d) for d in fp.graph.summary())
