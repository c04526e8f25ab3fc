"""Quantize a model held in memory: the blocks are the model's own, quantized in place.

The same run as a folder streamed from disk (streaming.py): checked and planned by planning.py, every
block through pipeline.py, each result packed for the format as it comes; here nothing is written
until QuantizedModel.save.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..arch import arch_for, declared_arch_for
from ..storage.checkpoint import (checkpoint_tensors, tensors_sha256, without_tied_copies, write_folder_atomically,
                         write_model_files, write_report_file)
from ..config import QuantConfig
from ..formats import FORMATS
from ..evaluation.model_card import write_model_card
from ..arch.moe import set_calibrate_all_experts
from ..rotation.online import with_online_rotation
from .pipeline import BlockStore, PipelineResult, Placement
from .planning import STORAGE_TORCH_DTYPES, RunRequest, plan_quantization
from ..evaluation.report import REPORT_FILE, build_report, peak_rss_mib, write_report


@dataclass
class QuantizedModel:
    """A model you held, quantized in memory: its block linears hold their quantized
    (dequantized-to-float) weights, plus the packed tensors of the chosen format. For weight-only
    methods `model` computes exactly what the saved checkpoint will; W8A8 methods also round
    activations, which only the loaded checkpoint's W8A8Linear layers do."""

    model: nn.Module
    tokenizer: object
    config: QuantConfig
    packed: dict[str, dict[str, torch.Tensor]]
    pipeline: PipelineResult
    source: str | None = None
    seconds: float = 0.0
    calibration: dict | None = None
    peak_rss_mib: float | None = None
    # Format-neutral results per layer, kept only when asked for (QAT starts from them).
    quantized_weights: dict = field(default_factory=dict)
    placement: Placement | None = None
    rotation: dict | None = None  # what rotation/fused.py fused into the weights, when asked for

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """All tensors of the checkpoint: packed quantized linears, the rest in the storage dtype, under
        the keys the family's checkpoints use."""
        tensors = checkpoint_tensors(without_tied_copies(self.model.state_dict()), self.packed,
                                     STORAGE_TORCH_DTYPES[self.config.dtype])
        arch = declared_arch_for(self.model.config)
        return {arch.stored_name(k): v for k, v in tensors.items()} if arch is not None else tensors

    def report(self) -> dict:
        packed_bytes = sum(t.numel() * t.element_size() for p in self.packed.values() for t in p.values())
        report = build_report(self.config, self.source, self.calibration, self.seconds, self.peak_rss_mib,
                              self.pipeline, packed_bytes, self.placement)
        return {**report, "rotation": self.rotation} if self.rotation else report

    def save(self, path: str | os.PathLike, overwrite: bool = False, max_shard_size: str = "4GB",
             more_reports: dict[str, dict] | None = None) -> Path:
        """Write the checkpoint folder (atomically). more_reports: {file name: report} written beside
        quantize_report.json (QAT's), each naming the folder's tensor files as every report does."""
        fmt = FORMATS[self.config.format]
        storage = STORAGE_TORCH_DTYPES[self.config.dtype]

        def write(folder: Path) -> None:
            tensors = self.checkpoint_tensors()
            write_model_files(folder, self.model, tensors, self.tokenizer, storage, max_shard_size,
                              with_online_rotation(fmt, self.config, self.rotation))
            report = self.report()
            report["checkpoint_sha256"] = tensors_sha256(tensors)
            write_report_file(folder, REPORT_FILE, report)
            for name, more in (more_reports or {}).items():
                write_report_file(folder, name, more)
            write_report(folder, name=Path(path).name)
            write_model_card(folder, report, location=Path(path).expanduser(), replacing=Path(path).expanduser())

        return write_folder_atomically(path, write, overwrite)


def quantize_in_memory(model: nn.Module, config: QuantConfig, request: RunRequest, tokenizer=None,
                       progress: bool = True, keep_quantized: bool = False) -> QuantizedModel:
    """Quantize `model` in place as `request` (planning.check_request) says. keep_quantized: also keep
    each layer's format-neutral result (QAT starts from them)."""
    start = time.time()
    arch = arch_for(model.config, model)
    plan = plan_quantization(model, arch, config, request, tokenizer, weights_loaded=True)
    packed: dict[str, dict[str, torch.Tensor]] = {}
    kept = {} if keep_quantized else None
    model.eval()
    result = plan.run(model, arch, BlockStore(plan.block_preparation(arch, model.config)), packed, progress, kept)
    set_calibrate_all_experts(model, False)  # from here on the model computes as it is served
    return QuantizedModel(model, tokenizer, plan.config, packed, result, getattr(model.config, "_name_or_path", None),
                          time.time() - start, plan.calibration_info, peak_rss_mib(), kept or {}, plan.placement,
                          plan.rotation.description if plan.rotation is not None else None)
