"""Training data: built-in datasets that download nothing, and any folder of images.

:func:`load_dataset` takes a *spec*:

==============================  =============================================================================
spec                            dataset
==============================  =============================================================================
``parts[:n=1024,seed=0]``       procedural compositional objects with ground-truth part masks (:mod:`.parts`)
``textures[:n=600,seed=0]``     crops of scikit-image's brick / grass / gravel photographs (:mod:`.bundled`)
``faces``                       scikit-image's LFW-subset faces and their mirror images, 200 (:mod:`.bundled`)
``PATH`` or ``folder:PATH``     every readable image under a folder, centre-cropped and resized (:mod:`.folder`);
                                ``PATH@N`` keeps the first N in sorted order
==============================  =============================================================================
"""
from __future__ import annotations

import os

from .base import ImageDataset, from_numpy_images, to_float, to_uint8
from .bundled import make_faces, make_textures
from .folder import load_folder
from .parts import make_parts

BUILTIN = {
    "parts": (make_parts, {"n": int, "seed": int}),
    "textures": (make_textures, {"n": int, "seed": int}),
    "faces": (make_faces, {"flips": lambda s: s.lower() in ("1", "true", "yes")}),
}

__all__ = ["ImageDataset", "load_dataset", "parse_spec", "make_parts", "make_textures", "make_faces", "load_folder",
           "to_float", "to_uint8", "from_numpy_images"]


def parse_spec(spec: str) -> tuple:
    """``spec -> (kind, options)``: kind is a built-in name or ``"folder"``; see the module docstring."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.partition(":")
    if name in BUILTIN:
        _, types = BUILTIN[name]
        opts = {}
        for item in filter(None, rest.split(",")):
            key, eq, val = item.partition("=")
            key = key.strip()
            if not eq or key not in types:
                raise ValueError(f"bad option {item!r} in dataset spec {spec!r}; {name} takes "
                                 f"{', '.join(f'{k}=' for k in types) or 'no options'}")
            try:
                opts[key] = types[key](val.strip())
            except ValueError:
                raise ValueError(f"bad value {val!r} for {key} in dataset spec {spec!r}") from None
        return name, opts
    path = spec[len("folder:"):] if spec.startswith("folder:") else spec
    opts = {}
    head, at, n = path.rpartition("@")
    if at and n.isdigit() and not os.path.isdir(path):
        path, opts["max_images"] = head, int(n)
    if not os.path.isdir(os.path.expanduser(path)):
        raise ValueError(f"unknown dataset {spec!r}: expected one of {sorted(BUILTIN)} or a folder of images")
    return "folder", {"root": os.path.expanduser(path), **opts}


def load_dataset(spec: str, image_size: int, channels: int = 3, progress: bool = False) -> ImageDataset:
    """Load the dataset named by ``spec`` at ``image_size`` with ``channels`` channels (images in memory)."""
    kind, opts = parse_spec(spec)
    if kind == "folder":
        return load_folder(opts["root"], image_size, channels, opts.get("max_images"), progress=progress)
    fn, _ = BUILTIN[kind]
    return fn(image_size=image_size, channels=channels, **opts)
