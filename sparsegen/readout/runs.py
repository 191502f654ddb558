"""Runs on disk: a *run* is a directory written by :class:`sparsegen.train.trainer.Trainer` (checkpoints,
``config.json``, pictures), read back with the data it was trained on.

    sparse, dense = find_runs("runs/demo")          # a run, or a folder holding sparse/ and dense/ runs
    run = load(sparse)                              # Run: the loaded generator, critic, latents, config
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..data import load_dataset, parse_spec
from ..train.checkpoint import has_checkpoint
from ..train.trainer import LoadedRun, load_run


def is_run(path: str) -> bool:
    """Whether ``path`` is a run directory (holds checkpoints) or a checkpoint file."""
    return has_checkpoint(path)


def find_runs(path: str, dense: Optional[str] = None) -> tuple:
    """``(sparse_run, dense_run or None)`` for ``path``.

    ``path`` is a run directory, or a directory holding the runs ``sparse/`` and ``dense/``. Without an
    explicit ``dense``, a dense twin is looked for as ``dense/`` beside ``path`` or inside its parent, and
    as ``<path>-dense``.
    """
    if not is_run(path):
        sub = os.path.join(path, "sparse")
        if is_run(sub):
            d = os.path.join(path, "dense")
            return sub, dense or (d if is_run(d) else None)
        raise FileNotFoundError(f"{path} is not a run directory (no checkpoint) nor a folder with sparse/ and "
                                "dense/ runs")
    if dense is not None:
        if not is_run(dense):
            raise FileNotFoundError(f"--dense-run {dense} is not a run directory (no checkpoint)")
        return path, dense
    parent = os.path.dirname(os.path.abspath(path))
    for cand in (os.path.join(parent, "dense"), os.path.abspath(path).rstrip("/") + "-dense"):
        if os.path.abspath(cand) != os.path.abspath(path) and is_run(cand):
            return path, cand
    return path, None


def run_dir_of(path: str) -> str:
    """The run directory of a run directory or checkpoint file."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


@dataclass
class Run:
    """A loaded run and the data it was trained on."""

    path: str
    loaded: LoadedRun
    dataset: object = None

    @property
    def g(self):
        """The generator."""
        return self.loaded.generator

    @property
    def kind(self) -> str:
        """``"sparse"`` or ``"dense"``."""
        return "sparse" if self.loaded.config.sparse else "dense"

    def data(self):
        """The training images (loaded on first use)."""
        if self.dataset is None:
            m = self.loaded.config.model
            self.dataset = load_dataset(self.loaded.config.data, m.image_size, m.image_channels)
        return self.dataset

    def sample_latents(self, n: int, seed: int) -> torch.Tensor:
        """``n`` latents ``Z ~ N(0, I)`` drawn with ``seed``, on the generator's device and in its dtype."""
        p = next(self.g.parameters())
        return torch.randn(n, self.g.z_dim, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)


def load(path: str, device: str = "cpu") -> Run:
    """Load a run directory (or checkpoint file)."""
    return Run(run_dir_of(path), load_run(path, device=device))


def heldout_spec(spec: str, n: int) -> tuple:
    """A dataset spec of ``n`` images the run did not train on, and whether it is really held out.

    Procedural data (``parts``, ``textures``) are drawn again with another seed; fixed sets (``faces``, a
    folder) have no held-out part, so their own images are used (flagged ``False``).
    """
    kind, opts = parse_spec(spec)
    if kind in ("parts", "textures"):
        seed = int(opts.get("seed", 0)) + 7919
        return f"{kind}:n={n},seed={seed}", True
    return spec, False
