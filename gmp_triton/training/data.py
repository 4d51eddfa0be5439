"""Data: the digit scans bundled with scikit-learn or a folder of class subfolders, split by
class into a training set and a held-out set, and the batches the training loop reads.

Every image is a float tensor ``(C, H, W)`` with values in [0, 1]. Held-out images may differ in
size: the pooling head takes any size, and ``batches_of_equal_size`` groups them for the
forward pass. Training batches have one size per batch, or with ``mixed_sizes`` one size per
image, padded into one batch (``padded.py``).
"""

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import DIGIT_DATA, InputError, TrainConfig

logger = logging.getLogger(__name__)

DIGIT_SIDE = 8
# load_digits stores ink as integers from 0 to 16.
DIGIT_MAX = 16.0


@dataclass
class ImageSet:
    """Images of some classes: ``images[i]`` is ``(C, H, W)`` in [0, 1] with class
    ``class_names[labels[i]]``. ``images`` is one tensor when all sizes agree, else a list."""

    images: Tensor | list[Tensor]
    labels: Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RetrievalData:
    """A training set, a held-out set of other classes, and how the training batches are built."""

    train: ImageSet
    held_out: ImageSet
    channels: int
    # Turns a list of (image, label) pairs into a batch; seeded through ``generator``.
    make_collate: Callable[[torch.Generator], Callable]


