"""The benchmark harness: time every implementation on every case, forward, backward and both.

For each case (map, dtype, layout) and implementation it records the median and 20th/80th
percentile times of each mode, the achieved GB/s under the ideal byte model of ``cases`` and its
fraction of the copy bandwidth measured in the same run, the peak memory of a forward+backward
step (CUDA only) and the bytes autograd keeps for backward.

Timed functions, with ``x`` requiring grad and ``g`` a fixed output gradient:

* forward: ``f(x)``, recording the autograd graph as in training;
* backward: ``torch.autograd.grad(out, x, g, retain_graph=True)`` on one recorded forward;
* forward+backward: ``torch.autograd.grad(f(x), x, g)``.

Padded batches of maps of different sizes are timed against loops over the maps by ``padded``;
their rows are the run's ``"padded"`` list.
"""

import contextlib
import dataclasses
import datetime
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch._dynamo.config
import torch._functorch.config

from .. import _backend
from . import measure, padded
from .cases import MODES, Case, dtype_name, ideal_bytes
from .providers import PROVIDERS

logger = logging.getLogger(__name__)

# Big enough that the copy runs at full speed and does not fit in any cache.
COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}
REFERENCE_PROVIDER = "eager_adaptive"


@dataclasses.dataclass
class BenchConfig:
    device: str
    cases: Sequence[Case]
    providers: Sequence[str] = tuple(PROVIDERS)
    modes: Sequence[str] = MODES
    compile_mode: str = "dynamic"  # "static", "dynamic" (see providers)
    timer: measure.TimerSettings = dataclasses.field(default_factory=measure.TimerSettings)
    time_budget_s: float | None = None
    copy_bytes: int | None = None
    padded_cases: Sequence[padded.PaddedCase] = ()


