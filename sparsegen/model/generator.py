"""The sparsely activated generator g(Z; Theta, k) of CVPR 2020 (Table 1, Eq. 6-7) and AAAI 2019.

After each sparsified layer only the top-k activations survive (Eq. 6: ``V = S(act(...); k)``), and the
layer that follows consumes them in compact form through the kernels of :mod:`sparsegen_kernels`,
skipping the zeros. ``sparse=False`` builds the same network (same parameter names and shapes) without
the top-k masks: the dense baseline.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Union

import sparsegen_kernels as sk
import torch
import torch.nn.functional as F
from sparsegen_kernels.baselines import topk_mask_torch_baseline
from torch import Tensor, nn

from .configs import ModelConfig, model_config

Activation = Union[sk.SparseActivation, Tensor]

#: the values of :attr:`SparseGenerator.dense_upsample`
DENSE_UPSAMPLE = ("interpolate", "folded")


class UpBlock(nn.Module):
    """``up`` (nearest x2 + 3x3 conv) + ReLU, then ``conv`` (3x3). Parameters as two ``nn.Conv2d``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = sk.SparseUpsampleConv2d(in_channels, out_channels)
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)


class SparseGenerator(nn.Module):
    """Top-down generator ``z [N, z_dim] -> images [N, C, S, S]`` in [-1, 1] with top-k sparsified layers.

    Args:
        config: a name from :data:`sparsegen.model.configs.MODEL_CONFIGS` (``"paper64"``, ``"aaai"``, ``"cpu32"``,
            ``"tiny16"``), a :class:`~sparsegen.model.configs.ModelConfig` or a dict of its fields.
        sparse: keep only the top-k activations of each sparsified layer. ``False`` removes the masks
            (plain ReLU there); parameter names and shapes do not change, so state dicts are interchangeable.
        use_kernels: run the sparse network on the :mod:`sparsegen_kernels` ops (compact activations, sparse
            upsample-convs). ``False`` runs the *same* sparse network the way a dense PyTorch model would
            (``torch.topk`` + ``scatter_`` masks, ``F.interpolate`` + ``F.conv2d``): the speed baseline.
            The selected sets agree except where values tie exactly.
        dense_upsample: how the dense network (``sparse=False``, or ``use_kernels=False``) computes each
            nearest-x2 upsampling + 3x3 conv: ``"interpolate"`` (default; ``F.interpolate`` + ``F.conv2d``, what
            a PyTorch model does) or ``"folded"`` (one stride-2 ``F.conv_transpose2d`` with the 4x4 weight of
            :func:`sparsegen_kernels.fold_upsample_weight`: the same function with 2.25x fewer MACs and no
            upsampled tensor, the best dense formulation). Gradients reach the 3x3 weight through the fold.
            Settable after construction (``gen.dense_upsample = "folded"``); the sparse kernel path ignores it.

    Sparsified layers, in order (:attr:`layer_names`), with the activation each one passes on:

    * ``"fc"``: the FC layer's ``[N, fc_channels, base, base]`` map after ReLU; cvpr: channel top-``fc_k``
      (k of the channels survive at each position); aaai: global top-``global_k[0]``.
    * ``"block1"``, ``"block2"``, ...: the output of each block after ReLU; cvpr: the second conv of the
      block, spatial top-k = H*W/4 per channel; aaai: the transposed conv, global top-``global_k[i]``.

    ``forward(z, return_activations=True)`` also returns these activations (a
    :class:`sparsegen_kernels.SparseActivation` per layer when sparse with kernels, else the dense masked
    tensor); :meth:`decode_from` runs the rest of the network from any of them. Together they give the parse
    graph of an image (AND node = position, OR nodes = the surviving channels there) and, by differentiating
    :meth:`decode_from` with respect to one surviving value, the image-space basis function of that unit
    with every later selection held fixed (the top-k gradient is its mask).
    """

    def __init__(self, config: Union[str, ModelConfig, dict] = "paper64", sparse: bool = True,
                 use_kernels: bool = True, dense_upsample: str = "interpolate"):
        super().__init__()
        if not isinstance(sparse, bool):
            raise TypeError(f"sparse must be a bool, got {type(sparse).__name__}")
        if not isinstance(use_kernels, bool):
            raise TypeError(f"use_kernels must be a bool, got {type(use_kernels).__name__}")
        self.dense_upsample = dense_upsample
        self.config = cfg = model_config(config)
        self.sparse = sparse
        self.use_kernels = use_kernels
        b = cfg.base_size
        self.fc = nn.Linear(cfg.z_dim, cfg.fc_channels * b * b)
        chans = (cfg.fc_channels,) + tuple(cfg.block_channels)
        if cfg.arch == "cvpr":
            self.blocks = nn.ModuleList(UpBlock(chans[i], chans[i + 1]) for i in range(len(cfg.block_channels)))
            self.final = UpBlock(chans[-1], cfg.final_channels)
            self.out = nn.Conv2d(cfg.final_channels, cfg.image_channels, 3, padding=1)
        else:
            self.deconvs = nn.ModuleList(
                sk.SparseConvTranspose2d(chans[i], chans[i + 1], 4, stride=2, padding=1)
                for i in range(len(cfg.block_channels)))
            self.out = sk.SparseConvTranspose2d(chans[-1], cfg.image_channels, 4, stride=2, padding=1)
        self.layer_names = ["fc"] + [f"block{i + 1}" for i in range(len(cfg.block_channels))]
        sizes = cfg.layer_sizes()
        if cfg.arch == "cvpr":
            ks = [(cfg.fc_k, "channel")] + [(cfg.spatial_k(s), "spatial") for _, s in sizes[1:]]
        else:
            ks = [(k, "global") for k in cfg.global_k]
        #: name -> (k, mode) of each sparsified layer's top-k
        self.layer_topk = OrderedDict(zip(self.layer_names, ks))
        #: name -> (C, H, W) of each sparsified layer's feature map
        self.layer_shapes = OrderedDict((n, (c, s, s)) for n, (c, s) in zip(self.layer_names, sizes))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, output_std: float = 0.5) -> None:
        """He-normal weights and zero biases, then the output layer scaled so that the pre-tanh output has
        standard deviation ``output_std`` over Z ~ N(0, I).

        The top-k layers keep a small fraction of the signal (the FC layer of ``paper64`` keeps 8 of 3200
        channels), so with plain He initialisation the output would hardly depend on Z, and Langevin
        inference (whose drift is proportional to dg/dZ) would barely move the latents. The scale is
        fixed from 8 latents of a fixed seed; the random draws of the weights come from the global
        generator (seed it with ``torch.manual_seed``).
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                if isinstance(m, nn.Linear):
                    fan = m.in_features
                elif isinstance(m, nn.ConvTranspose2d):  # inputs reaching one output pixel
                    fan = m.in_channels * m.weight[0, 0].numel() // (m.stride[0] * m.stride[1])
                else:
                    fan = m.in_channels * m.weight[0, 0].numel()
                m.weight.normal_(0.0, (2.0 / fan) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
        z = torch.randn(8, self.config.z_dim, generator=torch.Generator().manual_seed(0))
        z = z.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        _, acts = self(z, return_activations=True)
        std = self.decode_from("fc", acts["fc"], logits=True).std().item()
        if std > 0:
            self.out.weight.mul_(output_std / std)

    # ------------------------------------------------------------------------------------------------
    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def image_shape(self) -> tuple:
        """``(C, S, S)`` of the generated images."""
        return self.config.image_shape

    @property
    def dense_upsample(self) -> str:
        """``"interpolate"`` or ``"folded"``: how the dense path computes upsampling + 3x3 conv."""
        return self._dense_upsample

    @dense_upsample.setter
    def dense_upsample(self, value: str) -> None:
        if value not in DENSE_UPSAMPLE:
            raise ValueError(f"dense_upsample must be one of {DENSE_UPSAMPLE}, got {value!r}")
        self._dense_upsample = value

    def extra_repr(self) -> str:
        return (f"config={self.config.name!r}, arch={self.config.arch!r}, sparse={self.sparse}, "
                f"use_kernels={self.use_kernels}, dense_upsample={self.dense_upsample!r}, "
                f"topk={dict(self.layer_topk)}")

    # ------------------------------------------------------------------------------------------------
    def _select(self, name: str, x: Tensor, bias: Optional[Tensor]) -> Activation:
        """ReLU(x + bias), then the top-k of layer ``name`` when sparse. (Under autocast the kernels cast their
        inputs to one dtype themselves.)"""
        if not self.sparse:
            if bias is not None:
                x = x + bias.to(x.dtype).view(1, -1, 1, 1)
            return F.relu(x)
        k, mode = self.layer_topk[name]
        if self.use_kernels:
            return sk.topk_compact(x, k, mode, bias=bias, relu=True)
        return topk_mask_torch_baseline(x, k, mode, bias=bias, relu=True)

    @staticmethod
    def _dense(a: Activation) -> Tensor:
        return a.to_dense() if isinstance(a, sk.SparseActivation) else a

    # The layer functions: the one place that decides between the kernels and the dense PyTorch ops. The
    # read-outs (sparsegen.readout.basis) run the network through them too, with their own masks in between.
    @property
    def runs_on_kernels(self) -> bool:
        """Whether the layers run on the :mod:`sparsegen_kernels` ops (sparse with ``use_kernels``): they then
        pass compact activations on; otherwise dense maps through the PyTorch ops."""
        return self.sparse and self.use_kernels

    def upsample_conv(self, m: sk.SparseUpsampleConv2d, a: Activation, bias: bool = True) -> Tensor:
        """Nearest x2 upsampling + 3x3 conv of ``a`` with the parameters of ``m`` (one of this generator's
        ``up`` layers; ``bias=False``: without its bias). On the kernels a compact (or dense) ``a`` goes to
        the sparse upsample-conv; otherwise a dense ``a`` is computed as :attr:`dense_upsample` says."""
        b = m.bias if bias else None
        if self.runs_on_kernels:
            return m(a) if bias else sk.sparse_upsample_conv2d(a, m.weight)
        if self.dense_upsample == "folded":
            return F.conv_transpose2d(a, sk.fold_upsample_weight(m.weight), b, stride=2, padding=1)
        return F.conv2d(F.interpolate(a, scale_factor=2, mode="nearest"), m.weight, b, padding=1)

    def conv_transpose(self, m: sk.SparseConvTranspose2d, a: Activation, bias: bool = True) -> Tensor:
        """The transposed conv ``m`` (one of this generator's ``deconvs`` or ``out``) of ``a``; ``bias=False``:
        without its bias. On the kernels a compact (or dense) ``a`` goes to the sparse transposed conv."""
        b = m.bias if bias else None
        if self.runs_on_kernels:
            return sk.sparse_conv_transpose2d(a, m.weight, b, m.stride, m.padding, m.output_padding)
        return F.conv_transpose2d(a, m.weight, b, m.stride, m.padding, m.output_padding)

    def _fc_map(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"z must be [N, {self.config.z_dim}], got {tuple(z.shape)}")
        b = self.config.base_size
        return self.fc(z).view(z.shape[0], self.config.fc_channels, b, b)

    def _layer(self, i: int, a: Activation) -> Activation:
        """Layer ``i`` of :attr:`layer_names` (``i >= 1``): the previous activation -> this one's."""
        name = self.layer_names[i]
        if self.config.arch == "cvpr":
            blk = self.blocks[i - 1]
            h = F.relu(self.upsample_conv(blk.up, a))
            return self._select(name, F.conv2d(h, blk.conv.weight, None, padding=1), blk.conv.bias)
        m = self.deconvs[i - 1]
        return self._select(name, self.conv_transpose(m, a, bias=False), m.bias)

    def _head(self, a: Activation) -> Tensor:
        """From the last sparsified activation to the image (pre-tanh logits)."""
        if self.config.arch == "cvpr":
            h = F.relu(self.upsample_conv(self.final.up, a))
            h = F.relu(self.final.conv(h))
            return self.out(h)
        return self.conv_transpose(self.out, a)

    def _check_input(self, a: Activation) -> Activation:
        if self.runs_on_kernels:
            return a
        return self._dense(a)  # the torch paths take dense maps

    # ------------------------------------------------------------------------------------------------
    def forward(self, z: Tensor, return_activations: bool = False):
        """``z [N, z_dim] -> images [N, C, S, S]`` in [-1, 1].

        With ``return_activations=True`` returns ``(images, acts)``, ``acts`` an ordered dict
        ``layer name -> activation`` over :attr:`layer_names`: a :class:`sparsegen_kernels.SparseActivation`
        (sparse, ``use_kernels=True``) or the dense post-ReLU (masked, when sparse) ``[N, C, H, W]`` tensor.
        """
        acts = OrderedDict()
        a = self._select("fc", self._fc_map(z), None)  # the FC bias is per element, inside the Linear
        acts["fc"] = a
        for i in range(1, len(self.layer_names)):
            a = self._layer(i, a)
            acts[self.layer_names[i]] = a
        y = torch.tanh(self._head(a))
        return (y, acts) if return_activations else y

    def decode_from(self, name: str, activation: Activation, *, logits: bool = False) -> Tensor:
        """Run the network from sparsified layer ``name`` on: its (post-selection) activation -> images.

        ``activation`` is what :meth:`forward` returned for ``name`` (or any map of the shape in
        :attr:`layer_shapes`, dense or compact; the later layers re-select their top-k). ``logits=True``
        returns the pre-tanh output. Differentiable in the activation's values.
        """
        if name not in self.layer_names:
            raise ValueError(f"unknown layer {name!r}; expected one of {self.layer_names}")
        i = self.layer_names.index(name)
        a = self._check_input(activation)
        for j in range(i + 1, len(self.layer_names)):
            a = self._layer(j, a)
        out = self._head(a)
        return out if logits else torch.tanh(out)

    @torch.no_grad()
    def sample(self, n: int, rng: Optional[torch.Generator] = None) -> Tensor:
        """``n`` images from Z ~ N(0, I) (Eq. 1): ``[n, C, S, S]``. ``rng`` draws the latents."""
        p = next(self.parameters())
        z = torch.randn(n, self.config.z_dim, generator=rng, device=rng.device if rng is not None else p.device)
        return self(z.to(device=p.device, dtype=p.dtype))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
