"""Which CPU path each quantized linear takes, the conversion into it (the layer's prepared weight), and the
CPU's implementation of the ops that runs it.

Paths are tried in order of speed (int4pack, int8pack, w8a8, dequantized); the first that accepts a
layer takes it. A layer no path takes, or whose dequantized cache would pass the memory bound, runs
the reference op (dequantize on every call); the unquantized output head gets its own decode path
(head.py). Only the linear types a path takes (TAKES_CPU_KERNELS) are converted: FP8 and
pack-quantized linears run their own op and get nothing. Linears that read one input and
take the same path are converted together and run as one stacked matmul (fused.py), when the
model's architecture map says which they are. A conversion is the layer's prepared weight
(`layer.prepared`, a PreparedWeight; nn/base.py): only layers on the CPU get one; it is dropped at the
layer's first call off the CPU (moved to a GPU it keeps no CPU copies, ops.registry) and at a
load_state_dict, and redone when its source tensors change (freshness.py) at the next CPU call.
disable_cpu_paths takes a model off the paths for good (a base training adapters).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from ...arch import arch_for
from ...errors import ConfigError, UnsupportedArchitectureError
from ..nn import QUANTIZED_LINEARS, AWQLinear, BnB4bitLinear, GPTQLinear, W8A8Linear
from . import dequantized, int4pack, int8pack, w8a8
from .capability import DENSE_FP32_FROM_ROWS, dense_fp32_for, half_takes_every_call, has_fast_bf16_matmul
from .capability import describe as describe_cpu_class
from .freshness import Stamp
from .fused import MemberKernel, SharedInputGroup, open_scopes_around
from .head import HalfGemvHead, describe_head, prepare_output_head

PATHS = (int4pack, int8pack, w8a8, dequantized)
REFERENCE = "reference"
CACHE_MIB_ENV = "LLMQUANT_CPU_CACHE_MIB"
DEFAULT_MAX_CACHE_MIB = 4096.0
# The quantized linears the CPU prepares weights for; the others (FP8, pack-quantized) run their own op.
TAKES_CPU_KERNELS = (GPTQLinear, AWQLinear, W8A8Linear, BnB4bitLinear)
OWN_OP = "its own op on every call (no CPU path takes this layer type)"
DISABLED = "its own op on every call (CPU paths disabled: a base training adapters)"

logger = logging.getLogger("llmquant.inference.cpu")


@dataclass(frozen=True)
class LayerPath:
    name: str
    path: str
    detail: str
    extra_bytes: int
    refusals: dict[str, str] = field(default_factory=dict)  # faster path -> why it did not take the layer
    stacked: bool = False  # runs as one matmul with the linears that read its input


@dataclass
class PreparedWeight:
    """What a quantized linear holds as `layer.prepared` on the CPU: the kernel its calls run."""

    stamp: Stamp  # the module's buffers converted
    dtype: torch.dtype  # the activations' dtype converted for
    path: str
    kernel: object | None  # None: the reference op
    device_type = "cpu"

    def current(self, module: nn.Module, dtype: torch.dtype) -> bool:
        return dtype == self.dtype and self.stamp.matches(_sources(module))


def max_cache_mib_from_env() -> float:
    text = os.environ.get(CACHE_MIB_ENV)
    if text is None:
        return DEFAULT_MAX_CACHE_MIB
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{CACHE_MIB_ENV} must be a number of MiB, got {text!r}") from None
    if value < 0:
        raise ConfigError(f"{CACHE_MIB_ENV} must be >= 0, got {value}")
    return value


def choose_path(module: nn.Module, cache_allowed: bool = True) -> tuple[object | None, dict[str, str]]:
    """(the path module that takes `module`, or None for the reference; why each faster path refused)."""
    if not isinstance(module, TAKES_CPU_KERNELS):
        return None, {}
    refusals = {}
    for path in PATHS:
        reason = path.refusal(module)
        if reason is None and path is dequantized and not cache_allowed:
            reason = "the dequantized-weight memory bound is reached"
        if reason is None:
            return path, refusals
        refusals[path.NAME] = reason
    return None, refusals


@contextlib.contextmanager
def _building():
    # A conversion outlives the call that made it: made under torch.inference_mode() its tensors
    # would be inference tensors, which later calls outside that mode could not use everywhere.
    with torch.inference_mode(False), torch.no_grad():
        yield


def _sources(module: nn.Module) -> list[torch.Tensor]:
    return [b for b in module._buffers.values() if b is not None]


def _on_cpu(module: nn.Module) -> bool:
    sources = _sources(module)
    return bool(sources) and all(b.device.type == "cpu" for b in sources)


def _convert(module: nn.Module, dtype: torch.dtype) -> PreparedWeight:
    path, _ = choose_path(module, module.dequantized_copy_allowed)
    stamp = Stamp(_sources(module))
    with _building():
        kernel = path.build([module], dtype) if path is not None else None
    prepared = PreparedWeight(stamp, dtype, path.NAME if path is not None else REFERENCE, kernel)
    module.prepared = prepared  # one assignment: a concurrent call sees the old or the new
    return prepared


def kernel_for(module: nn.Module, x: torch.Tensor):
    """The CPU's implementation of a quantized linear's op (ops.register_prepared): the kernel of the
    weight prepared for `module` (preparing it when it has none or its tensors changed) to run on the CPU
    tensor x, or None for the op itself: under a kernel backend other than "auto" (use_backend /
    LLMQUANT_KERNELS), when autograd needs a gradient through x (the packed ops have no backward), for a
    layer type no path takes, and for a model taken off the paths (disable_cpu_paths). A layer prepared
    here without having been through prepare_for_cpu gets no dequantized weight (the memory bound is
    kept there): it runs the reference op if no packed path takes it."""
    if torch.compiler.is_compiling():
        return _kernel_for_compiled(module, x)
    if _runs_its_own_op(module, x):
        return None
    prepared = module.prepared
    if prepared is None or not prepared.current(module, x.dtype):
        if not _on_cpu(module):
            return None  # the module's own op reports the device mismatch
        prepared = _convert(module, x.dtype)
    return prepared.kernel


def _runs_its_own_op(module: nn.Module, x: torch.Tensor) -> bool:
    """A CPU call that takes no converted kernel: autograd needs a gradient through x (the packed ops have
    no backward), a kernel backend other than "auto" is asked for, or the model is off the paths."""
    return (not isinstance(module, TAKES_CPU_KERNELS) or (x.requires_grad and torch.is_grad_enabled())
            or ops.requested_backend() != "auto" or not module.prepare_weights)


def _kernel_for_compiled(module: nn.Module, x: torch.Tensor):
    """kernel_for as torch.compile traces it: the conversion the module holds, taken as it is. The
    freshness bookkeeping (weak references, data pointers) cannot be traced, so a traced model runs what
    prepare_for_cpu (or an eager call) converted: compile a model after loading it. A load_state_dict
    drops the conversion (and the compiled graph's guard on it sends the next call back through
    Dynamo); a layer with nothing converted runs its own op."""
    if _runs_its_own_op(module, x):
        return None
    prepared = module.prepared
    if prepared is None or prepared.dtype != x.dtype:
        return None
    return prepared.kernel


def disable_cpu_paths(model: nn.Module) -> None:
    """Take `model` off the CPU paths for good: its quantized linears drop what was converted for them
    and run their own op from now on, and the output head its own forward. For a quantized base that
    trains adapters (QLoRA), whose memory is the packed size: a dequantized cache is 4x an NF4 weight,
    and the gradients the training needs run the reference op anyway."""
    for _, module in _quantized_linears(model):
        module.prepare_weights = False
        module.prepared = None
        module.dequantized_copy_allowed = False
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), HalfGemvHead):
            del module.forward


def _quantized_linears(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZED_LINEARS)]


def shared_input_groups(model: nn.Module) -> list[list[str]]:
    """Full names of linears that read one tensor, from the model's architecture map: per block, the
    readers of each scaling pair's `previous` (a norm's output read by q/k/v, by gate/up), routed
    experts left out (each reads its own tokens). Empty for a model without a config or a map."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    try:
        arch = arch_for(config, model)
        blocks = arch.block_list(model)
    except (UnsupportedArchitectureError, AttributeError):
        return []
    experts = f"{arch.experts.path}." if arch.experts is not None else None
    groups, grouped = [], set()
    for index, block in enumerate(blocks):
        for pair in arch.block_scaling_pairs(block):
            names = [f"{arch.block_prefix(index)}.{n}" for n in pair.linears
                     if experts is None or not n.startswith(experts)]
            if len(names) > 1 and not grouped.intersection(names):
                groups.append(names)
                grouped.update(names)
    return groups


