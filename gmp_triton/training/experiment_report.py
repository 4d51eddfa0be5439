"""Writes the pooling experiment's results: ``results.json``, ``report.md`` and PNG plots.

The findings at the end of the report are computed from the numbers: each pooling is compared
with max pooling on every measure, and a difference counts as beyond the seed spread when it
exceeds the sum of the two standard deviations over seeds.
"""

import json
import logging
from pathlib import Path

from .evaluation import METRIC_LABELS

logger = logging.getLogger(__name__)

REFERENCE = "max"
PLOTS = ("retrieval.png", "translation.png", "sizes.png", "noise.png")
MAP = "mean_average_precision_at_r"
P1 = "precision_at_1"
RAW = "raw pixels"


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def shown_distances(shifts: list[int]) -> list[int]:
    """A few distances from the centre for the translation table: about a quarter, half,
    three quarters and all of the largest, on the grid of shifts."""
    grid = sorted({abs(shift) for shift in shifts if shift})
    if not grid:
        return []
    return sorted({min(grid, key=lambda d: abs(d - grid[-1] * q)) for q in (0.25, 0.5, 0.75, 1)})


def at_distance(curve: list[float], shifts: list[int], distance: int) -> float:
    """The mean of a curve at ``-distance`` and ``+distance``."""
    values = [value for value, shift in zip(curve, shifts, strict=True) if abs(shift) == distance]
    return sum(values) / len(values)


# Findings ---------------------------------------------------------------------------------------


def comparisons(results: dict) -> list[tuple[str, dict[str, dict]]]:
    """Every measure, named, with each pooling's spread over seeds (higher is better)."""
    retrieval, noise = results["retrieval"], results["noise"]
    translation = results["translation"]["summary"]
    larger = {pool: stats["large"] for pool, stats in results["sizes"].items()}

    def pick(by_pool: dict, key: str) -> dict[str, dict]:
        return {pool: stats[key] for pool, stats in by_pool.items()}

    return [
        ("retrieval, MAP@R", pick(retrieval, MAP)),
        ("retrieval, P@1", pick(retrieval, P1)),
        ("translation, cosine averaged over the shifts", pick(translation, "every shift")),
        ("translation, cosine at the canvas's edges", pick(translation, "edges")),
        ("canvas size, MAP@R on the larger canvases", pick(larger, MAP)),
        ("canvas size, P@1 on the larger canvases", pick(larger, P1)),
        ("noise, MAP@R with the stronger noise", pick(noise, MAP)),
        ("noise, P@1 with the stronger noise", pick(noise, P1)),
    ]


def findings(results: dict) -> tuple[list[str], list[str]]:
    """``(where max pooling loses, where it comes first)``: one line per measure."""
    loses, wins = [], []
    seeds = results["config"]["seeds"]
    for measure, stats in comparisons(results):
        if REFERENCE not in stats or len(stats) < 2:
            continue
        ours = stats[REFERENCE]
        others = sorted(
            ((pool, stat) for pool, stat in stats.items() if pool != REFERENCE),
            key=lambda item: -item[1]["mean"],
        )
        better = [(pool, stat) for pool, stat in others if stat["mean"] > ours["mean"]]
        if not better:
            pool, stat = others[0]
            wins.append(
                f"{measure}: max {_cell(ours)}; next {pool} {_cell(stat)} "
                f"(-{ours['mean'] - stat['mean']:.3f}, {_spread_verdict(ours, stat, seeds)})"
            )
            continue
        behind = "; ".join(
            f"{pool} {_cell(stat)} (+{stat['mean'] - ours['mean']:.3f}, "
            f"{_spread_verdict(ours, stat, seeds)})"
            for pool, stat in better
        )
        loses.append(f"{measure}: max {_cell(ours)} is behind {behind}")
    return loses, wins


def _spread_verdict(first: dict, second: dict, seeds: int) -> str:
    if seeds < 2:
        return "one seed: no spread to judge it by"
    margin = abs(first["mean"] - second["mean"])
    return ("beyond" if margin > first["std"] + second["std"] else "within") + " the seed spread"


# Sections ---------------------------------------------------------------------------------------


def introduction(results: dict) -> str:
    config, env, seconds = results["config"], results["environment"], results["seconds"]
    train, held = config["train"], results["held_out"]
    widths = "-".join(map(str, train["widths"]))
    studies = ", ".join(
        f"{name} {value:.0f} s" for name, value in seconds.items() if name != "total"
    )
    return (
        "# Which global pooling? The pooling experiment\n\n"
        "Written by `gmp-triton experiment`. Every model is the one `gmp-triton train` builds: "
        f"the small CNN (3x3 convolutions at full resolution, widths {widths}) with the package's "
        "`EmbeddingHead` (the pooling fused with the L2 norm, no projection), trained with the "
        f"{train['loss']} loss for {config['epochs']} epochs on the digits "
        f"{', '.join(results['train_classes'])} placed on noisy canvases (noise "
        f"{train['noise']}), and evaluated on the {held['images']} scans of the held-out digits "
        f"{', '.join(held['classes'])}, each querying all the others. Seeds 0 to "
        f"{config['seeds'] - 1} (weights, sampler, training canvases); the held-out canvases are "
        "the same for every model. Values are the mean ± sample standard deviation over the "
        "seeds.\n\n"
        f"**Machine**: {env['device']} ({env['logical_cpus']} logical CPUs), PyTorch "
        f"{env['torch']}, Python {env['python']}.  \n"
        f"**Time**: {seconds['total']:.0f} s in all ({studies}).\n"
    )


