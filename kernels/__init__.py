"""Triton device code: the ``@triton.jit`` kernels and their block-size heuristics.

``heuristics`` imports without Triton; ``global_max_pool`` and ``convert`` need it.
"""
