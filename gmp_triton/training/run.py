"""A training run: data, model, loss and optimiser from a ``TrainConfig``, the epochs, the
checkpoints in the run folder, and the comparison with two baselines on the held-out classes.

``train`` can be stopped at any point and continued with ``resume=True`` from its last complete
epoch: each epoch ends with a checkpoint of the model, the optimiser, the loss's own parameters
and every random state, so the continued run computes what an uninterrupted one would have.
"""

import dataclasses
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed
from .config import DIGIT_DATA, InputError, TrainConfig, check_config
from .data import ImageSet, load_data, read_image, training_loader
from .evaluation import evaluate_model, evaluate_raw_pixels
from .loop import train_one_epoch
from .losses import build_loss
from .model import EmbeddingModel, build_model

logger = logging.getLogger(__name__)

RAW_PIXELS = "raw pixels"
UNTRAINED = "untrained network"
TRAINED = "trained network"


def no_progress(iterable, **_):
    return iterable


@dataclass
class RunResult:
    """What a run produced: ``results`` maps each model (``RAW_PIXELS``, ``UNTRAINED``,
    ``TRAINED``) to its held-out metrics."""

    out_dir: Path
    config: TrainConfig
    results: dict[str, dict[str, float]]
    history: list[dict]
    train_seconds: float
    held_out_classes: list[str]
    held_out_images: int
    device: str


