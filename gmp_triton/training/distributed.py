"""Training in several processes: ``torchrun`` starts them, ``DistributedDataParallel`` keeps
their weights equal, and the loss sees the whole batch.

Run under torchrun (``torchrun --nproc_per_node K -m gmp_triton train ...``), the command becomes
one of the processes of a group: gloo on the CPU, NCCL on CUDA, each process on the GPU of its
local rank. A step of the group computes what one process computes on the same batch:

* Every process draws the same global batch (same seeds, same sampler, same canvases) and keeps
  its own rows: of a batch of ``B`` images, process ``r`` of ``W`` embeds rows ``r * B // W`` up
  to ``(r + 1) * B // W``.
* The embeddings of all processes are gathered in rank order, which is the order of the batch,
  and every process mines and computes the loss on the whole batch. It thus holds the whole
  gradient of its own rows. ``DistributedDataParallel`` averages the weight gradients of the
  ``W`` processes, so the gathered rows pass back ``W`` times their gradient: the average is
  then the sum over the shards, the gradient of one process. The loss's own parameters (proxies,
  class centres) are in the same ``DistributedDataParallel`` module; every process computes the
  same gradient for them, which the average keeps.
* Batch norm normalises with the statistics of the whole batch: PyTorch's ``SyncBatchNorm`` on
  CUDA, and on the CPU, which ``SyncBatchNorm`` refuses, ``CpuSyncBatchNorm`` below.

pytorch-metric-learning's ``DistributedLossWrapper`` does the same gathering, but puts each
process's own rows first, so that each process sees the batch in another order; the gathering
here keeps one order, that of the single-process run.

Only rank 0 shows progress, writes the run folder and computes the held-out metrics; every
process embeds a shard of the held-out images, and rank 0 gathers them. Checkpoints hold nothing
that depends on the number of processes, so a run can continue with another number.

Errors. The set-up (options, data, checkpoint) ends with an exchange of its outcome between all
processes, before anything is written: when one process finds bad input, every process stops
with its message, which rank 0 prints. A failure later in the run ends its own process; torchrun
then stops the others.
"""

import argparse
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .config import InputError, TrainConfig
from .data import ImageSet, RetrievalData, training_batch_size
from .evaluation import embed_images, evaluate_model, retrieval_metrics

logger = logging.getLogger(__name__)


class SharedInputError(InputError):
    """Bad input found by one process of the group, raised on every process."""


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or a launcher that sets
    the same ``RANK`` and ``WORLD_SIZE`` variables)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# Whether this process has told the others how its set-up went, in the current command.
_setup_shared = False


def share_setup_outcome(error: InputError | None) -> None:
    """Tell the other processes whether the set-up of this one succeeded, and learn theirs;
    raise ``SharedInputError`` on every process when any failed, with the message of the
    lowest failing rank. Each process calls this once per run, at the end of its set-up or
    where its set-up failed, so that no process waits for one that has stopped."""
    global _setup_shared
    _setup_shared = True
    if not in_process_group():
        if error is not None:
            raise error
        return
    outcomes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if error is None else str(error))
    failed = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
    if failed:
        rank, message = failed[0]
        prefix = "" if rank == 0 else f"rank {rank} of {len(outcomes)}: "
        raise SharedInputError(prefix + message)


