"""Atomic checkpoint files.

A checkpoint is written to a temporary file in the destination's directory, flushed to disk and renamed
over the destination (``os.replace`` is atomic on POSIX and Windows), so a crash mid-write leaves the
previous checkpoint intact.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Union

import torch

FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask); temp files start at 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_atomic(path: PathLike, binary: bool, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, rename it over ``path``, fsync the folder."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file + fsync + rename)."""
    _write_atomic(path, True, lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: PathLike) -> None:
    """Write ``text`` to ``path`` atomically."""
    _write_atomic(path, False, lambda f: f.write(text))


def load(path: PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :class:`sparsegen.train.trainer.Trainer`; checks its format version."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a sparsegen checkpoint of format {FORMAT_VERSION}")
    return ckpt
