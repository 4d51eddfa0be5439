"""Metric learning with the fused max-pool + L2-norm head: the ``train``, ``evaluate`` and
``embed`` commands and the Python API behind them.

Example, with your own backbone (any module that returns ``(N, C, H, W)`` feature maps)::

    from gmp_triton.training import TrainConfig, train

    backbone = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 3), torch.nn.ReLU(),
                                   torch.nn.Conv2d(64, 256, 3))
    config = TrainConfig(backbone="custom", epochs=5)
    result = train(config, "runs/mine", backbone=backbone, feature_channels=256)
    result.results["trained network"]["mean_average_precision_at_r"]

The optional dependencies (pytorch-metric-learning, scikit-learn, Pillow) are imported only
when the code that needs them runs.
"""

from .config import InputError, TrainConfig
from .model import EmbeddingModel, SmallConvNet, build_head, build_model
from .run import RunResult, evaluate_checkpoint, load_model, train

__all__ = [
    "EmbeddingModel",
    "InputError",
    "RunResult",
    "SmallConvNet",
    "TrainConfig",
    "build_head",
    "build_model",
    "evaluate_checkpoint",
    "load_model",
    "train",
]
