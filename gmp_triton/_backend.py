"""Which implementation runs a call: the Triton kernels or the pure-PyTorch path.

* CUDA tensors run the Triton kernels (compiled for the GPU).
* CPU tensors run the pure-PyTorch path, unless ``TRITON_INTERPRET=1`` was set before the package
  was imported: then the same Triton kernels run in Triton's interpreter, which is how the test
  suite covers the kernel code without a GPU.
* Without Triton installed, every device uses the PyTorch path.
"""

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)


def _triton_installed() -> bool:
    # Looked up, not imported: importing Triton takes a while and is only needed for a launch.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


TRITON_AVAILABLE = _triton_installed()
# Triton reads this variable when a kernel is defined, so it is read once, here, as well.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_cpu_backend: str | None = None
_warned_no_triton = False


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s computation goes to the Triton kernels."""
    global _warned_no_triton
    if tensor.device.type == "cuda":
        if TRITON_AVAILABLE:
            return True
        if not _warned_no_triton:
            logger.warning("triton is not installed: CUDA tensors use the PyTorch path")
            _warned_no_triton = True
        return False
    if tensor.device.type == "cpu":
        if _cpu_backend is not None:
            return _cpu_backend == "triton"
        return TRITON_INTERPRET and TRITON_AVAILABLE
    return False


@contextlib.contextmanager
def cpu_backend(name: str) -> Iterator[None]:
    """Run CPU tensors through ``"torch"`` (the PyTorch path) or ``"triton"`` (the interpreted
    kernels, which needs ``TRITON_INTERPRET=1`` at import) inside the ``with`` block."""
    global _cpu_backend
    if name not in ("torch", "triton"):
        raise ValueError(f"cpu_backend: expected 'torch' or 'triton', got {name!r}")
    if name == "triton" and not (TRITON_AVAILABLE and TRITON_INTERPRET):
        raise RuntimeError(
            "cpu_backend('triton') runs the kernels in Triton's interpreter: install triton and "
            "set TRITON_INTERPRET=1 before importing gmp_triton"
        )
    previous, _cpu_backend = _cpu_backend, name
    try:
        yield
    finally:
        _cpu_backend = previous
