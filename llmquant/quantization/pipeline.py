"""The sequential pipeline: quantize a model one decoder block at a time.

Embeddings run once to produce the first block's inputs; then each block in turn has its
linears quantized, step by step in the architecture map's order (true-sequential: a step's
inputs are recomputed through the already-quantized steps before it), and its outputs,
computed with the quantized weights, become the next block's inputs. Without calibration data
(data-free algorithms) blocks are simply visited in order.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchMap
from ..arch.derived import check_steps_by_forward
from ..device import move_tensors
from ..errors import DataError
from ..grid import AffineGrid, QuantizedWeight
from ..algorithms.scaling import scaling_groups
from ..algorithms.statistics import InputGram


@dataclass
class BlockInputs:
    """What one block is called with, per calibration sample."""

    hidden_states: list[torch.Tensor]
    kwargs: list[dict]


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    relative_output_error: float | None = None  # |X W^T - X Q^T|^2 / |X W^T|^2 on the calibration inputs
    relative_weight_error: float | None = None  # |W - Q|^2 / |W|^2
    bits: int | None = None
    group_size: int | None = None  # -1: one group per output channel; codebook grids: their block size
    calibration_rows: int | None = None  # input rows (tokens) its statistics saw; 0: no token reached it


@dataclass
class PipelineResult:
    layers: list[LayerResult] = field(default_factory=list)
    # One record per scaling group of a block transform (AWQ: the ratio chosen and its error).
    scaling: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Placement:
    """Where a run computes. Blocks run on `device`, their matmuls in `compute_dtype` (autocast: the
    weights stay float32, so what is rounded and written is rounded once, from full precision);
    calibration activations live on `activations` between blocks (the compute device when they fit,
    else the CPU, each batch moved over as it runs) in the compute dtype. The default, the CPU in
    float32, computes exactly as a plain forward pass does."""

    device: torch.device = torch.device("cpu")
    compute_dtype: torch.dtype = torch.float32
    activations: torch.device = torch.device("cpu")

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def stored(self, hidden: torch.Tensor) -> torch.Tensor:
        """An activation as it is kept between blocks."""
        return hidden.to(device=self.activations, dtype=self.compute_dtype)

    def to_dict(self) -> dict:
        return {"device": str(self.device), "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
                "activations": str(self.activations)}


CPU = Placement()


class _StopForward(Exception):
    """Raised by a hook once it has what it came for, to skip the rest of a forward pass."""


def _record_calls(blocks: nn.ModuleList, records: list[list[tuple]]):
    """Make every block an identity that records (hidden_states, kwargs) it is called with; the last
    one then stops the forward pass, so the final norm and the head never run."""

    def recorder(index):
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise TypeError("decoder blocks are expected to take everything but hidden_states by keyword")
            records[index].append((hidden_states, kwargs))
            if index == len(blocks) - 1:
                raise _StopForward
            return hidden_states

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, arch: ArchMap, samples: torch.Tensor,
                         placement: Placement = CPU) -> list[BlockInputs]:
    """Inputs of block 0 and the keyword arguments of every block, for each sample.

    One pass through the model's embeddings with every block replaced by a recorder: the embedding
    output reaches block 0 unchanged, and each block's keywords (masks, rotary embeddings; they
    differ per block in Gemma-3's sliding / full attention mix) are recorded without running any
    block, the final norm or the head. The embeddings run where the model's are (the CPU in a
    streamed run); the recorded inputs are then kept as `placement` says, the keywords moved to its
    device.
    """
    blocks = arch.block_list(model)
    records: list[list[tuple]] = [[] for _ in blocks]
    _record_calls(blocks, records)
    embedding_device = model.get_input_embeddings().weight.device
    try:
        for sample in samples:
            try:
                model(input_ids=sample[None].to(embedding_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
    per_block = []
    for i, calls in enumerate(records):
        hidden = [placement.stored(h) for h, _ in calls] if i == 0 else []
        kwargs = [move_tensors(kw, placement.device) for _, kw in calls]
        per_block.append(BlockInputs(hidden_states=hidden, kwargs=_share_equal_values(kwargs)))
    return per_block


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return a is b or a == b


def _share_equal_values(kwargs: list[dict]) -> list[dict]:
    """Let samples share keyword values equal to the first sample's: windows of one length get the
    same masks and rotary tables (a [seq, seq] mask per sample and block would not fit at 2048),
    and samples whose keywords all equal the first's share its dict, which marks them batchable."""
    if not kwargs:
        return kwargs
    first = kwargs[0]
    shared = [first]
    for kw in kwargs[1:]:
        if kw.keys() == first.keys() and all(_equal(v, first[k]) for k, v in kw.items()):
            shared.append(first)
        else:
            shared.append({k: first[k] if k in first and _equal(v, first[k]) else v for k, v in kw.items()})
    return shared