def parse_class_list(text: str | None) -> list[str] | None:
    """``"a,b,c"`` -> ``["a", "b", "c"]``; ``None`` stays ``None``."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not any(names):
        raise InputError(f"empty class list {text!r}: give class names separated by commas")
    if not all(names):
        raise InputError(f"class list {text!r} has an empty name between its commas")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"class list {text!r} names {', '.join(map(repr, repeated))} twice")
    return names


def split_classes(
    class_names: Sequence[str], train: list[str] | None, held_out: list[str] | None, source: str
) -> tuple[list[str], list[str]]:
    """Choose training and held-out classes: by default the first half of the sorted names
    trains and the second half is held out; either half can be named instead."""
    names = sorted(class_names)
    if len(names) == 1:
        raise InputError(
            f"{source} holds a single class ({names[0]!r}); metric learning needs at least 2 "
            f"classes to train on and 2 other classes to evaluate on"
        )
    for option, chosen in (("--train-classes", train), ("--eval-classes", held_out)):
        unknown = [name for name in chosen or () if name not in names]
        if unknown:
            raise InputError(
                f"{option}: no class {', '.join(map(repr, unknown))} in {source} "
                f"(classes: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})"
            )
    if train is None and held_out is None:
        train = names[: len(names) // 2]
    if train is None:
        train = [name for name in names if name not in held_out]
    if held_out is None:
        held_out = [name for name in names if name not in train]
    both = sorted(set(train) & set(held_out))
    if both:
        raise InputError(
            f"classes {', '.join(map(repr, both))} are both trained on and held out; the held-out "
            f"classes must be unseen in training"
        )
    for what, chosen in (("training", train), ("held-out", held_out)):
        if len(chosen) < 2:
            raise InputError(
                f"{len(chosen)} {what} class{'es' if len(chosen) != 1 else ''} in {source} "
                f"({', '.join(chosen) or 'none'}); need at least 2 training and 2 held-out "
                f"classes ({len(names)} classes in all)"
            )
    return sorted(train), sorted(held_out)


# Digits -----------------------------------------------------------------------------------------


def place_on_canvases(
    digits: Tensor, sides: Sequence[int], noise: float, generator: torch.Generator
) -> list[Tensor]:
    """Put each ``(1, 8, 8)`` digit at a random position of a black canvas of side ``sides[i]``
    and add Gaussian noise; returns ``(1, side, side)`` tensors clipped to [0, 1]."""
    canvases = []
    for digit, side in zip(digits, sides, strict=True):
        canvas = torch.randn(1, side, side, generator=generator) * noise
        top, left = torch.randint(0, side - DIGIT_SIDE + 1, (2,), generator=generator).tolist()
        canvas[:, top : top + DIGIT_SIDE, left : left + DIGIT_SIDE] += digit
        canvases.append(canvas.clamp_(0.0, 1.0))
    return canvases


class RandomCanvasBatch:
    """Collate function that places a batch of digits on canvases of one random side, drawn
    afresh for every batch, so each epoch sees new sizes and positions."""

    def __init__(self, canvas_min: int, canvas_max: int, noise: float, generator: torch.Generator):
        self.canvas_min, self.canvas_max, self.noise = canvas_min, canvas_max, noise
        self.generator = generator

    def __call__(self, samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
        digits = torch.stack([digit for digit, _ in samples])
        labels = torch.tensor([label for _, label in samples])
        side = int(
            torch.randint(self.canvas_min, self.canvas_max + 1, (1,), generator=self.generator)
        )
        canvases = place_on_canvases(digits, [side] * len(samples), self.noise, self.generator)
        return torch.stack(canvases), labels


def stack_batch(samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """Collate function for images that already share one size."""
    return torch.stack([image for image, _ in samples]), torch.tensor(
        [label for _, label in samples]
    )


def load_digits_data(config: TrainConfig) -> RetrievalData:
    """scikit-learn's 1,797 digit scans (bundled, no download), split by class. For
    ``data="digits"`` the held-out digits lie on canvases fixed by ``config.eval_seed``."""
    from sklearn.datasets import load_digits

    scans = load_digits()
    images = torch.from_numpy(scans.images).float().div_(DIGIT_MAX).unsqueeze(1)
    labels = torch.from_numpy(scans.target).long()
    class_names = [str(digit) for digit in range(10)]
    train_names, held_out_names = split_classes(
        class_names, config.train_classes, config.eval_classes, "the digits data"
    )
    train = subset(ImageSet(images, labels, class_names), train_names)
    held_out = subset(ImageSet(images, labels, class_names), held_out_names)

    if config.data == "digits-plain":
        return RetrievalData(train, held_out, channels=1, make_collate=lambda _: stack_batch)

    generator = torch.Generator().manual_seed(config.eval_seed)
    sides = torch.randint(
        config.canvas_min, config.canvas_max + 1, (len(held_out),), generator=generator
    )
    held_out.images = place_on_canvases(held_out.images, sides.tolist(), config.noise, generator)

    def make_collate(generator: torch.Generator) -> Callable:
        if config.mixed_sizes:
            # Imported here: the padded-batch module builds on this one.
            from .padded import MixedCanvasBatch

            return MixedCanvasBatch(config.canvas_min, config.canvas_max, config.noise, generator)
        return RandomCanvasBatch(config.canvas_min, config.canvas_max, config.noise, generator)

    return RetrievalData(train, held_out, channels=1, make_collate=make_collate)


def subset(images: ImageSet, names: list[str]) -> ImageSet:
    """The images of the classes ``names``, relabelled 0..len(names)-1 in that order."""
    new_label = torch.full((len(images.class_names),), -1, dtype=torch.long)
    for index, name in enumerate(names):
        new_label[images.class_names.index(name)] = index
    labels = new_label[images.labels]
    keep = (labels >= 0).nonzero().flatten()
    if isinstance(images.images, Tensor):
        kept = images.images[keep]
    else:
        kept = [images.images[i] for i in keep.tolist()]
    return ImageSet(kept, labels[keep], list(names))


# Image folders ----------------------------------------------------------------------------------


def image_extensions() -> set[str]:
    from PIL import Image

    return {extension.lower() for extension in Image.registered_extensions()}


def scan_image_folder(root: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files, for a folder with one subfolder of images per class."""
    if not root.exists():
        raise InputError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise InputError(f"--data {str(root)!r} is not a folder (or 'digits', 'digits-plain')")
    extensions = image_extensions()
    classes: dict[str, list[Path]] = {}
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        files = sorted(
            path
            for path in folder.iterdir()
            if path.is_file()
            and not path.name.startswith(".")
            and path.suffix.lower() in extensions
        )
        if not files:
            raise InputError(
                f"class folder {str(folder)!r} holds no images (looked for "
                f"{', '.join(sorted(e for e in extensions if e in ('.png', '.jpg', '.jpeg')))} "
                f"and the other types Pillow reads)"
            )
        classes[folder.name] = files
    if not classes:
        raise InputError(
            f"data folder {str(root)!r} holds no class subfolders; expected one subfolder of "
            f"images per class (the CUB-200 / Cars196 layout)"
        )
    return classes


