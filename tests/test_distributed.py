"""Training in two processes under torchrun (gloo, on the CPU) against one process trained on the
same global batches; continuing a run with another number of processes; bad input on one rank.

The two processes are started by ``python -m torch.distributed.run --standalone``, on localhost,
with a time limit so that a hang fails the test. They run the CPU's PyTorch path, as the
one-process references here do (``cpu_backend("torch")``): their environment leaves out
``TRITON_INTERPRET``, which at import would send CPU tensors to the interpreted kernels (slow;
the kernels are tested elsewhere).

Tolerances. Two processes add the same numbers in another order (each process's share of the
gradient, then an all-reduce; batch-norm statistics from sums over the two halves), so the
results differ by rounding only. Measured here after 11 AdamW steps: at most 1e-5 on a weight,
4e-5 on a running variance, 3e-5 of the largest value on the optimiser's moment estimates. The
tests allow 5e-5 plus 1e-4 relative on weights and buffers, and 1e-3 of the largest value on
the moments. Training moves the weights by about 1e-2 (checked below); with the gradient of the
gathered rows not scaled by the number of processes, or with batch norm not synchronised, the
weights were off by 1e-4 to 2e-2 and the moments by 30% to 50%.

Those rounding differences grow when training goes on from them: the miner keeps or drops a pair
by comparing a similarity with a threshold, so a difference of 1e-5 can flip a pair and change a
later gradient. After a second epoch from the two-process checkpoint the weights differed from
the one-process run by up to 3e-4 and the moments by up to 1.5%. A run continued from a
checkpoint of the other process count is thus held to looser bounds (CONTINUED): within one
AdamW step (lr 1e-3) on weights and 5% on the moments, while its losses and its random states
must still match. Comparisons that start from the same checkpoint keep the tight bounds.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gmp_triton
from gmp_triton import _backend
from gmp_triton.cli import main
from gmp_triton.training.checkpoint import load_checkpoint
from gmp_triton.training.config import TrainConfig
from gmp_triton.training.run import new_model

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("sklearn")
pytestmark = pytest.mark.skipif(
    sys.platform == "win32"
    or not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo, and process groups (not Windows)",
)

# A torchrun launch here takes 10-15 s, most of it importing torch in each process.
TORCHRUN_TIMEOUT = 150

# Digits on small canvases: 11 steps of 80 images (40 per process) per epoch.
CANVASES = ("--canvas-size", "12", "16", "--seed", "0")
# A loss with parameters of its own (the proxies), and a projection in the head.
PROXIES = (
    "--data",
    "digits-plain",
    "--loss",
    "proxy-anchor",
    "--embed-dim",
    "16",
    "--m-per-class",
    "8",
    "--seed",
    "1",
)


def run_command(*argv) -> int:
    with _backend.cpu_backend("torch"):
        return main([str(arg) for arg in argv])


def torchrun(processes: int, *argv, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``argv`` (a script, or ``-m module``, and its arguments) in ``processes`` processes
    started by torchrun; fail the test if they have not all ended within the time limit."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CPU's PyTorch path in the workers
    env["OMP_NUM_THREADS"] = "1"
    # The workers import this very copy of gmp_triton, wherever it was imported from here.
    package_root = str(Path(gmp_triton.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # the group talks over the loopback interface only
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        *(str(arg) for arg in argv),
    ]
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a hang can be ended with all its processes
    ) as launched:
        try:
            stdout, stderr = launched.communicate(timeout=TORCHRUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(launched.pid, signal.SIGKILL)
            stdout, stderr = launched.communicate()
            pytest.fail(f"torchrun still running after {TORCHRUN_TIMEOUT} s:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, launched.returncode, stdout, stderr)


def one_process_runs(root: Path, options: tuple[str, ...]) -> dict[str, Path]:
    """One process: a run of one epoch, and a copy of it continued to two epochs."""
    first, second = root / "epoch1", root / "epoch2"
    assert run_command("train", *options, "--epochs", "1", "--out", first) == 0
    shutil.copytree(first, second)
    assert run_command("train", "--resume", second, "--epochs", "2") == 0
    return {"epoch1": first, "epoch2": second}


@pytest.fixture(scope="module")
def canvas_runs(tmp_path_factory) -> dict[str, Path]:
    return one_process_runs(tmp_path_factory.mktemp("one_process_canvases"), CANVASES)


@pytest.fixture(scope="module")
def proxy_runs(tmp_path_factory) -> dict[str, Path]:
    return one_process_runs(tmp_path_factory.mktemp("one_process_proxies"), PROXIES)


# Tolerances (see the module's docstring): weights and buffers (absolute, relative), and the
# optimiser's moments as a fraction of their largest value.
SAME_START = {"atol": 5e-5, "rtol": 1e-4, "moments": 1e-3}
CONTINUED = {"atol": 1e-3, "rtol": 1e-4, "moments": 5e-2}


def assert_close_tensors(found: dict, expected: dict, what: str, atol: float, rtol: float) -> None:
    assert found.keys() == expected.keys(), what
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(
                found[name], value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}"
            )
        else:
            assert torch.equal(found[name], value), f"{what} {name}"


def assert_same_training(run_dir: Path, reference_dir: Path, tolerance: dict = SAME_START) -> None:
    """The checkpoint in ``run_dir`` holds what the one-process one in ``reference_dir`` does,
    within ``tolerance``."""
    run, reference = load_checkpoint(run_dir), load_checkpoint(reference_dir)
    assert run["epoch"] == reference["epoch"]
    assert [entry["loss"] for entry in run["history"]] == pytest.approx(
        [entry["loss"] for entry in reference["history"]], rel=1e-5
    )
    atol, rtol = tolerance["atol"], tolerance["rtol"]
    assert_close_tensors(run["model"], reference["model"], "model", atol, rtol)
    assert_close_tensors(run["loss"], reference["loss"], "loss", atol, rtol)

    moments = reference["optimiser"]["state"]
    assert run["optimiser"]["state"].keys() == moments.keys()
    for index, state in moments.items():
        for key in ("exp_avg", "exp_avg_sq"):
            found, expected = run["optimiser"]["state"][index][key], state[key]
            scale = expected.abs().max().item()
            difference = (found - expected).abs().max().item()
            bound = tolerance["moments"] * scale
            assert difference <= bound, f"parameter {index} {key}: {difference} of {scale}"

    # Every process drew each whole global batch, as the single process did: same random states.
    for key in ("torch", "batches"):
        assert torch.equal(run["random"][key], reference["random"][key]), key
    assert torch.equal(run["random"]["numpy"]["keys"], reference["random"]["numpy"]["keys"])
    assert run["random"]["numpy"]["position"] == reference["random"]["numpy"]["position"]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_two_processes_train_as_one_on_the_same_global_batches(canvas_runs, tmp_path):
    out = tmp_path / "two_processes"
    done = torchrun(
        2, "-m", "gmp_triton", "train", *CANVASES, "--epochs", "1", "--out", out, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_training(out, canvas_runs["epoch1"])

    # The comparison is between trained weights, not two copies of the initial ones.
    initial = new_model(TrainConfig(**{"canvas_min": 12, "canvas_max": 16})).state_dict()
    trained = load_checkpoint(out)["model"]
    moved = max(
        (trained[name] - initial[name]).abs().max().item() for name in initial if "weight" in name
    )
    assert moved > 1e-3, moved

    # Rank 0 alone prints the table and logs the epoch.
    assert done.stdout.count("Held-out classes") == 1, done.stdout
    assert done.stderr.count("epoch 1/1") == 1, done.stderr[-4000:]
    # The held-out images were embedded half by each process and gathered in order: the metrics
    # are those of the one-process run (2e-3: one query of 896 that changes its neighbour).
    metrics, reference = read_metrics(out), read_metrics(canvas_runs["epoch1"])
    assert metrics["device"].endswith(", 2 processes")
    assert metrics["results"].keys() == reference["results"].keys()
    for model, values in reference["results"].items():
        assert metrics["results"][model] == pytest.approx(values, abs=2e-3), model

    # The run continues in one process, as the one-process run continued.
    assert run_command("train", "--resume", out, "--epochs", "2") == 0
    assert_same_training(out, canvas_runs["epoch2"], CONTINUED)


def test_a_one_process_run_continues_in_two_processes(proxy_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(proxy_runs["epoch1"], run)
    done = torchrun(2, "-m", "gmp_triton", "train", "--resume", run, "--epochs", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    # Weights, proxies and optimiser state as if the one process had continued.
    assert_same_training(run, proxy_runs["epoch2"])
    assert len(read_metrics(run)["epochs"]) == 2


def test_bad_input_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    script = tmp_path / "rank_1_has_no_data.py"
    script.write_text(
        "import os, sys\n"
        "from gmp_triton.cli import main\n"
        "data = sys.argv[1] if os.environ['RANK'] == '1' else 'digits-plain'\n"
        "sys.exit(main(['train', '--data', data, '--epochs', '1', '--out', sys.argv[2]]))\n"
    )
    missing, out = tmp_path / "nowhere", tmp_path / "run"
    done = torchrun(2, script, missing, out, cwd=tmp_path)

    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("gmp-triton")]
    assert errors == [
        f"gmp-triton train: error: rank 1 of 2: data folder '{missing}' does not exist"
    ], done.stderr[-4000:]
    # No traceback from the package (torchrun adds its own summary of the failed processes).
    assert "gmp_triton/training" not in done.stderr, done.stderr[-4000:]
    assert not out.exists()
