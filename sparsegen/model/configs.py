"""Configurations: the model architecture (:class:`ModelConfig`), Algorithm 1's hyper-parameters
(:class:`TrainConfig`) and a whole training run (:class:`RunConfig`).

Every config is a dataclass that checks its values on construction and raises :class:`ConfigError` (a
``ValueError``) naming the field, the value and what is allowed; ``check_field(name, value)`` checks one field
on its own (what the command line does for each option). A field declared on one line with a comment,
``name: type = default  # what it is``, is an option of ``sparsegen train`` with that comment as its help
(:mod:`sparsegen.cli.options`). Named architectures live in :data:`MODEL_CONFIGS`:

==========  ===========================================================================================
name        architecture
==========  ===========================================================================================
paper64     CVPR 2020 Table 1: Z in R^100 -> FC 4x4x3200 (channel top-8) -> [up x2, conv, conv,
            spatial top-k = HW/4] x 3 (512, 256, 128 channels) -> up x2, conv 64, conv 64 -> conv 3 + tanh;
            64x64 RGB. Critic: Table 1 right column.
aaai        AAAI 2019 workshop: FC + ReLU -> transposed convolutions (4x4, stride 2), global top-K on every
            hidden feature map; 64x64 RGB. The paper gives no exact sizes; these are ours.
cpu32       the CVPR architecture scaled to train in minutes on 2 CPU cores: 32x32 RGB.
tiny16      a 16x16 network for tests (seconds on a CPU).
==========  ===========================================================================================
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Union

ARCHS = ("cvpr", "aaai")


class ConfigError(ValueError):
    """A config field holds a value it does not allow: ``config.field = value is invalid: expected ...``."""

    def __init__(self, config: str, field: str, value: Any, expected: str):
        super().__init__(f"{config}.{field} = {value!r} is invalid: expected {expected}")
        self.config, self.field, self.value, self.expected = config, field, value, expected


def _fail(cls: str, name: str, value: Any, expected: str) -> None:
    raise ConfigError(cls, name, value, expected)


def _check_int(cls: str, name: str, value: Any, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        _fail(cls, name, value, "a positive integer" if lo == 1 else f"an integer >= {lo}")


def _check_float(cls: str, name: str, value: Any, lo: float = 0.0, *, strict: bool = True,
                 hi: float = math.inf) -> None:
    """A finite number above ``lo`` (``strict``) or at least ``lo``, and at most ``hi``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if strict else value >= lo) and value <= hi
    if not ok:
        what = "a positive number" if strict and lo == 0 else f"a number {'>' if strict else '>='} {_num(lo)}"
        if hi < math.inf:
            what += f" and <= {_num(hi)}"
        _fail(cls, name, value, what)


def _num(x: float) -> Union[int, float]:
    return int(x) if float(x).is_integer() else x


