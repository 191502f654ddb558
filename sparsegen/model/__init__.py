"""The model: what the networks are.

* :mod:`.configs`: :class:`ModelConfig` (architecture; the named ones in ``MODEL_CONFIGS``),
  :class:`TrainConfig` (Algorithm 1's hyper-parameters) and :class:`RunConfig` (a whole run).
* :mod:`.generator`: :class:`SparseGenerator`, the top-k sparsified generator (CVPR 2020 Table 1, AAAI 2019)
  on the kernels of :mod:`sparsegen_kernels`; its layer functions (:meth:`~SparseGenerator.upsample_conv`,
  :meth:`~SparseGenerator.conv_transpose`) are the one place that picks the kernels or the dense ops.
* :mod:`.critic`: :class:`EnergyCritic`, the energy f(Y; Phi), and its loss (Eq. 21).

Imports nothing else of :mod:`sparsegen`.
"""
