"""torch.compile: a model using the layer traces without graph breaks and does not recompile for
new batch sizes or map sizes."""

import pytest
import torch
from conftest import CPU_BACKENDS
from torch._dynamo.testing import CompileCounterWithBackend

import gmp_triton
from gmp_triton import _backend


class TinyEmbedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = gmp_triton.GMPL2Norm()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


class ScaledReluEmbedder(torch.nn.Module):
    """Elementwise layers that Inductor fuses into generated code around the op (Inductor's CPU
    convolution specialises on the input width, which would hide what this test checks)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3).view(3, 1, 1))
        self.head = gmp_triton.GMPL2Norm()

    def forward(self, x):
        return self.head(torch.relu(x * self.scale + 0.1))


# Sizes 0 and 1 are specialised by the compiler by design, so every size here is at least 2.
SIZES = [(2, 9, 11), (3, 16, 16), (5, 7, 20), (4, 12, 5)]


def _run(model, backend_name, memory_format):
    """Compile ``model``, run every size forward and backward against eager, and return the
    number of graphs compiled after the first size and after all of them."""
    counter = CompileCounterWithBackend(backend_name)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    compiled_after_first = None
    for n, h, w in SIZES:
        x = torch.randn(n, 3, h, w).contiguous(memory_format=memory_format).requires_grad_(True)
        out = compiled(x)
        out.square().sum().backward()
        x_eager = x.detach().clone().requires_grad_(True)
        expected = model(x_eager)
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(x.grad, x_eager.grad)
        if compiled_after_first is None:
            compiled_after_first = counter.frame_count
    graphs = "\n".join(graph.code for graph in counter.graphs)
    assert "torch.ops.gmp_triton.gmp_l2norm_forward" in graphs, "the op is not in the graph"
    return compiled_after_first, counter.frame_count


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_compile_fullgraph_dynamic_no_recompile(backend, memory_format):
    torch._dynamo.reset()
    model = TinyEmbedder()
    with _backend.cpu_backend(backend):
        after_first, after_all = _run(model, "aot_eager", memory_format)
    assert after_all == after_first, f"{after_all - after_first} recompilations for new sizes"


def test_compile_with_inductor():
    """Inductor generates and runs code around the registered ops (on the PyTorch CPU path, to
    keep the suite fast; the op boundary is the same for both implementations)."""
    torch._dynamo.reset()
    with _backend.cpu_backend("torch"):
        after_first, after_all = _run(ScaledReluEmbedder(), "inductor", torch.contiguous_format)
    assert after_all == after_first, f"{after_all - after_first} recompilations for new sizes"
