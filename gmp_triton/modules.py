"""``nn.Module`` wrappers of the functional API."""

from torch import Tensor, nn

from . import functional


class GlobalMaxPool(nn.Module):
    r"""Global max pooling: :math:`y_{n,c} = \max_{h,w} x_{n,c,h,w}`.

    Same values as ``nn.AdaptiveMaxPool2d(1)`` followed by ``flatten(1)``; the gradient of each
    output goes to the first maximal position in row-major order, and NaN wins the max.

    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(N, C, L)`, any memory layout.
        - Output: :math:`(N, C)`.

    Example::

        >>> pool = GlobalMaxPool()
        >>> pool(torch.randn(8, 512, 7, 7)).shape
        torch.Size([8, 512])
    """

    def forward(self, x: Tensor) -> Tensor:
        return functional.global_max_pool(x)


class GMPL2Norm(nn.Module):
    r"""Global max pooling then L2 normalisation: the embedding head of metric learning.

    .. math::
        p_{n,c} = \max_{h,w} x_{n,c,h,w}, \qquad
        y_{n} = \frac{p_{n}}{\max(\lVert p_{n} \rVert_2, \epsilon)}

    Same values as ``F.normalize(nn.AdaptiveMaxPool2d(1)(x).flatten(1), dim=1, eps=eps)``, with
    the norm accumulated in float32 (float64 for float64 input).

    Args:
        eps: lower bound of the norm, so that an all-zero vector gives a zero embedding.

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

    def forward(self, x: Tensor) -> Tensor:
        return functional.gmp_l2norm(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
