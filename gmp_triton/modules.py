"""``nn.Module`` wrappers of the functional API."""

import torch
from torch import Tensor, nn

from . import functional


class GlobalMaxPool(nn.Module):
    r"""Global max pooling: :math:`y_{n,c} = \max_{h,w} x_{n,c,h,w}`.

    Same values as ``nn.AdaptiveMaxPool2d(1)`` followed by ``flatten(1)``; the gradient of each
    output goes to the first maximal position in row-major order, and NaN wins the max.

    ``forward(x, sizes=None)``: with ``sizes`` (an ``(N, 2)`` integer tensor of each item's valid
    ``(h, w)``), ``x`` is a padded batch and each item is pooled over its own top-left corner.

    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(N, C, L)`, any memory layout.
        - Output: :math:`(N, C)`.

    Example::

        >>> pool = GlobalMaxPool()
        >>> pool(torch.randn(8, 512, 7, 7)).shape
        torch.Size([8, 512])
    """

    def forward(self, x: Tensor, sizes: Tensor | None = None) -> Tensor:
        return functional.global_max_pool(x, sizes)


class GMPL2Norm(nn.Module):
    r"""Global max pooling then L2 normalisation: the embedding head of metric learning.

    .. math::
        p_{n,c} = \max_{h,w} x_{n,c,h,w}, \qquad
        y_{n} = \frac{p_{n}}{\max(\lVert p_{n} \rVert_2, \epsilon)}

    Same values as ``F.normalize(nn.AdaptiveMaxPool2d(1)(x).flatten(1), dim=1, eps=eps)``, with
    the norm accumulated in float32 (float64 for float64 input).

    Args:
        eps: lower bound of the norm, so that an all-zero vector gives a zero embedding.

    ``forward(x, sizes=None)``: with ``sizes``, ``x`` is a padded batch (see ``GlobalMaxPool``);
    an item of size 0 gives a zero embedding.

    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(N, C, L)`, any memory layout.
        - Output: :math:`(N, C)`, rows of unit length.

    Example::

        >>> head = GMPL2Norm()
        >>> emb = head(torch.randn(8, 512, 7, 7))
        >>> emb.norm(dim=1)  # all ones
    """

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor, sizes: Tensor | None = None) -> Tensor:
        return functional.gmp_l2norm(x, sizes, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class MaskedMaxPool(nn.Module):
    r"""Max over the valid tokens of each sequence (sentence-embedding pooling).

    :math:`y_{n,c} = \max_{l : m_{n,l} \neq 0} h_{n,l,c}`; a sequence with no valid token gives
    zeros. Equal to pooling each sequence's valid tokens alone, whatever padding holds.

    Shape:
        - Input: hidden states :math:`(N, L, C)` and attention mask :math:`(N, L)` (bool or
          integer, non-zero for valid tokens).
        - Output: :math:`(N, C)`.

    Example::

        >>> pool = MaskedMaxPool()
        >>> hidden, mask = torch.randn(4, 16, 384), torch.ones(4, 16, dtype=torch.long)
        >>> pool(hidden, mask).shape
        torch.Size([4, 384])
    """

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        return functional.masked_max_pool(hidden, attention_mask)


class MaskedGMPL2Norm(nn.Module):
    r"""``MaskedMaxPool`` followed by L2 normalisation: a sentence-embedding head.

    Args:
        eps: lower bound of the norm; a sequence with no valid token gives a zero embedding.

    Shape:
        - Input: hidden states :math:`(N, L, C)` and attention mask :math:`(N, L)`.
        - Output: :math:`(N, C)`, rows of unit length.

    Example::

        >>> head = MaskedGMPL2Norm()
        >>> emb = head(torch.randn(4, 16, 384), torch.ones(4, 16, dtype=torch.long))
    """

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        return functional.masked_gmp_l2norm(hidden, attention_mask, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class GlobalPool(nn.Module):
    r"""Global pooling of each channel: ``"max"``, ``"avg"``, ``"avgmax"``, ``"catavgmax"`` or
    ``"gem"`` (see ``gmp_triton.global_pool``).

    Args:
        pool: the pooling.
        p: initial GeM exponent (GeM only).
        learn_p: learn GeM's exponent as a parameter (GeM only).
        gem_eps: GeM's clamp of the input from below.

    ``forward(x, sizes=None)`` takes padded batches as ``GlobalMaxPool`` does.

    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(N, C, L)`, any memory layout.
        - Output: :math:`(N, C)`, or :math:`(N, 2C)` for catavgmax.

    Example::

        >>> gem = GlobalPool("gem", p=3.0)
        >>> gem(torch.rand(8, 512, 7, 7)).shape
        torch.Size([8, 512])
    """

    def __init__(
        self, pool: str = "avg", p: float = 3.0, learn_p: bool = True, gem_eps: float = 1e-6
    ) -> None:
        super().__init__()
        functional._check_pool(pool, "GlobalPool")
        self.pool, self.gem_eps = pool, gem_eps
        if pool == "gem":
            exponent = torch.tensor([float(p)])
            if learn_p:
                self.p = nn.Parameter(exponent)
            else:
                self.register_buffer("p", exponent)
        else:
            self.p = None

    def forward(self, x: Tensor, sizes: Tensor | None = None) -> Tensor:
        return functional.global_pool(x, self.pool, sizes, self.p, self.gem_eps)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}" + (f", gem_eps={self.gem_eps}" if self.pool == "gem" else "")
