"""The ``train``, ``evaluate`` and ``embed`` subcommands of ``gmp-triton``.

Building the parsers imports nothing heavy; each command imports the training code when it runs.
Bad input ends in one line on stderr and exit status 2; the library below raises ``InputError``
for it.
"""

import argparse
import contextlib
import datetime
import logging
import sys
import time
from pathlib import Path

from .config import DIGIT_DATA, LOSSES, POOLS, InputError, TrainConfig, default_of

INPUT_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130

TRAIN_DESCRIPTION = """\
Train an embedding model whose head is the fused global pooling + L2-norm layer (max pooling
by default; --pool chooses another), then show how well it retrieves images of classes it never
saw in training: every held-out image queries all the others, and the table compares the
trained model with raw pixels and with the same network untrained.

By default the data are the 1,797 handwritten digit scans bundled with scikit-learn (no
download): digits 0-4 train, 5-9 are held out, and each 8x8 digit lies at a random place on a
canvas of random size with light noise (new places every batch; a fixed seed for the held-out
set). --data PATH takes a folder with one subfolder of images per class instead.

The run folder (--out) holds checkpoint.pt, config.json and metrics.json; the checkpoint is
replaced atomically after every epoch, and --resume continues a stopped run exactly."""

TRAIN_EXAMPLES = """\
examples:
  gmp-triton train                              digits on random canvases, about a minute on a CPU
  gmp-triton train --pool avg                   the same with average pooling, to compare
  gmp-triton train --pool gem --mixed-sizes     GeM pooling, canvases of many sizes per batch
  gmp-triton train --data ~/CUB_200_2011/images --epochs 30 --embed-dim 128
  gmp-triton train --resume runs/20250101-120000 --epochs 12
  torchrun --nproc_per_node 4 -m gmp_triton train
  gmp-triton evaluate runs/20250101-120000
  gmp-triton embed runs/20250101-120000 a.png b.png --out embeddings.npy"""


def add_parsers(subcommands) -> None:
    """Register ``train``, ``evaluate``, ``embed`` and ``experiment``; each sets ``run`` to a
    function of ``args`` that returns the exit status."""
    _add_train_parser(subcommands)
    _add_evaluate_parser(subcommands)
    _add_embed_parser(subcommands)
    _add_experiment_parser(subcommands)


