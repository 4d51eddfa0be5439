"""One epoch of metric-learning training, independent of where the batches come from."""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class EpochStats:
    """What an epoch did: the mean loss and how many batches it took."""

    loss: float
    batches: int


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: nn.Module,
    miner: nn.Module | None,
    optimiser: torch.optim.Optimizer,
    device: torch.device,
) -> EpochStats:
    """Train ``model`` on each ``(images, labels)`` batch: embed, mine the informative pairs or
    triplets (when there is a miner), take a step on the loss."""
    model.train()
    loss_fn.train()
    total = torch.zeros((), device=device)
    count = 0
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)

        embeddings = model(images)
        tuples = miner(embeddings, labels) if miner is not None else None
        loss = loss_fn(embeddings, labels, tuples)

        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

        # Summed on the device: no synchronisation per batch.
        total += loss.detach()
        count += 1
    return EpochStats(loss=(total / max(count, 1)).item(), batches=count)
