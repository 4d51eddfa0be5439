"""Settings of a training run and of the pooling experiment, their checks, and the error raised
for bad input.

This module imports nothing heavy, so that the command line can build its parsers (choices,
defaults) before any of the training dependencies is loaded.
"""

import dataclasses
from dataclasses import dataclass, field

DIGIT_DATA = ("digits", "digits-plain")
# The poolings of gmp_triton.global_pool; all run through the package's fused kernels.
POOLS = ("max", "avg", "avgmax", "catavgmax", "gem")
LOSSES = ("multi-similarity", "triplet", "contrastive", "proxy-anchor", "arcface")
# Losses over pairs of images of a batch: they need two images of a class in it to learn.
PAIR_LOSSES = ("multi-similarity", "triplet", "contrastive")
SEED_LIMIT = 2**32  # numpy's seeds are 32-bit
BACKBONES = ("small-cnn", "custom")


class InputError(Exception):
    """Bad input from the user (data, options, files): the command prints it as one line."""


@dataclass
class TrainConfig:
    """Everything that defines a run; saved next to its checkpoint as ``config.json``.

    Args:
        data: ``"digits"`` (scikit-learn's digit scans placed on random canvases),
            ``"digits-plain"`` (the bare 8x8 scans) or the path of a folder of class subfolders.
        train_classes: names of the classes to train on; ``None`` takes the first half of the
            sorted class names (or every class not in ``eval_classes``).
        eval_classes: names of the held-out classes; ``None`` takes the classes not trained on.
        image_size: side, in pixels, that folder images are resized to.
        canvas_min, canvas_max: range of canvas sides for ``data="digits"``.
        noise: standard deviation of the Gaussian noise added to the digit canvases.
        eval_seed: seed of the held-out canvases, fixed so that runs compare on the same set.
        backbone: ``"small-cnn"``, or ``"custom"`` for a module passed from Python.
        widths: output channels of the small CNN's convolutions.
        pool: the global pooling of the head, one of ``POOLS`` (``gmp_triton.EmbeddingHead``).
        gem_p: initial exponent of GeM pooling (``pool="gem"``), learned with the weights.
        embed_dim: size of the optional ``Linear`` projection of the pooled vector, before the
            norm; ``None`` for none (the embedding is then the pooled vector).
        mixed_sizes: for ``data="digits"``, each training batch holds canvases of different
            sizes, zero-padded to the largest and pooled with their sizes (``pad_maps``); the
            held-out set is embedded in padded batches as well. Otherwise each training batch
            has one canvas size.
        loss: one of ``LOSSES``, from pytorch-metric-learning.
        epochs: passes over the training images.
        m_per_class: images of each class in a batch (``MPerClassSampler``'s ``m``).
        batch_size: images per batch; ``None`` takes ``m_per_class`` times the number of
            training classes, at most 8 classes.
        lr, weight_decay: AdamW settings of the model; trainable loss parameters (proxies,
            class centres) learn ``loss_lr_scale`` times faster, as proxy losses need.
        seed: seed of the weights, the sampler and the training placements.
    """

    data: str = "digits"
    train_classes: list[str] | None = None
    eval_classes: list[str] | None = None
    image_size: int = 64
    canvas_min: int = 24
    canvas_max: int = 48
    noise: float = 0.05
    eval_seed: int = 0
    backbone: str = "small-cnn"
    widths: tuple[int, ...] = (32, 64)
    pool: str = "max"
    gem_p: float = 3.0
    embed_dim: int | None = None
    mixed_sizes: bool = False
    loss: str = "multi-similarity"
    epochs: int = 10
    m_per_class: int = 16
    batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 5e-3
    loss_lr_scale: float = 100.0
    seed: int = 0

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["widths"] = list(self.widths)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown settings in the run's config: {', '.join(unknown)}")
        config = cls(**values)
        config.widths = tuple(config.widths)
        return config


def default_of(name: str):
    """The default value of a ``TrainConfig`` field (the command line shows the same ones)."""
    return next(field.default for field in dataclasses.fields(TrainConfig) if field.name == name)


