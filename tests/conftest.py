"""Shared test set-up: Hypothesis profiles and the backend switch."""

import os

import pytest
from hypothesis import HealthCheck, settings

from gmp_triton import _backend

# "ci" keeps the suite within its time budget on two cores; "deep" is for a long local run.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("GMP_HYPOTHESIS_PROFILE", "ci"))

INTERPRETED_KERNELS = _backend.TRITON_AVAILABLE and _backend.TRITON_INTERPRET

# Both implementations that CPU tensors can run: the interpreted Triton kernels and the PyTorch
# path. The kernels need TRITON_INTERPRET=1 before import, which the README's test command sets.
CPU_BACKENDS = [
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not INTERPRETED_KERNELS,
            reason="the Triton kernels run on the CPU only with triton and TRITON_INTERPRET=1",
        ),
    ),
    "torch",
]