def _batches(hidden_states: list[torch.Tensor], kwargs: list[dict], batch_size: int, placement: Placement):
    """(hidden states batched along dim 0 on the compute device, keywords) for runs of samples that
    share their keywords."""
    start = 0
    while start < len(hidden_states):
        end = start + 1
        while end < len(hidden_states) and end - start < batch_size and kwargs[end] is kwargs[start]:
            end += 1
        yield torch.cat(hidden_states[start:end]).to(placement.device), kwargs[start]
        start = end


def _block_output(output):
    return output[0] if isinstance(output, tuple) else output


# Calibration samples per block forward: larger matmuls run faster on the CPU, and activations of
# 8 x 2048 tokens still fit easily.
BATCH_SIZE = 8


@torch.no_grad()
def run_block(block: nn.Module, hidden_states: list[torch.Tensor], kwargs: list[dict],
              placement: Placement = CPU) -> list[torch.Tensor]:
    outputs = []
    for h, kw in _batches(hidden_states, kwargs, BATCH_SIZE, placement):
        with placement.autocast():
            output = _block_output(block(h, **kw))
        outputs.extend(placement.stored(o) for o in output.split(1))
    return outputs


@torch.no_grad()
def collect_input_statistics(block: nn.Module, layers: dict[str, nn.Linear], hidden_states, kwargs,
                             options: dict | None = None, placement: Placement = CPU) -> dict[str, InputGram]:
    """InputGram of each layer in `layers` over all samples, stopping each forward once they have run.

    Layers fed the very same tensor (q/k/v, gate/up) share one InputGram, accumulated once.
    options: keyword arguments of InputGram (histogram, keep_rows).
    """
    stats: dict[str, InputGram] = {}
    seen: set[str] = set()
    inputs_this_pass: dict[int, tuple[torch.Tensor, InputGram]] = {}  # holds the tensor so its id stays unique

    def hook(name):
        def record(module, args):
            x = args[0]
            shared = inputs_this_pass.get(id(x))
            if name not in stats:
                stats[name] = shared[1] if shared is not None else InputGram(x.shape[-1], device=x.device,
                                                                          **(options or {}))
            if shared is None:
                try:
                    stats[name].add_batch(x)
                except DataError as exc:
                    raise DataError(f"{exc} (at the input of {name})") from exc
                inputs_this_pass[id(x)] = (x, stats[name])
            seen.add(name)
            if len(seen) == len(layers):
                raise _StopForward

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        for h, kw in _batches(hidden_states, kwargs, BATCH_SIZE, placement):
            seen.clear()
            inputs_this_pass.clear()
            try:
                with placement.autocast():
                    block(h, **kw)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        inputs_this_pass.clear()
    return stats


