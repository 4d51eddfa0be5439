"""Losses and miners from pytorch-metric-learning, by the names the command line uses."""

from torch import nn


def build_loss(
    name: str, num_classes: int, embedding_size: int
) -> tuple[nn.Module, nn.Module | None]:
    """``(loss, miner)`` for ``name``; the miner is ``None`` for the proxy and classifier losses,
    which compare each embedding with learned class vectors instead of other embeddings.

    Settings are the library's recommended ones for unit embeddings compared by cosine
    similarity; the triplet and contrastive miners keep the informative (hard and semi-hard)
    tuples only.
    """
    from pytorch_metric_learning import losses, miners

    if name == "multi-similarity":
        return losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(
            epsilon=0.1
        )
    if name == "triplet":
        return losses.TripletMarginLoss(margin=0.1), miners.TripletMarginMiner(
            margin=0.1, type_of_triplets="semihard"
        )
    if name == "contrastive":
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0), miners.PairMarginMiner(
            pos_margin=0.2, neg_margin=0.8
        )
    if name == "proxy-anchor":
        return losses.ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32), None
    if name == "arcface":
        return losses.ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64), None
    raise ValueError(f"build_loss: unknown loss {name!r}")