def _add_train_parser(subcommands) -> None:
    parser = subcommands.add_parser(
        "train",
        help="train an embedding model and evaluate it on held-out classes",
        description=TRAIN_DESCRIPTION,
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default=default_of("data"),
        metavar="DATA",
        help="'digits' (default), 'digits-plain' (the bare 8x8 scans) or a folder of class "
        "subfolders of images",
    )
    data.add_argument(
        "--train-classes",
        metavar="NAMES",
        help="comma-separated classes to train on (default: the first half of the sorted names)",
    )
    data.add_argument(
        "--eval-classes",
        metavar="NAMES",
        help="comma-separated held-out classes (default: the classes not trained on)",
    )
    data.add_argument(
        "--image-size",
        type=int,
        default=default_of("image_size"),
        metavar="PIXELS",
        help="side that folder images are resized to (default: %(default)s)",
    )
    data.add_argument(
        "--canvas-size",
        type=int,
        nargs=2,
        default=(default_of("canvas_min"), default_of("canvas_max")),
        metavar=("MIN", "MAX"),
        help="range of canvas sides for --data digits (default: 24 48)",
    )
    data.add_argument(
        "--mixed-sizes",
        action="store_true",
        help="with --data digits, give each canvas of a batch its own size: the batch is "
        "zero-padded to its largest canvas and each map is pooled over its own canvas only "
        "(default: one size per batch)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--pool",
        choices=POOLS,
        default=default_of("pool"),
        help="global pooling of the head, fused with the L2 norm: max, avg (mean), avgmax "
        "((mean + max) / 2), catavgmax (mean and max side by side: twice the channels) or gem "
        "(generalized mean) (default: %(default)s)",
    )
    model.add_argument(
        "--gem-p",
        type=float,
        default=default_of("gem_p"),
        metavar="P",
        help="initial exponent of --pool gem, learned in training (default: %(default)s)",
    )
    model.add_argument(
        "--embed-dim",
        type=int,
        metavar="D",
        help="project the pooled vector to D dimensions with a linear layer before the L2 norm "
        "(default: none; the embedding is the pooled vector, the backbone's 64 channels, 128 "
        "for catavgmax)",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--loss",
        choices=LOSSES,
        default=default_of("loss"),
        help="pytorch-metric-learning loss; multi-similarity, triplet and contrastive come with "
        "their miners (default: %(default)s)",
    )
    training.add_argument(
        "--epochs",
        type=int,
        default=default_of("epochs"),
        metavar="N",
        help="passes over the training images (default: %(default)s)",
    )
    training.add_argument(
        "--m-per-class",
        type=int,
        default=default_of("m_per_class"),
        metavar="M",
        help="images of each class in a batch; every training class needs at least M "
        "(default: %(default)s)",
    )
    training.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="images per batch, a multiple of M (default: M times the number of training "
        "classes, at most 8 classes)",
    )
    training.add_argument(
        "--lr",
        type=float,
        default=default_of("lr"),
        help="AdamW learning rate (default: %(default)s)",
    )
    training.add_argument(
        "--weight-decay",
        type=float,
        default=default_of("weight_decay"),
        metavar="WD",
        help="AdamW weight decay (default: %(default)s)",
    )
    training.add_argument(
        "--seed",
        type=int,
        default=default_of("seed"),
        help="seed of the weights, the sampler and the training canvases (default: %(default)s)",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu); on CUDA the head "
        "runs the Triton kernels",
    )
    run.add_argument("--out", metavar="DIR", help="run folder (default: runs/<date>-<time>/)")
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its last checkpoint, with its settings; only --epochs "
        "(to train longer), --device and --data (its image folder, moved) may change",
    )
    parser.set_defaults(run=_guarded(_as_torchrun_worker(run_train)))


def _add_evaluate_parser(subcommands) -> None:
    parser = subcommands.add_parser(
        "evaluate",
        help="evaluate a checkpoint on its run's held-out classes",
        description="Recompute the held-out retrieval metrics of a checkpoint written by "
        "`gmp-triton train` (P@1, R-precision, MAP@R, Recall@1/2/4/8).",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder or checkpoint file")
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="the run's image folder, if it has moved since training",
    )
    parser.add_argument("--device", default="auto", help="default: cuda when available, else cpu")
    parser.add_argument("--json", metavar="FILE", help="also write the metrics to FILE as JSON")
    parser.set_defaults(run=_guarded(run_evaluate))


def _add_embed_parser(subcommands) -> None:
    parser = subcommands.add_parser(
        "embed",
        help="embed images with a trained checkpoint",
        description="Compute the unit-length embeddings of images with a checkpoint written by "
        "`gmp-triton train`. Images are read as the run's data were: in grey at any size for "
        "digit models (white ink on black), in colour resized to the run's --image-size for "
        "folder models. Prints one line per image (its path, then the values) unless --out "
        "is given.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder or checkpoint file")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    parser.add_argument(
        "--out", metavar="FILE.npy", help="write an (images, dimensions) float32 array instead"
    )
    parser.add_argument("--device", default="auto", help="default: cuda when available, else cpu")
    parser.set_defaults(run=_guarded(run_embed))


EXPERIMENT_DESCRIPTION = """\
Compare the global poolings of the embedding head (max, avg, avgmax, catavgmax, gem) on the
digit-canvas task of `gmp-triton train`, with its data, model and training loop:

  1. retrieval on the held-out classes (MAP@R, P@1), over several seeds;
  2. translation: cosine similarity between the embeddings of one digit moved across a canvas;
  3. canvas size: trained on small canvases, evaluated on small and on larger ones;
  4. noise: the models of 1 on the held-out canvases with stronger noise.

Writes report.md (tables and findings: where max pooling loses, where it comes first),
results.json and PNG plots to --out. With the defaults it takes a few minutes on a CPU."""


