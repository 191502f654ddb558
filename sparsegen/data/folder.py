"""Any folder of images: centre-cropped to a square, resized, held in memory as uint8."""
from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
import torch

from .base import ImageDataset, match_channels

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_images(root: str) -> list:
    """Image files under ``root`` (recursive), by extension, in sorted order."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out.extend(os.path.join(d, f) for f in sorted(files) if f.lower().endswith(EXTENSIONS))
    return out


def load_image(path: str, image_size: int, channels: int = 3) -> torch.Tensor:
    """One file -> uint8 ``[channels, S, S]``: centre crop to a square, then Lanczos resize."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((image_size, image_size), Image.LANCZOS)
        a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def load_folder(root: str, image_size: int, channels: int = 3, max_images: Optional[int] = None,
                progress: bool = False) -> ImageDataset:
    """Every readable image under ``root`` (the first ``max_images`` in sorted order).

    Unreadable files are skipped and counted (``dataset.info["skipped"]``, a warning names the first few);
    a folder without one readable image is an error.
    """
    if not os.path.isdir(root):
        raise ValueError(f"{root!r} is not a folder of images")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    files = list_images(root)
    if not files:
        raise ValueError(f"no image files ({', '.join(EXTENSIONS)}) under {root!r}")
    it = files
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(files, desc=f"loading {root}", unit="img", leave=False)
    images, skipped = [], []
    for f in it:
        if max_images is not None and len(images) >= max_images:
            break
        try:
            images.append(load_image(f, image_size, channels))
        except Exception as exc:  # unreadable / truncated / not an image: skip, count
            skipped.append((f, f"{type(exc).__name__}: {exc}"))
    if skipped:
        names = ", ".join(os.path.basename(f) for f, _ in skipped[:3])
        warnings.warn(f"skipped {len(skipped)} unreadable file(s) under {root!r} (e.g. {names})", RuntimeWarning,
                      stacklevel=2)
    if not images:
        raise ValueError(f"none of the {len(files)} image files under {root!r} could be read")
    x = match_channels(torch.stack(images), channels)
    return ImageDataset(x, f"folder({root})", info={"root": root, "skipped": len(skipped),
                                                    "skipped_files": [f for f, _ in skipped]})
