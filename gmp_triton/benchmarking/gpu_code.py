"""The GPU-code gate: compile every kernel variant for real GPUs, on a machine without one.

Which variants exist is not guessed: the real launchers in ``gmp_triton.launch`` are called on
``meta`` tensors (sizes and strides, no memory) with the kernels swapped for recorders, and with
the multiprocessor count of a reference GPU of each architecture, so the block sizes, splits,
warps and ``INDEX_64`` choices are exactly those a launch on that GPU would make (the forward
launcher also with per-sample sizes and with a mask, where it takes them). The recorded arguments
are then specialised by Triton's own function for it (an integer equal to 1 becomes a constant,
integers divisible by 16 and 16-byte aligned pointers get a divisibility hint) and packed by the
JIT's own code, so a variant compiles under the JIT's own cache key. Meta tensors report
address 0, so every pointer counts as aligned, as a fresh CUDA allocation is.

Each distinct variant is compiled ahead of time through ``triton.compile`` for ``sm_80`` and
``sm_90`` in worker processes (see ``compile_worker``) and read with the tools in Triton's
wheel: registers per thread, stack and local memory, register spills, shared memory, and the
width of the global accesses on the main path (the loads of the feature map in the forward
kernel, the stores of its gradient in the backward kernel).

A variant fails the gate if it spills registers inside a loop (or where the spill's place is not
known), or if its main-path accesses are narrower than the tile allows where the map is
contiguous and aligned along the axis the tile runs on (NCHW maps with ``H * W`` a multiple of
16, channels_last maps with ``C`` a multiple of 16): 128 bits, or less when a thread holds fewer
than 16 bytes of that axis (``BLOCK_C * BLOCK_S`` smaller than 16 bytes per thread). Sixteen
elements is what the JIT can see: it marks integers divisible by 16, so it cannot prove
alignment for smaller factors, and such maps are read with scalar accesses.
"""

import contextlib
import dataclasses
import inspect
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import torch

from .cases import CUDA_SHAPES, Shape

logger = logging.getLogger(__name__)

ARCHS = (80, 90)
# The split heuristic depends on the multiprocessor count: A100 (sm_80) and H100/H200 (sm_90).
REFERENCE_NUM_SMS = {80: 108, 90: 132}
# Kernels that move the feature map, and which of their accesses is the main path.
MAIN_PATH_ACCESS = {"pool_stats_kernel": "LDG", "pool_backward_kernel": "STG"}
FORWARD_KERNEL = "pool_stats_kernel"
# Every pooling compiles its own forward and backward variants.
POOLS = ("max", "avg", "avgmax", "catavgmax", "gem")
GATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
VECTOR_BITS = 128
# Alignment, in elements, that the JIT can prove (it marks integers divisible by 16).
ALIGNMENT_ELEMENTS = 16
EPS = 1e-12