@dataclass
class _Plan:
    module: nn.Module
    dtype: torch.dtype
    path: object | None
    cache_allowed: bool


def _is_current(plan: _Plan) -> bool:
    prepared = plan.module.prepared
    return (prepared is not None and prepared.current(plan.module, plan.dtype)
            and plan.module.dequantized_copy_allowed == plan.cache_allowed)


def _common_parent(model: nn.Module, names: list[str]) -> nn.Module:
    """The closest module holding all of `names` (self_attn for q/k/v): its calls scope the hand-over."""
    parents = [name.split(".")[:-1] for name in names]
    common = []
    for parts in zip(*parents):
        if any(part != parts[0] for part in parts):
            break
        common.append(parts[0])
    return model.get_submodule(".".join(common))


def _convert_group(model: nn.Module, names: list[str], plans: dict[str, _Plan]) -> bool:
    """Convert the linears `names` (one input) into one stacked kernel if they can run as one."""
    if any(n not in plans for n in names):
        return False
    members = [plans[n] for n in names]
    first = members[0]
    if first.path is None or any(p.path is not first.path or p.dtype != first.dtype or not p.cache_allowed
                                 for p in members):
        return False
    modules = [p.module for p in members]
    kernels = [p.module.prepared for p in members]
    if all(_is_current(p) for p in members) and all(isinstance(k.kernel, MemberKernel) for k in kernels) \
            and len({id(k.kernel.group) for k in kernels}) == 1:
        return True  # converted together before, sources unchanged
    reason = ("their input widths differ" if any(m.in_features != modules[0].in_features for m in modules)
              else first.path.fusion_refusal(modules))
    if reason is not None:
        logger.debug("  %s not stacked: %s", ", ".join(names), reason)
        return False
    owner = _common_parent(model, names)
    stamps = [Stamp(_sources(m)) for m in modules]
    with _building():
        group = SharedInputGroup(first.path.build(modules, first.dtype), [m.out_features for m in modules], owner)
    open_scopes_around(owner)
    short = [n.rsplit(".", 1)[-1] for n in names]
    for index, plan in enumerate(members):
        plan.module.dequantized_copy_allowed = True
        member = MemberKernel(group, index, short)
        plan.module.prepared = PreparedWeight(stamps[index], first.dtype, first.path.NAME, member)
    return True