def cpu_model() -> str:
    """The CPU's model name as Linux reports it, or what ``platform`` knows elsewhere."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe_environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    environment = {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        environment |= {
            "gpu": properties.name,
            "compute_capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return environment


def device_label(environment: dict) -> str:
    """One line naming the machine that produced the numbers."""
    if environment["device"] == "cuda":
        return (
            f"GPU: {environment['gpu']} (compute capability {environment['compute_capability']}, "
            f"{environment['multiprocessors']} SMs), CUDA {environment['cuda']}"
        )
    return (
        f"CPU: {environment['cpu']}, {environment['cpu_cores']} cores "
        f"({environment['torch_threads']} PyTorch threads); no GPU was used"
    )


@contextlib.contextmanager
def measurement_context(device: str) -> Iterator[None]:
    """Settings every measurement runs under (also used by the pytest-benchmark suites)."""
    with contextlib.ExitStack() as stack:
        if device == "cpu":
            # The CPU numbers are for the PyTorch path a CPU tensor runs in normal use, also when
            # the process was started with TRITON_INTERPRET=1 (as the tests are).
            stack.enter_context(_backend.cpu_backend("torch"))
        # Timing the backward alone runs one graph backward many times, which compiled graphs
        # with donated buffers refuse; donating only saves the (N, C) temporaries' memory.
        stack.enter_context(torch._functorch.config.patch(donated_buffer=False))
        # One compiled graph per dtype, layout and specialised size must not hit the recompile
        # limit, past which torch.compile silently falls back to eager.
        stack.enter_context(torch._dynamo.config.patch(recompile_limit=256))
        yield


def _mode_functions(
    function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor
) -> dict[str, Callable[[], object]]:
    out = function(x)
    return {
        "forward": lambda: function(x),
        "backward": lambda: torch.autograd.grad(out, x, grad, retain_graph=True),
        "forward+backward": lambda: torch.autograd.grad(function(x), x, grad),
    }


def _measure_provider(
    config: BenchConfig,
    case: Case,
    function: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    reference: torch.Tensor,
    copy_gbps: float,
) -> list[dict]:
    out = function(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    max_difference = (out.detach().double() - reference.double()).abs().max().item()
    functions = _mode_functions(function, x, grad)
    peak = measure.peak_memory_bytes(functions["forward+backward"], config.device)
    saved = measure.saved_for_backward(function, x)
    rows = []
    for mode in config.modes:
        timing = measure.time_function(functions[mode], config.device, config.timer)
        moved = ideal_bytes(case, mode)
        gbps = moved / (timing.median_ms * 1e-3) / 1e9
        rows.append(
            {
                "mode": mode,
                "median_ms": timing.median_ms,
                "p20_ms": timing.p20_ms,
                "p80_ms": timing.p80_ms,
                "runs": timing.runs,
                "ideal_bytes": moved,
                "gbps": gbps,
                "fraction_of_copy": gbps / copy_gbps,
                "peak_memory_bytes": peak,
                "saved_bytes": saved.total,
                "saved_input_bytes": saved.input,
                "max_abs_difference": max_difference,
            }
        )
    return rows


def run_benchmarks(config: BenchConfig, on_progress: Callable[[str], None] | None = None) -> dict:
    """Measure every case and implementation; returns the content of ``results.json``."""
    started = time.monotonic()
    environment = describe_environment(config.device)
    results, skipped = [], []
    with measurement_context(config.device):
        copy_bytes = config.copy_bytes or COPY_BYTES[config.device]
        copy_gbps, copy_timing = measure.copy_bandwidth(config.device, copy_bytes, config.timer)
        logger.info("copy bandwidth %.1f GB/s", copy_gbps)
        built = {name: PROVIDERS[name].build(config.compile_mode) for name in config.providers}

        for case in config.cases:
            if (
                config.time_budget_s is not None
                and time.monotonic() - started > config.time_budget_s
            ):
                skipped.append({"case": case.label(), "reason": "time budget spent"})
                for name in config.providers:
                    if on_progress:
                        on_progress(f"skipped {case.label()} {name}")
                continue
            x = case.make_input(config.device)
            with torch.no_grad():
                reference = PROVIDERS[REFERENCE_PROVIDER].function(x)
            for name in config.providers:
                base = {
                    "case": case.label(),
                    "shape_name": case.shape.name,
                    "size": list(case.shape.size),
                    "dtype": dtype_name(case.dtype),
                    "layout": case.layout,
                    "provider": name,
                }
                try:
                    rows = _measure_provider(config, case, built[name], x, reference, copy_gbps)
                    results.extend(base | row for row in rows)
                except Exception as error:  # one failing implementation must not end the run
                    logger.warning("%s on %s failed: %s", name, case.label(), error)
                    results.append(
                        base | {"mode": None, "error": f"{type(error).__name__}: {error}"}
                    )
                if on_progress:
                    on_progress(f"{case.label()} {name}")
            del x, reference
            if config.compile_mode == "static":
                # Static graphs are never reused by another case; drop them to free memory.
                torch._dynamo.reset()

        padded_rows = []
        for case in config.padded_cases:
            if (
                config.time_budget_s is not None
                and time.monotonic() - started > config.time_budget_s
            ):
                skipped.append({"case": case.label(), "reason": "time budget spent"})
            else:
                padded_rows += padded.measure_padded_case(
                    case, config.device, config.timer, config.modes
                )
            if on_progress:
                on_progress(case.label())

    return {
        "environment": environment,
        "settings": {
            "compile_mode": config.compile_mode,
            "timer": dataclasses.asdict(config.timer),
            "time_budget_s": config.time_budget_s,
            "providers": {name: PROVIDERS[name].description for name in config.providers},
            "padded_implementations": dict(padded.IMPLEMENTATIONS),
            "modes": list(config.modes),
            "cpu_flush_bytes": measure.cpu_flush_bytes() if config.device == "cpu" else None,
        },
        "copy": {
            "bytes": copy_bytes,
            "gbps": copy_gbps,
            "median_ms": copy_timing.median_ms,
            "p20_ms": copy_timing.p20_ms,
            "p80_ms": copy_timing.p80_ms,
        },
        "results": results,
        "padded": padded_rows,
        "skipped": skipped,
        "elapsed_s": time.monotonic() - started,
    }