# Maps beyond the benchmark grid, so that every regime the launchers have is compiled: tiny and
# unaligned maps, 1x1 maps, (N, C, L) token maps in both layouts, and maps past 2**31 elements
# (int64 offsets), both for many small maps and for a few huge ones.
COVERAGE_SHAPES = (
    Shape("tiny, unaligned", 2, 3, (5, 5)),
    Shape("1x1 map", 16, 2048, (1, 1)),
    Shape("ViT tokens (N, C, L)", 64, 768, (197,)),
    Shape("ViT tokens, aligned (N, C, L)", 64, 768, (256,)),
    Shape("int64 offsets, many maps", 65536, 2048, (7, 7)),
    Shape("int64 offsets, huge map", 2, 64, (16384, 16384)),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled form of one kernel: everything that makes the JIT compile it anew."""

    kernel: str
    # The module that defines the kernel, where the compile worker finds it.
    module: str
    arch: int
    num_warps: int
    # Argument name -> Triton type ("*fp32", "i32", "constexpr", ...), in parameter order.
    signature: tuple[tuple[str, str], ...]
    # Constexpr name -> value; Triton dtypes are kept by name ("fp32").
    constexprs: tuple[tuple[str, object], ...]
    # Argument name -> the JIT's specialisation string ("D": divisible by 16, "": nothing known)
    # for the pointer and integer arguments, in parameter order.
    hints: tuple[tuple[str, str], ...]

    @property
    def aligned(self) -> tuple[str, ...]:
        """Arguments the JIT marks as divisible by 16."""
        return tuple(name for name, hint in self.hints if hint == "D")

    def to_json(self) -> dict:
        return {
            "kernel": self.kernel,
            "module": self.module,
            "arch": self.arch,
            "num_warps": self.num_warps,
            "signature": dict(self.signature),
            "constexprs": dict(self.constexprs),
            "hints": dict(self.hints),
        }


@dataclasses.dataclass
class VariantInfo:
    """What the launch that produced a variant was about, for the table and the expectations."""

    dtype: str
    layout: str
    # Which positions a forward launch pools: "all", or those given by "sizes" or a "mask".
    positions: str
    examples: list[str]
    # Narrowest acceptable main-path access in bits; None: no expectation (not a feature-map
    # kernel, or the map is not aligned along the axis the tile runs on).
    expected_bits: int | None
    # The pooling of the first launch that produced the variant.
    pool: str = "max"


@dataclasses.dataclass
class VariantResult:
    variant: Variant
    info: VariantInfo
    registers: int | None = None
    local_bytes: int | None = None
    stack_bytes: int | None = None
    spill_bytes: int | None = None
    # Where there are spills: the local-memory accesses inside and outside the SASS's loops.
    spill_accesses_in_loops: int | None = None
    spill_accesses_outside_loops: int | None = None
    shared_bytes: int | None = None
    # Opcode -> widths in bits seen for it in the PTX, e.g. {"LDG": [128]}; ``sass_widths`` the
    # same read from the machine code, when asked for.
    access_widths: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    sass_widths: dict[str, list[int]] | None = None
    error: str | None = None

    @property
    def main_path_widths(self) -> list[int]:
        # The tile's loads (forward) or stores (backward) are masked, hence predicated; scalar
        # loads of per-program values are not part of the main path.
        opcode = MAIN_PATH_ACCESS.get(self.variant.kernel)
        return self.access_widths.get(opcode + " masked", []) if opcode else []

    @property
    def spills_outside_loops_only(self) -> bool:
        """ptxas spilled a few values that are live across the main loop but not used in it
        (stored before the loop, loaded after it): a cost paid once per program, not per
        element. Reported, but not a failure."""
        return bool(
            self.spill_bytes
            and self.spill_accesses_in_loops == 0
            and (self.spill_accesses_outside_loops or 0) > 0
        )

    @property
    def spills(self) -> bool:
        """Spills that fail the gate: any with a spill access inside a loop, or whose place in
        the code is unknown."""
        return bool(self.spill_bytes) and not self.spills_outside_loops_only

    @property
    def problems(self) -> list[str]:
        """Why this variant fails the gate; empty when it passes."""
        if self.error:
            return [f"did not compile: {self.error}"]
        found = []
        if self.spills:
            found.append(
                f"spills {self.spill_bytes} B of registers ({self.registers} registers, "
                f"{self.stack_bytes} B stack frame, "
                f"{_count_or_unknown(self.spill_accesses_in_loops)} spill accesses in loops)"
            )
        if self.info.expected_bits:
            widths = self.main_path_widths
            if not widths or min(widths) < self.info.expected_bits:
                opcode = MAIN_PATH_ACCESS[self.variant.kernel]
                found.append(
                    f"aligned map but {opcode} widths {sorted(set(widths))} bits, "
                    f"{self.info.expected_bits} expected"
                )
        return found

    def to_json(self) -> dict:
        return {
            "variant": self.variant.to_json(),
            "dtype": self.info.dtype,
            "layout": self.info.layout,
            "positions": self.info.positions,
            "examples": self.info.examples,
            "expected_bits": self.info.expected_bits,
            "registers": self.registers,
            "local_bytes": self.local_bytes,
            "stack_bytes": self.stack_bytes,
            "spill_bytes": self.spill_bytes,
            "spill_accesses_in_loops": self.spill_accesses_in_loops,
            "spill_accesses_outside_loops": self.spill_accesses_outside_loops,
            "shared_bytes": self.shared_bytes,
            "access_widths": self.access_widths,
            "main_path_widths": self.main_path_widths,
            "error": self.error,
            "problems": self.problems,
        }


def _count_or_unknown(count: int | None) -> str:
    return "an unknown number of" if count is None else str(count)


# --- discovering the variants ------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Launch:
    """One kernel call a launcher made: the kernel, its positional and keyword arguments."""

    kernel_name: str
    kernel: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name: str, kernel: object, launches: list[Launch]):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.name, self.kernel, args, kwargs))

        return record


@contextlib.contextmanager
def _recording_launches(num_sms: int) -> Iterator[list[Launch]]:
    from .. import launch

    launches: list[Launch] = []
    recorders = {name: _Recorder(name, kernel, launches) for name, kernel in kernels().items()}
    with mock.patch.multiple(launch, _num_sms=lambda device: num_sms, **recorders):
        yield launches


def kernels() -> dict[str, object]:
    """The Triton kernels the launchers call, by name."""
    from .. import launch

    return {
        name: value
        for name, value in vars(launch).items()
        if name.endswith("_kernel") and hasattr(value, "fn")
    }


def parameters(kernel) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of each kernel parameter, for compiled and interpreted kernels."""
    import triton.language as tl

    params = inspect.signature(kernel.fn).parameters.values()
    return [(p.name, p.annotation is tl.constexpr) for p in params]


def _encode_constexpr(value):
    """A JSON-able, hashable form of a constexpr value (see ``compile_worker.decode_constexpr``).
    A ``tl.constexpr`` wrapper is kept apart from a plain value: the JIT's cache key tells them
    apart, and the gate compiles with the JIT's key."""
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return value.name
    if isinstance(value, tl.constexpr):
        return ("constexpr", value.value)
    return value


def specialise(launch: Launch, arch: int) -> Variant:
    """The variant the JIT would compile for this launch, using Triton's own specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError as error:  # the gate follows the JIT's rule, so it needs the JIT's code
        raise RuntimeError(
            "the GPU-code gate needs a Triton whose JIT specialises arguments with "
            "native_specialize_impl (checked with Triton 3.6 and 3.9)"
        ) from error

    backend = make_backend(GPUTarget("cuda", arch, 32))
    params = parameters(launch.kernel)
    values = list(launch.args) + [launch.kwargs[name] for name, _ in params[len(launch.args) :]]
    signature, constexprs, hints = [], [], []
    for (name, is_constexpr), value in zip(params, values, strict=True):
        if is_constexpr:
            kind, attribute = "constexpr", _encode_constexpr(value)
        else:
            kind, attribute = native_specialize_impl(type(backend), value, False, True, True)
        signature.append((name, kind))
        if kind == "constexpr":
            constexprs.append((name, attribute))
        elif isinstance(attribute, str):
            hints.append((name, attribute))
    return Variant(
        kernel=launch.kernel_name,
        module=launch.kernel.fn.__module__,
        arch=arch,
        num_warps=launch.kwargs["num_warps"],
        signature=tuple(signature),
        constexprs=tuple(constexprs),
        hints=tuple(hints),
    )


def _expected_bits(launch: Launch, element_size: int) -> int | None:
    """Narrowest acceptable main-path access of a feature-map kernel launch, in bits."""
    if launch.kernel_name not in MAIN_PATH_ACCESS:
        return None
    names = [name for name, _ in parameters(launch.kernel)]
    arg = dict(zip(names, launch.args, strict=False)) | launch.kwargs
    prefix = "stride_x" if launch.kernel_name == FORWARD_KERNEL else "stride_g"
    if arg[prefix + "s"] == 1 and arg["S"] > 1:
        extent, block = arg["S"], arg["BLOCK_S"]
    elif arg[prefix + "c"] == 1:
        extent, block = arg["C"], arg["BLOCK_C"]
    else:
        return None
    if extent % ALIGNMENT_ELEMENTS:
        return None
    # Triton gives each thread a run of the contiguous axis no longer than the tile's share.
    threads = 32 * launch.kwargs["num_warps"]
    per_thread = max(1, min(block, arg["BLOCK_C"] * arg["BLOCK_S"] // threads))
    return min(VECTOR_BITS, per_thread * element_size * 8)


def _layouts(shape: Shape) -> Iterator[tuple[str, Callable[[torch.dtype], torch.Tensor]]]:
    size = (shape.n, shape.c, *shape.spatial)
    if len(shape.spatial) == 2:
        yield "NCHW", lambda dtype: torch.empty(size, dtype=dtype, device="meta")
        yield (
            "channels_last",
            lambda dtype: torch.empty(
                size, dtype=dtype, device="meta", memory_format=torch.channels_last
            ),
        )
    else:
        length = shape.spatial[0]
        yield "(N, C, L)", lambda dtype: torch.empty(size, dtype=dtype, device="meta")
        yield (
            "(N, L, C) as (N, C, L)",
            lambda dtype: torch.empty(
                (shape.n, length, shape.c), dtype=dtype, device="meta"
            ).transpose(1, 2),
        )


def forward_options(x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """The ways the forward launcher can be called on ``x``: over all positions, and, where the
    launcher takes them, limited by per-sample ``sizes`` (padded (N, C, H, W) batches) or by a
    ``mask`` of valid positions. Each compiles its own forward variant."""
    from .. import launch

    accepted = inspect.signature(launch.pool_forward).parameters
    n, positions = x.shape[0], math.prod(x.shape[2:])
    options = {"": {}}
    if "sizes" in accepted and x.dim() == 4:
        options["sizes"] = {"sizes": torch.empty((n, 2), dtype=torch.int64, device="meta")}
    if "mask" in accepted:
        options["mask"] = {"mask": torch.empty((n, positions), dtype=torch.bool, device="meta")}
    return options


def record_launches(
    x: torch.Tensor, num_sms: int, pool: str = "max", **forward_kwargs
) -> list[Launch]:
    """The kernel calls a forward and backward pass of ``pool_l2norm(x, pool)`` makes on ``x``
    (a meta tensor) on a GPU with ``num_sms`` multiprocessors; ``forward_kwargs`` go to the
    forward launcher (see ``forward_options``)."""
    from .. import launch, ops

    gem_p = torch.empty(1, device=x.device) if pool == "gem" else None
    with _recording_launches(num_sms) as launches:
        pooled, index, _ = launch.pool_forward(x, pool, gem_p=gem_p, **forward_kwargs)
        # The launchers allocate their outputs before launching, so these are meta tensors of
        # the right shapes even though no kernel ran.
        out, norm = launch.l2norm_forward(pooled, EPS, x.dtype)
        grad_pooled = launch.l2norm_backward(out, pooled, norm, EPS)
        channels_last = ops.grad_layout_is_channels_last(x)
        launch.pool_backward(
            grad_pooled,
            index,
            pooled,
            x if pool == "gem" else None,
            list(x.shape),
            channels_last,
            x.dtype,
            pool,
            gem_p=gem_p,
            **forward_kwargs,
        )
    return launches


def discover_variants(
    shapes: Iterable[Shape] = CUDA_SHAPES + COVERAGE_SHAPES,
    dtypes: Sequence[torch.dtype] = GATE_DTYPES,
    archs: Sequence[int] = ARCHS,
    pools: Sequence[str] = POOLS,
) -> dict[Variant, VariantInfo]:
    """Every distinct kernel variant the launchers choose for these maps and poolings, per
    architecture."""
    variants: dict[Variant, VariantInfo] = {}
    shapes = list(shapes)
    for arch, shape, pool in itertools.product(archs, shapes, pools):
        for layout, make in _layouts(shape):
            for dtype in dtypes:
                x = make(dtype)
                for option, kwargs in forward_options(x).items():
                    example = f"{shape.name}: {tuple(x.shape)} {layout}, {pool}"
                    example += f" with {option}" if option else ""
                    launches = record_launches(x, REFERENCE_NUM_SMS[arch], pool, **kwargs)
                    for launch in launches:
                        variant = specialise(launch, arch)
                        # Sizes and masks are data: which positions count is not known
                        # when compiling, so those loads need not be vectors.
                        expected = None if option else _expected_bits(launch, x.element_size())
                        info = variants.get(variant)
                        if info is None:
                            variants[variant] = VariantInfo(
                                str(dtype).removeprefix("torch."),
                                layout,
                                option or "all",
                                [example],
                                expected,
                                pool,
                            )
                        else:
                            info.examples.append(example)
                            info.expected_bits = max(info.expected_bits or 0, expected or 0) or None
    return variants


def all_tile_shapes(max_channels: int = 4096, max_positions: int = 2**14) -> list[Shape]:
    """Maps that together reach every block shape the tile heuristics can pick: powers of two
    (aligned) and odd sizes (unaligned) of channels and positions. Slow to compile: for
    ``gpu-code --all``, not for the test suite."""
    sizes_c = [2**k for k in range(int(math.log2(max_channels)) + 1)] + [3, 100, 1000]
    sizes_s = [2**k for k in range(int(math.log2(max_positions)) + 1)] + [3, 49, 196, 3000]
    return [Shape(f"sweep C={c} L={s}", 8, c, (s,)) for c in sizes_c for s in sizes_s]


# --- compiling and reading the machine code ----------------------------------------------------


def _worker_environment() -> dict[str, str]:
    # Under TRITON_INTERPRET=1 the kernels are interpreter objects that cannot be compiled.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def _run_worker(
    specs: list[dict], on_result: Callable[[dict], None], timeout: float | None
) -> str | None:
    """Compile ``specs`` in a fresh interpreter; returns the worker's error output on failure."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gmp_triton.benchmarking.compile_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_worker_environment(),
    )
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True)
    reader.start()
    process.stdin.write(json.dumps(specs))
    process.stdin.close()
    for line in process.stdout:
        if line.startswith("{"):
            on_result(json.loads(line))
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return "timed out"
    reader.join(timeout=5)
    if process.returncode != 0:
        return "".join(stderr_lines[-20:])
    return None