def _check_bool(cls: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(cls, name, value, "a bool")


def _check_int_tuple(cls: str, name: str, value: Any, *, allow_empty: bool = False) -> None:
    if not isinstance(value, tuple) or (not value and not allow_empty) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        _fail(cls, name, value, "a " + ("" if allow_empty else "non-empty ") + "tuple of ints >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the generator g(Z; Theta, k) and of the energy critic f(Y; Phi).

    The generator maps ``z [N, z_dim]`` to images ``[N, image_channels, image_size, image_size]`` in
    [-1, 1], with ``image_size = base_size * 2 ** (len(block_channels) + 1)``.
    """

    name: str = "custom"
    arch: str = "cvpr"  # "cvpr" (Table 1: nearest-up + conv) or "aaai" (FC + transposed convs, global top-K)
    z_dim: int = 100  # dimension d of the latent Z ~ N(0, I_d)
    image_channels: int = 3  # 3 for RGB
    base_size: int = 4  # spatial size of the FC layer's feature map
    fc_channels: int = 3200  # channels of the FC layer's feature map (Table 1: 4x4x3200)
    fc_k: int = 8  # cvpr: channel top-k at the FC layer (k of fc_channels survive at each position)
    block_channels: tuple = (512, 256, 128)  # channels of each upsampling block (cvpr) / deconv layer (aaai)
    block_density: float = 0.25  # cvpr: spatial top-k of a block keeps max(1, round(H*W*density)) per channel
    final_channels: int = 64  # cvpr: channels of the last, dense block (Table 1 layer 6)
    global_k: tuple = ()  # aaai: K of the global top-K on the FC map and on each hidden deconv map
    critic_stem: int = 64  # critic: channels of the first conv, at full resolution
    critic_channels: tuple = (64, 128, 256, 512)  # critic: [avg-pool /2, conv, conv] stages
    critic_slope: float = 0.2  # negative slope of the critic's leaky ReLU

    @classmethod
    def check_field(cls, name: str, value: Any) -> None:
        """Check one field's value on its own (the checks between fields are left to construction)."""
        c = "ModelConfig"
        if name == "name":
            if not isinstance(value, str) or not value:
                _fail(c, name, value, "a non-empty string")
        elif name == "arch":
            if value not in ARCHS:
                _fail(c, name, value, f"one of {ARCHS}")
        elif name in ("block_channels", "critic_channels", "global_k"):
            _check_int_tuple(c, name, value, allow_empty=name == "global_k")
        elif name == "block_density":
            _check_float(c, name, value, 0.0, hi=1.0)
        elif name == "critic_slope":
            _check_float(c, name, value, 0.0, strict=False, hi=1.0)
        else:
            _check_int(c, name, value)

    def __post_init__(self):
        c = "ModelConfig"
        # JSON round trips give lists: store tuples.
        for n in ("block_channels", "global_k", "critic_channels"):
            v = getattr(self, n)
            if isinstance(v, list):
                object.__setattr__(self, n, tuple(v))
        for f in fields(self):
            self.check_field(f.name, getattr(self, f.name))
        if self.arch == "cvpr" and self.fc_k > self.fc_channels:
            _fail(c, "fc_k", self.fc_k, f"at most fc_channels = {self.fc_channels} (channel top-k of the FC map)")
        if self.arch == "aaai":
            sizes = self.layer_sizes()
            if len(self.global_k) != len(sizes):
                _fail(c, "global_k", self.global_k,
                      f"{len(sizes)} values for arch 'aaai' (the FC map and each of the "
                      f"{len(self.block_channels)} hidden deconv maps)")
            for i, (k, (ch, s)) in enumerate(zip(self.global_k, sizes)):
                if k > ch * s * s:
                    _fail(c, "global_k", self.global_k, f"global_k[{i}] <= {ch}*{s}*{s} = {ch * s * s} "
                          "(the size of that feature map)")
        if self.image_size % (2 ** len(self.critic_channels)) != 0:
            _fail(c, "critic_channels", self.critic_channels,
                  f"at most {int(math.log2(self.image_size & -self.image_size))} stages: each halves the "
                  f"{self.image_size}x{self.image_size} image")

    @property
    def image_size(self) -> int:
        """Height and width of the generated images."""
        return self.base_size * 2 ** (len(self.block_channels) + 1)

    @property
    def image_shape(self) -> tuple:
        """``(image_channels, image_size, image_size)``."""
        return (self.image_channels, self.image_size, self.image_size)

    def layer_sizes(self) -> list:
        """``[(channels, size)]`` of every sparsified feature map: the FC map, then each block's output."""
        out = [(self.fc_channels, self.base_size)]
        s = self.base_size
        for ch in self.block_channels:
            s *= 2
            out.append((ch, s))
        return out

    def spatial_k(self, size: int) -> int:
        """cvpr: per-channel spatial top-k of a ``size x size`` block output (Table 1: k = HW/4)."""
        return max(1, int(round(size * size * self.block_density)))

    def replace(self, **changes) -> "ModelConfig":
        """A copy with ``changes`` applied (checked again)."""
        return dataclasses.replace(self, **changes)


MODEL_CONFIGS: dict = {
    "paper64": ModelConfig(name="paper64"),
    "aaai": ModelConfig(name="aaai", arch="aaai", z_dim=100, fc_channels=256, block_channels=(128, 64, 32),
                        global_k=(64, 256, 1024, 4096), critic_stem=64, critic_channels=(64, 128, 256, 512)),
    "cpu32": ModelConfig(name="cpu32", z_dim=32, fc_channels=128, fc_k=8, block_channels=(64, 32),
                         final_channels=16, critic_stem=16, critic_channels=(16, 32, 64)),
    "tiny16": ModelConfig(name="tiny16", z_dim=8, fc_channels=32, fc_k=4, block_channels=(16,),
                          final_channels=8, critic_stem=8, critic_channels=(8, 16)),
}


def model_config(config: Union[str, ModelConfig, Mapping]) -> ModelConfig:
    """Resolve ``config``: a name from :data:`MODEL_CONFIGS`, a :class:`ModelConfig` or a dict of its fields."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, str):
        if config not in MODEL_CONFIGS:
            raise ValueError(f"unknown model config {config!r}; expected one of {sorted(MODEL_CONFIGS)}")
        return MODEL_CONFIGS[config]
    if isinstance(config, Mapping):
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known: {sorted(known)}")
        return ModelConfig(**config)
    raise TypeError(f"config must be a name, a ModelConfig or a dict, got {type(config).__name__}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of Algorithm 1 (CVPR 2020) and of the run's bookkeeping."""

    iters: int = 1000  # learning iterations T (total, counted from the start of the run)
    batch_size: int = 64  # training examples per iteration (per process under DDP)
    sigma: float = 0.3  # observation noise std sigma of Eq. 1 / Eq. 14 (images in [-1, 1])
    step_size: float = 0.1  # Langevin step size delta of Eq. 13
    langevin_steps: int = 20  # l_G: Langevin steps per iteration on each example's persistent latent
    langevin_noise: bool = True  # the delta * E_tau term of Eq. 13 (False: gradient ascent to the posterior mode)
    lr_g: float = 2e-4  # Adam learning rate of the generator (Theta)
    lr_d: float = 1e-4  # Adam learning rate of the critic (Phi)
    beta1: float = 0.5  # Adam beta1 of both optimisers
    beta2: float = 0.999  # Adam beta2 of both optimisers
    critic_weight: float = 1.0  # weight of Eq. 20 (critic energy of syntheses) in the generator step; 0: no critic
    gp_weight: float = 10.0  # WGAN-GP gradient penalty in the critic step (Eq. 21); 0: none
    gp_every: int = 1  # lazy penalty (StyleGAN2): only on every N-th iteration (N, 2N, ...), scaled by N there
    gp_batch: int = 0  # the gradient penalty on the first M examples of each batch only (0: the whole batch)
    energy_l2: float = 1e-3  # keeps the critic's energies near 0: + energy_l2 * mean(f(Y)^2)
    seed: int = 0  # seeds the weights, the latent bank and every random draw of the run
    amp: bool = False  # bfloat16 autocast of the forward passes (CUDA only)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ... (under torchrun: the local rank's GPU)
    log_every: int = 10  # iterations between log lines
    sample_every: int = 200  # iterations between sample / reconstruction grids and the loss plot
    ckpt_every: int = 100  # iterations between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # checkpoints kept in the run directory, the newest; resume falls back on older ones
    eval_examples: int = 256  # training examples whose reconstruction MSE is reported at the end

    @classmethod
    def check_field(cls, name: str, value: Any) -> None:
        """Check one field's value on its own (the checks between fields are left to construction)."""
        c = "TrainConfig"
        if name in ("seed", "gp_batch"):
            _check_int(c, name, value, lo=0)
        elif name in ("sigma", "step_size", "lr_g", "lr_d"):
            _check_float(c, name, value)
        elif name in ("beta1", "beta2"):
            _check_float(c, name, value, 0.0, strict=False, hi=0.9999999)
        elif name in ("critic_weight", "gp_weight", "energy_l2"):
            _check_float(c, name, value, 0.0, strict=False)
        elif name in ("langevin_noise", "amp"):
            _check_bool(c, name, value)
        elif name == "device":
            if not isinstance(value, str) or not (value == "cpu" or value.startswith("cuda")):
                _fail(c, name, value, "'cpu', 'cuda' or 'cuda:<index>'")
        else:
            _check_int(c, name, value)

    def __post_init__(self):
        c = "TrainConfig"
        for f in fields(self):
            self.check_field(f.name, getattr(self, f.name))
        if self.amp and not self.device.startswith("cuda"):
            _fail(c, "amp", self.amp, "False on a CPU device (bfloat16 autocast is for CUDA)")
        if self.gp_batch > self.batch_size:
            _fail(c, "gp_batch", self.gp_batch, f"at most batch_size = {self.batch_size} (0: the whole batch)")

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied (checked again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RunConfig:
    """A whole training run: what to train (``model``, ``sparse``), on what (``data``) and how (``train``)."""

    model: ModelConfig = field(default_factory=lambda: MODEL_CONFIGS["cpu32"])
    sparse: bool = True  # keep only the top-k activations of each sparsified layer (False: the dense baseline)
    data: str = "parts"  # parts[:n=1024,seed=0] | textures[:n=600,seed=0] | faces | a folder of images (PATH[@N])
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def check_field(cls, name: str, value: Any) -> None:
        """Check one field's value on its own (``model`` and ``train`` are checked by their own class)."""
        if name == "sparse":
            _check_bool("RunConfig", name, value)
        elif name == "data":
            if not isinstance(value, str) or not value:
                _fail("RunConfig", name, value, "a non-empty dataset spec")

    def __post_init__(self):
        if isinstance(self.model, (str, Mapping)):
            object.__setattr__(self, "model", model_config(self.model))
        if isinstance(self.train, Mapping):
            known = {f.name for f in fields(TrainConfig)}
            unknown = sorted(set(self.train) - known)
            if unknown:
                raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}")
            object.__setattr__(self, "train", TrainConfig(**self.train))
        if not isinstance(self.model, ModelConfig):
            _fail("RunConfig", "model", self.model, "a ModelConfig or a config name")
        if not isinstance(self.train, TrainConfig):
            _fail("RunConfig", "train", self.train, "a TrainConfig")
        self.check_field("sparse", self.sparse)
        self.check_field("data", self.data)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        return {"model": asdict(self.model), "sparse": self.sparse, "data": self.data, "train": asdict(self.train)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunConfig":
        unknown = sorted(set(d) - {"model", "sparse", "data", "train"})
        if unknown:
            raise ValueError(f"unknown RunConfig field(s) {unknown}")
        return cls(model=model_config(dict(d["model"])), sparse=d.get("sparse", True), data=d.get("data", "parts"),
                   train=d.get("train", {}))

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return cls.from_dict(json.loads(text))
