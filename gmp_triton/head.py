"""The embedding head of metric learning, and a wrapper that puts it on a backbone."""

from torch import Tensor, nn

from . import functional
from .modules import GlobalPool


class EmbeddingHead(nn.Module):
    r"""Pool -> (normalisation layer) -> (Linear projection) -> L2 norm.

    Without a projection or a normalisation layer, pooling and L2 norm run fused
    (``gmp_triton.pool_l2norm``); otherwise the norm is ``gmp_triton.l2_normalize``, accumulated in
    fp32.

    Args:
        in_channels: channels C of the feature map.
        embed_dim: size of the Linear projection before the norm; None for no projection.
        pool: ``"max"``, ``"avg"``, ``"avgmax"``, ``"catavgmax"`` (2C features) or ``"gem"``.
        norm_layer: None, ``"batchnorm"`` (``BatchNorm1d``) or ``"layernorm"`` (``LayerNorm``
            without affine parameters), applied to the pooled features before the projection.
        gem_p: initial GeM exponent; learn_gem_p: learn it.
        eps: lower bound of the norm.
        return_features: also return the features before the L2 norm.

    ``forward(x, sizes=None)`` returns the ``(N, D)`` embeddings (unit rows), or
    ``(embeddings, features)`` with ``return_features``.

    Example::

        >>> head = EmbeddingHead(2048, embed_dim=512, pool="gem")
        >>> head(torch.rand(8, 2048, 7, 7)).shape
        torch.Size([8, 512])
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int | None = None,
        pool: str = "max",
        norm_layer: str | None = None,
        gem_p: float = 3.0,
        learn_gem_p: bool = True,
        eps: float = 1e-12,
        return_features: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels <= 0:
            raise ValueError(
                f"EmbeddingHead: in_channels must be a positive int, got {in_channels}"
            )
        if embed_dim is not None and (not isinstance(embed_dim, int) or embed_dim <= 0):
            raise ValueError(
                f"EmbeddingHead: embed_dim must be a positive int or None, got {embed_dim}"
            )
        self.pool = GlobalPool(pool, p=gem_p, learn_p=learn_gem_p)
        features = 2 * in_channels if pool == "catavgmax" else in_channels
        if norm_layer is None:
            self.norm_layer = None
        elif norm_layer == "batchnorm":
            self.norm_layer = nn.BatchNorm1d(features)
        elif norm_layer == "layernorm":
            self.norm_layer = nn.LayerNorm(features, elementwise_affine=False)
        else:
            raise ValueError(
                f"EmbeddingHead: norm_layer must be None, 'batchnorm' or 'layernorm', got "
                f"{norm_layer!r}"
            )
        self.projection = nn.Linear(features, embed_dim) if embed_dim else None
        self.in_channels = in_channels
        self.eps = eps
        self.return_features = return_features
        self.embed_dim = embed_dim or features

    def forward(self, x: Tensor, sizes: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if x.dim() >= 2 and x.shape[1] != self.in_channels:
            raise ValueError(
                f"EmbeddingHead: input has {x.shape[1]} channels (dim 1 of shape "
                f"{tuple(x.shape)}), the head was built for {self.in_channels}"
            )
        fused = self.norm_layer is None and self.projection is None and not self.return_features
        if fused:
            return functional.pool_l2norm(
                x, self.pool.pool, sizes, self.pool.p, eps=self.eps, gem_eps=self.pool.gem_eps
            )
        features = self.pool(x, sizes)
        if self.norm_layer is not None:
            features = self.norm_layer(features)
        if self.projection is not None:
            features = self.projection(features)
        embeddings = functional.l2_normalize(features, self.eps)
        return (embeddings, features) if self.return_features else embeddings


class EmbeddingModel(nn.Module):
    """A backbone whose ``forward_features`` (or ``forward``) returns feature maps, with an
    ``EmbeddingHead`` on top. ``(N, L, C)`` token maps, as vision transformers return, are pooled
    over the tokens."""

    def __init__(self, backbone: nn.Module, head: EmbeddingHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: Tensor, sizes: Tensor | None = None):
        extract = getattr(self.backbone, "forward_features", self.backbone)
        features = extract(images)
        if features.dim() == 3:
            features = features.transpose(1, 2)
        return self.head(features, sizes)


def from_timm(
    model_name: str,
    embed_dim: int | None = None,
    pool: str = "max",
    pretrained: bool = False,
    **head,
) -> EmbeddingModel:
    """A timm backbone (``timm.create_model(model_name, pretrained=...)``) with an
    ``EmbeddingHead`` on its ``forward_features``. Needs timm installed."""
    try:
        import timm
    except ImportError as error:
        raise ImportError("from_timm needs timm: pip install timm") from error
    backbone = timm.create_model(model_name, pretrained=pretrained, num_classes=0)
    channels = backbone.num_features
    return EmbeddingModel(backbone, EmbeddingHead(channels, embed_dim, pool, **head))


__all__ = ["EmbeddingHead", "EmbeddingModel", "from_timm"]