def read_image(path: Path, mode: str, size: int | None) -> Tensor:
    """Decode one image with Pillow into a ``(C, H, W)`` float tensor in [0, 1]; ``mode`` is
    ``"L"`` or ``"RGB"``; ``size`` resizes it to ``size x size``."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if size is not None:
                # Lets JPEG decode at a reduced scale close to the target: much faster.
                image.draft(mode, (size, size))
            image = image.convert(mode)
            if size is not None:
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"cannot read image {str(path)!r}: {error}") from None
    tensor = torch.from_numpy(pixels.copy())
    tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return tensor.float().div_(255.0)


def load_folder_data(
    config: TrainConfig, progress: Callable = lambda iterable, **_: iterable
) -> RetrievalData:
    """Decode the chosen classes of an image folder, resized to ``config.image_size``."""
    root = Path(config.data).expanduser()
    files = scan_image_folder(root)
    train_names, held_out_names = split_classes(
        list(files), config.train_classes, config.eval_classes, f"data folder {str(root)!r}"
    )
    for name in train_names:
        check_class_size(name, len(files[name]), config.m_per_class)
    sets = []
    for names, what in ((train_names, "training"), (held_out_names, "held-out")):
        paths = [(path, label) for label, name in enumerate(names) for path in files[name]]
        bar = progress(paths, total=len(paths), desc=f"reading {what} images")
        try:
            images = [read_image(path, "RGB", config.image_size) for path, _ in bar]
        finally:
            # Clear a progress bar before an error is reported below it.
            getattr(bar, "close", lambda: None)()
        labels = torch.tensor([label for _, label in paths])
        sets.append(ImageSet(torch.stack(images), labels, names))
    logger.info(
        "%s: %d training images of %d classes, %d held-out images of %d classes",
        root,
        len(sets[0]),
        len(train_names),
        len(sets[1]),
        len(held_out_names),
    )
    return RetrievalData(sets[0], sets[1], channels=3, make_collate=lambda _: stack_batch)


def load_data(
    config: TrainConfig, progress: Callable = lambda iterable, **_: iterable
) -> RetrievalData:
    """The run's training and held-out sets."""
    if config.data in DIGIT_DATA:
        return load_digits_data(config)
    return load_folder_data(config, progress)


def check_class_size(name: str, count: int, m_per_class: int) -> None:
    """MPerClassSampler would repeat the images of a class smaller than m: refuse instead."""
    if count < m_per_class:
        raise InputError(
            f"class {name!r} has {count} images, fewer than the {m_per_class} that each batch "
            f"takes from a class (--m-per-class); lower --m-per-class or add images"
        )


def check_enough_per_class(train: ImageSet, m_per_class: int) -> None:
    counts = torch.bincount(train.labels, minlength=len(train.class_names))
    for name, count in zip(train.class_names, counts.tolist(), strict=True):
        check_class_size(name, count, m_per_class)


class IndexedImages(torch.utils.data.Dataset):
    """``(image, label)`` pairs of an ``ImageSet``, for a ``DataLoader``."""

    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images.images[index], int(self.images.labels[index])


def training_batch_size(config: TrainConfig, num_classes: int) -> int:
    """``config.batch_size``, or m images of each of up to 8 classes."""
    if config.batch_size is not None:
        if config.batch_size > config.m_per_class * num_classes:
            raise InputError(
                f"--batch-size {config.batch_size} needs {config.batch_size // config.m_per_class} "
                f"classes of --m-per-class {config.m_per_class} images, but there are "
                f"{num_classes} training classes"
            )
        return config.batch_size
    return config.m_per_class * min(num_classes, 8)


def training_loader(
    data: RetrievalData, config: TrainConfig, generator: torch.Generator
) -> torch.utils.data.DataLoader:
    """Batches of m images from each of batch_size / m classes (pytorch-metric-learning's
    ``MPerClassSampler``); an epoch is about one pass over the training images.

    The sampler draws from numpy's global random state (pytorch-metric-learning's choice), so a
    run seeds that state and saves it in its checkpoints."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    check_enough_per_class(data.train, config.m_per_class)
    batch_size = training_batch_size(config, len(data.train.class_names))
    per_epoch = max(batch_size, len(data.train) - len(data.train) % batch_size)
    sampler = MPerClassSampler(
        data.train.labels,
        config.m_per_class,
        batch_size=batch_size,
        length_before_new_iter=per_epoch,
    )
    return torch.utils.data.DataLoader(
        IndexedImages(data.train),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=data.make_collate(generator),
        drop_last=True,
    )


def batches_of_equal_size(
    images: Tensor | list[Tensor], batch_size: int
) -> Iterator[tuple[list[int], Tensor]]:
    """Yield ``(indices, batch)`` where each batch stacks images of one size, so that a set of
    images of many sizes goes through the network without padding."""
    if isinstance(images, Tensor):
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            yield list(range(start, stop)), images[start:stop]
        return
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            yield chunk, torch.stack([images[i] for i in chunk])