def worker_device(name: str | None, local_rank: int) -> torch.device:
    """The device of the process with this local rank: ``cuda:LOCAL_RANK`` for ``auto`` (where
    CUDA is available) and ``cuda``, the CPU for ``cpu``."""
    from .run import resolve_device

    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise InputError(
            f"--device {name}: under torchrun each process takes the GPU of its local rank; "
            f"give --device cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if local_rank >= torch.cuda.device_count():
        raise InputError(
            f"process of local rank {local_rank} has no GPU: this machine has "
            f"{torch.cuda.device_count()}; start at most that many processes per machine"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def _silenced(silent: bool) -> Iterator[None]:
    """Without standard output and log lines below warnings, when ``silent``."""
    if not silent:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        logging.disable(previous)


def run_as_worker(
    command: Callable[[argparse.Namespace], int],
    args: argparse.Namespace,
    report_error: Callable[[InputError], object],
    error_status: int,
) -> int:
    """Run a command of the command line; under torchrun, as one process of the group.

    The process joins the group (``args.device`` becomes its own device), runs ``command``
    with only rank 0 writing to standard output and logging, and leaves the group. When the
    set-up of any process finds bad input, every process stops with ``error_status``: rank 0
    passes the error to ``report_error`` (which prints it), and the others wait for it to have
    done so before they exit, since torchrun ends the others as soon as one exits with an error.
    """
    if not launched_by_torchrun():
        return command(args)
    global _setup_shared
    _setup_shared = False
    rank = int(os.environ["RANK"])
    device_error = None
    try:
        device = worker_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    except InputError as error:
        device, device_error = torch.device("cpu"), error
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    args.device = str(device)
    logger.debug("rank %d of %d on %s", rank, dist.get_world_size(), device)
    try:
        try:
            if device_error is not None:
                raise device_error
            with _silenced(rank != 0):
                return command(args)
        except InputError as error:
            if not (isinstance(error, SharedInputError) or _setup_shared):
                share_setup_outcome(error)  # raises SharedInputError on every process
            # After the set-up, an error of this process alone: reported by it, like any error.
            raise
    except SharedInputError as error:
        if rank == 0:
            report_error(error)
        dist.barrier()
        return error_status
    finally:
        dist.destroy_process_group()


# Gathering rows ---------------------------------------------------------------------------------


def _communication_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(rows: Tensor) -> tuple[Tensor, list[int]]:
    """The rows of every process, concatenated in rank order, and how many each process had
    (processes may hold different numbers of rows; the same other dimensions)."""
    world_size = dist.get_world_size()
    count = torch.tensor([len(rows)], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(size) for size in counts]
    # all_gather needs tensors of one shape: pad to the largest shard, then cut the padding.
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]), sizes


class _GatherRows(torch.autograd.Function):
    """Forward: the rows of all processes in rank order. Backward: this process's rows of the
    gradient, times the number of processes, for ``DistributedDataParallel`` to average."""

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:
        gathered, sizes = all_gather_rows(rows)
        rank = dist.get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        ctx.world_size = len(sizes)
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad[ctx.start : ctx.stop] * ctx.world_size


class _AllReduceSum(torch.autograd.Function):
    """The sum over the processes; each input's gradient is the sum of all the processes'
    output gradients (every process's output depends on every input)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


# Batch norm over the whole batch ----------------------------------------------------------------


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm with the statistics of the whole batch of all processes, for CPU tensors
    (PyTorch's ``SyncBatchNorm`` takes CUDA tensors only).

    In training, in a process group, each channel's mean is the all-reduced sum of every
    process's values over the all-reduced count, and its variance the all-reduced sum of
    squared deviations from that mean (two passes, which keeps the variance accurate). The
    gradients of the sums are all-reduced too, so each process's input receives the gradient
    of the whole batch's statistics. Running statistics are updated as ``BatchNorm`` does (the
    unbiased variance). Otherwise, it is plain batch norm.

    Shape:
        - Input: :math:`(N, C, *)`, statistics over every dimension but ``C``.
        - Output: same shape as the input.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"CpuSyncBatchNorm: expected at least 2 dimensions, got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and in_process_group()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        values = input.float()

        count = values.new_tensor([values.numel() // max(values.shape[1], 1)])
        sums = _AllReduceSum.apply(torch.cat([values.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        centred = values - mean.view(shape)
        variance = _AllReduceSum.apply((centred * centred).sum(dims)) / total
        output = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.weight is not None:
            output = output * self.weight.view(shape)
        if self.bias is not None:
            output = output + self.bias.view(shape)

        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                unbiased = variance * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return output.to(input.dtype)


def _with_cpu_sync_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every batch norm layer replaced by ``CpuSyncBatchNorm``, which takes over
    the same parameter and buffer tensors (an optimiser built before keeps working)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, CpuSyncBatchNorm
    ):
        synced = CpuSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        with torch.no_grad():
            synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean = module.running_mean
        synced.running_var = module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _with_cpu_sync_batch_norm(child))
    return module


def synchronise_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with its batch norm layers normalising over the whole batch of all
    processes; the parameters stay the same tensors, under the same names."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _with_cpu_sync_batch_norm(module)


# The processes of a run ------------------------------------------------------------------------


class _ModelAndLoss(nn.Module):
    """The model and the loss in one module, so that ``DistributedDataParallel`` also averages
    the gradients of the loss's parameters; the forward pass is the model's."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


