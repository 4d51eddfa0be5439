"""The pooling experiment: which global pooling to choose for the embedding head, measured.

Every model is the ``train`` command's: the same digit-canvas data, small CNN, head
(``EmbeddingHead`` with each pooling), loss, sampler and training loop, with fewer epochs so
that the whole experiment runs on a CPU in minutes. Four studies:

1. **Retrieval.** Each pooling, over several seeds, trained on canvases of the ``train``
   command's sizes and evaluated on the held-out digits (MAP@R, P@1, R-precision).
2. **Translation.** The same models embed one held-out digit at many horizontal places on one
   canvas (the same noise everywhere else); the cosine similarity with its embedding at the
   centre, as a curve over the shift. Raw pixels give the curve of an embedding that is not
   invariant at all.
3. **Canvas size.** Each pooling trained on small canvases only, evaluated on canvases of those
   sizes and on larger ones.
4. **Noise.** The models of study 1 evaluated on the same held-out canvases with stronger noise.

``run_experiment`` returns the results (also written as ``results.json``); the report and plots
are written by ``experiment_report``.
"""

import dataclasses
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ExperimentConfig, InputError, TrainConfig, check_experiment_config
from .data import DIGIT_SIDE, RetrievalData, load_data, training_loader
from .evaluation import METRICS, embed_images, evaluate_model, evaluate_raw_pixels
from .loop import train_one_epoch
from .losses import build_loss
from .model import EmbeddingModel
from .run import _optimiser, describe_device, new_model, no_progress, resolve_device

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"


def train_model(config: TrainConfig, data: RetrievalData, device: torch.device) -> EmbeddingModel:
    """The model that ``gmp-triton train`` builds and trains with ``config``, trained on ``data``
    by the same steps (seeding, sampler, loss, optimiser, epochs), without its evaluations and
    checkpoints."""
    np.random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = new_model(config).to(device)
    loss_fn, miner = build_loss(config.loss, len(data.train.class_names), model.embedding_size)
    loss_fn.to(device)
    optimiser = _optimiser(config, model, loss_fn)
    for _ in range(config.epochs):
        loader = training_loader(data, config, generator)
        train_one_epoch(model, loader, loss_fn, miner, optimiser, device)
    return model.eval()


# Translation ----------------------------------------------------------------------------------


def shift_positions(side: int, step: int) -> tuple[list[int], int]:
    """Left edges of the digit, ``step`` apart and symmetric around the centre, and the
    centre's index among them."""
    centre = (side - DIGIT_SIDE) // 2
    reach = min(centre, side - DIGIT_SIDE - centre) // step
    lefts = [centre + k * step for k in range(-reach, reach + 1)]
    return lefts, reach


def shifted_canvases(
    digits: torch.Tensor, side: int, lefts: list[int], noise: float, seed: int
) -> torch.Tensor:
    """``(K, P, 1, side, side)``: digit k at vertical centre and left edge ``lefts[p]``, on a
    noise field drawn once per digit, so that only the digit's place changes."""
    generator = torch.Generator().manual_seed(seed)
    top = (side - DIGIT_SIDE) // 2
    canvases = torch.empty(len(digits), len(lefts), 1, side, side)
    for k, digit in enumerate(digits):
        field_k = torch.randn(1, side, side, generator=generator) * noise
        for p, left in enumerate(lefts):
            canvas = field_k.clone()
            canvas[:, top : top + DIGIT_SIDE, left : left + DIGIT_SIDE] += digit
            canvases[k, p] = canvas.clamp_(0.0, 1.0)
    return canvases


def cosine_to_centre(embeddings: torch.Tensor, centre: int) -> list[float]:
    """Mean over digits of the cosine similarity between each place's embedding ``(K, P, D)``
    and the centre's."""
    unit = F.normalize(embeddings.float(), dim=2)
    return (unit * unit[:, centre : centre + 1]).sum(dim=2).mean(dim=0).tolist()


def held_out_digits(config: TrainConfig, per_class: int) -> torch.Tensor:
    """The first ``per_class`` bare 8x8 scans of each held-out class."""
    scans = load_data(dataclasses.replace(config, data="digits-plain")).held_out
    chosen = [
        index
        for label in range(len(scans.class_names))
        for index in (scans.labels == label).nonzero().flatten()[:per_class].tolist()
    ]
    return scans.images[chosen]


# Summaries ------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of per-seed values."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "values": [float(v) for v in array],
    }


def summarise(per_seed: list[dict[str, float]]) -> dict[str, dict]:
    """Each metric's spread over the seeds."""
    return {name: spread([metrics[name] for metrics in per_seed]) for name in per_seed[0]}