def prepare_for_cpu(model: nn.Module, max_cache_mib: float | None = None,
                    dtype: torch.dtype | None = None) -> list[LayerPath]:
    """Convert every quantized linear of `model` that sits on the CPU into its fastest CPU path, once
    (the forward would do it lazily; doing it here spends the memory up front, applies the bound on
    dequantized weights, `max_cache_mib`, default $LLMQUANT_CPU_CACHE_MIB or 4096, in module order,
    and stacks linears that read one input). Layers elsewhere (a GPU, meta), layers whose forward
    takes no converted kernel and a model taken off the paths get nothing. Logs what runs: a count
    per path, the layers left to their own ops by device, and at debug level each layer's path.
    Returns each CPU layer's path."""
    budget = (max_cache_mib_from_env() if max_cache_mib is None else max_cache_mib) * 2**20
    plans, unconverted, elsewhere = {}, {}, Counter()
    for name, module in _quantized_linears(model):
        if not _on_cpu(module):
            sources = _sources(module)
            elsewhere[str(sources[0].device) if sources else "no tensors"] += 1
            continue
        if not module.prepare_weights or not isinstance(module, TAKES_CPU_KERNELS):
            unconverted[name] = DISABLED if not module.prepare_weights else OWN_OP
            continue
        activation_dtype = dtype or (module.bias.dtype if module.bias is not None else _model_dtype(model))
        path, _ = choose_path(module)
        allowed = path is not dequantized or dequantized.cache_bytes(module, activation_dtype) <= budget
        if path is dequantized and allowed:
            budget -= dequantized.cache_bytes(module, activation_dtype)
        plans[name] = _Plan(module, activation_dtype, path if allowed else choose_path(module, False)[0], allowed)
    stacked = {name for names in (shared_input_groups(model) if plans else [])
               if _convert_group(model, names, plans) for name in names}
    for name, module in _quantized_linears(model):
        if name in plans and name not in stacked and (not _is_current(plans[name]) or isinstance(
                module.prepared.kernel, MemberKernel)):
            module.dequantized_copy_allowed = plans[name].cache_allowed
            _convert(module, plans[name].dtype)
    _keep_dense_copies(model, plans, budget)
    layers = []
    for name, module in _quantized_linears(model):
        if name in unconverted:
            layers.append(LayerPath(name, REFERENCE, unconverted[name], 0))
            continue
        plan = plans.get(name)
        if plan is None:
            continue
        prepared = module.prepared
        _, refusals = choose_path(module, plan.cache_allowed)
        kernel = prepared.kernel
        layers.append(LayerPath(name, prepared.path, _detail(kernel),
                                kernel.nbytes if kernel is not None else 0, refusals, isinstance(kernel, MemberKernel)))
    for device, count in sorted(elsewhere.items()):
        logger.info("%d quantized linears on %s: their own ops there, nothing converted for the CPU", count, device)
    if layers:
        logger.info("CPU class: %s", describe_cpu_class())
        logger.info("CPU paths: %s", summary(layers))
        for layer in layers:
            logger.debug("  %s: %s (%s)", layer.name, layer.path, layer.detail)
        if any(reason == DISABLED for reason in unconverted.values()):
            logger.info("CPU output head: its own forward (CPU paths disabled)")
        else:
            logger.info("CPU output head: %s", describe_head(prepare_output_head(model)))
    return layers


