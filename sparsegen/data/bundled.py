"""``textures`` and ``faces``: crops of real images bundled with scikit-image (nothing is downloaded).

* ``textures``: random crops of the brick, grass and gravel photographs (512x512 gray), in equal numbers,
  each crop ``2 * image_size`` wide (at most 512) resized to ``image_size``, randomly flipped.
* ``faces``: the 100 face images of scikit-image's LFW subset (25x25 gray), resized, plus their mirror
  images (200 in all).

Gray images are replicated to the requested number of channels. Needs ``scikit-image``
(``pip install sparsegen[data]``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import ImageDataset, match_channels

TEXTURE_NAMES = ("brick", "grass", "gravel")


def _skimage_data():
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the 'textures' and 'faces' datasets need scikit-image: pip install scikit-image") from exc
    return data


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """float ``[N, 1, h, w]`` in [0, 1] -> ``[N, 1, size, size]`` (area when shrinking, bicubic when growing)."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _to_u8(x: torch.Tensor, channels: int) -> torch.Tensor:
    return match_channels((x * 255).round().clamp(0, 255).to(torch.uint8), channels)


def make_textures(n: int = 600, image_size: int = 32, seed: int = 0, channels: int = 3) -> ImageDataset:
    """``n`` texture crops (brick, grass, gravel in turn) of ``image_size``; labels = texture id."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"textures: n must be an int >= 1, got {n!r}")
    data = _skimage_data()
    rng = np.random.default_rng(seed)
    crop = min(512, 2 * image_size)
    crops, labels = [], []
    sources = [np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0 for name in TEXTURE_NAMES]
    for i in range(n):
        t = i % len(sources)
        src = sources[t]
        y0 = int(rng.integers(0, src.shape[0] - crop + 1))
        x0 = int(rng.integers(0, src.shape[1] - crop + 1))
        c = src[y0:y0 + crop, x0:x0 + crop]
        if rng.random() < 0.5:
            c = c[:, ::-1]
        crops.append(np.ascontiguousarray(c))
        labels.append(t)
    x = _resize(torch.from_numpy(np.stack(crops))[:, None], image_size)
    return ImageDataset(_to_u8(x, channels), f"textures(n={n}, seed={seed})", part_labels=None,
                        info={"labels": torch.tensor(labels), "label_names": TEXTURE_NAMES, "seed": seed})


def make_faces(image_size: int = 32, channels: int = 3, flips: bool = True) -> ImageDataset:
    """The LFW-subset faces of scikit-image, resized to ``image_size`` (plus mirror images if ``flips``)."""
    data = _skimage_data()
    faces = np.asarray(data.lfw_subset()[:100], dtype=np.float32)  # the first 100 are faces
    x = torch.from_numpy(faces)[:, None]
    if flips:
        x = torch.cat([x, x.flip(-1)])
    x = _resize(x, image_size)
    return ImageDataset(_to_u8(x, channels), f"faces(n={x.shape[0]})", info={"source": "skimage.data.lfw_subset"})
