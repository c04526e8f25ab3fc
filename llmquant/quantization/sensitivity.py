"""Sensitivity: how much the model's loss on calibration data rises when only one group of linears
is quantized, at each candidate setting (bits x group size), everything else in full precision.

Two measures per run: delta_loss, the rise of the mean next-token loss on the calibration tokens,
and kl, the mean KL divergence from the full-precision model's next-token distribution, which is
the loss rise expected when the full-precision model's predictions are taken as the truth. On a
few hundred tokens delta_loss is dominated by noise (on SmolLM2's 2 x 256 tokens many 3/4/8-bit
measurements came out negative, the spread far larger than a 4-bit group's mean rise), while
kl is non-negative and far steadier, so the allocation minimizes kl by default.

Groups are the architecture map's true-sequential steps (q/k/v, o, gate/up, down): linears that
read the same input, which serving engines fuse into one matmul (vLLM's qkv_proj, gate_up_proj)
and so must share bits and group size. Candidates are rounded by the algorithm the checkpoint will
be quantized with: RTN (the default, data-free) or GPTQ, which gets each layer's Hessian from its
full-precision inputs. GPTQ repairs some layers' rounding far better than others', so a table
measured with RTN ranks layers for a GPTQ run only roughly. A group in block i only changes what
blocks i.. compute, so the full-precision inputs of every block are computed once and each
measurement runs from its own block to the head.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms import ALGORITHMS, GPTQ_ROUNDING, RTN
from ..arch import arch_for, ArchMap
from ..config import PER_CHANNEL, QuantConfig
from ..errors import ConfigError
from ..formats import FORMATS
from ..grid import AffineGrid
from ..models import load_fp_model
from ..arch.moe import unfuse_experts
from .pipeline import CPU, capture_block_inputs, collect_input_statistics, Placement, run_block
from .planning import calibration_windows_for, placement_for

DEFAULT_BITS = (3, 4, 8)
DEFAULT_GROUP_SIZES = (64, 128, PER_CHANNEL)
# Methods whose rounding is one layer at a time, and so can be measured one group at a time.
SENSITIVITY_METHODS = ("rtn", "gptq")


@dataclass
class SensitivityTable:
    """base_loss: mean next-token loss of the full-precision model on the calibration windows.
    rows: one per (group, candidate): modules, parameters, shapes, bits, group_size, delta_loss, kl.
    method: the algorithm that rounded the candidates."""

    base_loss: float
    sym: bool
    calibration: dict | None
    rows: list[dict] = field(default_factory=list)
    method: str = "rtn"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def is_table(cls, path: str | Path) -> bool:
        try:
            cls.load(path)
        except ConfigError:
            return False
        return True

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        try:
            data = json.loads(Path(path).read_text())
            return cls(float(data["base_loss"]), bool(data["sym"]), data.get("calibration"), list(data["rows"]),
                       str(data.get("method", "rtn")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a sensitivity table written by llmquant sensitivity: {exc}") from exc

    def groups(self) -> dict[tuple[str, ...], list[dict]]:
        out: dict[tuple[str, ...], list[dict]] = {}
        for row in self.rows:
            out.setdefault(tuple(row["modules"]), []).append(row)
        return out


def _final_norm_and_head(model: nn.Module):
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return inner.norm, model.get_output_embeddings()


@torch.no_grad()
def _run_from(model, arch: ArchMap, start: int, hidden: list[torch.Tensor], kwargs: list[list[dict]],
              targets: torch.Tensor, reference: list[torch.Tensor] | None = None, placement: Placement = CPU):
    """(mean next-token loss, mean KL(reference || model) per token, the log-probabilities) when
    `hidden` (the inputs of block `start`) runs through the rest of the model."""
    blocks = arch.block_list(model)
    for index in range(start, len(blocks)):
        hidden = run_block(blocks[index], hidden, kwargs[index], placement)
    norm, head = _final_norm_and_head(model)
    loss, kl, count, log_probs = 0.0, 0.0, 0, []
    for i, (h, window) in enumerate(zip(hidden, targets.to(placement.device))):
        with placement.autocast():
            logits = head(norm(h.to(placement.device)))[0, :-1].float()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        log_p = torch.log_softmax(logits, dim=-1)
        loss -= float(log_p.gather(1, window[1:, None]).sum())
        if reference is not None:
            ref = reference[i].float()
            kl += max(float((ref.exp() * (ref - log_p)).sum()), 0.0)  # non-negative up to float rounding
        else:
            log_probs.append(log_p)  # the reference of the runs to come (fp32: rounding it would bias every KL)
        count += window.numel() - 1
    return loss / count, kl / count, log_probs


@torch.no_grad()
def measure_sensitivity(model: nn.Module, arch: ArchMap, windows: torch.Tensor, bits=DEFAULT_BITS,
                        group_sizes=DEFAULT_GROUP_SIZES, sym: bool = False, check_layer=None,
                        calibration_info: dict | None = None, progress: bool = True,
                        algorithm=None, statistics_windows: torch.Tensor | None = None,
                        placement: Placement = CPU) -> SensitivityTable:
    """check_layer(name, out, in, bits, group_size) raises for a candidate the format cannot store;
    such candidates are left out of the table. algorithm: rounds the candidates (default RTN).
    statistics_windows: the windows whose full-precision activations give the algorithm its input
    statistics (GPTQ's Hessians), default `windows`. GPTQ fitted to the few hundred tokens the
    loss is measured on would fit them better than any text it has not seen, and so look better
    than it will be; give it the quantize run's own, larger calibration set instead.
    placement: where the model (already there) computes and its activations are kept."""
    algorithm = algorithm or RTN()
    if algorithm.name not in SENSITIVITY_METHODS:
        raise ConfigError(f"sensitivity is measured with {' or '.join(SENSITIVITY_METHODS)} rounding, "
                          f"not {algorithm.name}: its block-wide transforms have no per-group candidates")
    inputs = capture_block_inputs(model, arch, windows, placement)
    kwargs = [block_inputs.kwargs for block_inputs in inputs]
    blocks = arch.block_list(model)
    block_hidden = [inputs[0].hidden_states]
    for index, block in enumerate(blocks[:-1]):
        block_hidden.append(run_block(block, block_hidden[-1], kwargs[index], placement))
    base_loss, _, reference = _run_from(model, arch, 0, block_hidden[0], kwargs, windows, placement=placement)
    table = SensitivityTable(base_loss, sym, calibration_info, method=algorithm.name)
    statistics = _StatisticsInputs(model, arch, windows if statistics_windows is None else statistics_windows,
                                   algorithm.needs_calibration, placement)
    candidates = [(b, g) for b in bits for g in group_sizes]
    total = len(blocks) * len(arch.sequential) * len(candidates)
    bar = tqdm(total=total, desc="sensitivity", unit="run", disable=not progress)
    for index, block in enumerate(blocks):
        prefix = arch.block_prefix(index)
        for step in arch.steps(block):
            linears = {f"{prefix}.{name}": block.get_submodule(name) for name in step}
            originals = {name: linear.weight.data for name, linear in linears.items()}
            stats = statistics.of(index, block, linears)
            for b, g in candidates:
                bar.update(1)
                if not _storable(linears, b, g, check_layer):
                    continue
                for name, linear in linears.items():
                    quantized = algorithm.quantize(originals[name], AffineGrid(b, sym, g), stats.get(name), name)
                    linear.weight.data = quantized.dequantize(originals[name].dtype)
                loss, kl, _ = _run_from(model, arch, index, block_hidden[index], kwargs, windows, reference, placement)
                for name, linear in linears.items():
                    linear.weight.data = originals[name]
                table.rows.append({"modules": list(linears), "parameters": sum(l.weight.numel() for l in linears.values()),
                                   "shapes": [list(l.weight.shape) for l in linears.values()],
                                   "bits": b, "group_size": g, "delta_loss": loss - table.base_loss, "kl": kl})
        statistics.advance(index, block)
    bar.close()
    return table


class _StatisticsInputs:
    """The full-precision inputs of one block at a time on the statistics windows, and the input
    statistics of a group of its linears; nothing when the algorithm needs none."""

    def __init__(self, model, arch: ArchMap, windows: torch.Tensor, needed: bool, placement: Placement = CPU):
        self.placement = placement
        self.inputs = capture_block_inputs(model, arch, windows, placement) if needed else None
        self.hidden = self.inputs[0].hidden_states if needed else None

    def of(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> dict:
        if self.inputs is None:
            return {}
        return collect_input_statistics(block, linears, self.hidden, self.inputs[index].kwargs, placement=self.placement)

    def advance(self, index: int, block: nn.Module) -> None:
        if self.inputs is not None and index + 1 < len(self.inputs):
            self.hidden = run_block(block, self.hidden, self.inputs[index].kwargs, self.placement)
            self.inputs[index] = None


def rounding_for(config):
    """The algorithm that rounds the candidates for a run with `config`: GPTQ with the run's options
    when the run rounds with GPTQ (gptq, awq+gptq), else RTN."""
    return ALGORITHMS["gptq" if config.method in GPTQ_ROUNDING else "rtn"](config)


def _storable(linears: dict[str, nn.Linear], bits: int, group_size: int, check_layer) -> bool:
    for name, linear in linears.items():
        if group_size != PER_CHANNEL and group_size > linear.in_features:
            return False
        if check_layer is not None:
            try:
                check_layer(name, linear.out_features, linear.in_features, bits, group_size)
            except ConfigError:
                return False
    return True


def sensitivity_of(model_spec, calib, bits=DEFAULT_BITS, group_sizes=DEFAULT_GROUP_SIZES, sym: bool = False,
                   format_name: str = "gptq", progress: bool = True, config=None,
                   statistics_calib=None, device="auto", compute_dtype="auto") -> SensitivityTable:
    """measure_sensitivity for a model name / folder and a Calibration (or corpus name), keeping only
    candidates the checkpoint format can store. config: the run's QuantConfig, whose rounding
    (rounding_for) rounds the candidates (default RTN); statistics_calib: the Calibration that gives
    GPTQ its Hessians (default `calib`); device / compute_dtype: where the whole model computes."""
    for b in bits:  # a candidate the format cannot hold is refused, not silently dropped
        QuantConfig(bits=b, sym=sym, format=format_name)
    placement = placement_for(device, compute_dtype, "never")
    model, tokenizer = load_fp_model(model_spec, device=placement.device)
    arch = arch_for(model.config, model)
    unfuse_experts(model, arch)
    vocab = model.get_input_embeddings().num_embeddings
    windows, info = calibration_windows_for(calib, tokenizer, arch, vocab)
    algorithm = rounding_for(config) if config is not None else None
    statistics_windows = None
    if algorithm is not None and algorithm.needs_calibration and statistics_calib is not None:
        statistics_windows, statistics_info = calibration_windows_for(statistics_calib, tokenizer, arch, vocab)
        info = {**(info or {}), "statistics": statistics_info}
    fmt = FORMATS[format_name]

    def check_layer(name, out_features, in_features, b, g):
        fmt.check_layer(name, out_features, in_features, QuantConfig(bits=b, group_size=g, sym=sym, format=format_name))

    return measure_sensitivity(model, arch, windows, bits, group_sizes, sym, check_layer, info, progress, algorithm,
                               statistics_windows, placement)
