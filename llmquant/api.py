"""The public face: quantize a model, save it, load it back.

    qmodel = llmquant.quantize("smollm2-135m", QuantConfig(bits=4, group_size=64))
    qmodel.save("out/smollm2-w4g64")
    model = llmquant.load("out/smollm2-w4g64")   # a transformers model that generates
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .algorithms import CODEBOOK_METHODS, algorithm_for
from .arch import ArchMap, arch_for
from .checkpoint import (REPORT_FILES, checkpoint_tensors, tensors_sha256, without_tied_copies, write_folder_atomically,
                         write_model_files)
from .config import PER_CHANNEL, QuantConfig
from .data import Calibration
from .errors import ConfigError, LlmquantError, UnsupportedArchitectureError
from .formats import FORMATS
from .grid import AffineGrid
from .grid.codebook import CodebookGrid
from .models import load_fp_model
from .pipeline import PipelineResult, quantize_blocks

STORAGE_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
REPORT_FILE = REPORT_FILES["quantize"]


@dataclass
class QuantizedModel:
    """A model whose block linears hold their quantized (dequantized-to-float) weights, plus the
    packed tensors of the chosen format. For weight-only methods `model` computes exactly what the
    saved checkpoint will; W8A8 methods also round activations, which only the loaded checkpoint's
    W8A8Linear layers do."""

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

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """All tensors of the checkpoint: packed quantized linears, the rest in the storage dtype."""
        return checkpoint_tensors(without_tied_copies(self.model.state_dict()), self.packed,
                                  STORAGE_TORCH_DTYPES[self.config.dtype])

    def report(self) -> dict:
        packed_bytes = sum(t.numel() * t.element_size() for p in self.packed.values() for t in p.values())
        return build_report(self.config, self.source, self.calibration, self.seconds, self.peak_rss_mib,
                            self.pipeline, packed_bytes)

    def save(self, path: str | os.PathLike, overwrite: bool = False, max_shard_size: str = "4GB") -> Path:
        fmt = FORMATS[self.config.format]
        storage = STORAGE_TORCH_DTYPES[self.config.dtype]

        def write(folder: Path) -> None:
            tensors = self.checkpoint_tensors()
            write_model_files(folder, self.model, tensors, self.tokenizer, storage, max_shard_size,
                              fmt.quantization_config(self.config))
            report = self.report()
            report["checkpoint_sha256"] = tensors_sha256(tensors)
            (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
            from .report import write_report

            write_report(folder, plots=False)  # `llmquant report DIR` draws the figures

        return write_folder_atomically(path, write, overwrite)


def build_report(config: QuantConfig, source, calibration, seconds, peak_rss_mib, pipeline: PipelineResult,
                 packed_bytes: int) -> dict:
    """quantize_report.json: what was run (with the llmquant version), and what it gave."""
    from . import __version__

    quantized = sum(r.shape[0] * r.shape[1] for r in pipeline.layers)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "llmquant_version": __version__,
        "llmquant_config": config.to_dict(),
        "source_model": source,
        "calibration": calibration,
        "seconds": round(seconds, 2),
        "peak_rss_mib": peak_rss_mib,
        "peak_gpu_mib": peak_gpu,
        "quantized_parameters": quantized,
        "quantized_layers_fp16_bytes": 2 * quantized,
        "quantized_layers_packed_bytes": packed_bytes,
        "bits_per_weight": 8 * packed_bytes / max(quantized, 1),
        "scaling": pipeline.scaling,
        "layers": [{**dataclasses.asdict(r), "shape": list(r.shape)} for r in pipeline.layers],
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def calibration_windows_for(calib, tokenizer, arch: ArchMap, vocab_size: int) -> tuple[torch.Tensor | None, dict | None]:
    """(token windows, their description for the report) from a Calibration, corpus name or tensor."""
    if isinstance(calib, str):
        calib = Calibration(corpus=calib)
    if isinstance(calib, Calibration):
        if tokenizer is None:
            raise ConfigError("calibration from a corpus needs the model's tokenizer (pass tokenizer=)")
        bos = tokenizer.bos_token_id if arch.bos_per_window else None
        calibration = calib.windows(tokenizer, bos)
        info = {"corpus": calib.corpus, "split": calib.split, "nsamples": calib.nsamples,
                "seqlen": calib.seqlen, "seed": calib.seed}
    elif isinstance(calib, torch.Tensor):
        calibration = calib.long()
        info = {"windows": list(calibration.shape)}
    elif calib is None:
        return None, None
    else:
        raise ConfigError(f"calib must be a Calibration, a corpus name or a tensor of token ids, got {type(calib).__name__}")
    if calibration.numel() == 0 or int(calibration.max()) >= vocab_size or int(calibration.min()) < 0:
        raise ConfigError(f"calibration token ids must lie in [0, {vocab_size}) for this model's embedding "
                          "(is the tokenizer the model's own?)")
    return calibration, info


def plan_run(model, arch: ArchMap, config: QuantConfig, calib, tokenizer, check_values: bool = True):
    """What a quantization run needs, checked before any work: (format, algorithm, grid per linear
    to quantize, calibration windows or None, their description)."""
    layers = list(linears_to_quantize(model, arch, config))
    _check_layers(layers, config, check_values)
    fmt = FORMATS[config.format]
    algorithm = algorithm_for(config)
    grids = {name: grid_for_config(config.for_layer(name), fmt) for name, _ in layers}
    if calib is None and algorithm.needs_calibration:
        calib = Calibration()
    calibration, info = calibration_windows_for(calib, tokenizer, arch, model.get_input_embeddings().num_embeddings)
    return fmt, algorithm, grids, calibration, info


def linears_to_quantize(model: nn.Module, arch: ArchMap, config: QuantConfig):
    """(name, linear) of every block linear the config quantizes, in pipeline order."""
    try:
        blocks = arch.block_list(model)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(f"{arch.name} map: no block list at {arch.blocks!r}") from exc
    for index, block in enumerate(blocks):
        for short_name in arch.linear_names():
            name = f"{arch.block_prefix(index)}.{short_name}"
            try:
                linear = block.get_submodule(short_name)
            except AttributeError as exc:
                raise UnsupportedArchitectureError(f"{arch.name} map names {name}, which this model lacks") from exc
            if not isinstance(linear, nn.Linear):
                raise UnsupportedArchitectureError(f"{name} is a {type(linear).__name__}, not nn.Linear")
            if any(name == m or name.endswith("." + m) for m in config.modules_to_not_convert):
                continue
            yield name, linear


def grid_for_config(config: QuantConfig, fmt) -> AffineGrid | CodebookGrid:
    if config.method in CODEBOOK_METHODS:
        return CodebookGrid(config.method, config.group_size, config.double_quant)
    return AffineGrid(config.bits, config.sym, config.group_size, min_zero=fmt.grid_min_zero(config),
                      clip_search=config.clip_search)


def _check_layers(layers, config: QuantConfig, check_values: bool = True) -> None:
    fmt = FORMATS[config.format]
    unknown = set(config.layer_overrides) - {name for name, _ in layers}
    if unknown:
        raise ConfigError(f"layer overrides name linears this model does not quantize: {', '.join(sorted(unknown)[:3])}")
    row_groups = config.method not in CODEBOOK_METHODS  # codebook blocks run over the flattened weight
    for name, linear in layers:
        layer_config = config.for_layer(name)
        if row_groups and layer_config.group_size != PER_CHANNEL and layer_config.group_size > linear.in_features:
            raise ConfigError(
                f"group_size {layer_config.group_size} is larger than in_features {linear.in_features} of {name}; "
                "use -1 for one group per output channel"
            )
        fmt.check_layer(name, linear.out_features, linear.in_features, layer_config)
        if check_values and not torch.isfinite(linear.weight).all():
            raise LlmquantError(f"{name}.weight contains NaN or Inf; refusing to quantize it")


def quantize(model, config: QuantConfig | None = None, calib: Calibration | str | torch.Tensor | None = None,
             *, tokenizer=None, progress: bool = True, keep_quantized: bool = False) -> QuantizedModel:
    """Quantize a model (a built-in name, a folder, a hub id, or a loaded transformers model, which
    is modified in place). `calib`: a Calibration, a corpus name, or token windows [n, seqlen];
    data-free methods take none (and then report no per-layer output error); methods that need
    data default to Calibration() (32 windows of 512 tokens of the wiki train split).
    keep_quantized: also keep each layer's format-neutral result (QuantizedModel.quantized_weights)."""
    config = config or QuantConfig()
    start = time.time()
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = str(model)
        model, tokenizer = load_fp_model(model)
    else:
        source = getattr(model.config, "_name_or_path", None)
    arch = arch_for(model.config)
    fmt, algorithm, grids, calibration, calibration_info = plan_run(model, arch, config, calib, tokenizer)
    packed: dict[str, dict[str, torch.Tensor]] = {}
    kept = {}

    def on_quantized(name, quantized, linear):
        packed[name] = fmt.pack(quantized, config.for_layer(name))
        if keep_quantized:
            kept[name] = quantized

    model.eval()
    result = quantize_blocks(
        model, arch, algorithm,
        grid_for=lambda name, linear: grids.get(name),
        on_quantized=on_quantized,
        calibration=calibration,
        true_sequential=config.true_sequential,
        progress=progress,
    )
    return QuantizedModel(model, tokenizer, config, packed, result, source, time.time() - start, calibration_info,
                          peak_rss_mib(), kept)


