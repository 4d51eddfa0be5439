"""The embedding model: a backbone that returns ``(N, C, H, W)`` feature maps, then the head.

The head is built in one place, ``build_head``: the package's ``EmbeddingHead``, which pools
(``max``, ``avg``, ``avgmax``, ``catavgmax`` or ``gem``), optionally projects the pooled vector
with a ``Linear`` layer, and L2-normalises it. Without a projection the pooling and the norm run
as one fused op (Triton kernels on CUDA, the PyTorch path on the CPU).

Padded batches of images of different sizes (see ``gmp_triton.pad_maps``) go through the model
with their ``sizes``. The small CNN keeps the resolution, so its feature maps have the sizes of
the images; it zeroes each map outside its image before every convolution, so that a 3x3
convolution at the edge of an image reads zeros there, as it does at the edge of the image alone.
"""

import torch
from torch import Tensor, nn

from ..head import EmbeddingHead
from .config import POOLS
from .padded import PaddedImages


def valid_region(sizes: Tensor, height: int, width: int) -> Tensor:
    """``(N, 1, height, width)`` bool: True inside each item's ``(h, w)``, top-left aligned."""
    rows = torch.arange(height, device=sizes.device).view(1, 1, height, 1)
    cols = torch.arange(width, device=sizes.device).view(1, 1, 1, width)
    return (rows < sizes[:, 0].view(-1, 1, 1, 1)) & (cols < sizes[:, 1].view(-1, 1, 1, 1))


class SmallConvNet(nn.Module):
    """A small CNN sized for CPU training: 3x3 convolutions with batch norm, ReLU between them,
    all at full resolution. Takes any input size.

    There is no downsampling: the objects it is made for are small (8-pixel digits), and the
    global pooling over positions, not strided layers, is what makes the embedding indifferent
    to where an object lies. The last convolution has no ReLU, so features can be negative and
    the embeddings spread over the whole sphere rather than its positive orthant.

    ``forward(x, sizes=None)``: with ``sizes``, the ``(N, 2)`` valid ``(h, w)`` of each image of
    a zero-padded batch, the input of every convolution is zeroed outside each image, so that in
    eval mode an image's features inside it equal those of the image alone. In training mode,
    batch norm's statistics also count the padded positions.

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

    def forward(self, x: Tensor, sizes: Tensor | None = None) -> Tensor:
        if sizes is None:
            return self.layers(x)
        inside = valid_region(sizes, x.shape[-2], x.shape[-1])
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d):
                # Zero, not just ignored: the convolution reads the positions around each one.
                # (Keyed on the convolutions: in several processes the batch norms are replaced
                # by synchronised ones.)
                x = x * inside
            x = layer(x)
        return x


def build_head(
    pool: str,
    in_channels: int,
    embed_dim: int | None,
    gem_p: float = 3.0,
    eps: float = 1e-12,
) -> EmbeddingHead:
    """The embedding head: global ``pool`` -> ``Linear`` projection to ``embed_dim`` (when
    given) -> L2 norm, as ``gmp_triton.EmbeddingHead``. GeM starts at exponent ``gem_p`` and
    learns it."""
    if pool not in POOLS:
        raise ValueError(f"build_head: unknown pool {pool!r}; expected one of {', '.join(POOLS)}")
    return EmbeddingHead(in_channels, embed_dim, pool, gem_p=gem_p, eps=eps)


class EmbeddingModel(nn.Module):
    """``backbone`` then ``head``: images ``(N, C, H, W)`` to unit embeddings ``(N, D)``.

    ``forward(images, sizes=None)``: ``sizes`` (``(N, 2)``, each image's valid ``(h, w)`` in a
    zero-padded batch) go to the head, which pools each map over its valid region only, and to
    the backbone when it takes them (``SmallConvNet`` does). The feature maps must then have the
    images' spatial size: sizes are not rescaled for backbones that downsample. A
    ``PaddedImages`` batch may be passed as ``images``; it carries its sizes.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, embedding_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.embedding_size = embedding_size

    def forward(self, images: Tensor | PaddedImages, sizes: Tensor | None = None) -> Tensor:
        if isinstance(images, PaddedImages):
            images, sizes = images
        if sizes is None:
            return self.head(self.backbone(images))
        if isinstance(self.backbone, SmallConvNet):
            features = self.backbone(images, sizes)
        else:
            features = self.backbone(images)
        if features.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"EmbeddingModel: padded batches need feature maps of the images' size, got "
                f"{tuple(features.shape[-2:])} maps for {tuple(images.shape[-2:])} images"
            )
        return self.head(features, sizes)


def build_model(
    in_channels: int,
    pool: str,
    embed_dim: int | None,
    widths: tuple[int, ...] = (32, 64),
    backbone: nn.Module | None = None,
    feature_channels: int | None = None,
    gem_p: float = 3.0,
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
    head = build_head(pool, feature_channels, embed_dim, gem_p)
    return EmbeddingModel(backbone, head, head.embed_dim)