def _add_experiment_parser(subcommands) -> None:
    from .config import ExperimentConfig

    defaults = ExperimentConfig()
    parser = subcommands.add_parser(
        "experiment",
        help="compare the poolings on the digit task and write a report with plots",
        description=EXPERIMENT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--pools",
        nargs="+",
        choices=POOLS,
        default=list(defaults.pools),
        help="poolings to compare (default: all)",
    )
    parser.add_argument(
        "--seeds", type=int, default=defaults.seeds, help="seeds per pooling (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help="training epochs of every model (default: %(default)s)",
    )
    for name, what in (
        ("canvas", "canvas sides of studies 1, 2 and 4"),
        ("small_canvas", "canvas sides that study 3 trains on"),
        ("large_canvas", "larger canvas sides that study 3 also evaluates on"),
    ):
        low, high = getattr(defaults, name)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            nargs=2,
            default=(low, high),
            metavar=("MIN", "MAX"),
            help=f"{what} (default: {low} {high})",
        )
    parser.add_argument(
        "--test-noise",
        type=float,
        default=defaults.test_noise,
        metavar="STD",
        help=f"noise of study 4's held-out canvases; the models train with {defaults.train.noise} "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--shift-canvas",
        type=int,
        default=defaults.shift_canvas,
        metavar="PIXELS",
        help="canvas side of the translation study (default: %(default)s)",
    )
    parser.add_argument(
        "--shift-step",
        type=int,
        default=defaults.shift_step,
        metavar="PIXELS",
        help="pixels between two places of the moved digit (default: %(default)s)",
    )
    parser.add_argument(
        "--shift-digits-per-class",
        type=int,
        default=defaults.shift_digits_per_class,
        metavar="N",
        help="held-out digits of each class moved across the canvas (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="default: cuda when available, else cpu")
    parser.add_argument(
        "--out", metavar="DIR", help="output folder (default: runs/experiment-<date>-<time>/)"
    )
    parser.set_defaults(run=_guarded(run_experiment))


def _as_torchrun_worker(command):
    """Run ``command(args)``; under torchrun, as one process of the group, with only rank 0
    printing (``distributed.run_as_worker``)."""

    def run(args: argparse.Namespace) -> int:
        from .distributed import run_as_worker

        def report(error: InputError) -> int:
            return _report_input_error(args, error)

        return run_as_worker(command, args, report, INPUT_ERROR_STATUS)

    return run


def _guarded(command):
    """Run ``command(args)``; bad input becomes one line on stderr and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            _check_dependencies()
            return command(args)
        except InputError as error:
            return _report_input_error(args, error)

    return run


def _report_input_error(args: argparse.Namespace, error: InputError) -> int:
    message = " ".join(str(error).split())  # one line, whatever the cause wrote
    print(f"gmp-triton {args.command}: error: {message}", file=sys.stderr)
    return INPUT_ERROR_STATUS


def _check_dependencies() -> None:
    missing = []
    for module, package in (
        ("pytorch_metric_learning", "pytorch-metric-learning"),
        ("sklearn", "scikit-learn"),
        ("tqdm", "tqdm"),
        ("PIL", "Pillow"),
    ):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise InputError(f"training needs {', '.join(missing)}: pip install 'gmp-triton[train]'")


class _TqdmLogHandler(logging.Handler):
    """Writes log lines above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _show_progress() -> None:
    """Show the training code's log lines (one per epoch) on stderr."""
    package_logger = logging.getLogger("gmp_triton")
    if not any(isinstance(handler, _TqdmLogHandler) for handler in package_logger.handlers):
        handler = _TqdmLogHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def _progress_bar(iterable, total=None, desc=None):
    from tqdm import tqdm

    # disable=None: no bars when stderr is not a terminal (logs, CI), only the log lines.
    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, disable=None)