def resolve_device(name: str | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device (try cpu, cuda or cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: training runs on cpu or cuda, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads != 1 else ''}"


def input_channels(config: TrainConfig) -> int:
    return 1 if config.data in DIGIT_DATA else 3


def new_model(
    config: TrainConfig, backbone: nn.Module | None = None, feature_channels: int | None = None
) -> EmbeddingModel:
    """The run's model, with the weights that ``config.seed`` gives."""
    if config.backbone == "custom" and backbone is None:
        raise InputError(
            "this run uses a custom backbone: pass the same module as backbone= from Python"
        )
    torch.manual_seed(config.seed)
    return build_model(
        input_channels(config),
        config.pool,
        config.embed_dim,
        config.widths,
        backbone,
        feature_channels,
        config.gem_p,
    )


def _optimiser(config: TrainConfig, model: nn.Module, loss_fn: nn.Module) -> torch.optim.Optimizer:
    groups = [{"params": list(model.parameters())}]
    loss_parameters = list(loss_fn.parameters())
    if loss_parameters:
        groups.append({"params": loss_parameters, "lr": config.lr * config.loss_lr_scale})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _check_same_run(stored: TrainConfig, config: TrainConfig) -> None:
    # An image folder may have moved: its classes (train_classes, eval_classes) must not change.
    moved = stored.data not in DIGIT_DATA and config.data not in DIGIT_DATA
    changed = [
        field.name
        for field in dataclasses.fields(TrainConfig)
        if field.name != "epochs"
        and not (field.name == "data" and moved)
        and getattr(stored, field.name) != getattr(config, field.name)
    ]
    if changed:
        raise InputError(
            f"the run being resumed was made with other settings ({', '.join(changed)}); "
            f"a resumed run keeps its settings, only --epochs, --device and (for an image folder "
            f"that moved) --data may change"
        )


def _check_not_diverged(
    epoch: int, loss: float, model: nn.Module, config: TrainConfig, checkpoint_file: Path
) -> None:
    """Stop with one line, before NaN weights are evaluated or saved, when training diverged."""
    finite = math.isfinite(loss) and all(bool(p.isfinite().all()) for p in model.parameters())
    if not finite:
        kept = (
            "the checkpoint of the last complete epoch is kept"
            if checkpoint_file.exists()
            else "no checkpoint was written"
        )
        raise InputError(
            f"training diverged in epoch {epoch}: the loss is {loss:.4g} or the weights are not "
            f"finite; try a lower --lr than {config.lr:g} ({kept})"
        )


def _warn_about_lone_held_out_images(data) -> None:
    """A held-out class of one image counts as a query with no right answer in every metric."""
    held_out = data.held_out
    counts = torch.bincount(held_out.labels, minlength=len(held_out.class_names)).tolist()
    lone = [name for name, count in zip(held_out.class_names, counts, strict=True) if count < 2]
    if lone:
        logger.warning(
            "held-out class%s %s ha%s a single image, which no other image can match: it "
            "lowers every metric",
            "es" if len(lone) > 1 else "",
            ", ".join(repr(name) for name in lone[:5]) + (" ..." if len(lone) > 5 else ""),
            "ve" if len(lone) > 1 else "s",
        )


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    backbone: nn.Module | None = None,
    feature_channels: int | None = None,
    progress: Callable = no_progress,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> RunResult:
    """Train an embedding model and compare it with the baselines on the held-out classes.

    Args:
        config: the run's settings. With ``resume=True`` they must be those of the run in
            ``out_dir``, except ``epochs``, which may grow.
        out_dir: the run folder: ``checkpoint.pt``, ``config.json`` and ``metrics.json``.
        resume: continue the run in ``out_dir`` from its last checkpoint.
        device: ``"cpu"``, ``"cuda"``...; by default CUDA when available.
        backbone: any module that maps images ``(N, C, H, W)`` to feature maps
            ``(N, feature_channels, H', W')``, used in place of the small CNN (set
            ``config.backbone = "custom"``).
        progress: wraps the iterable of batches, like ``tqdm.tqdm(iterable, total=, desc=)``.
        on_epoch_end: called with the epoch number and its log entry after its checkpoint.
    """
    check_config(config)
    # Under torchrun, one of several processes (see distributed.py); rank 0 shows progress.
    processes = distributed.current()
    if not processes.is_main:
        progress = no_progress
    if backbone is not None and config.backbone != "custom":
        raise InputError('a backbone module was passed: set config.backbone = "custom"')
    device = device if isinstance(device, torch.device) else resolve_device(device)
    out_dir = Path(out_dir)
    checkpoint_file = out_dir / ckpt.CHECKPOINT_NAME
    state = None
    if resume:
        state = ckpt.load_checkpoint(out_dir)
    elif checkpoint_file.exists():
        raise InputError(
            f"{str(out_dir)!r} already holds a run; continue it with --resume, or choose another "
            f"--out"
        )

    data = load_data(config, progress)
    _warn_about_lone_held_out_images(data)
    # Record the resolved split and path, so that `evaluate` finds the same held-out set.
    config = dataclasses.replace(
        config,
        train_classes=data.train.class_names,
        eval_classes=data.held_out.class_names,
        data=config.data
        if config.data in DIGIT_DATA
        else str(Path(config.data).expanduser().resolve()),
    )
    if state is not None:
        _check_same_run(TrainConfig.from_dict(state["config"]), config)

    np.random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = new_model(config, backbone, feature_channels).to(device)
    loss_fn, miner = build_loss(config.loss, len(data.train.class_names), model.embedding_size)
    loss_fn.to(device)
    optimiser = _optimiser(config, model, loss_fn)
    # A fresh loader every epoch: MPerClassSampler shuffles its class list in place, so a
    # long-lived one would carry state from epoch to epoch that a checkpoint does not hold.
    training_loader(data, config, generator)  # checks the data before anything is written
    # Every process learns whether the others' set-up succeeded: all go on, or all stop.
    processes.finish_setup(config, data)

    if state is None:
        if processes.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_json(out_dir / ckpt.CONFIG_NAME, config.to_dict())
        logger.info("evaluating the baselines on %d held-out images", len(data.held_out))
        baselines = {
            RAW_PIXELS: processes.on_main(evaluate_raw_pixels, data.held_out),
            UNTRAINED: processes.evaluate_model(model, data.held_out, device, config.mixed_sizes),
        }
        history: list[dict] = []
        train_seconds = 0.0
        start_epoch = 0
    else:
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimiser.load_state_dict(state["optimiser"])
        ckpt.restore_random_state(state["random"], generator)
        baselines, history = state["baselines"], state["history"]
        train_seconds, start_epoch = state["train_seconds"], state["epoch"]
        if processes.is_main:
            ckpt.write_json(out_dir / ckpt.CONFIG_NAME, config.to_dict())
        logger.info("resuming %s after epoch %d of %d", out_dir, start_epoch, config.epochs)

    def summary() -> dict:
        results = dict(baselines)
        if history:
            results[TRAINED] = history[-1]["held_out"]
        return {
            "results": results,
            "held_out": {"classes": data.held_out.class_names, "images": len(data.held_out)},
            "epochs": history,
            "train_seconds": train_seconds,
            "device": processes.describe(describe_device(device)),
        }

    # In several processes: the model in DistributedDataParallel, and each batch split.
    trainer = processes.for_training(model, loss_fn, device)
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        loader = training_loader(data, config, generator)
        batches = progress(
            processes.shard(loader), total=len(loader), desc=f"epoch {epoch + 1}/{config.epochs}"
        )
        stats = train_one_epoch(trainer, batches, loss_fn, miner, optimiser, device)
        _check_not_diverged(epoch + 1, stats.loss, model, config, checkpoint_file)
        epoch_seconds = time.perf_counter() - started
        train_seconds += epoch_seconds
        metrics = processes.evaluate_model(model, data.held_out, device, config.mixed_sizes)
        entry = {
            "epoch": epoch + 1,
            "loss": stats.loss,
            "seconds": epoch_seconds,
            "held_out": metrics,
        }
        history.append(entry)

        if processes.is_main:
            ckpt.save_checkpoint(
                checkpoint_file,
                {
                    "format": ckpt.CHECKPOINT_FORMAT,
                    "config": config.to_dict(),
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "loss": loss_fn.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "random": ckpt.random_state(generator),
                    "baselines": baselines,
                    "history": history,
                    "train_seconds": train_seconds,
                },
            )
            ckpt.write_json(out_dir / ckpt.METRICS_NAME, summary())
        logger.info(
            "epoch %d/%d  loss %.4f  held-out MAP@R %.4f  P@1 %.4f  (%.1f s)",
            epoch + 1,
            config.epochs,
            stats.loss,
            metrics["mean_average_precision_at_r"],
            metrics["precision_at_1"],
            epoch_seconds,
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, entry)

    final = summary()
    if processes.is_main:
        ckpt.write_json(out_dir / ckpt.METRICS_NAME, final)
    return RunResult(
        out_dir=out_dir,
        config=config,
        results=final["results"],
        history=history,
        train_seconds=train_seconds,
        held_out_classes=data.held_out.class_names,
        held_out_images=len(data.held_out),
        device=final["device"],
    )


def load_model(
    path: str | Path,
    device: str | torch.device | None = None,
    backbone: nn.Module | None = None,
    feature_channels: int | None = None,
) -> tuple[EmbeddingModel, TrainConfig, int]:
    """The model of a checkpoint (a file or a run folder) in eval mode, its config and the
    number of epochs it was trained for."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    state = ckpt.load_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    model = new_model(config, backbone, feature_channels)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise InputError(
            f"the weights in {str(path)!r} do not fit the model its settings describe (pool "
            f"{config.pool!r}, embed-dim {config.embed_dim}): another backbone, or a checkpoint "
            f"from before --embed-dim projected the pooled vector"
        ) from None
    return model.to(device).eval(), config, state["epoch"]


def evaluate_checkpoint(
    path: str | Path,
    device: str | torch.device | None = None,
    data: str | None = None,
    backbone: nn.Module | None = None,
    feature_channels: int | None = None,
    progress: Callable = no_progress,
) -> tuple[dict[str, float], ImageSet]:
    """Held-out metrics of a checkpoint, on its run's held-out classes (from the folder ``data``
    when given, for a data set that has moved)."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    model, config, _ = load_model(path, device, backbone, feature_channels)
    if data is not None:
        if (data in DIGIT_DATA) != (config.data in DIGIT_DATA):
            raise InputError(f"--data {data!r} does not match the run's data {config.data!r}")
        config = dataclasses.replace(config, data=data)
    held_out = load_data(config, progress).held_out
    return evaluate_model(model, held_out, device, config.mixed_sizes), held_out


def read_images_for(config: TrainConfig, paths: list[str | Path]) -> list[torch.Tensor]:
    """Decode images the way the run's data was: grey levels at any size for the digit models
    (white ink on black, as in the scans), colour resized to ``image_size`` otherwise."""
    if config.data in DIGIT_DATA:
        return [read_image(Path(path), "L", None) for path in paths]
    return [read_image(Path(path), "RGB", config.image_size) for path in paths]
