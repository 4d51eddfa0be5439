"""Writes a benchmark run to a folder: ``results.json``, ``report.md`` and PNG plots."""

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from . import gpu_code
from .bench import device_label
from .cases import MODES

logger = logging.getLogger(__name__)

OURS = "gmp_triton"
MIB = 2**20
PEAK_CUDA = (
    "memory allocated at the peak of one forward+backward step beyond what was allocated before "
    "it (`torch.cuda.max_memory_allocated`); it includes the input gradient"
)
PEAK_CPU = "not measured on the CPU (the CPU allocator keeps no peak statistics)"


def _index(results: list[dict]) -> dict[tuple[str, str, str], dict]:
    """(case, provider, mode) -> measured row."""
    return {(r["case"], r["provider"], r["mode"]): r for r in results if r.get("mode")}


def _cases(results: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["case"] for r in results))


def _providers(run: dict) -> list[str]:
    return list(run["settings"]["providers"])


def _milliseconds(row: dict) -> str:
    return f"{row['median_ms']:.4g} ({row['p20_ms']:.4g}-{row['p80_ms']:.4g})"


def _mebibytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.3g}"


def speedup(run: dict, case: str, mode: str, baseline: str) -> float | None:
    """How many times faster this package is than ``baseline`` (median over median)."""
    rows = _index(run["results"])
    ours, theirs = rows.get((case, OURS, mode)), rows.get((case, baseline, mode))
    if ours is None or theirs is None:
        return None
    return theirs["median_ms"] / ours["median_ms"]