def config_from_args(args: argparse.Namespace):
    """The ``TrainConfig`` that the options of ``train`` describe."""
    from .data import parse_class_list

    canvas_min, canvas_max = args.canvas_size
    return TrainConfig(
        data=args.data,
        train_classes=parse_class_list(args.train_classes),
        eval_classes=parse_class_list(args.eval_classes),
        image_size=args.image_size,
        canvas_min=canvas_min,
        canvas_max=canvas_max,
        pool=args.pool,
        gem_p=args.gem_p,
        embed_dim=args.embed_dim,
        mixed_sizes=args.mixed_sizes,
        loss=args.loss,
        epochs=args.epochs,
        m_per_class=args.m_per_class,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )


def _resumed_config(given: TrainConfig, run_dir: Path) -> TrainConfig:
    """The stored settings of the run in ``run_dir``, with ``--epochs`` when given; any other
    option set to something else than the stored value is an error, not silently ignored."""
    import dataclasses

    from .checkpoint import load_checkpoint

    checkpoint = load_checkpoint(run_dir)
    stored = TrainConfig.from_dict(checkpoint["config"])
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        value, default = getattr(given, name), getattr(defaults, name)
        if name == "epochs" or value == default:
            continue
        stored_value = getattr(stored, name)
        if name == "data" and value not in DIGIT_DATA:
            value = str(Path(value).expanduser().resolve())
        if name in ("train_classes", "eval_classes") and value is not None:
            value = sorted(value)
        if name == "data" and value not in DIGIT_DATA and stored_value not in DIGIT_DATA:
            # The run's image folder, moved: same classes (checked when the data are read).
            stored = dataclasses.replace(stored, data=value)
            continue
        if value != stored_value:
            option = "--canvas-size" if name.startswith("canvas") else f"--{name.replace('_', '-')}"
            raise InputError(
                f"{option}: the run in {str(run_dir)!r} was made with {stored_value!r}, not "
                f"{value!r}; a resumed run keeps its settings (only --epochs, --device and, for "
                f"an image folder that moved, --data may change)"
            )
    if given.epochs != defaults.epochs:
        stored = dataclasses.replace(stored, epochs=given.epochs)
    if stored.data not in DIGIT_DATA and not Path(stored.data).exists():
        raise InputError(
            f"the run's data folder {stored.data!r} does not exist; if it moved, give its new "
            f"place with --data"
        )
    done = checkpoint["epoch"]
    if stored.epochs < done:
        raise InputError(
            f"--epochs {stored.epochs}: the run in {str(run_dir)!r} has already trained {done} "
            f"epochs; --epochs is the total to reach, so give {done} or more"
        )
    return stored


def _new_run_folder() -> Path:
    """A new folder under ``runs/`` named by the time, created here so that two runs started in
    the same second cannot both take it (the second gets a suffix). Under torchrun only rank 0
    writes, so only it claims a folder."""
    from . import distributed

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    claim = distributed.current().is_main
    folder, suffix = Path("runs") / stamp, 1
    while True:
        try:
            if claim:
                folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            folder = Path("runs") / f"{stamp}-{suffix}"
            suffix += 1


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()  # only an empty folder goes


def run_train(args: argparse.Namespace) -> int:
    from .config import check_config
    from .run import train

    config = config_from_args(args)
    check_config(config)
    if args.resume is not None:
        out_dir = Path(args.resume)
        if args.out is not None and Path(args.out).resolve() != out_dir.resolve():
            raise InputError(
                "--out and --resume name different folders; --resume continues the run in place"
            )
        config = _resumed_config(config, out_dir)
    else:
        out_dir = Path(args.out) if args.out is not None else _new_run_folder()

    _show_progress()
    started = time.perf_counter()
    try:
        result = train(
            config,
            out_dir,
            resume=args.resume is not None,
            device=args.device,
            progress=_progress_bar,
        )
    except KeyboardInterrupt:
        from . import distributed
        from .checkpoint import CHECKPOINT_NAME

        if not distributed.current().is_main:
            return INTERRUPTED_STATUS  # under torchrun, rank 0 says what happened
        if (out_dir / CHECKPOINT_NAME).exists():
            print(
                f"\ninterrupted: {out_dir} keeps the checkpoint of the last complete epoch; "
                f"continue with: gmp-triton train --resume {out_dir}",
                file=sys.stderr,
            )
        else:
            print(
                "\ninterrupted before the first epoch ended: no checkpoint was written, so "
                "there is nothing to resume; run the command again to start over",
                file=sys.stderr,
            )
            if args.out is None:
                _remove_if_empty(out_dir)
        return INTERRUPTED_STATUS
    except InputError:
        if args.out is None and args.resume is None:
            _remove_if_empty(out_dir)  # the folder claimed above, if nothing was written
        raise

    print(results_table(result.results, result.held_out_classes, result.held_out_images))
    epochs = len(result.history)
    session = time.perf_counter() - started
    if args.resume is None:
        timing = f"{session:.0f} s in all with data and evaluations"
    else:
        timing = f"counting earlier sessions; this one took {session:.0f} s"
    print(
        f"\nTrained {epochs} epoch{'s' if epochs != 1 else ''} in {result.train_seconds:.0f} s "
        f"({timing}) on {result.device}.\nRun folder: {out_dir}"
    )
    return 0


