"""Read-out of a trained generator: AND-OR trees, basis functions, metrics and the report.

* :mod:`.andor`: parse graphs (AND node = position, OR nodes = surviving channels) from the activations.
* :mod:`.basis`: :class:`FixedParse`, image-space basis functions with the downstream masks fixed, and
  per-layer dictionaries.
* :mod:`.metrics`: reconstruction MSE, NCC template matching, part purity, FID.
* :mod:`.render`: pictures of AND-OR trees and dictionaries.
* :mod:`.runs`: trained runs on disk (a sparse run and its dense twin), loaded with their data.
* :mod:`.export`: a run's parse graphs as JSON, its AND-OR tree figures and dictionaries.
* :mod:`.evaluate`: a run's Table 2/3/4-style numbers.
* :mod:`.html`: the report's self-contained HTML page.
* :mod:`.report`: :func:`~sparsegen.readout.report.build_report`, all of the above for a run and its twin.

Imports :mod:`sparsegen.model`, :mod:`sparsegen.train` and :mod:`sparsegen.data`.
"""
