"""The public face: quantize a model, save it, load it back, evaluate it.

    qmodel = llmquant.quantize("smollm2-135m", QuantConfig(bits=4, group_size=64))
    qmodel.save("out/smollm2-w4g64")
    model = llmquant.load("out/smollm2-w4g64")   # a transformers model that generates
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .arch import arch_for, declared_arch_for
from .checkpoint import (check_output_path, checkpoint_tensors, replace_folder, tensors_sha256, without_tied_copies,
                         write_folder_atomically, write_model_files, write_report_file)
from .config import QuantConfig
from .data import Calibration, default_split, evaluation_windows, tokenize_corpus
from .errors import ConfigError, OutputWriteError, UnsupportedArchitectureError
from .formats import FORMATS
from .loading import load
from .model_card import write_model_card
from .models import cache_dir, resolve_model
from .moe import set_calibrate_all_experts
from .perplexity import perplexity
from .pipeline import PipelineResult, Placement, quantize_blocks
from .planning import STORAGE_TORCH_DTYPES, placement_for, plan_run, prepare_model
from .report import REPORT_FILE, build_report, peak_rss_mib, write_report
from .online_rotation import with_online_rotation
from .rotation import rotate_model
from .streaming import quantize_to_disk


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
    rotation: dict | None = None  # what rotation.py fused into the weights, when asked for

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


class QuantizedCheckpoint:
    """A model quantized from disk, one block at a time, into a checkpoint folder: `path` (a
    temporary folder until `save` moves it, removed if it is never saved), `report`, `load()`, and
    `model` / `tokenizer` (loaded on first use)."""

    def __init__(self, path: Path, report: dict, temporary: bool):
        self.path, self.report_data = Path(path), report
        self._model = self._tokenizer = None
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.path.parent), True) if temporary else None

    def report(self) -> dict:
        return self.report_data

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Move the checkpoint to `path` (refused if it exists, unless overwrite)."""
        target = check_output_path(path, overwrite)
        if target.resolve() == self.path.resolve():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            try:
                shutil.copytree(self.path, staging / "checkpoint")
                write_report(staging / "checkpoint", name=target.name)  # titled by its final name
                write_model_card(staging / "checkpoint", self.report_data, location=target, replacing=target)
            except OSError as exc:
                raise OutputWriteError(f"writing {target} failed: {exc}") from exc
            replace_folder(staging / "checkpoint", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None
        self.path = target
        return target

    def load(self, device="auto", dtype="auto"):
        return load(self.path, device=device, dtype=dtype)

    @property
    def model(self):
        """The checkpoint loaded once (auto device), its quantized linears running the format's kernels."""
        if self._model is None:
            self._model = self.load()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer


# Unsaved runs' folders under the cache that no call has touched for this long are removed.
STALE_RUN_SECONDS = 7 * 24 * 3600


def run_folder(model, config: QuantConfig, calib, device, compute_dtype, offload_activations) -> Path:
    """The folder under the cache where `quantize(model, ...)` without `out` works: the same for the same
    call (model folder, settings, calibration, placement), so that a call stopped by Ctrl-C, an error
    or a kill resumes when made again (streaming.quantize_to_disk checks the finer fingerprint)."""
    if isinstance(calib, torch.Tensor):
        calibration = hashlib.sha256(calib.cpu().contiguous().numpy().tobytes()).hexdigest()
    elif dataclasses.is_dataclass(calib):
        calibration = dataclasses.asdict(calib)
    else:
        calibration = calib
    call = {"model": str(Path(resolve_model(str(model))).resolve()), "config": config.to_dict(),
            "calibration": calibration, "device": str(device), "compute_dtype": str(compute_dtype),
            "offload_activations": offload_activations}
    key = hashlib.sha256(json.dumps(call, sort_keys=True, default=str).encode()).hexdigest()[:16]
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    _remove_stale_runs(runs, keep=key)
    folder = runs / f"quantize-{key}"
    folder.mkdir(exist_ok=True)
    return folder


def _remove_stale_runs(runs: Path, keep: str) -> None:
    """Unsaved runs nobody resumed within STALE_RUN_SECONDS (a killed process leaves its folder behind)."""
    now = time.time()
    for folder in runs.iterdir():
        if keep in folder.name or folder.is_symlink() or not folder.is_dir():
            continue
        touched = max((p.lstat().st_mtime for p in folder.rglob("*")), default=folder.lstat().st_mtime)
        if now - touched > STALE_RUN_SECONDS:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"removed {folder}: an unsaved quantization run untouched for {(now - touched) / 86400:.0f} days",
                  file=sys.stderr)


