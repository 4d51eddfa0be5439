"""Timers, the copy-bandwidth ceiling, and memory measurements, for CUDA and for the CPU.

On CUDA, times come from ``triton.testing.do_bench``: it flushes the L2 cache before every run
and records each run with CUDA events. ``do_bench`` needs a GPU, so on the CPU the same protocol
is done here with ``time.perf_counter``: a warm-up call, then repeated runs, each after writing a
buffer larger than the last-level cache, until a minimum time has passed. Both report the
median and the 20th and 80th percentiles in milliseconds.
"""

import dataclasses
import gc
import glob
import time
from collections.abc import Callable

import numpy as np
import torch

QUANTILES = (0.5, 0.2, 0.8)
# Used when the cache sizes cannot be read (not Linux).
DEFAULT_CPU_FLUSH_BYTES = 256 * 2**20
_SIZE_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int | None  # None where the timer does not say (do_bench)


@dataclasses.dataclass(frozen=True)
class TimerSettings:
    """``warmup_ms``/``rep_ms`` go to ``do_bench`` on CUDA; on the CPU, runs repeat until
    ``cpu_min_time_s`` has passed and at least ``cpu_min_runs`` are done."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_min_time_s: float = 0.3
    cpu_min_runs: int = 5
    cpu_max_runs: int = 1000


def time_function(fn: Callable[[], object], device: str, settings: TimerSettings) -> Timing:
    if device == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(
            fn, warmup=settings.warmup_ms, rep=settings.rep_ms, quantiles=list(QUANTILES)
        )
        return Timing(median, p20, p80, None)
    return _time_cpu(fn, settings)


_flush_buffer: torch.Tensor | None = None


def cpu_flush_bytes() -> int:
    """Twice the largest CPU cache Linux reports: written before each timed CPU run so that the
    run starts with cold caches, as ``do_bench`` does on the GPU."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as file:
            text = file.read().strip()
        if text[:-1].isdigit() and text[-1] in _SIZE_UNITS:
            sizes.append(int(text[:-1]) * _SIZE_UNITS[text[-1]])
    return 2 * max(sizes) if sizes else DEFAULT_CPU_FLUSH_BYTES


def _flush_cpu_caches() -> None:
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(cpu_flush_bytes(), dtype=torch.uint8)
    _flush_buffer.fill_(1)


def _time_cpu(fn: Callable[[], object], settings: TimerSettings) -> Timing:
    fn()
    times = []
    started = time.perf_counter()
    while len(times) < settings.cpu_max_runs and (
        len(times) < settings.cpu_min_runs
        or time.perf_counter() - started < settings.cpu_min_time_s
    ):
        _flush_cpu_caches()
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    median, p20, p80 = np.quantile(times, QUANTILES)
    return Timing(float(median), float(p20), float(p80), len(times))


def copy_bandwidth(device: str, nbytes: int, settings: TimerSettings) -> tuple[float, Timing]:
    """GB/s of a device-to-device copy of ``nbytes`` (read once, written once: 2 * nbytes moved),
    the ceiling the kernels' GB/s are compared with."""
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    timing = time_function(lambda: target.copy_(source), device, settings)
    return 2 * source.nbytes / (timing.median_ms * 1e-3) / 1e9, timing


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Bytes allocated at the peak of ``fn`` beyond what was allocated before it (CUDA only: the
    CPU allocator keeps no such statistics, so None there)."""
    if device != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@dataclasses.dataclass(frozen=True)
class SavedBytes:
    """What autograd keeps from the forward pass for the backward pass."""

    total: int
    # Part of ``total`` that is the input itself (kept alive, not a new allocation).
    input: int


def saved_for_backward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> SavedBytes:
    """Bytes of the distinct storages autograd saves while ``fn(x)`` runs, found with saved-tensor
    hooks, so it works the same for eager, compiled and custom-op code."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(x)
    input_key = x.untyped_storage().data_ptr()
    return SavedBytes(sum(storages.values()), storages.get(input_key, 0))
