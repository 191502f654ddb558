"""Read-out of a trained generator: AND-OR trees, basis functions, metrics and the report.

* :mod:`.andor`: parse graphs (AND node = position, OR nodes = surviving channels) from the activations.
* :mod:`.basis`: :class:`FixedParse`, image-space basis functions with the downstream masks fixed, and
  per-layer dictionaries.
* :mod:`.metrics`: reconstruction MSE, NCC template matching, part purity, FID.
* :mod:`.render`: pictures of AND-OR trees and dictionaries.
* :mod:`.report`: runs on disk, their AND-OR export, evaluation and the HTML page.

Imports :mod:`sparsegen.model`, :mod:`sparsegen.train` and :mod:`sparsegen.data`.
"""
