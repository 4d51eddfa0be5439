"""The embedding model: a backbone that returns ``(N, C, H, W)`` feature maps, then the head.

The head is built in one place, ``build_head``: an optional projection, then global pooling and
L2 normalisation. With ``pool="max"`` the pooling and the norm are the fused ``GMPL2Norm`` layer
(Triton kernels on CUDA, the PyTorch path on the CPU).
"""

import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import GMPL2Norm


class SmallConvNet(nn.Module):
    """A small CNN sized for CPU training: 3x3 convolutions with batch norm, ReLU between them,
    all at full resolution. Takes any input size.

    There is no downsampling: the objects it is made for are small (8-pixel digits), and the
    global max over positions, not strided layers, is what makes the embedding indifferent to
    where an object lies. The last convolution has no ReLU, so features can be negative and the
    embeddings spread over the whole sphere rather than its positive orthant.

    Args:
        in_channels: 1 for grey images, 3 for colour.
        widths: output channels of each convolution; the last is ``out_channels``.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)`.
        - Output: :math:`(N, C_{out}, H, W)`.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for inputs, outputs in zip((in_channels, *widths[:-1]), widths, strict=True):
            if layers:
                layers.append(nn.ReLU(inplace=True))
            layers += [
                nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
                nn.BatchNorm2d(outputs),
            ]
        self.layers = nn.Sequential(*layers)
        self.out_channels = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class AvgPoolL2Norm(nn.Module):
    """Global average pooling then L2 normalisation, with stock PyTorch ops (for comparison)."""

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x.mean(dim=tuple(range(2, x.dim()))), dim=1, eps=self.eps)


def build_head(pool: str, in_channels: int, embed_dim: int | None, eps: float = 1e-12) -> nn.Module:
    """The embedding head: ``[projection] -> global pool -> L2 norm``.

    The projection, when ``embed_dim`` is given, is a linear map applied at every position (a 1x1
    convolution) before the pooling. For average pooling that equals projecting the pooled
    vector; for max pooling it lets each embedding dimension pick its own best position, and it
    keeps the pooling and the norm in one fused layer that reads the feature map once.
    """
    if pool == "max":
        pool_and_norm: nn.Module = GMPL2Norm(eps)
    elif pool == "avg":
        pool_and_norm = AvgPoolL2Norm(eps)
    else:
        raise ValueError(f"build_head: unknown pool {pool!r}; expected 'max' or 'avg'")
    if embed_dim is None:
        return pool_and_norm
    return nn.Sequential(nn.Conv2d(in_channels, embed_dim, 1), pool_and_norm)


class EmbeddingModel(nn.Module):
    """``backbone`` then ``head``: images ``(N, C, H, W)`` to unit embeddings ``(N, D)``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, embedding_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.embedding_size = embedding_size

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))


def build_model(
    in_channels: int,
    pool: str,
    embed_dim: int | None,
    widths: tuple[int, ...] = (32, 64),
    backbone: nn.Module | None = None,
    feature_channels: int | None = None,
) -> EmbeddingModel:
    """The small CNN (or ``backbone``, whose maps have ``feature_channels`` channels) plus the
    head of ``build_head``."""
    if backbone is None:
        backbone = SmallConvNet(in_channels, widths)
        feature_channels = backbone.out_channels
    elif feature_channels is None:
        feature_channels = getattr(backbone, "out_channels", None)
        if feature_channels is None:
            raise ValueError(
                "build_model: give feature_channels, the channel count of the backbone's maps"
            )
    head = build_head(pool, feature_channels, embed_dim)
    return EmbeddingModel(backbone, head, embed_dim or feature_channels)