def check_config(config: TrainConfig) -> None:
    """Raise ``InputError`` naming the first setting that cannot work."""

    def positive_int(name: str, value) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")

    def positive_float(name: str, value) -> None:
        if not 0 < value < float("inf"):
            raise InputError(f"--{name.replace('_', '-')} must be positive and finite, got {value}")

    if config.embed_dim is not None:
        positive_int("embed_dim", config.embed_dim)
    for name in ("epochs", "m_per_class", "image_size", "canvas_min", "canvas_max"):
        positive_int(name, getattr(config, name))
    if config.batch_size is not None:
        positive_int("batch_size", config.batch_size)
        if config.batch_size % config.m_per_class:
            raise InputError(
                f"--batch-size {config.batch_size} is not a multiple of --m-per-class "
                f"{config.m_per_class}: each batch holds m images of each of its classes"
            )
    if config.m_per_class < 2 and config.loss in PAIR_LOSSES:
        raise InputError(
            f"--m-per-class {config.m_per_class} with --loss {config.loss}: a batch needs at "
            f"least 2 images of a class for a positive pair, so nothing would be learned"
        )
    if not isinstance(config.seed, int) or not 0 <= config.seed < SEED_LIMIT:
        raise InputError(f"--seed must be an integer from 0 to 2**32 - 1, got {config.seed}")
    positive_float("lr", config.lr)
    if not 0 <= config.weight_decay < float("inf"):
        raise InputError(f"--weight-decay must be 0 or more and finite, got {config.weight_decay}")
    if config.noise < 0:
        raise InputError(f"--noise must be 0 or more, got {config.noise}")
    if config.canvas_min < 8 or config.canvas_min > config.canvas_max:
        raise InputError(
            f"--canvas-size {config.canvas_min} {config.canvas_max}: need 8 <= MIN <= MAX, "
            f"as the digits are 8x8"
        )
    if config.pool not in POOLS:
        raise InputError(f"--pool must be one of {', '.join(POOLS)}, got {config.pool!r}")
    if not 0 < config.gem_p < float("inf"):
        raise InputError(f"--gem-p must be a positive finite number, got {config.gem_p}")
    if config.pool != "gem" and config.gem_p != TrainConfig.gem_p:
        raise InputError(f"--gem-p sets GeM's exponent: it needs --pool gem, not {config.pool}")
    if config.mixed_sizes and config.data != "digits":
        raise InputError(
            f"--mixed-sizes needs --data digits (canvases of random sizes); the images of "
            f"{config.data!r} all have one size"
        )
    if config.loss not in LOSSES:
        raise InputError(f"--loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    if config.backbone not in BACKBONES:
        raise InputError(f"backbone must be one of {', '.join(BACKBONES)}, got {config.backbone!r}")
    if len(config.widths) == 0:
        raise InputError("widths must hold at least one channel count")
    for width in config.widths:
        positive_int("widths", width)


@dataclass
class ExperimentConfig:
    """Settings of the pooling experiment (``gmp-triton experiment``).

    Args:
        pools: the poolings compared.
        seeds: seeds 0 .. seeds-1 of each model (weights, sampler, training canvases).
        epochs: training epochs of every model.
        canvas: canvas sides of the retrieval, translation and noise studies (the ``train``
            command's default range).
        small_canvas: the sides the canvas-size study trains on.
        large_canvas: the larger sides it also evaluates on.
        test_noise: noise of the noise study's held-out canvases (training uses
            ``TrainConfig.noise``).
        shift_canvas: side of the translation study's canvas.
        shift_step: pixels between two places of the digit.
        shift_digits_per_class: held-out digits of each class moved across the canvas.
        train: every other setting of the models (loss, widths, noise, batches...).
    """

    pools: tuple[str, ...] = POOLS
    seeds: int = 3
    epochs: int = 5
    canvas: tuple[int, int] = (24, 48)
    small_canvas: tuple[int, int] = (16, 24)
    large_canvas: tuple[int, int] = (40, 64)
    test_noise: float = 0.2
    shift_canvas: int = 48
    shift_step: int = 2
    shift_digits_per_class: int = 10
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["train"] = self.train.to_dict()
        return values

    def train_config(self, pool: str, seed: int, canvas: tuple[int, int]) -> TrainConfig:
        return dataclasses.replace(
            self.train,
            pool=pool,
            seed=seed,
            epochs=self.epochs,
            canvas_min=canvas[0],
            canvas_max=canvas[1],
        )


def check_experiment_config(config: ExperimentConfig) -> None:
    """Raise ``InputError`` naming the first setting that cannot work."""
    unknown = [pool for pool in config.pools if pool not in POOLS]
    if unknown or not config.pools:
        raise InputError(
            f"--pools must name some of {', '.join(POOLS)}, got {', '.join(config.pools) or 'none'}"
        )
    for name in ("seeds", "epochs", "shift_step", "shift_digits_per_class"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for name in ("canvas", "small_canvas", "large_canvas"):
        low, high = getattr(config, name)
        if not 8 <= low <= high:
            raise InputError(
                f"--{name.replace('_', '-')} {low} {high}: need 8 <= MIN <= MAX, as the digits "
                f"are 8x8"
            )
    if config.shift_canvas < 8 + 2 * config.shift_step:
        raise InputError(
            f"--shift-canvas {config.shift_canvas} leaves no room to move an 8-pixel digit by "
            f"{config.shift_step} pixels each way"
        )
    if not config.test_noise >= 0:
        raise InputError(f"--test-noise must be 0 or more, got {config.test_noise}")
    check_config(config.train_config(config.pools[0], 0, config.canvas))
