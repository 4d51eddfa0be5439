"""Subcommands of ``gmp-triton``: ``bench`` (the benchmark report) and ``gpu-code`` (the gate
that compiles every kernel variant for sm_80 and sm_90 without a GPU)."""

import dataclasses
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from . import cases as cases_module
from .providers import PROVIDERS

logger = logging.getLogger(__name__)


def add_parsers(subcommands) -> None:
    """Register this package's subcommands; each sets ``run`` to a function of ``args``."""
    bench = subcommands.add_parser(
        "bench",
        help="time the kernels against PyTorch and write report.md, results.json and plots",
        description=(
            "Time gmp_triton against eager and compiled PyTorch (forward, backward, both) on a "
            "grid of shapes, dtypes and layouts, and write report.md, results.json and PNG "
            "plots. On CUDA the grid is the full one; on the CPU a smaller one."
        ),
    )
    bench.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    bench.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    bench.add_argument("--quick", action="store_true", help="two small maps, fp32: a smoke run")
    bench.add_argument(
        "--shapes", nargs="+", metavar="TEXT", help="keep maps whose name or size contains TEXT"
    )
    bench.add_argument("--dtypes", nargs="+", choices=sorted(cases_module.DTYPES_BY_NAME))
    bench.add_argument("--layouts", nargs="+", choices=cases_module.LAYOUTS)
    bench.add_argument("--modes", nargs="+", choices=cases_module.MODES)
    bench.add_argument(
        "--providers",
        nargs="+",
        choices=list(PROVIDERS),
        help="implementations to time (gmp_triton is always included)",
    )
    bench.add_argument(
        "--compile",
        choices=("dynamic", "static"),
        default="dynamic",
        help="torch.compile the references with dynamic shapes (one graph per dtype and layout) "
        "or static ones (one graph per case: slower to compile)",
    )
    bench.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="stop starting new cases after this long and report what was measured",
    )
    bench.add_argument("--warmup-ms", type=float, help="do_bench warm-up time (CUDA)")
    bench.add_argument("--rep-ms", type=float, help="do_bench measuring time (CUDA)")
    bench.add_argument("--cpu-min-time", type=float, help="seconds of runs per measurement (CPU)")
    bench.add_argument(
        "--no-gpu-code", action="store_true", help="leave the GPU-code table out of the report"
    )
    bench.add_argument(
        "--no-padded",
        action="store_true",
        help="leave out the padded batch of maps of different sizes against loops over the maps "
        "(--shapes padded keeps only it)",
    )
    bench.add_argument("-v", "--verbose", action="store_true")
    bench.set_defaults(run=run_bench)

    gate = subcommands.add_parser(
        "gpu-code",
        help="compile every kernel variant for sm_80/sm_90 (no GPU needed) and check the code",
        description=(
            "Compile every kernel variant the launchers choose, ahead of time for sm_80 and "
            "sm_90, and read registers, spills, shared memory and global access widths with the "
            "tools in Triton's wheel. Exits with 1 if a variant spills registers inside a loop or "
            "reads an aligned map with narrower accesses than its tile allows (spills outside "
            "every loop are reported, not failed)."
        ),
    )
    gate.add_argument(
        "--all",
        action="store_true",
        help="also sweep channel and position counts to reach every tile shape (thousands of "
        "variants: minutes on many cores)",
    )
    gate.add_argument(
        "--shapes", nargs="+", metavar="TEXT", help="keep maps whose name or size contains TEXT"
    )
    gate.add_argument("--arch", nargs="+", type=int, choices=(80, 90), default=[80, 90])
    gate.add_argument("--dtypes", nargs="+", choices=sorted(cases_module.DTYPES_BY_NAME))
    gate.add_argument("--jobs", type=int, help="compile processes (default: one per CPU)")
    gate.add_argument("--json", type=Path, help="write every variant's results here")
    gate.add_argument("--markdown", type=Path, help="write the tables here")
    gate.add_argument("--list", action="store_true", help="print every variant, not only failures")
    gate.add_argument("-v", "--verbose", action="store_true")
    gate.set_defaults(run=run_gpu_code)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _select_padded_cases(args, device: str) -> list:
    from . import padded

    if args.no_padded:
        return []
    if args.quick:
        chosen = padded.QUICK_PADDED_CASES
    elif device == "cuda":
        chosen = padded.CUDA_PADDED_CASES
    else:
        chosen = padded.CPU_PADDED_CASES
    if args.shapes:
        chosen = [
            c for c in chosen if any(text in c.name or text in c.label() for text in args.shapes)
        ]
    if args.dtypes:
        dtypes = [cases_module.DTYPES_BY_NAME[name] for name in args.dtypes]
        chosen = [dataclasses.replace(c, dtype=d) for c in chosen for d in dtypes]
        chosen = list(dict.fromkeys(chosen))
    return list(chosen)


def _select_cases(args, device: str) -> list[cases_module.Case]:
    if args.quick:
        shapes, dtypes = cases_module.QUICK_SHAPES, cases_module.QUICK_DTYPES
    elif device == "cuda":
        shapes, dtypes = cases_module.CUDA_SHAPES, cases_module.CUDA_DTYPES
    else:
        shapes, dtypes = cases_module.CPU_SHAPES, cases_module.CPU_DTYPES
    if args.shapes:
        shapes = [
            s for s in shapes if any(text in s.name or text in s.label() for text in args.shapes)
        ]
    if args.dtypes:
        dtypes = [cases_module.DTYPES_BY_NAME[name] for name in args.dtypes]
    layouts = args.layouts or cases_module.LAYOUTS
    return cases_module.make_cases(shapes, dtypes, layouts)


