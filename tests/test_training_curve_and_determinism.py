"""The layer inside a real training loop, and the determinism of its backward pass."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS

import gmp_triton
from gmp_triton import _backend


class SmallCNN(torch.nn.Module):
    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(),
        )
        self.head = head

    def forward(self, x):
        return self.head(self.features(x))


class ReferenceHead(torch.nn.Module):
    def forward(self, x):
        return F.normalize(F.adaptive_max_pool2d(x, 1).flatten(1), dim=1, eps=1e-12)


def _loss_curve(head: torch.nn.Module, steps: int = 8) -> list[float]:
    torch.manual_seed(0)
    model = SmallCNN(head)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 1, 12, 10, generator=generator)
    labels = torch.arange(16) % 4
    losses = []
    for _ in range(steps):
        embeddings = model(images)
        # A contrastive objective: pull same-label embeddings together, push the rest apart.
        similarity = embeddings @ embeddings.T
        same = (labels[:, None] == labels[None, :]).float()
        loss = ((similarity - same) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_small_cnn_follows_the_reference_loss_curve(backend):
    with _backend.cpu_backend(backend):
        ours = _loss_curve(gmp_triton.GMPL2Norm())
    reference = _loss_curve(ReferenceHead())
    assert reference[-1] < reference[0], "the reference run did not learn; the test is void"
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(reference), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_is_deterministic_without_warnings(backend):
    x = torch.relu(torch.randn(4, 6, 9, 7, generator=torch.Generator().manual_seed(3)))
    grads = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings(), _backend.cpu_backend(backend):
            warnings.simplefilter("error")
            for _ in range(2):
                leaf = x.clone().requires_grad_(True)
                gmp_triton.gmp_l2norm(leaf).sum().backward()
                grads.append(leaf.grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0], grads[1])
    # Each channel sends its whole gradient to exactly one position, even with ReLU ties.
    assert (torch.count_nonzero(grads[0].flatten(2), dim=2) <= 1).all()
