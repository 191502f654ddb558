"""Training: how the networks learn (Algorithm 1 of CVPR 2020).

* :mod:`.langevin`: Langevin inference of the latents (Eq. 13-14), computing only d/dZ.
* :mod:`.trainer`: :class:`Trainer` (critic step, Langevin steps on the persistent latents, generator step),
  resuming, and :func:`load_run` to read a trained run back.
* :mod:`.checkpoint`: atomic checkpoint and text files.
* :mod:`.distributed`: the process group (``torchrun`` + DDP) and its collectives.
* :mod:`.pictures`: the image grids and loss curves a run writes.

Imports :mod:`sparsegen.model` and :mod:`sparsegen.data`.
"""