class BlockStore:
    """Where blocks come from and where finished ones go. The default keeps the whole model in
    memory; streaming.py's store loads each block from disk when its turn comes, writes it out and
    releases it, and can resume a killed run after its last finished block. prepare_block(block):
    what the plan does to each block once its weights are there (a rotation), before it is quantized."""

    def __init__(self, prepare_block: Callable[[nn.Module], None] | None = None):
        self.prepare_block = prepare_block

    def resume_point(self) -> tuple[int, list[torch.Tensor] | None]:
        """(index of the first block to quantize, that block's saved calibration inputs or None)."""
        return 0, None

    def load(self, index: int, block: nn.Module) -> None:
        """Give the block its weights (in memory already: note where they live, to move them back)."""
        self._home = next(block.parameters()).device
        self.prepared(block)

    def prepared(self, block: nn.Module) -> None:
        if self.prepare_block is not None:
            self.prepare_block(block)

    def finish(self, index: int, block: nn.Module, next_hidden: list[torch.Tensor] | None,
               result: PipelineResult) -> None:
        block.to(self._home)


def _check_finite(hidden: list[torch.Tensor], where: str) -> None:
    if not all(torch.isfinite(h).all() for h in hidden):
        raise DataError(f"calibration activations contain NaN or Inf {where}; refusing to quantize on them")


def quantize_blocks(
    model: nn.Module,
    arch: ArchMap,
    algorithm,
    grid_for: Callable[[str, nn.Linear], AffineGrid | None],
    on_quantized: Callable[[str, QuantizedWeight, nn.Linear], None],
    calibration: torch.Tensor | None = None,
    true_sequential: bool = True,
    progress: bool = True,
    store: BlockStore | None = None,
    placement: Placement = CPU,
) -> PipelineResult:
    """Quantize the linears of every block in place (their weights become the dequantized grid values).

    grid_for(name, linear) gives the grid of a linear, or None to leave it in floating point.
    on_quantized(name, quantized_weight, linear) receives each result (e.g. to pack it at once).
    calibration: token windows [n, seqlen]; required when the algorithm needs statistics,
    optional otherwise (then each layer's relative output error is measured and reported).
    true_sequential: statistics per step of the architecture map, through the quantized steps
    before it; otherwise one pass per block gives every layer its floating-point inputs.
    An algorithm with `transform_block` (AWQ) first gets the block's scaling groups with their
    input statistics and may rescale / clip the block's weights before any layer is rounded.
    store: a BlockStore (default: the model is all in memory, nothing is written).
    placement: where blocks compute and activations live (each block is moved to the compute device
    for its turn; the store writes it out or moves it back).
    """
    if algorithm.needs_calibration and calibration is None:
        raise ValueError(f"{algorithm.name} needs calibration data")
    store = store or BlockStore()
    blocks = arch.block_list(model)
    inputs = capture_block_inputs(model, arch, calibration, placement) if calibration is not None else None
    start, saved_hidden = store.resume_point()
    hidden = None
    if inputs is not None:
        hidden = [placement.stored(h) for h in saved_hidden] if saved_hidden is not None else inputs[0].hidden_states
        inputs[0].hidden_states = []
        _check_finite(hidden, f"at the input of block {start}")
    result = PipelineResult()
    bar = tqdm(total=len(blocks), initial=start, desc=f"{algorithm.name} blocks", unit="block", disable=not progress)
    for index in range(start, len(blocks)):
        block = blocks[index]
        store.load(index, block)
        block.to(placement.device)
        if arch.derived and hidden is not None and index == start:
            # a map read from names alone: one sample through the block shows which tensor each linear reads
            check_steps_by_forward(block, arch, lambda: run_block(block, hidden[:1], inputs[index].kwargs[:1], placement))
        steps = arch.steps(block)
        if not true_sequential:
            steps = (tuple(name for step in steps for name in step),)
        quantize_block(block, arch.block_prefix(index), arch, algorithm, grid_for, on_quantized, steps,
                       hidden, inputs[index].kwargs if inputs is not None else None, result, bar, placement)
        if hidden is not None:
            hidden = run_block(block, hidden, inputs[index].kwargs, placement)
            inputs[index] = None  # free this block's recorded keywords
            _check_finite(hidden, f"at the output of block {index}")
        store.finish(index, block, hidden, result)
        bar.update(1)
    bar.close()
    return result