def environment(device: torch.device) -> dict:
    return {
        "device": describe_device(device),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# The experiment -------------------------------------------------------------------------------


def run_experiment(
    config: ExperimentConfig,
    device: str | torch.device | None = None,
    progress: Callable = no_progress,
) -> dict:
    """Run the four studies; returns what ``results.json`` holds.

    Args:
        config: the settings.
        device: ``"cpu"``, ``"cuda"``...; by default CUDA when available.
        progress: wraps an iterable, like ``tqdm.tqdm(iterable, total=, desc=)``.
    """
    check_experiment_config(config)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    base = config.train_config(config.pools[0], 0, config.canvas)

    data = load_data(base)
    noisy = load_data(dataclasses.replace(base, noise=config.test_noise)).held_out
    digits = held_out_digits(base, config.shift_digits_per_class)
    lefts, centre = shift_positions(config.shift_canvas, config.shift_step)
    canvases = shifted_canvases(digits, config.shift_canvas, lefts, base.noise, base.eval_seed)
    flat_canvases = canvases.flatten(0, 1)
    raw_pixels = canvases.flatten(2)

    retrieval: dict[str, list[dict]] = {pool: [] for pool in config.pools}
    noise: dict[str, list[dict]] = {pool: [] for pool in config.pools}
    curves: dict[str, list[list[float]]] = {pool: [] for pool in config.pools}
    jobs = [(pool, seed) for pool in config.pools for seed in range(config.seeds)]
    study_started = time.perf_counter()
    for pool, seed in progress(jobs, total=len(jobs), desc="retrieval, translation, noise"):
        run_started = time.perf_counter()
        model = train_model(config.train_config(pool, seed, config.canvas), data, device)
        metrics = evaluate_model(model, data.held_out, device)
        retrieval[pool].append(metrics)
        noise[pool].append(evaluate_model(model, noisy, device))
        embeddings = embed_images(model, flat_canvases, device)
        curves[pool].append(cosine_to_centre(embeddings.view(*canvases.shape[:2], -1), centre))
        logger.info(
            "%-9s seed %d: held-out MAP@R %.3f  P@1 %.3f  (%.0f s)",
            pool,
            seed,
            metrics["mean_average_precision_at_r"],
            metrics["precision_at_1"],
            time.perf_counter() - run_started,
        )
    seconds["retrieval, translation and noise"] = time.perf_counter() - study_started

    study_started = time.perf_counter()
    small_config = config.train_config(config.pools[0], 0, config.small_canvas)
    small = load_data(small_config)
    large = load_data(
        dataclasses.replace(
            small_config, canvas_min=config.large_canvas[0], canvas_max=config.large_canvas[1]
        )
    ).held_out
    sizes: dict[str, dict[str, list[dict]]] = {
        pool: {"small": [], "large": []} for pool in config.pools
    }
    for pool, seed in progress(jobs, total=len(jobs), desc="canvas size"):
        model = train_model(config.train_config(pool, seed, config.small_canvas), small, device)
        sizes[pool]["small"].append(evaluate_model(model, small.held_out, device))
        sizes[pool]["large"].append(evaluate_model(model, large, device))
        logger.info(
            "%-9s seed %d, trained on small canvases: MAP@R %.3f on small, %.3f on large",
            pool,
            seed,
            sizes[pool]["small"][-1]["mean_average_precision_at_r"],
            sizes[pool]["large"][-1]["mean_average_precision_at_r"],
        )
    seconds["canvas size"] = time.perf_counter() - study_started

    raw = {
        "canvas": evaluate_raw_pixels(data.held_out),
        "noisy": evaluate_raw_pixels(noisy),
        "small": evaluate_raw_pixels(small.held_out),
        "large": evaluate_raw_pixels(large),
    }
    unit = F.normalize(raw_pixels, dim=2)
    raw_curve = (unit * unit[:, centre : centre + 1]).sum(dim=2).mean(dim=0).tolist()
    # The digit touches the canvas's left and right edges at the first and last places.
    edges = [0, len(lefts) - 1]
    translation = {
        pool: {
            "every shift": spread([float(np.mean(run)) for run in runs]),
            "edges": spread([float(np.mean([run[i] for i in edges])) for run in runs]),
        }
        for pool, runs in curves.items()
    }
    seconds["total"] = time.perf_counter() - started

    return {
        "config": config.to_dict(),
        "environment": environment(device),
        "seconds": seconds,
        "metrics": list(METRICS),
        "train_classes": data.train.class_names,
        "held_out": {"classes": data.held_out.class_names, "images": len(data.held_out)},
        "retrieval": {pool: summarise(runs) for pool, runs in retrieval.items()},
        "noise": {pool: summarise(runs) for pool, runs in noise.items()},
        "sizes": {
            pool: {split: summarise(runs) for split, runs in by_split.items()}
            for pool, by_split in sizes.items()
        },
        "translation": {
            "shifts": [left - lefts[centre] for left in lefts],
            "canvas": config.shift_canvas,
            "digits": len(digits),
            "cosine": {
                pool: {
                    "mean": np.mean(runs, axis=0).tolist(),
                    "std": (
                        np.std(runs, axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(lefts))
                    ).tolist(),
                    "per_seed": runs,
                }
                for pool, runs in curves.items()
            },
            "raw_pixels": raw_curve,
            "summary": translation,
        },
        "raw_pixels": raw,
    }


def output_folder(out: str | Path | None) -> Path:
    """``out``, or ``runs/experiment-<date>-<time>``; refuses a folder that holds results."""
    if out is None:
        import datetime

        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"experiment-{stamp}"
    out = Path(out)
    if (out / RESULTS_NAME).exists():
        raise InputError(
            f"{str(out)!r} already holds an experiment's results; choose another --out"
        )
    return out