def compile_variants(
    variants: dict[Variant, VariantInfo],
    jobs: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    timeout: float | None = None,
    with_sass: bool = False,
) -> list[VariantResult]:
    """Compile and inspect every variant in ``jobs`` parallel worker processes; ``with_sass``
    also disassembles each one (slow) to read the access widths from the machine code."""
    ordered = list(variants)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(ordered)))
    results = {variant: VariantResult(variant, variants[variant]) for variant in ordered}
    done, lock = 0, threading.Lock()

    def store(raw: dict) -> None:
        nonlocal done
        result = results[ordered[raw["index"]]]
        for field in (
            "registers",
            "local_bytes",
            "stack_bytes",
            "spill_bytes",
            "spill_accesses_in_loops",
            "spill_accesses_outside_loops",
            "shared_bytes",
            "access_widths",
            "sass_widths",
            "error",
        ):
            if field in raw:
                setattr(result, field, raw[field])
        with lock:
            done += 1
            if on_progress:
                on_progress(done, len(ordered))

    # Round-robin shares: neighbouring variants are alike in cost, so shares come out even.
    shares = [
        [
            dict(ordered[i].to_json(), index=i, sass=with_sass)
            for i in range(start, len(ordered), jobs)
        ]
        for start in range(jobs)
    ]
    with ThreadPoolExecutor(jobs) as pool:
        failures = list(pool.map(lambda share: _run_worker(share, store, timeout), shares))
    for failure in failures:
        if failure:
            logger.error("a compile worker failed: %s", failure)
    for result in results.values():
        if result.registers is None and result.error is None:
            result.error = "no result from the compile worker"
    return list(results.values())