def quantize_block(block: nn.Module, prefix: str, arch: ArchMap, algorithm, grid_for, on_quantized,
                   steps: tuple[tuple[str, ...], ...], hidden: list[torch.Tensor] | None, kwargs: list[dict] | None,
                   result: PipelineResult, bar=None, placement: Placement = CPU) -> None:
    """Quantize one block's linears in place, step by step; `hidden`/`kwargs`: its calibration inputs or None."""
    reference_weights = {}
    if hidden is not None and hasattr(algorithm, "transform_block"):
        if bar is not None:
            bar.set_postfix_str("scaling search")
        transform = _transform_block(algorithm, block, arch, prefix, grid_for, hidden, kwargs, placement)
        reference_weights = transform.reference_weights
        result.scaling.extend(transform.records)
    for step in steps:
        layers = {}
        for short_name in step:
            name = f"{prefix}.{short_name}"
            linear = block.get_submodule(short_name)
            if grid_for(name, linear) is not None:
                layers[name] = linear
        if not layers:
            continue
        stats = (collect_input_statistics(block, layers, hidden, kwargs, getattr(algorithm, "statistics_options", None),
                                          placement) if hidden is not None else {})
        for name, linear in layers.items():
            if bar is not None:
                bar.set_postfix_str(name[len(prefix) + 1:])
            weight = linear.weight.data
            # no calibration token reached a linear (an expert the router never chose): the algorithm
            # gets no statistics (GPTQ then rounds to nearest)
            quantized = algorithm.quantize(weight, grid_for(name, linear), stats.get(name), name)
            fake = quantized.dequantize(weight.dtype).to(weight.device)
            reference = reference_weights.get(name, weight)
            error = stats[name].relative_output_error(reference, fake) if name in stats else None
            weight_error = float(((fake.float() - reference.float()) ** 2).sum()
                                 / (reference.float() ** 2).sum().clamp_min(1e-30))
            group_size = getattr(quantized, "group_size", getattr(quantized, "blocksize", None))
            linear.weight.data = fake
            # packing and writing happen on the CPU, whatever the compute device
            on_quantized(name, quantized.to(torch.device("cpu")), linear)
            rows = stats[name].rows if name in stats else 0 if hidden is not None else None
            result.layers.append(LayerResult(name, tuple(weight.shape), error, weight_error, quantized.bits, group_size,
                                             rows))


def scaling_groups_with_statistics(block: nn.Module, arch: ArchMap, prefix: str, grid_for, hidden, kwargs,
                                   options: dict | None = None, placement: Placement = CPU):
    """The block's scaling groups that have a linear to quantize, each with the statistics of its
    linears' common input, read at the group's first linear (one forward pass per calibration batch).
    A group whose input no calibration token reached (an expert never routed to) is left out."""
    quantized = {f"{prefix}.{short}" for short in arch.block_linear_names(block)
                 if grid_for(f"{prefix}.{short}", block.get_submodule(short)) is not None}
    groups = scaling_groups(block, arch, prefix, quantized)
    first_linears = {next(iter(group.linears)): next(iter(group.linears.values())) for group in groups}
    stats = collect_input_statistics(block, first_linears, hidden, kwargs, options, placement)
    for group in groups:
        group.statistics = stats.get(next(iter(group.linears)))
    return [group for group in groups if group.statistics is not None]


def _transform_block(algorithm, block, arch: ArchMap, prefix: str, grid_for, hidden, kwargs,
                     placement: Placement = CPU):
    groups = scaling_groups_with_statistics(block, arch, prefix, grid_for, hidden, kwargs,
                                            getattr(algorithm, "transform_statistics_options", None), placement)
    no_clip = {f"{prefix}.{short}" for short in arch.no_clip}
    return algorithm.transform_block(groups, grid_for, no_clip)
