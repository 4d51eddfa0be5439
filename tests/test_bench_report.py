"""The benchmark report on the CPU: what it measures, how it counts bytes, and the files it writes.

Nothing here checks a speed: the report's numbers are checked for consistency with each other
(GB/s with time and bytes, speed-ups with times, quantiles in order), not against targets.
"""

import json
import math
import shutil
import time

import pytest
import torch

from gmp_triton.benchmarking import bench, cases, measure, report
from gmp_triton.cli import main


def element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ideal_bytes_read_the_map_once_and_write_its_gradient_once(dtype):
    shape = cases.Shape("test", 3, 5, (7, 11))
    case = cases.Case(shape, dtype, "NCHW")
    size, rows = element_bytes(dtype), 3 * 5
    map_bytes = 3 * 5 * 7 * 11 * size
    norm_bytes = 3 * (8 if dtype == torch.float64 else 4)

    assert cases.ideal_bytes(case, "forward") == map_bytes + rows * size
    # Backward: the gradient written once; output gradient, pooled values, int32 index and norm
    # read once.
    backward = map_bytes + rows * size + rows * size + rows * 4 + norm_bytes
    assert cases.ideal_bytes(case, "backward") == backward
    assert cases.ideal_bytes(case, "forward+backward") == map_bytes + rows * size + backward


def test_cuda_grid_covers_both_ends_of_real_use():
    sizes = {shape.size for shape in cases.CUDA_SHAPES}
    assert {(32, 2048, 7, 7), (256, 2048, 7, 7), (64, 768, 14, 14)} <= sizes
    assert {(n, 256, h, h) for n in (1, 8) for h in (56, 128)} <= sizes
    assert set(cases.CUDA_DTYPES) == {torch.float32, torch.float16, torch.bfloat16}
    assert set(cases.LAYOUTS) == {"NCHW", "channels_last"}


def test_cpu_timer_reports_ordered_quantiles_of_real_runs():
    settings = measure.TimerSettings(cpu_min_time_s=0.0, cpu_min_runs=7)
    pause_s = 0.002
    timing = measure.time_function(lambda: time.sleep(pause_s), "cpu", settings)
    assert timing.runs == 7
    assert pause_s * 1e3 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_saved_for_backward_counts_each_storage_once_and_names_the_input():
    x = torch.randn(4, 8, requires_grad=True)
    # x * x saves x twice: one storage, and it is the input.
    saved = measure.saved_for_backward(lambda t: t * t, x)
    assert saved == measure.SavedBytes(total=x.nbytes, input=x.nbytes)
    # exp saves its output only.
    saved = measure.saved_for_backward(torch.exp, x)
    assert saved == measure.SavedBytes(total=x.nbytes, input=0)


# torch.compile on the CPU needs a C++ compiler; without one the compiled provider is left out
# (its backward-only timing, the part that needs care, is then exercised on CUDA only).
HAS_CXX = any(shutil.which(name) for name in ("g++", "clang++", "c++"))
PROVIDERS_UNDER_TEST = ["eager_adaptive", *(["compiled_amax"] if HAS_CXX else [])]


def run_quick_report(tmp_path, *extra: str) -> dict:
    out = tmp_path / "report"
    status = main(
        [
            "bench",
            "--device",
            "cpu",
            "--quick",
            "--shapes",
            "early layer",
            "--providers",
            *PROVIDERS_UNDER_TEST,
            "--cpu-min-time",
            "0.01",
            "--no-gpu-code",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert status == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bench")
    return tmp_path / "report", run_quick_report(tmp_path)


def test_cpu_report_writes_every_file(quick_run):
    folder, _ = quick_run
    for name in ("report.md", "results.json", "bandwidth.png", "speedup.png"):
        assert (folder / name).stat().st_size > 0, name
    for name in ("bandwidth.png", "speedup.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_report_measures_every_case_provider_and_mode(quick_run):
    _, run = quick_run
    expected_cases = {
        case.label()
        for case in cases.make_cases(
            [s for s in cases.QUICK_SHAPES if "early layer" in s.name],
            cases.QUICK_DTYPES,
            cases.LAYOUTS,
        )
    }
    measured = {(r["case"], r["provider"], r["mode"]) for r in run["results"]}
    providers = ["gmp_triton", *PROVIDERS_UNDER_TEST]
    assert measured == {(c, p, m) for c in expected_cases for p in providers for m in cases.MODES}
    assert not run["skipped"]


def test_cpu_report_numbers_are_consistent(quick_run):
    _, run = quick_run
    copy_gbps = run["copy"]["gbps"]
    assert copy_gbps > 0
    for row in run["results"]:
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert math.isclose(row["gbps"], row["ideal_bytes"] / (row["median_ms"] * 1e-3) / 1e9)
        assert math.isclose(row["fraction_of_copy"], row["gbps"] / copy_gbps)
        # The CPU allocator keeps no peak statistics: said, not invented.
        assert row["peak_memory_bytes"] is None
        # All implementations compute the same embedding.
        assert row["max_abs_difference"] < 1e-5, row


def test_cpu_report_counts_what_autograd_keeps(quick_run):
    _, run = quick_run
    for row in run["results"]:
        n, c, *spatial = row["size"]
        if row["provider"] == "gmp_triton":
            # pooled (N, C) fp32 + index (N, C) int32 + norm (N,) fp32; never the input.
            assert row["saved_bytes"] == n * c * 4 + n * c * 4 + n * 4
            assert row["saved_input_bytes"] == 0
        if row["provider"] == "eager_adaptive":
            # adaptive_max_pool2d keeps the whole input for its backward.
            assert row["saved_input_bytes"] == n * c * math.prod(spatial) * 4


def test_cpu_report_names_the_device_and_its_speedups(quick_run):
    folder, run = quick_run
    text = (folder / "report.md").read_text()
    assert f"Measured on CPU: {bench.cpu_model()}" in text
    assert "These are CPU numbers" in text
    assert "GPU:" not in text
    for case in {r["case"] for r in run["results"]}:
        ours = next(
            r
            for r in run["results"]
            if (r["case"], r["provider"], r["mode"]) == (case, "gmp_triton", "forward")
        )
        theirs = next(
            r
            for r in run["results"]
            if (r["case"], r["provider"], r["mode"]) == (case, "eager_adaptive", "forward")
        )
        value = theirs["median_ms"] / ours["median_ms"]
        assert math.isclose(report.speedup(run, case, "forward", "eager_adaptive"), value)
        assert f"{value:.2f}" in report.mode_table(run, "forward")


def test_time_budget_stops_new_cases_and_still_reports(tmp_path):
    config = bench.BenchConfig(
        device="cpu",
        cases=cases.make_cases(cases.QUICK_SHAPES, cases.QUICK_DTYPES, ["NCHW"]),
        providers=["gmp_triton"],
        timer=measure.TimerSettings(cpu_min_time_s=0.0, cpu_min_runs=1),
        time_budget_s=0.0,
        copy_bytes=2**20,
    )
    run = bench.run_benchmarks(config)
    assert run["results"] == []
    assert [s["case"] for s in run["skipped"]] == [c.label() for c in config.cases]
    run["gpu_code"] = None
    report.write_report(run, tmp_path)
    assert "## Not measured" in (tmp_path / "report.md").read_text()