def mode_table(run: dict, mode: str) -> str:
    """This package's time, GB/s and fraction of copy bandwidth, and its speed-up over each
    other implementation, for one mode."""
    rows = _index(run["results"])
    baselines = [p for p in _providers(run) if p != OURS]
    header = ["case", "ms: median (p20-p80)", "GB/s", "of copy"]
    header += [f"x vs {b}" for b in baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in _cases(run["results"]):
        ours = rows.get((case, OURS, mode))
        if ours is None:
            continue
        cells = [
            case,
            _milliseconds(ours),
            f"{ours['gbps']:.1f}",
            f"{ours['fraction_of_copy']:.0%}",
        ]
        for baseline in baselines:
            value = speedup(run, case, mode, baseline)
            cells.append("-" if value is None else f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def memory_table(run: dict) -> str:
    """Peak memory of a forward+backward step and bytes kept for backward, per implementation."""
    rows = _index(run["results"])
    providers = _providers(run)
    header = ["case"]
    for provider in providers:
        header += [f"{provider} peak MiB", f"{provider} kept MiB (input)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in _cases(run["results"]):
        cells = [case]
        for provider in providers:
            row = rows.get((case, provider, "forward+backward"))
            if row is None:
                cells += ["-", "-"]
                continue
            kept = _mebibytes(row["saved_bytes"])
            if row["saved_input_bytes"]:
                kept += f" ({_mebibytes(row['saved_input_bytes'])})"
            cells += [_mebibytes(row["peak_memory_bytes"]), kept]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def padded_speedup(run: dict, case: str, implementation: str, mode: str) -> float | None:
    """How many times faster the padded batch is than ``implementation`` (median over median)."""
    measured = [r for r in run.get("padded", []) if r.get("mode")]
    rows = {(r["case"], r["implementation"], r["mode"]): r for r in measured}
    ours, theirs = rows.get((case, "padded", mode)), rows.get((case, implementation, mode))
    if ours is None or theirs is None:
        return None
    return theirs["median_ms"] / ours["median_ms"]


def padded_table(run: dict) -> str:
    """Time of each implementation per mode, and the padded batch's speed-up over it."""
    measured = [r for r in run.get("padded", []) if r.get("mode")]
    modes = [m for m in MODES if any(r["mode"] == m for r in measured)]
    rows = {(r["case"], r["implementation"], r["mode"]): r for r in measured}
    header = ["case", "implementation"] + [f"{m} ms" for m in modes]
    header.append("padded is x faster: " + " / ".join(modes))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in dict.fromkeys(r["case"] for r in measured):
        for name in dict.fromkeys(r["implementation"] for r in measured if r["case"] == case):
            cells = [case, name]
            for mode in modes:
                row = rows.get((case, name, mode))
                cells.append("-" if row is None else _milliseconds(row))
            speedups = [padded_speedup(run, case, name, mode) for mode in modes]
            cells.append(
                "-"
                if name == "padded"
                else " / ".join("-" if v is None else f"{v:.2f}" for v in speedups)
            )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def padded_section(run: dict) -> str:
    measured = [r for r in run.get("padded", []) if r.get("mode")]
    cases = {r["case"]: r for r in measured}
    described = "\n".join(
        f"- {label}: {row['valid_positions']} valid positions, "
        f"{row['padded_positions']} in the padded batch "
        f"({1 - row['valid_positions'] / row['padded_positions']:.0%} padding)"
        for label, row in cases.items()
    )
    implementations = "\n".join(
        f"- `{name}`: {description}"
        for name, description in run["settings"].get("padded_implementations", {}).items()
    )
    return (
        "## Padded batch vs a loop over items\n\n"
        "Maps of different sizes (each side drawn at random, with a fixed seed), pooled into "
        "L2-normalised embeddings:\n\n"
        f"{described}\n\nImplementations, all giving the same embeddings:\n\n"
        f"{implementations}\n\nTimes in ms, median (p20-p80), timed as above; the last "
        "column is each implementation's median over the padded batch's (above 1: the padded "
        "batch is faster).\n\n" + padded_table(run)
    )


def all_rows_table(run: dict) -> str:
    header = ["case", "provider", "mode", "ms: median (p20-p80)", "GB/s", "of copy", "max |diff|"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in run["results"]:
        if not row.get("mode"):
            cells = [row["case"], row["provider"], "error", row.get("error", ""), "", "", ""]
        else:
            cells = [
                row["case"],
                row["provider"],
                row["mode"],
                _milliseconds(row),
                f"{row['gbps']:.1f}",
                f"{row['fraction_of_copy']:.0%}",
                f"{row['max_abs_difference']:.2g}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _methods(run: dict) -> str:
    environment, settings, copy = run["environment"], run["settings"], run["copy"]
    cuda = environment["device"] == "cuda"
    timer = settings["timer"]
    if cuda:
        timing = (
            f"`triton.testing.do_bench` (L2 flushed before every run, CUDA events, "
            f"warm-up {timer['warmup_ms']:g} ms, {timer['rep_ms']:g} ms of runs)"
        )
    else:
        timing = (
            f"`time.perf_counter` around each run after writing "
            f"{settings['cpu_flush_bytes'] / MIB:.0f} MiB to flush the caches; at least "
            f"{timer['cpu_min_runs']} runs and {timer['cpu_min_time_s']:g} s per measurement"
        )
    providers = "\n".join(
        f"- `{name}`: {description}" for name, description in settings["providers"].items()
    )
    return f"""## What is measured

- **Times**: median and 20th-80th percentiles in milliseconds, from {timing}.
- **Modes**: forward (`f(x)` with `x.requires_grad`, recording the graph as in training),
  backward (`torch.autograd.grad(out, x, g, retain_graph=True)` on one recorded forward) and
  forward+backward.
- **Bytes** come from an ideal model, the same for every implementation: forward reads the map
  once and writes the `(N, C)` output; backward writes the input gradient once and reads the
  output gradient `(N, C)`, the pooled values `(N, C)`, the int32 index `(N, C)` and the norm
  `(N,)`. GB/s is those bytes over the median time.
- **Copy ceiling**: a device-to-device copy of {copy["bytes"] / MIB:.0f} MiB (read and written:
  twice that moved) ran at **{copy["gbps"]:.1f} GB/s** in this run (median
  {copy["median_ms"]:.4g} ms); "of copy" is GB/s as a fraction of it.
- **Speed-up** "x vs B" is B's median time over gmp_triton's: above 1, gmp_triton is faster.
- **Peak MiB**: {PEAK_CUDA if cuda else PEAK_CPU}.
- **Kept MiB**: bytes of the distinct storages autograd saves for backward (saved-tensor hooks);
  in brackets the part that is the input itself, which is kept alive rather than allocated.
- **torch.compile**: `dynamic={settings["compile_mode"] == "dynamic"}`; compiled with donated
  buffers off so that one graph can be run backward repeatedly.

Implementations:

{providers}
"""


def render_markdown(run: dict) -> str:
    environment = run["environment"]
    cuda = environment["device"] == "cuda"
    parts = [
        "# gmp-triton benchmark report\n",
        f"**Measured on {device_label(environment)}.**\n",
        f"Date {environment['date']}; PyTorch {environment['torch']}, Triton "
        f"{environment['triton']}, Python {environment['python']}, {environment['platform']}.\n",
    ]
    if not cuda:
        parts.append(
            "These are CPU numbers: `gmp_triton` here is the package's PyTorch path (what a CPU "
            "tensor runs), timed against eager and compiled PyTorch on the same CPU. They say "
            "nothing about GPU speed.\n"
        )
    parts.append(_methods(run))
    for mode in MODES:
        if any(r.get("mode") == mode for r in run["results"]):
            parts.append(f"## {mode.capitalize()}\n\n" + mode_table(run, mode))
    if any(r.get("mode") for r in run["results"]):
        parts.append("## Memory (forward+backward)\n\n" + memory_table(run))
    if any(r.get("mode") for r in run.get("padded", [])):
        parts.append(padded_section(run))
    if run["skipped"]:
        skipped = "\n".join(f"- {s['case']}: {s['reason']}" for s in run["skipped"])
        parts.append(f"## Not measured\n\n{skipped}\n")
    errors = [r for r in run["results"] + run.get("padded", []) if not r.get("mode")]
    if errors:
        listed = "\n".join(
            f"- {r['case']} {r.get('provider') or r.get('implementation')}: {r['error']}"
            for r in errors
        )
        parts.append(f"## Errors\n\n{listed}\n")
    parts.append(
        "## Every measurement\n\n<details><summary>all implementations and modes</summary>\n\n"
        + all_rows_table(run)
        + "\n</details>\n"
    )
    if run.get("gpu_code") is not None:
        parts.append(gpu_code_section(run["gpu_code"]))
    if _plot_cases(run):
        parts.append(
            "## Plots\n\n![fraction of copy bandwidth](bandwidth.png)\n\n![speed-up](speedup.png)\n"
        )
    return "\n".join(parts)


def gpu_code_section(gate: dict) -> str:
    if gate.get("error"):
        return f"## GPU code (compiled without a GPU)\n\nNot run: {gate['error']}\n"
    failing = [row for row in gate["variants"] if row["verdict"] != "ok"]
    lines = [
        "## GPU code (compiled without a GPU)\n",
        f"Every kernel variant the launchers choose for the benchmark maps and the coverage maps "
        f"({len(gate['variants'])} variants), compiled ahead of time with Triton "
        f"{gate['triton']} for sm_80 and sm_90 and read with the tools in Triton's wheel "
        "(`gmp-triton gpu-code`). A variant fails if it spills registers inside a loop, or if an "
        "aligned map is read (forward) or written (backward) with accesses narrower than its "
        "tile allows. Spills outside every loop (values stored once before the main loop and "
        "loaded once after it) are counted in their own column and do not fail.\n",
        gpu_code.markdown_table(gate["summary"]),
    ]
    if failing:
        lines.append("Failing variants:\n")
        lines.append(gpu_code.markdown_table(failing, GATE_COLUMNS + ["problems"]))
    # Thousands of rows: every variant is in results.json ("gpu_code", "variants"), and
    # `gmp-triton gpu-code --list` prints them.
    lines.append(
        f"Every variant, with its registers, spills and access widths: `results.json` "
        f"(`gpu_code.variants`, {len(gate['variants'])} rows).\n"
    )
    return "\n".join(lines)


GATE_COLUMNS = [
    "kernel",
    "sm",
    "dtype",
    "layout",
    "positions",
    "block",
    "splits",
    "warps",
    "int64",
    "registers",
    "stack_bytes",
    "spill_bytes",
    "spills",
    "shared_bytes",
    "widths",
    "expected",
    "verdict",
    "example",
]


def _plot_cases(run: dict) -> list[str]:
    rows = _index(run["results"])
    return [c for c in _cases(run["results"]) if any((c, OURS, m) in rows for m in MODES)]


def _finish(figure, axes, title: str) -> None:
    # Title, then the shared legend under it, then the plots.
    figure.suptitle(title, fontsize=9, y=0.998, va="top")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.985),
        ncols=max(1, len(labels)),
        fontsize=8,
        frameon=False,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.96))


def write_plots(run: dict, folder: Path) -> list[Path]:
    """``bandwidth.png``: each implementation's fraction of copy bandwidth per case and mode;
    ``speedup.png``: gmp_triton's speed-up over each other implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _index(run["results"])
    cases = _plot_cases(run)
    providers = _providers(run)
    modes = [m for m in MODES if any(r.get("mode") == m for r in run["results"])]
    if not cases or not modes:
        return []
    width = max(8.0, 0.5 * len(cases) * max(1, len(providers)) / 3)
    label = device_label(run["environment"])
    paths = []

    figure, axes = plt.subplots(len(modes), 1, figsize=(width, 3.6 * len(modes)), squeeze=False)
    bar = 0.8 / len(providers)
    for axis, mode in zip(axes[:, 0], modes, strict=True):
        for i, provider in enumerate(providers):
            values = [
                rows[(c, provider, mode)]["fraction_of_copy"] if (c, provider, mode) in rows else 0
                for c in cases
            ]
            positions = [k + (i - (len(providers) - 1) / 2) * bar for k in range(len(cases))]
            axis.bar(positions, values, bar, label=provider)
        axis.set_title(f"{mode}: fraction of copy bandwidth ({run['copy']['gbps']:.0f} GB/s)")
        axis.set_xticks(range(len(cases)), cases, rotation=60, ha="right", fontsize=7)
        axis.set_ylabel("of copy bandwidth")
    _finish(figure, axes, label)
    paths.append(folder / "bandwidth.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    baselines = [p for p in providers if p != OURS]
    figure, axes = plt.subplots(len(modes), 1, figsize=(width, 3.6 * len(modes)), squeeze=False)
    bar = 0.8 / max(1, len(baselines))
    for axis, mode in zip(axes[:, 0], modes, strict=True):
        for i, baseline in enumerate(baselines):
            values = [speedup(run, c, mode, baseline) or math.nan for c in cases]
            positions = [k + (i - (len(baselines) - 1) / 2) * bar for k in range(len(cases))]
            axis.bar(positions, values, bar, label=f"vs {baseline}")
        axis.set_yscale("log")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_title(f"{mode}: speed-up of gmp_triton (above 1: faster)")
        axis.set_xticks(range(len(cases)), cases, rotation=60, ha="right", fontsize=7)
    _finish(figure, axes, label)
    paths.append(folder / "speedup.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)
    return paths


def gate_summary(results: Sequence[gpu_code.VariantResult], triton_version: str) -> dict:
    """The GPU-code gate's results in the form ``results.json`` keeps."""
    return {
        "triton": triton_version,
        "summary": gpu_code.summary_rows(results),
        "variants": gpu_code.result_rows(results),
    }


def write_report(run: dict, folder: Path) -> list[Path]:
    """Write ``results.json``, ``report.md`` and the plots; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "results.json", folder / "report.md"]
    written[0].write_text(json.dumps(run, indent=1))
    written[1].write_text(render_markdown(run))
    written += write_plots(run, folder)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written
