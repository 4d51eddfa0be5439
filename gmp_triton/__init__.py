"""gmp-triton: fused global max pooling + L2-normalised embedding head, as Triton kernels."""

from .functional import global_max_pool, gmp_l2norm
from .modules import GlobalMaxPool, GMPL2Norm

__version__ = "0.1.0"

__all__ = ["GMPL2Norm", "GlobalMaxPool", "global_max_pool", "gmp_l2norm", "__version__"]