def retrieval_section(results: dict) -> str:
    config = results["config"]
    metrics = [MAP, P1, "r_precision"]
    rows = [[pool] + [_cell(s[m]) for m in metrics] for pool, s in results["retrieval"].items()]
    raw = results["raw_pixels"]["canvas"]
    rows.append([RAW] + [f"{raw[m]:.3f}" for m in metrics])
    low, high = config["canvas"]
    return (
        "## 1. Retrieval on held-out classes\n\n"
        f"Trained and evaluated on canvases of {low} to {high} pixels a side (the `train` "
        "command's default). catavgmax embeddings have twice as many dimensions as the others.\n\n"
        + _table(["pool", *(METRIC_LABELS[m] for m in metrics)], rows)
        + "\n![retrieval](retrieval.png)\n"
    )


def translation_section(results: dict) -> str:
    translation = results["translation"]
    shifts = translation["shifts"]
    distances = shown_distances(shifts)
    rows = []
    for pool, curve in translation["cosine"].items():
        summary = translation["summary"][pool]
        cells = [f"{at_distance(curve['mean'], shifts, d):.3f}" for d in distances]
        rows.append([pool, *cells, _cell(summary["every shift"])])
    raw = translation["raw_pixels"]
    cells = [f"{at_distance(raw, shifts, d):.3f}" for d in distances]
    rows.append([RAW, *cells, f"{sum(raw) / len(raw):.3f}"])
    return (
        "## 2. Translation\n\n"
        f"{translation['digits']} held-out digits, each at the vertical centre of a "
        f"{translation['canvas']}-pixel canvas and moved horizontally from the left edge to the "
        f"right edge, {shifts[1] - shifts[0]} pixels at a time, on one noise field per digit. "
        "The cosine similarity between the embedding at each place and at the centre, averaged "
        f"over the digits (and then the seeds). At ±{shifts[-1]} px the digit touches the edge.\n\n"
        + _table(["pool", *(f"±{d} px" for d in distances), "mean over shifts"], rows)
        + "\n![translation](translation.png)\n"
    )


def size_section(results: dict) -> str:
    small, large = results["config"]["small_canvas"], results["config"]["large_canvas"]
    names = {"small": f"{small[0]}-{small[1]}", "large": f"{large[0]}-{large[1]}"}
    header = ["pool"] + [f"{m} {names[s]}" for s in names for m in ("MAP@R", "P@1")]
    rows = []
    for pool, stats in results["sizes"].items():
        change = stats["large"][MAP]["mean"] - stats["small"][MAP]["mean"]
        cells = [_cell(stats[split][m]) for split in names for m in (MAP, P1)]
        rows.append([pool, *cells, f"{change:+.3f}"])
    raw = results["raw_pixels"]
    cells = [f"{raw[split][m]:.3f}" for split in names for m in (MAP, P1)]
    rows.append([RAW, *cells, f"{raw['large'][MAP] - raw['small'][MAP]:+.3f}"])
    return (
        "## 3. Canvas size\n\n"
        f"Trained on canvases of {small[0]} to {small[1]} pixels only; evaluated on the held-out "
        f"digits on canvases of those sizes and of {large[0]} to {large[1]} pixels.\n\n"
        + _table([*header, "MAP@R change"], rows)
        + "\n![canvas size](sizes.png)\n"
    )


def noise_section(results: dict) -> str:
    trained, tested = results["config"]["train"]["noise"], results["config"]["test_noise"]
    header = ["pool"] + [f"{m} noise {n}" for m in ("MAP@R", "P@1") for n in (trained, tested)]
    rows = []
    for pool, clean in results["retrieval"].items():
        noisy = results["noise"][pool]
        cells = [_cell(clean[MAP]), _cell(noisy[MAP]), _cell(clean[P1]), _cell(noisy[P1])]
        rows.append([pool, *cells, f"{noisy[MAP]['mean'] - clean[MAP]['mean']:+.3f}"])
    clean, noisy = results["raw_pixels"]["canvas"], results["raw_pixels"]["noisy"]
    cells = [f"{v:.3f}" for v in (clean[MAP], noisy[MAP], clean[P1], noisy[P1])]
    rows.append([RAW, *cells, f"{noisy[MAP] - clean[MAP]:+.3f}"])
    return (
        "## 4. Noise\n\n"
        f"The models of study 1 (trained with noise {trained}) on the same held-out canvases with "
        f"noise {tested}: the standard deviation of the Gaussian noise added to the canvas, "
        "clipped to [0, 1] with the digit.\n\n"
        + _table([*header, "MAP@R change"], rows)
        + "\n![noise](noise.png)\n"
    )