class _WholeBatchEmbeddings(nn.Module):
    """Embeds this process's rows with the ``DistributedDataParallel`` module and returns the
    embeddings of the whole batch, for the miner and the loss."""

    def __init__(self, parallel: DistributedDataParallel) -> None:
        super().__init__()
        self.parallel = parallel

    def forward(self, images: Tensor) -> Tensor:
        return _GatherRows.apply(self.parallel(images))


def _take_rows(batch, rows: slice):
    if isinstance(batch, Tensor):
        return batch[rows]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple: PaddedImages
        return type(batch)(*(_take_rows(part, rows) for part in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take_rows(part, rows) for part in batch)
    return batch


@dataclass(frozen=True)
class Processes:
    """The processes that train one model: ``world_size`` of them, this one being ``rank``.
    ``Processes()`` is a single process, for which every method is the plain one-process step.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that reports progress and writes the run folder."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    def rows(self, count: int) -> slice:
        """This process's rows of ``count``: contiguous, in rank order, sizes within one."""
        start = count * self.rank // self.world_size
        return slice(start, count * (self.rank + 1) // self.world_size)

    def finish_setup(self, config: TrainConfig, data: RetrievalData) -> None:
        """End of the set-up of a run: check what only the group can check, and share the
        outcome with the other processes (see ``share_setup_outcome``)."""
        if not self.several:
            return
        batch_size = training_batch_size(config, len(data.train.class_names))
        error = None
        if batch_size < self.world_size:
            error = InputError(
                f"a batch of {batch_size} images cannot be shared by {self.world_size} "
                f"processes: give a --batch-size of at least {self.world_size}, or start fewer"
            )
        share_setup_outcome(error)

    def for_training(self, model: nn.Module, loss_fn: nn.Module, device: torch.device) -> nn.Module:
        """The module for the training loop to call on a batch: ``model`` itself in one
        process; in several, ``model`` with synchronised batch norm in
        ``DistributedDataParallel``, returning the embeddings of the whole batch."""
        if not self.several:
            return model
        synchronise_batch_norm(model, device)
        parallel = DistributedDataParallel(
            _ModelAndLoss(model, loss_fn),
            device_ids=[device.index] if device.type == "cuda" else None,
        )
        return _WholeBatchEmbeddings(parallel)

    def shard(self, batches: Iterable) -> Iterable:
        """The training batches ``(images, labels)`` as this process trains on them: its rows
        of the images, and the labels of the whole batch, which go with the whole batch's
        embeddings."""
        if not self.several:
            return batches
        return self._shards(batches)

    def _shards(self, batches: Iterable) -> Iterator:
        for images, labels in batches:
            yield _take_rows(images, self.rows(len(labels))), labels

    def on_main(self, function: Callable, *args):
        """``function(*args)``, computed by rank 0 and sent to the other processes."""
        if not self.several:
            return function(*args)
        result = [function(*args) if self.is_main else None]
        dist.broadcast_object_list(result, src=0)
        return result[0]

    def evaluate_model(
        self, model: nn.Module, held_out: ImageSet, device: torch.device, mixed_sizes: bool = False
    ) -> dict[str, float]:
        """Held-out metrics of ``model`` (``evaluation.evaluate_model``): every process embeds
        its shard of the images, rank 0 gathers the embeddings and computes the metrics, every
        process receives them."""
        if not self.several or len(held_out) < self.world_size:
            return self.on_main(evaluate_model, model, held_out, device, mixed_sizes)
        shard = held_out.images[self.rows(len(held_out))]
        mine = embed_images(model, shard, device, mixed_sizes=mixed_sizes)
        everything, _ = all_gather_rows(mine.to(_communication_device()))
        return self.on_main(retrieval_metrics, everything.cpu(), held_out.labels)

    def describe(self, device: str) -> str:
        """``device`` (a description), with the number of processes when there are several."""
        return f"{device}, {self.world_size} processes" if self.several else device


def current() -> Processes:
    """The processes of the group this process belongs to, or this one alone."""
    if in_process_group():
        return Processes(dist.get_rank(), dist.get_world_size())
    return Processes()
