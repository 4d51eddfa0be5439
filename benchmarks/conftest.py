"""Set-up of the pytest-benchmark suites: the settings every measurement of the report runs
under (the PyTorch path for CPU tensors, torch.compile settings)."""

import pytest
import torch

from gmp_triton.benchmarking import bench


@pytest.fixture(scope="session", autouse=True)
def measurement_settings():
    with bench.measurement_context("cuda" if torch.cuda.is_available() else "cpu"):
        yield