def results_table(results: dict[str, dict[str, float]], classes: list[str], images: int) -> str:
    """The metrics of each model, one row each, as an aligned text table."""
    from .evaluation import METRIC_LABELS, METRICS

    shown = ", ".join(classes[:10]) + (
        f" and {len(classes) - 10} more" if len(classes) > 10 else ""
    )
    width = max(len(model) for model in results) + 2
    lines = [
        f"Held-out classes {shown}: {images} images, each querying all the others",
        "",
        " " * width + "".join(f"{METRIC_LABELS[name]:>8}" for name in METRICS),
    ]
    for model, metrics in results.items():
        lines.append(f"{model:{width}}" + "".join(f"{metrics[name]:8.3f}" for name in METRICS))
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from .run import evaluate_checkpoint, load_model

    _show_progress()
    _, _, epochs = load_model(args.checkpoint, "cpu")
    metrics, held_out = evaluate_checkpoint(
        args.checkpoint, device=args.device, data=args.data, progress=_progress_bar
    )
    name = f"checkpoint (epoch {epochs})"
    print(results_table({name: metrics}, held_out.class_names, len(held_out)))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .evaluation import embed_images
    from .run import load_model, read_images_for, resolve_device

    device = resolve_device(args.device)
    if args.out is not None and not args.out.endswith(".npy"):
        raise InputError(f"--out {args.out!r}: the embeddings are written as a .npy file")
    model, config, _ = load_model(args.checkpoint, device)
    images = read_images_for(config, args.images)
    embeddings = embed_images(model, images, device, mixed_sizes=config.mixed_sizes).numpy()
    if args.out is not None:
        np.save(args.out, embeddings.astype(np.float32))
        print(
            f"wrote {len(embeddings)} embeddings of {embeddings.shape[1]} values to {args.out}",
            file=sys.stderr,
        )
        return 0
    for path, row in zip(args.images, embeddings, strict=True):
        print(path, " ".join(f"{value:.6f}" for value in row))
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    from .config import ExperimentConfig, check_experiment_config

    config = ExperimentConfig(
        pools=tuple(dict.fromkeys(args.pools)),
        seeds=args.seeds,
        epochs=args.epochs,
        canvas=tuple(args.canvas),
        small_canvas=tuple(args.small_canvas),
        large_canvas=tuple(args.large_canvas),
        test_noise=args.test_noise,
        shift_canvas=args.shift_canvas,
        shift_step=args.shift_step,
        shift_digits_per_class=args.shift_digits_per_class,
    )
    check_experiment_config(config)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("the experiment's plots need matplotlib: pip install matplotlib") from None
    from .experiment import output_folder
    from .experiment import run_experiment as run
    from .experiment_report import summary, write_report

    out = output_folder(args.out)
    _show_progress()
    models = 2 * len(config.pools) * config.seeds
    print(f"training and evaluating {models} models; writing to {out}", file=sys.stderr)
    try:
        results = run(config, device=args.device, progress=_progress_bar)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return INTERRUPTED_STATUS
    written = write_report(results, out)
    print(summary(results))
    print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    return 0