def load_with_tokenizer(model_or_path):
    """(model, tokenizer) for a built-in name, a hub id, or a folder (quantized or not)."""
    from transformers import AutoTokenizer

    from .loading import load
    from .models import BUILTIN_MODELS, resolve_model

    text = str(model_or_path)
    if text in BUILTIN_MODELS or not Path(text).expanduser().exists():
        return load_fp_model(text)
    folder = resolve_model(text)
    return load(folder), AutoTokenizer.from_pretrained(folder)


def evaluate(model_or_path, corpus: str = "wiki", split: str | None = None, seqlen: int = 512,
             max_windows: int | None = None, bos: bool | None = None, progress: bool = True,
             tokenizer=None) -> dict:
    """Token perplexity of a model (name, folder, or loaded model + tokenizer) on a corpus split.

    bos: start each window with BOS; by default the architecture map decides (Gemma: yes).
    split: by default "test" of a built-in corpus or hub dataset, "all" of a user's own file
    (data.default_split); the result names the split used.
    """
    from .data import default_split, evaluation_windows, tokenize_corpus
    from .perplexity import perplexity

    if isinstance(model_or_path, nn.Module):
        # a peft model (QLoRA adapters) is evaluated through the transformers model it wraps
        model = model_or_path.get_base_model() if hasattr(model_or_path, "get_base_model") else model_or_path
        name = getattr(model.config, "_name_or_path", None)
        if tokenizer is None:
            raise ConfigError("evaluating a loaded model needs its tokenizer (pass tokenizer=)")
    else:
        name = str(model_or_path)
        model, tokenizer = load_with_tokenizer(model_or_path)
    if bos is None:
        try:
            bos = arch_for(model.config).bos_per_window
        except UnsupportedArchitectureError:
            bos = False
    if bos and tokenizer.bos_token_id is None:
        raise ConfigError("BOS per window was asked for, but the tokenizer has no BOS token")
    split = split or default_split(corpus, "evaluation")
    tokens = tokenize_corpus(tokenizer, corpus, split)
    windows = evaluation_windows(tokens, seqlen, tokenizer.bos_token_id if bos else None, max_windows)
    start = time.time()
    result = perplexity(model, windows, progress=progress)
    return {
        **result.to_dict(),
        "model": name,
        "quantization_config": getattr(model.config, "quantization_config", None),
        "corpus": corpus,
        "split": split,
        "seconds": round(time.time() - start, 2),
    }
