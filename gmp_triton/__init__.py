"""gmp-triton: fused global max pooling + L2-normalised embedding head, as Triton kernels."""

from .functional import (
    global_max_pool,
    global_pool,
    gmp_l2norm,
    l2_normalize,
    masked_gmp_l2norm,
    masked_max_pool,
    pool_l2norm,
)
from .head import EmbeddingHead, EmbeddingModel, from_timm
from .modules import GlobalMaxPool, GlobalPool, GMPL2Norm, MaskedGMPL2Norm, MaskedMaxPool
from .padding import pad_maps, unpad_maps

__version__ = "0.1.0"

__all__ = [
    "EmbeddingHead",
    "EmbeddingModel",
    "GMPL2Norm",
    "GlobalPool",
    "GlobalMaxPool",
    "MaskedGMPL2Norm",
    "MaskedMaxPool",
    "__version__",
    "from_timm",
    "global_max_pool",
    "global_pool",
    "gmp_l2norm",
    "l2_normalize",
    "masked_gmp_l2norm",
    "masked_max_pool",
    "pad_maps",
    "pool_l2norm",
    "unpad_maps",
]
