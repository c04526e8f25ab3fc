"""How an op is declared, how its implementations register, and which one a call runs.

An op is declared once, by its reference implementation (`declare`): torch code for any device,
differentiable, whose signature is the op's schema and whose arithmetic is the numerics every other
implementation reproduces. Declaring makes it a torch custom op (`torch.ops.llmquant.<name>`) with a
fake (shape-only) implementation, so torch.compile and CUDA graphs see one opaque call.

Implementations register per backend, as bitsandbytes registers kernels per device:

- "reference": the declaration itself, on any device;
- "triton": llmquant_kernels (ops/triton.py, `implements`), on a GPU, and on a CPU under the Triton
  interpreter (TRITON_INTERPRET=1 before triton is imported), as the tests use it;
- a prepared weight (`register_prepared`): a device whose fastest path needs the layer's tensors in
  another layout converts them once into an object the layer holds (`layer.prepared`, see
  nn/base.py) and runs that; the CPU does (llmquant.inference.cpu registers it when imported).

A quantized linear's call (`call_layer`) runs, in order: the reference directly when autograd needs a
gradient through x (no other implementation has a backward: QLoRA training); the layer's prepared
weight where its device registered one and it takes the call; else the custom op (`call`), whose
kernel runs the backend chosen for the device: "triton" on CUDA and "reference" on the CPU under
"auto", or what LLMQUANT_KERNELS (or `use_backend`) asks for. Quantized-linear modules call
`call_layer`, never a backend.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import ConfigError

REFERENCE = "reference"
TRITON = "triton"
BACKENDS = ("auto", REFERENCE, TRITON)
# Backends whose module registers its implementations when imported, at the first call that wants it:
# importing triton is slow, and on a CPU it must come after TRITON_INTERPRET is set.
_BACKEND_MODULES = {TRITON: ".triton"}
_override: list[str] = []


@dataclass(frozen=True)
class Op:
    name: str
    reference: Callable  # the inputs (its signature is the schema) and the numerics
    custom_op: Callable  # torch.ops.llmquant.<name>


OPS: dict[str, Op] = {}
_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}  # (op, backend) -> the function
_PREPARED: dict[str, Callable] = {}  # device type -> run_prepared(layer, x): a kernel, or None


def declare(name: str, output_features: Callable | None):
    """Declare op `name` by its reference implementation (the decorated function). The fake
    implementation gives an output of x's dtype and shape [..., output_features(*other arguments)]
    (x's shape when None)."""
    def decorate(reference: Callable) -> Callable:
        if name in OPS:
            raise ValueError(f"op {name!r} is declared twice")

        def run(x, *args):
            return implementation(name, x.device.type)(x, *args)

        custom_op = torch.library.custom_op(f"llmquant::{name}", run, mutates_args=(), device_types=("cpu", "cuda"),
                                            schema=torch.library.infer_schema(reference, mutates_args=()))
        if output_features is None:
            custom_op.register_fake(lambda x, *args: torch.empty_like(x))
        else:
            custom_op.register_fake(lambda x, *args: x.new_empty(*x.shape[:-1], output_features(*args)))
        OPS[name] = Op(name, reference, custom_op)
        return reference

    return decorate


def implements(name: str, backend: str):
    """Register the decorated function as op `name`'s implementation on `backend`; it takes the
    reference's arguments."""
    if backend not in _BACKEND_MODULES:
        raise ValueError(f"no backend {backend!r} takes implementations; known: {', '.join(_BACKEND_MODULES)}")

    def decorate(fn: Callable) -> Callable:
        _IMPLEMENTATIONS[(name, backend)] = fn
        return fn

    return decorate


def register_prepared(device_type: str, run_prepared: Callable) -> None:
    """run_prepared(layer, x): the kernel that runs `layer` on x (on `device_type`) from the weight it
    prepared and the layer holds as `layer.prepared` (preparing it at need), or None to run the op."""
    _PREPARED[device_type] = run_prepared


@contextlib.contextmanager
def use_backend(backend: str):
    """Within the block, run the quantized ops on `backend` ("auto", "reference" or "triton")."""
    if backend not in BACKENDS:
        raise ConfigError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    _override.append(backend)
    try:
        yield
    finally:
        _override.pop()


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend` block, else LLMQUANT_KERNELS, else "auto"."""
    wanted = _override[-1] if _override else os.environ.get("LLMQUANT_KERNELS", "auto")
    if wanted not in BACKENDS:
        raise ConfigError(f"LLMQUANT_KERNELS must be one of {', '.join(BACKENDS)}, got {wanted!r}")
    return wanted


def backend_for(device_type: str) -> str:
    wanted = requested_backend()
    if wanted == "auto":
        return TRITON if device_type == "cuda" else REFERENCE
    if wanted == TRITON and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("the Triton kernels run on the CPU only under the interpreter: set TRITON_INTERPRET=1 "
                          "before triton is imported")
    return wanted


def implementation(name: str, device_type: str) -> Callable:
    """Op `name`'s implementation for tensors on `device_type`: the backend chosen for that device."""
    backend = backend_for(device_type)
    if backend == REFERENCE:
        return OPS[name].reference
    importlib.import_module(_BACKEND_MODULES[backend], __package__)
    return _IMPLEMENTATIONS[(name, backend)]


def call(name: str, x: torch.Tensor, *args) -> torch.Tensor:
    """Op `name` on (x, *args): the custom op, or its reference when autograd needs a gradient through x."""
    backend_for(x.device.type)  # a bad LLMQUANT_KERNELS is refused on every path
    if torch.is_grad_enabled() and x.requires_grad:
        return OPS[name].reference(x, *args)
    return OPS[name].custom_op(x, *args)


def call_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """Quantized linear `layer` on x: its prepared weight where x's device registered one and it takes
    the call, else its op (`layer.op_name`) on its tensors (`layer.op_arguments()`)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        device_type = x.device.type
        prepared = layer.prepared
        if prepared is not None and prepared.device_type != device_type and not torch.compiler.is_compiling():
            layer.prepared = None  # moved off the device it was prepared for: keep no copies made for that one
        run_prepared = _PREPARED.get(device_type)
        # run_prepared reads the requested backend (a bad LLMQUANT_KERNELS is refused there too)
        kernel = run_prepared(layer, x) if run_prepared is not None else None
        if kernel is not None:
            return kernel(x)
    return call(layer.op_name, x, *layer.op_arguments())
