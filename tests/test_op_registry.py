"""The op registry: each quantized matmul declared once, implementations registered per device, and
the quantized linears calling their op without choosing a backend."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from llmquant.inference import ops
from llmquant.inference.nn import QUANTIZED_LINEARS, BnB4bitLinear, Fp8Linear, GPTQLinear, QuantizedLinear

NN_FOLDER = Path(ops.__file__).parents[1] / "nn"


def test_every_op_is_declared_once_with_a_custom_op_and_a_triton_implementation():
    from llmquant.inference.ops import triton  # noqa: F401  (registers the "triton" implementations)

    assert set(ops.OPS) == {"gptq_linear", "awq_linear", "w8a8_linear", "codebook4_linear", "fp8_linear",
                            "fp8_block_linear", "hadamard_transform"}
    for name, op in ops.OPS.items():
        assert getattr(torch.ops.llmquant, name).default._schema.name == f"llmquant::{name}"
        assert (name, ops.TRITON) in ops.registry._IMPLEMENTATIONS, name
    with pytest.raises(ValueError, match="declared twice"):
        ops.declare("gptq_linear", None)(lambda x: x)
    with pytest.raises(ValueError, match="no backend 'cuda-graphs'"):
        ops.implements("gptq_linear", "cuda-graphs")


def test_every_quantized_linear_calls_a_declared_op_with_its_own_tensors():
    for cls in QUANTIZED_LINEARS:
        assert issubclass(cls, QuantizedLinear), cls
    layers = [GPTQLinear(64, 32, 4, 32, 2, dtype=torch.float32), Fp8Linear(64, 32),
              Fp8Linear(64, 32, block=32, dynamic_activations=False), BnB4bitLinear(64, 32, "nf4", 32)]
    for layer in layers:
        assert layer.op_name in ops.OPS
        # the op's schema takes x and exactly the arguments the layer gives
        schema = getattr(torch.ops.llmquant, layer.op_name).default._schema
        assert len(schema.arguments) == 1 + len(layer.op_arguments()), layer.op_name
    assert {Fp8Linear(64, 32).op_name, Fp8Linear(64, 32, block=32, dynamic_activations=False).op_name} == \
        {"fp8_linear", "fp8_block_linear"}


def test_a_device_registers_its_prepared_weight_and_the_layer_runs_it(monkeypatch):
    """The layer does not choose: the device of x picks the implementation registered for it. A stand-in
    registered for "meta" runs for a layer on meta and nowhere else; with none registered the op runs."""
    layer = GPTQLinear(64, 32, 4, 32, 2, dtype=torch.float32, device="meta")
    x = torch.empty(3, 64, device="meta")
    seen = []

    def run_prepared(module, inputs):
        seen.append(module)
        return lambda inputs: torch.full((inputs.shape[0], 7), 1.0, device=inputs.device)

    monkeypatch.setitem(ops.registry._PREPARED, "meta", run_prepared)
    assert layer(x).shape == (3, 7) and seen == [layer]
    monkeypatch.delitem(ops.registry._PREPARED, "meta")
    assert layer(x).shape == (3, 32)  # the op's fake (shape) implementation
    assert seen == [layer]


def test_a_gradient_through_x_runs_the_reference_not_a_prepared_weight(monkeypatch):
    layer = GPTQLinear(64, 32, 4, 32, 2, dtype=torch.float32)
    layer.qweight.zero_()
    layer.qzeros.zero_()
    layer.scales.fill_(0.5)
    layer.g_idx.copy_(torch.arange(64) // 32)
    monkeypatch.setitem(ops.registry._PREPARED, "cpu", lambda module, inputs: pytest.fail("prepared weight ran"))
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    assert layer.prepared is None


def test_the_prepared_weight_is_not_saved_and_a_load_drops_it():
    layer = GPTQLinear(64, 32, 4, 32, 2, dtype=torch.float32)
    layer.prepared = object()
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"}
    layer.load_state_dict(layer.state_dict())
    assert layer.prepared is None


def test_the_quantized_linears_import_no_backend():
    """nn/ calls ops; it imports nothing from the CPU paths, the Triton implementations or the kernels."""
    for path in NN_FOLDER.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                names = {alias.name for alias in node.names}
                assert not module.startswith("..cpu") and "cpu" not in names, (path.name, module)
                assert "triton" not in module and "triton" not in names, (path.name, module)
                assert "llmquant_kernels" not in module, (path.name, module)
            elif isinstance(node, ast.Import):
                assert not any("triton" in alias.name or "llmquant_kernels" in alias.name for alias in node.names)
