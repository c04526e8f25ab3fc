"""Sensitivity: how much the model's loss on calibration data rises when only one group of linears
is quantized, at each candidate setting (bits x group size), everything else in full precision.

Two measures per run: delta_loss, the rise of the mean next-token loss on the calibration tokens,
and kl, the mean KL divergence from the full-precision model's next-token distribution, which is
the loss rise expected when the full-precision model's predictions are taken as the truth. On a
few hundred tokens delta_loss is dominated by noise (on SmolLM2, 2 x 256 tokens: a third of the
3/4/8-bit measurements came out negative, spread +-0.04 against a mean 4-bit rise of 0.002), while
kl is non-negative and far steadier, so the allocation minimizes kl by default.

Groups are the architecture map's true-sequential steps (q/k/v, o, gate/up, down): linears that
read the same input, which serving engines fuse into one matmul (vLLM's qkv_proj, gate_up_proj)
and so must share bits and group size. Candidates are rounded with RTN on the affine grid: a
cheap, consistent proxy for any weight-only method. A group in block i only changes what blocks
i.. compute, so the full-precision inputs of every block are computed once and each measurement
runs from its own block to the head.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchMap
from .config import PER_CHANNEL
from .grid import AffineGrid
from .pipeline import capture_block_inputs, run_block

DEFAULT_BITS = (3, 4, 8)
DEFAULT_GROUP_SIZES = (64, 128, PER_CHANNEL)


@dataclass
class SensitivityTable:
    """base_loss: mean next-token loss of the full-precision model on the calibration windows.
    rows: one per (group, candidate): modules, parameters, bits, group_size, delta_loss."""

    base_loss: float
    sym: bool
    calibration: dict | None
    rows: list[dict] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        from .errors import ConfigError

        try:
            data = json.loads(Path(path).read_text())
            return cls(float(data["base_loss"]), bool(data["sym"]), data.get("calibration"), list(data["rows"]))
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
              targets: torch.Tensor, reference: list[torch.Tensor] | None = None):
    """(mean next-token loss, mean KL(reference || model) per token, the log-probabilities) when
    `hidden` (the inputs of block `start`) runs through the rest of the model."""
    blocks = arch.block_list(model)
    for index in range(start, len(blocks)):
        hidden = run_block(blocks[index], hidden, kwargs[index])
    norm, head = _final_norm_and_head(model)
    loss, kl, count, log_probs = 0.0, 0.0, 0, []
    for i, (h, window) in enumerate(zip(hidden, targets)):
        logits = head(norm(h))[0, :-1].float()
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
                        calibration_info: dict | None = None, progress: bool = True) -> SensitivityTable:
    """check_layer(name, out, in, bits, group_size) raises for a candidate the format cannot store;
    such candidates are left out of the table."""
    inputs = capture_block_inputs(model, arch, windows)
    kwargs = [block_inputs.kwargs for block_inputs in inputs]
    blocks = arch.block_list(model)
    block_hidden = [inputs[0].hidden_states]
    for index, block in enumerate(blocks[:-1]):
        block_hidden.append(run_block(block, block_hidden[-1], kwargs[index]))
    base_loss, _, reference = _run_from(model, arch, 0, block_hidden[0], kwargs, windows)
    table = SensitivityTable(base_loss, sym, calibration_info)
    candidates = [(b, g) for b in bits for g in group_sizes]
    total = len(blocks) * len(arch.sequential) * len(candidates)
    bar = tqdm(total=total, desc="sensitivity", unit="run", disable=not progress)
    for index, block in enumerate(blocks):
        prefix = arch.block_prefix(index)
        for step in arch.sequential:
            linears = {f"{prefix}.{name}": block.get_submodule(name) for name in step}
            originals = {name: linear.weight.data for name, linear in linears.items()}
            for b, g in candidates:
                bar.update(1)
                if not _storable(linears, b, g, check_layer):
                    continue
                for name, linear in linears.items():
                    grid = AffineGrid(b, sym, g)
                    linear.weight.data = grid.quantize(originals[name]).dequantize(originals[name].dtype)
                loss, kl, _ = _run_from(model, arch, index, block_hidden[index], kwargs, windows, reference)
                for name, linear in linears.items():
                    linear.weight.data = originals[name]
                table.rows.append({"modules": list(linears), "parameters": sum(l.weight.numel() for l in linears.values()),
                                   "shapes": [list(l.weight.shape) for l in linears.values()],
                                   "bits": b, "group_size": g, "delta_loss": loss - table.base_loss, "kl": kl})
    bar.close()
    return table


def _storable(linears: dict[str, nn.Linear], bits: int, group_size: int, check_layer) -> bool:
    from .errors import ConfigError

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
                   format_name: str = "gptq", progress: bool = True) -> SensitivityTable:
    """measure_sensitivity for a model name / folder and a Calibration (or corpus name), keeping only
    candidates the checkpoint format can store."""
    from .api import calibration_windows_for
    from .arch import arch_for
    from .config import QuantConfig
    from .formats import FORMATS
    from .models import load_fp_model

    model, tokenizer = load_fp_model(model_spec)
    arch = arch_for(model.config)
    windows, info = calibration_windows_for(calib, tokenizer, arch, model.get_input_embeddings().num_embeddings)
    fmt = FORMATS[format_name]

    def check_layer(name, out_features, in_features, b, g):
        fmt.check_layer(name, out_features, in_features, QuantConfig(bits=b, group_size=g, sym=sym, format=format_name))

    return measure_sensitivity(model, arch, windows, bits, group_sizes, sym, check_layer, info, progress)
