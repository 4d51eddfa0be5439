"""gmp-triton: fused global max pooling + L2-normalised embedding head, as Triton kernels."""

from .functional import global_max_pool, gmp_l2norm, masked_gmp_l2norm, masked_max_pool
from .modules import GlobalMaxPool, GMPL2Norm, MaskedGMPL2Norm, MaskedMaxPool
from .padding import pad_maps, unpad_maps

__version__ = "0.1.0"

__all__ = [
    "GMPL2Norm",
    "GlobalMaxPool",
    "MaskedGMPL2Norm",
    "MaskedMaxPool",
    "__version__",
    "global_max_pool",
    "gmp_l2norm",
    "masked_gmp_l2norm",
    "masked_max_pool",
    "pad_maps",
    "unpad_maps",
]