def quantize(model, config: QuantConfig | None = None, calib: Calibration | str | torch.Tensor | None = None,
             *, out: str | os.PathLike | None = None, overwrite: bool = False, tokenizer=None,
             device="auto", compute_dtype="auto", offload_activations: str = "auto", progress: bool = True,
             keep_quantized: bool = False):
    """Quantize a model.

    model: a built-in name, a local folder or a hub id (resolved to its local snapshot) is streamed
    from disk one decoder block at a time into the checkpoint folder `out` (when None, a folder under
    the cache named after the call, so that the same call resumes after a stop; `.save(path)` moves
    it) and gives a QuantizedCheckpoint; a transformers model you already
    hold is quantized in memory, in place, and gives a QuantizedModel (`.save(path)` writes it).
    calib: a Calibration, a corpus name, or token windows [n, seqlen]; data-free methods take none
    (and then report no per-layer output error); methods that need data default to Calibration().
    device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; compute_dtype: "auto" (float32 on
    the CPU, bfloat16 / float16 on a GPU) or a dtype name; offload_activations: auto | never | always
    (calibration activations in CPU memory instead of on the GPU).
    keep_quantized: (a model you hold) also keep each layer's format-neutral result."""
    config = config or QuantConfig()
    if isinstance(model, (str, os.PathLike)):
        if keep_quantized:
            raise ConfigError("keep_quantized needs a model held in memory; load it first")
        temporary = out is None
        if temporary:
            out = run_folder(model, config, calib, device, compute_dtype, offload_activations) / "checkpoint"
            overwrite = True  # a finished checkpoint left there by the same call, never saved: made again
        try:
            folder, report = quantize_to_disk(model, config, calib, out, overwrite=overwrite, progress=progress,
                                              device=device, compute_dtype=compute_dtype,
                                              offload_activations=offload_activations)
        except BaseException:
            if temporary and not any(Path(out).parent.iterdir()):
                Path(out).parent.rmdir()  # nothing kept to resume from
            raise
        return QuantizedCheckpoint(folder, report, temporary)

    start = time.time()
    source = getattr(model.config, "_name_or_path", None)
    arch = arch_for(model.config, model)
    placement = placement_for(device, compute_dtype, offload_activations)
    config = prepare_model(model, arch, config)
    rotation = rotate_model(model, arch, config.rotate_seed, config.rotate_online) if config.rotate else None
    plan = plan_run(model, arch, config, calib, tokenizer, placement=placement)
    if plan.calibration is not None and offload_activations == "auto":
        block_bytes = sum(p.numel() * 4 for p in arch.block_list(model)[0].parameters())
        plan.placement = placement_for(device, compute_dtype, offload_activations, model.config, plan.calibration,
                                       block_bytes)
    packed: dict[str, dict[str, torch.Tensor]] = {}
    kept = {}

    def on_quantized(name, quantized, linear):
        packed[name] = plan.fmt.pack(quantized, config.for_layer(name))
        if keep_quantized:
            kept[name] = quantized

    model.eval()
    result = quantize_blocks(model, arch, plan.algorithm, grid_for=plan.grid_for, on_quantized=on_quantized,
                             calibration=plan.calibration, true_sequential=config.true_sequential,
                             progress=progress, placement=plan.placement)
    set_calibrate_all_experts(model, False)  # from here on the model computes as it is served
    return QuantizedModel(model, tokenizer, config, packed, result, source, time.time() - start,
                          plan.calibration_info, peak_rss_mib(), kept, plan.placement,
                          rotation.description if rotation is not None else None)


