"""``benchmarks/gpu_check.sh`` on a machine without a GPU: it must refuse at once, and each of its
steps must work when rehearsed on the CPU (``--rehearse``).

Both tests are skipped where PyTorch sees a GPU: there the script is the real thing, and it runs
this suite itself.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"

pytestmark = [
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="on a GPU machine gpu_check.sh runs for real (and runs this suite)",
    ),
    pytest.mark.skipif(shutil.which("bash") is None, reason="gpu_check.sh is a bash script"),
]


def run_script(*args: str, env: dict | None = None, timeout: float = 600):
    environment = dict(os.environ, **(env or {}))
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


def test_refuses_clearly_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    result = run_script(str(out))
    assert result.returncode == 2
    assert "no CUDA GPU" in result.stderr or "sees no CUDA GPU" in result.stderr
    assert "nothing was run" in result.stderr
    assert not out.exists(), "nothing may be written when the script refuses"


def test_refuses_when_torch_sees_no_gpu_even_with_nvidia_smi(tmp_path):
    # A stand-in nvidia-smi on PATH: the second check (PyTorch's view) must still refuse.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    result = run_script(str(out), env={"PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert result.returncode == 2
    assert "torch.cuda.is_available() is false" in result.stderr
    assert not out.exists()


def test_rehearsal_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    result = run_script("--rehearse", str(out))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # The staged package is the one imported, not the source tree.
    assert "== package" in result.stdout
    # The gate ran and wrote its tables.
    gate = json.loads((out / "gpu_code.json").read_text())
    assert gate and all(row["error"] is None for row in gate)
    assert (out / "gpu_code.md").read_text().startswith("GPU code")
    # The CUDA tests were collected and skipped with their reason, not failed.
    assert "skipped" in (out / "tests.log").read_text()
    # The report wrote all its files, from the CPU.
    for name in ("report.md", "results.json", "bandwidth.png", "speedup.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "results.json").read_text())["environment"]["device"] == "cpu"
