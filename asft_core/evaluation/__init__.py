"""Evaluation: generation, judges, harmful score and task accuracy.

This package imports nothing at import time. Import the submodule you need:
``asft_core.evaluation.judges`` (is an answer harmful?), ``asft_core.evaluation.matchers``
(is a task answer correct?), ``asft_core.evaluation.stats`` (Wilson intervals, sample sizes)
and ``asft_core.evaluation.safety`` (harmful score per category).
"""
