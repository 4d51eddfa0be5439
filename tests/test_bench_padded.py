"""The benchmark of a padded batch against loops over its maps: every implementation computes the
same embeddings, the rows are complete, and the report's speed-ups follow from its times."""

import json
import math

import pytest

from gmp_triton.benchmarking import measure, padded, report
from gmp_triton.benchmarking.cases import MODES
from gmp_triton.cli import main

CASE = padded.PaddedCase("padded batch", 5, 6, 2, 9, seed=4)


def test_case_counts_valid_and_padded_positions():
    sizes = CASE.sizes()
    assert len(sizes) == 5 and all(2 <= side <= 9 for size in sizes for side in size)
    assert len(set(sizes)) > 1
    valid, padded_positions = CASE.positions()
    assert valid == sum(h * w for h, w in sizes)
    assert padded_positions == 5 * max(h for h, _ in sizes) * max(w for _, w in sizes)
    maps = CASE.make_maps("cpu")
    assert [tuple(m.shape) for m in maps] == [(6, h, w) for h, w in sizes]


def test_every_implementation_is_timed_in_every_mode_and_agrees():
    timer = measure.TimerSettings(cpu_min_time_s=0.0, cpu_min_runs=3)
    rows = padded.measure_padded_case(CASE, "cpu", timer)
    found = {(row["implementation"], row["mode"]) for row in rows}
    assert found == {(name, mode) for name in padded.IMPLEMENTATIONS for mode in MODES}
    for row in rows:
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert row["max_abs_difference"] < 1e-6, row
        assert row["case"] == CASE.label()


@pytest.fixture(scope="module")
def padded_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    argv = ["bench", "--device", "cpu", "--quick", "--shapes", "padded", "--cpu-min-time", "0.01"]
    assert main([*argv, "--no-gpu-code", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_bench_command_reports_the_padded_batch_alone(padded_report):
    out, run = padded_report
    # "--shapes padded" selects only the padded-batch case: no dense case was measured.
    assert run["results"] == []
    assert {row["implementation"] for row in run["padded"]} == set(padded.IMPLEMENTATIONS)
    text = (out / "report.md").read_text()
    assert "## Padded batch vs a loop over items" in text
    for name in padded.IMPLEMENTATIONS:
        assert f"`{name}`" in text


def test_padded_speedups_are_ratios_of_the_measured_medians(padded_report):
    out, run = padded_report
    table = report.padded_table(run)
    medians = {(r["case"], r["implementation"], r["mode"]): r["median_ms"] for r in run["padded"]}
    for (case, name, mode), median in medians.items():
        if name == "padded":
            continue
        expected = median / medians[(case, "padded", mode)]
        assert math.isclose(report.padded_speedup(run, case, name, mode), expected)
        assert f"{expected:.2f}" in table