def run_gate(
    shapes: Iterable[Shape] = CUDA_SHAPES + COVERAGE_SHAPES,
    dtypes: Sequence[torch.dtype] = GATE_DTYPES,
    archs: Sequence[int] = ARCHS,
    jobs: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    timeout: float | None = None,
) -> list[VariantResult]:
    """Discover, compile and inspect every variant; see ``VariantResult.problems``."""
    variants = discover_variants(shapes, dtypes, archs)
    logger.info("compiling %d kernel variants for %s", len(variants), archs)
    return compile_variants(variants, jobs, on_progress, timeout)


# --- tables ------------------------------------------------------------------------------------


def _constexpr(result: VariantResult, name: str):
    return dict(result.variant.constexprs).get(name)


def _widths(result: VariantResult) -> str:
    parts = []
    for opcode in ("LDG", "STG"):
        widths = sorted(set(result.access_widths.get(opcode, [])))
        if widths:
            parts.append(f"{opcode} {'/'.join(map(str, widths))}")
    return ", ".join(parts) or "-"


def _spill_place(result: VariantResult) -> str:
    if not result.spill_bytes:
        return ""
    if result.spills_outside_loops_only:
        return "outside loops"
    return "in loops" if result.spill_accesses_in_loops else "unknown"


def result_rows(results: Iterable[VariantResult]) -> list[dict]:
    """One row per variant, in a stable order, for the report's table."""
    rows = []
    for result in results:
        variant = result.variant
        block_c, block_s = _constexpr(result, "BLOCK_C"), _constexpr(result, "BLOCK_S")
        # "1": one split, compiled with the split count as the constant 1; "n": several splits.
        splits = ""
        if "num_splits" in dict(variant.signature):
            splits = "1" if _constexpr(result, "num_splits") == 1 else "n"
        rows.append(
            {
                "kernel": variant.kernel.removesuffix("_kernel"),
                "pool": result.info.pool if variant.kernel in MAIN_PATH_ACCESS else "",
                "sm": variant.arch,
                "dtype": result.info.dtype,
                "layout": result.info.layout if variant.kernel in MAIN_PATH_ACCESS else "rows",
                "positions": result.info.positions if variant.kernel in MAIN_PATH_ACCESS else "",
                "block": f"{block_c}x{block_s}" if block_s else f"{block_c}",
                "splits": splits,
                "warps": variant.num_warps,
                "int64": "yes" if _constexpr(result, "INDEX_64") else "no",
                "registers": result.registers,
                "stack_bytes": result.stack_bytes,
                "spill_bytes": result.spill_bytes,
                "spills": _spill_place(result),
                "shared_bytes": result.shared_bytes,
                "widths": _widths(result),
                "expected": result.info.expected_bits or "",
                "verdict": "FAIL" if result.problems else "ok",
                "problems": "; ".join(result.problems),
                "example": result.info.examples[0],
            }
        )
    order = ("kernel", "pool", "sm", "layout", "positions", "dtype", "block", "splits", "int64")
    rows.sort(key=lambda r: tuple(str(r[k]) for k in order))
    return rows