def _detail(kernel) -> str:
    if kernel is None:
        return "dequantized per call"
    inner = kernel.group.kernel if isinstance(kernel, MemberKernel) else kernel
    copy = _dense_copy_to_keep(inner, dense_fp32_for(DENSE_FP32_FROM_ROWS))
    if copy is None:
        return kernel.detail
    dtype = ("bf16" if copy is getattr(inner, "dense_bf16", None) else
             "float16 (FBGEMM)" if copy is getattr(inner, "dense_half", None) else "fp32")
    return kernel.detail + (f"; {dtype} weight kept for dense calls" if copy.kept is not None
                            else f"; {dtype} weight made per dense call (memory bound reached)")


def _keep_dense_copies(model: nn.Module, plans: dict[str, _Plan], budget: float) -> None:
    """Keep each kernel's dense copy (_dense_copy_to_keep), in module order, while what the dequantized
    caches left of the memory bound allows; the others make theirs per call."""
    dense_class = dense_fp32_for(DENSE_FP32_FROM_ROWS)
    seen = set()
    for name, module in _quantized_linears(model):
        prepared = module.prepared if name in plans else None
        kernel = prepared.kernel if prepared is not None else None
        if isinstance(kernel, MemberKernel):
            kernel = kernel.group.kernel
        copy = _dense_copy_to_keep(kernel, dense_class)
        if copy is None or id(kernel) in seen:
            continue
        seen.add(id(kernel))
        if copy.kept is None and copy.nbytes <= budget:
            with _building():
                copy.keep()
        if copy.kept is not None:
            budget -= copy.nbytes


def _dense_copy_to_keep(kernel, dense_class: bool):
    """The copy a kernel's dense calls read: float16 through FBGEMM where the kernel has one and it beats fp32
    at every call size (capability.half_takes_every_call), else bf16 where the CPU multiplies it natively
    (int4pack, whose dequantization per call outweighs a prefill's matmul), fp32 on a class whose
    prefill-sized calls run dense fp32 (capability.dense_fp32_for), for W8A8 without an int8 dot product on
    any class, and for dequantized weights where the float16 gemv is not the faster; None for the others."""
    half = getattr(kernel, "dense_half", None)
    if half is not None and half_takes_every_call():
        return half
    fp32 = getattr(kernel, "dense_fp32", None)
    if fp32 is not None and (dense_class or isinstance(kernel, w8a8.W8A8Kernel) or (
            isinstance(kernel, dequantized.DequantizedKernel) and not kernel.half_gemv)):
        return fp32
    bf16 = getattr(kernel, "dense_bf16", None)
    return bf16 if bf16 is not None and has_fast_bf16_matmul() else None


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def summary(layers: list[LayerPath]) -> str:
    counts = Counter(layer.path for layer in layers)
    extra = sum(layer.extra_bytes for layer in layers) / 2**20
    order = [p.NAME for p in PATHS] + [REFERENCE]
    stacked = sum(layer.stacked for layer in layers)
    return (", ".join(f"{counts[p]} {p}" for p in order if counts[p]) + (f"; {stacked} stacked" if stacked else "")
            + f"; {extra:.1f} MiB converted tensors")


def path_table(layers: list[LayerPath]) -> str:
    """One line per layer: name, path, detail, and why the faster paths did not take it."""
    width = max((len(layer.name) for layer in layers), default=0)
    lines = []
    for layer in layers:
        why = "; ".join(f"not {p}: {reason}" for p, reason in layer.refusals.items())
        lines.append(f"{layer.name:<{width}}  {layer.path:<11}  {layer.detail}" + (f"  [{why}]" if why else ""))
    return "\n".join(lines)