def _run_gate(jobs: int | None = None, archs=(80, 90), shapes=None, dtypes=None):
    """The gate with a progress bar; returns its results."""
    from . import gpu_code

    variants = gpu_code.discover_variants(
        shapes or gpu_code.CUDA_SHAPES + gpu_code.COVERAGE_SHAPES,
        dtypes or gpu_code.GATE_DTYPES,
        archs,
    )
    with tqdm(total=len(variants), desc="compiling kernel variants", unit="variant") as bar:

        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        return gpu_code.compile_variants(variants, jobs, progress)


def run_bench(args) -> int:
    import torch

    from . import bench, measure, report

    _configure_logging(args.verbose)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("gmp-triton bench: --device cuda, but PyTorch sees no CUDA GPU", file=sys.stderr)
        return 2

    timer = measure.TimerSettings()
    if args.quick:
        timer = measure.TimerSettings(warmup_ms=10, rep_ms=25, cpu_min_time_s=0.05)
    overrides = {
        "warmup_ms": args.warmup_ms,
        "rep_ms": args.rep_ms,
        "cpu_min_time_s": args.cpu_min_time,
    }
    timer = dataclasses.replace(
        timer, **{key: value for key, value in overrides.items() if value is not None}
    )
    providers = list(dict.fromkeys(["gmp_triton", *(args.providers or PROVIDERS)]))
    config = bench.BenchConfig(
        device=device,
        cases=_select_cases(args, device),
        providers=providers,
        modes=args.modes or cases_module.MODES,
        compile_mode=args.compile,
        timer=timer,
        time_budget_s=args.time_budget,
        padded_cases=_select_padded_cases(args, device),
    )
    if args.time_budget is not None and not args.time_budget > 0:
        print(
            f"gmp-triton bench: error: --time-budget must be a positive number of seconds, "
            f"got {args.time_budget}",
            file=sys.stderr,
        )
        return 2
    if not config.cases and not config.padded_cases:
        print("gmp-triton bench: no case matches the filters", file=sys.stderr)
        return 2

    print(f"benchmarking {len(config.cases)} cases x {len(providers)} implementations on {device}")
    runs = len(config.cases) * len(providers) + len(config.padded_cases)
    with tqdm(total=runs, desc="benchmarks", unit="run") as bar:
        run = bench.run_benchmarks(config, lambda _step: bar.update())

    run["gpu_code"] = None
    if not args.no_gpu_code:
        try:
            import triton

            # A smoke run compiles only the variants of its own maps and dtype.
            quick = dict(shapes=list(cases_module.QUICK_SHAPES), dtypes=[torch.float32])
            results = _run_gate(**(quick if args.quick else {}))
            run["gpu_code"] = report.gate_summary(results, triton.__version__)
        except Exception as error:  # the report is still worth writing without the gate
            logger.exception("the GPU-code gate failed")
            run["gpu_code"] = {"error": f"{type(error).__name__}: {error}"}

    written = report.write_report(run, args.out)
    print(f"\n{bench.device_label(run['environment'])}")
    print(f"copy bandwidth: {run['copy']['gbps']:.1f} GB/s")
    if "forward+backward" in config.modes:
        if config.cases:
            table = report.mode_table(run, "forward+backward")
            print("\nforward+backward, gmp_triton:\n" + table)
        if config.padded_cases:
            print("\npadded batch vs loops over the maps:\n" + report.padded_table(run))
    if run["skipped"]:
        print(f"not measured (time budget): {len(run['skipped'])} cases")
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def run_gpu_code(args) -> int:
    try:
        import triton
    except ImportError:
        print(
            "gmp-triton gpu-code: error: needs Triton (pip install triton; Linux only)",
            file=sys.stderr,
        )
        return 2

    from . import gpu_code, report

    _configure_logging(args.verbose)
    shapes = list(gpu_code.CUDA_SHAPES + gpu_code.COVERAGE_SHAPES)
    if args.all:
        shapes += gpu_code.all_tile_shapes()
    if args.shapes:
        shapes = [
            s for s in shapes if any(text in s.name or text in s.label() for text in args.shapes)
        ]
    if not shapes:
        print("gmp-triton gpu-code: no map matches the filters", file=sys.stderr)
        return 2
    dtypes = [cases_module.DTYPES_BY_NAME[name] for name in args.dtypes] if args.dtypes else None
    results = _run_gate(args.jobs, tuple(args.arch), shapes, dtypes)
    gate = report.gate_summary(results, triton.__version__)
    failing = [row for row in gate["variants"] if row["verdict"] != "ok"]

    text = (
        "GPU code, Triton " + triton.__version__ + "\n\n" + gpu_code.markdown_table(gate["summary"])
    )
    if failing:
        text += "\nfailing variants:\n" + gpu_code.markdown_table(
            failing, report.GATE_COLUMNS + ["problems"]
        )
    if args.list:
        text += "\nevery variant:\n" + gpu_code.markdown_table(
            gate["variants"], report.GATE_COLUMNS
        )
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=1))
    print(f"{len(results)} variants, {len(failing)} failing")
    return 1 if failing else 0