def summary_rows(results: Iterable[VariantResult]) -> list[dict]:
    """One row per kernel and architecture: the worst case over its variants."""
    groups: dict[tuple[str, int], list[VariantResult]] = {}
    for result in results:
        groups.setdefault((result.variant.kernel, result.variant.arch), []).append(result)
    rows = []
    for (kernel, arch), members in sorted(groups.items()):
        compiled = [m for m in members if m.error is None]
        registers = [m.registers for m in compiled]
        aligned = [m for m in compiled if m.info.expected_bits]
        vectorised = [m for m in aligned if min(m.main_path_widths or [0]) >= m.info.expected_bits]
        rows.append(
            {
                "kernel": kernel.removesuffix("_kernel"),
                "sm": arch,
                "variants": len(members),
                "failed to compile": len(members) - len(compiled),
                "registers": f"{min(registers)}-{max(registers)}" if registers else "-",
                "spilling in a loop": sum(m.spills for m in compiled),
                "spilling outside loops only": sum(m.spills_outside_loops_only for m in compiled),
                "max shared (B)": max((m.shared_bytes or 0) for m in compiled) if compiled else "-",
                "aligned at full width": f"{len(vectorised)}/{len(aligned)}" if aligned else "n/a",
            }
        )
    return rows


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["" if row.get(c) is None else str(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
