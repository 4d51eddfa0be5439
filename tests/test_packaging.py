"""Packaging: the CI runs the README's commands, the kernels ship inside the package, and the
package works without Triton."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(heading: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_commands():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = _readme_block("Install")
    # The README creates and activates its own venv; CI makes a fresh one the same way.
    for command in install[1:] + _readme_block("Test"):
        assert command in ci, f"README command {command!r} is not run by .ci/run"


def test_kernels_are_not_a_top_level_module():
    import gmp_triton.kernels

    assert Path(gmp_triton.kernels.__file__).parent.name == "kernels"
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels'))"],
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    assert found.stdout.strip() == "None"


def test_works_without_triton():
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class NoTriton(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "triton":
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoTriton())
        import torch, gmp_triton
        from gmp_triton import _backend
        assert not _backend.TRITON_AVAILABLE
        x = torch.randn(2, 3, 4, 4, requires_grad=True)
        gmp_triton.gmp_l2norm(x).sum().backward()
        print(gmp_triton.global_max_pool(x).shape, x.grad.shape)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd="/", check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.Size([2, 3]) torch.Size([2, 3, 4, 4])"