def load_with_tokenizer(model_or_path, device="auto", dtype="auto"):
    """(model, tokenizer) for a built-in name, a hub id, or a folder (quantized or not), on `device`."""
    from transformers import AutoTokenizer

    folder = resolve_model(str(model_or_path))
    return load(folder, device=device, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def evaluate(model_or_path, corpus: str = "wiki", split: str | None = None, seqlen: int = 512,
             max_windows: int | None = None, bos: bool | None = None, progress: bool = True,
             tokenizer=None, device="auto", dtype="auto") -> dict:
    """Token perplexity of a model (name, folder, or loaded model + tokenizer) on a corpus split.

    bos: start each window with BOS; by default the architecture map decides (Gemma: yes).
    split: by default "test" of a built-in corpus or hub dataset, "all" of a user's own file
    (data.default_split); the result names the split used.
    device / dtype: where a model given by name or folder is loaded and computes.
    """
    model, tokenizer, name, bos = _model_to_evaluate(model_or_path, tokenizer, device, dtype, bos)
    if bos and tokenizer.bos_token_id is None:
        raise ConfigError("BOS per window was asked for, but the tokenizer has no BOS token")
    split = split or default_split(corpus, "evaluation")
    tokens = tokenize_corpus(tokenizer, corpus, split)
    windows = evaluation_windows(tokens, seqlen, tokenizer.bos_token_id if bos else None, max_windows)
    start = time.time()
    result = perplexity(model, windows, progress=progress)
    return {**result.to_dict(), **_what_was_evaluated(model, name), "corpus": corpus, "split": split,
            "seconds": round(time.time() - start, 2)}


def _model_to_evaluate(model_or_path, tokenizer, device, dtype, bos):
    """(model, tokenizer, name, bos) for an evaluation: a loaded model with its tokenizer, or one loaded
    from a name or folder; bos None: the architecture map decides (Gemma: yes)."""
    if isinstance(model_or_path, nn.Module):
        # a peft model (QLoRA adapters) is evaluated through the transformers model it wraps
        model = model_or_path.get_base_model() if hasattr(model_or_path, "get_base_model") else model_or_path
        name = getattr(model.config, "_name_or_path", None)
        if tokenizer is None:
            raise ConfigError("evaluating a loaded model needs its tokenizer (pass tokenizer=)")
    else:
        name = str(model_or_path)
        model, tokenizer = load_with_tokenizer(model_or_path, device, dtype)
    if bos is None:
        try:
            bos = arch_for(model.config).bos_per_window
        except UnsupportedArchitectureError:
            bos = False
    return model, tokenizer, name, bos


def _what_was_evaluated(model, name) -> dict:
    parameter = next(model.parameters())
    return {"model": name, "quantization_config": getattr(model.config, "quantization_config", None),
            "device": str(parameter.device), "dtype": str(parameter.dtype).removeprefix("torch.")}


def evaluate_tasks(model_or_path, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                   bos: bool | None = None, include_path: list[str] | None = None, tokenizer=None,
                   device="auto", dtype="auto", manager=None) -> dict:
    """Zero-shot task accuracy (lm-evaluation-harness) of a model (name, folder, or loaded model +
    tokenizer): task_accuracy.task_accuracy on the model as llmquant.load gives it. bos: by default the
    architecture map decides (Gemma: yes), as for perplexity."""
    from .task_accuracy import task_accuracy, task_manager

    manager = manager or task_manager(tasks, include_path)
    model, tokenizer, name, bos = _model_to_evaluate(model_or_path, tokenizer, device, dtype, bos)
    start = time.time()
    result = task_accuracy(model, tokenizer, tasks, limit, batch_size, bos, manager=manager)
    return {**result, **_what_was_evaluated(model, name), "bos": bos, "seconds": round(time.time() - start, 2)}
