"""Retrieval metrics on held-out classes: every held-out image queries all the others.

pytorch-metric-learning's ``AccuracyCalculator`` gives P@1, R-precision and MAP@R; Recall@K
(a query counts as found when one of its K nearest neighbours has its class) is added here. The
nearest neighbours come from faiss when it is installed, else from an exact PyTorch search.
"""

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import ImageSet, batches_of_equal_size

logger = logging.getLogger(__name__)

RECALL_AT = (1, 2, 4, 8)
METRICS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    *(f"recall_at_{k}" for k in RECALL_AT),
)
METRIC_LABELS = {
    "precision_at_1": "P@1",
    "r_precision": "R-Prec",
    "mean_average_precision_at_r": "MAP@R",
    **{f"recall_at_{k}": f"R@{k}" for k in RECALL_AT},
}


def nearest_neighbours():
    """A k-nearest-neighbour search for ``AccuracyCalculator``: faiss when installed, else an
    exact search by cosine similarity in PyTorch (in blocks of queries, to bound memory)."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN, FaissKNN

    if importlib.util.find_spec("faiss") is not None:
        return FaissKNN(reset_before=True, reset_after=True)
    return CustomKNN(CosineSimilarity(), batch_size=4096)


def retrieval_calculator():
    """An ``AccuracyCalculator`` for ``METRICS``."""
    from pytorch_metric_learning.utils.accuracy_calculator import (
        AccuracyCalculator,
        try_getting_not_lone_labels,
    )

    class RetrievalAccuracy(AccuracyCalculator):
        """``AccuracyCalculator`` plus Recall@K, with enough neighbours for the largest K."""

        def requires_knn(self):
            return [*super().requires_knn(), *(f"recall_at_{k}" for k in RECALL_AT)]

        def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
            k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
            return min(max(k, max(RECALL_AT)), num_reference_embeddings - int(ref_includes_query))

        def recall_at(self, k, knn_labels, query_labels, not_lone_query_mask):
            knn_labels, query_labels = try_getting_not_lone_labels(
                knn_labels, query_labels, not_lone_query_mask
            )
            if knn_labels is None:
                return float("nan")
            hits = self.label_comparison_fn(knn_labels[:, :k], query_labels[:, None])
            return hits.any(dim=1).float().mean().item()

        def calculate_recall_at_1(self, knn_labels, query_labels, not_lone_query_mask, **_):
            return self.recall_at(1, knn_labels, query_labels, not_lone_query_mask)

        def calculate_recall_at_2(self, knn_labels, query_labels, not_lone_query_mask, **_):
            return self.recall_at(2, knn_labels, query_labels, not_lone_query_mask)

        def calculate_recall_at_4(self, knn_labels, query_labels, not_lone_query_mask, **_):
            return self.recall_at(4, knn_labels, query_labels, not_lone_query_mask)

        def calculate_recall_at_8(self, knn_labels, query_labels, not_lone_query_mask, **_):
            return self.recall_at(8, knn_labels, query_labels, not_lone_query_mask)

    return RetrievalAccuracy(
        include=METRICS,
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=nearest_neighbours(),
    )


def retrieval_metrics(embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    """``METRICS`` of ``embeddings`` ``(N, D)``, each row querying all the other rows."""
    if len(embeddings) < 2:
        raise ValueError("retrieval_metrics: need at least 2 embeddings")
    results = retrieval_calculator().get_accuracy(embeddings.float().cpu(), labels.cpu())
    return {name: float(results[name]) for name in METRICS}


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: Tensor | list[Tensor],
    device: torch.device,
    batch_size: int = 256,
    mixed_sizes: bool = False,
) -> Tensor:
    """Embeddings ``(N, D)`` on the CPU of images that may differ in size, in eval mode: in
    batches of one size, or with ``mixed_sizes`` in zero-padded batches of consecutive images
    whose sizes go to the model."""
    from .padded import padded_batches

    was_training = model.training
    model.eval()
    embeddings: list[Tensor | None] = [None] * len(images)
    batches = padded_batches if mixed_sizes else batches_of_equal_size
    try:
        for indices, batch in batches(images, batch_size):
            output = model(batch.to(device)).float().cpu()
            for index, row in zip(indices, output, strict=True):
                embeddings[index] = row
    finally:
        model.train(was_training)
    return torch.stack(embeddings)


def raw_pixel_vectors(images: Tensor | list[Tensor]) -> Tensor:
    """Each image as one unit vector of its pixels; images of different sizes are padded with
    black at the bottom and the right to the largest size, so that a digit keeps its scale."""
    if isinstance(images, Tensor):
        return F.normalize(images.flatten(1).float(), dim=1)
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    padded = [
        F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2])) for image in images
    ]
    return F.normalize(torch.stack(padded).flatten(1).float(), dim=1)


def evaluate_model(
    model: nn.Module, held_out: ImageSet, device: torch.device, mixed_sizes: bool = False
) -> dict[str, float]:
    """``METRICS`` of ``model`` on the held-out set (embedded in padded batches with
    ``mixed_sizes``)."""
    embeddings = embed_images(model, held_out.images, device, mixed_sizes=mixed_sizes)
    return retrieval_metrics(embeddings, held_out.labels)


def evaluate_raw_pixels(held_out: ImageSet) -> dict[str, float]:
    """``METRICS`` of the pixels themselves: the baseline that needs no model."""
    return retrieval_metrics(raw_pixel_vectors(held_out.images), held_out.labels)