def findings_section(results: dict) -> str:
    loses, wins = findings(results)
    lines = [
        "## Findings, computed from the numbers above\n",
        "A difference is *beyond the seed spread* when it exceeds the sum of the two standard "
        "deviations; *within* it, other seeds may reverse it.\n",
        "**Where max pooling loses** (another pooling has the higher mean):\n",
        "\n".join(f"- {line}" for line in loses) if loses else "- nowhere in these measures",
        "\n**Where max pooling comes first**:\n",
        "\n".join(f"- {line}" for line in wins) if wins else "- nowhere in these measures",
    ]
    return "\n".join(lines) + "\n"


def render_markdown(results: dict) -> str:
    sections = (
        introduction,
        retrieval_section,
        translation_section,
        size_section,
        noise_section,
        findings_section,
    )
    return "\n".join(section(results) for section in sections)


def summary(results: dict) -> str:
    """What the command prints: the retrieval table and the findings."""
    return "\n".join(section(results) for section in (retrieval_section, findings_section))


# Plots ------------------------------------------------------------------------------------------


def write_plots(results: dict, folder: Path) -> list[Path]:
    """The PNG plots named in ``PLOTS``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pools = list(results["retrieval"])
    config = results["config"]
    paths = []

    def save(figure, name: str) -> None:
        figure.tight_layout()
        paths.append(folder / name)
        figure.savefig(paths[-1], dpi=80)
        plt.close(figure)

    def bars(axis, groups: list[tuple[str, dict[str, dict]]], metric: str) -> None:
        """One group of bars per entry, one bar per pooling (mean ± std), the seeds as dots."""
        width = 0.8 / len(pools)
        for i, pool in enumerate(pools):
            offset = (i - (len(pools) - 1) / 2) * width
            for g, (_, stats) in enumerate(groups):
                stat = stats[pool]
                axis.bar(
                    g + offset,
                    stat["mean"],
                    width,
                    yerr=stat["std"],
                    color=f"C{i}",
                    label=pool if g == 0 else None,
                    capsize=2,
                )
                axis.plot([g + offset] * len(stat["values"]), stat["values"], "k.", markersize=3)
        axis.set_xticks(range(len(groups)), [name for name, _ in groups])
        axis.set_ylabel(METRIC_LABELS[metric])

    def pair(groups_of, title: str, name: str, raw_of=None) -> None:
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for axis, metric in zip(axes, (MAP, P1), strict=True):
            bars(axis, groups_of(metric), metric)
            if raw_of is not None:
                axis.axhline(raw_of(metric), color="grey", ls="--", lw=0.8)
        axes[0].legend(fontsize=7, ncols=2)
        figure.suptitle(title, fontsize=9)
        save(figure, name)

    seeds = config["seeds"]
    pair(
        lambda m: [("held-out digits", {p: results["retrieval"][p][m] for p in pools})],
        f"Held-out retrieval: mean ± std over {seeds} seeds (dots: seeds; dashed: raw pixels)",
        "retrieval.png",
        raw_of=lambda m: results["raw_pixels"]["canvas"][m],
    )

    translation = results["translation"]
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    for i, pool in enumerate(pools):
        curve = translation["cosine"][pool]
        low = [m - s for m, s in zip(curve["mean"], curve["std"], strict=True)]
        high = [m + s for m, s in zip(curve["mean"], curve["std"], strict=True)]
        axis.plot(translation["shifts"], curve["mean"], color=f"C{i}", label=pool)
        axis.fill_between(translation["shifts"], low, high, color=f"C{i}", alpha=0.2)
    axis.plot(translation["shifts"], translation["raw_pixels"], "k--", lw=0.8, label=RAW)
    axis.set_xlabel("shift from the centre (pixels)")
    axis.set_ylabel("cosine similarity to the centre")
    axis.set_title(
        f"One digit moved across a {translation['canvas']}-pixel canvas (band: ± std over seeds)",
        fontsize=9,
    )
    axis.legend(fontsize=7)
    save(figure, "translation.png")

    small, large = config["small_canvas"], config["large_canvas"]
    pair(
        lambda m: [
            (f"{low}-{high} px", {p: results["sizes"][p][split][m] for p in pools})
            for split, (low, high) in (("small", small), ("large", large))
        ],
        f"Trained on {small[0]}-{small[1]} px canvases, evaluated on both sizes",
        "sizes.png",
    )

    trained, tested = config["train"]["noise"], config["test_noise"]
    pair(
        lambda m: [
            (f"noise {trained}", {p: results["retrieval"][p][m] for p in pools}),
            (f"noise {tested}", {p: results["noise"][p][m] for p in pools}),
        ],
        f"Trained with noise {trained}, evaluated with both",
        "noise.png",
    )
    return paths


def write_report(results: dict, folder: Path) -> list[Path]:
    """Write ``results.json``, ``report.md`` and the plots; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "results.json", folder / "report.md"]
    written[0].write_text(json.dumps(results, indent=1) + "\n")
    written[1].write_text(render_markdown(results))
    written += write_plots(results, folder)
    logger.info("wrote %s", ", ".join(str(path) for path in written))
    return written
