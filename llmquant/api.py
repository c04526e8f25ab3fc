"""The public face: quantize a model, save it, load it back, evaluate it.

    qmodel = llmquant.quantize("smollm2-135m", QuantConfig(bits=4, group_size=64))
    qmodel.save("out/smollm2-w4g64")
    model = llmquant.load("out/smollm2-w4g64")   # a transformers model that generates

A quantization is one run whatever holds the model (quantization/planning.py checks and plans it,
quantization/pipeline.py takes every block through it); its blocks come from a folder streamed from
disk (quantization/streaming.py) or from a model held in memory (quantization/in_memory.py).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from .arch import arch_for
from .config import QuantConfig
from .data import Calibration, default_split, evaluation_windows, tokenize_corpus
from .errors import ConfigError, UnsupportedArchitectureError
from .quantization.in_memory import quantize_in_memory
from .inference.loading import load
from .models import resolve_model
from .evaluation.perplexity import perplexity
from .quantization.planning import check_request
from .quantization.streaming import QuantizedCheckpoint, run_folder, stream_to_disk


def quantize(model, config: QuantConfig | None = None, calib: Calibration | str | torch.Tensor | None = None,
             *, out: str | os.PathLike | None = None, overwrite: bool = False, tokenizer=None,
             device="auto", compute_dtype="auto", offload_activations: str = "auto", progress: bool = True,
             keep_quantized: bool = False):
    """Quantize a model.

    model: a built-in name, a local folder or a hub id (resolved to its local snapshot) is streamed
    from disk one decoder block at a time into the checkpoint folder `out` (when None, a folder under
    the cache named after the call, so that the same call resumes after a stop; `.save(path)` moves
    it) and gives a QuantizedCheckpoint; a transformers model you already hold is quantized in
    memory, in place, and gives a QuantizedModel (`.save(path)` writes it; given `out`, it is
    written there too).
    calib: a Calibration, a corpus name, or token windows [n, seqlen]; data-free methods take none
    (and then report no per-layer output error); methods that need data default to Calibration().
    device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; compute_dtype: "auto" (float32 on
    the CPU, bfloat16 / float16 on a GPU) or a dtype name; offload_activations: auto | never | always
    (calibration activations in CPU memory instead of on the GPU).
    keep_quantized: (a model you hold) also keep each layer's format-neutral result."""
    config = config or QuantConfig()
    if not isinstance(model, (str, os.PathLike)):
        request = check_request(config, calib, out=out, overwrite=overwrite, device=device,
                                compute_dtype=compute_dtype, offload_activations=offload_activations)
        qmodel = quantize_in_memory(model, config, request, tokenizer, progress, keep_quantized)
        if request.out is not None:
            qmodel.save(request.out, overwrite=overwrite)
        return qmodel
    if keep_quantized:
        raise ConfigError("keep_quantized needs a model held in memory; load it first")
    temporary = out is None
    if temporary:
        out = run_folder(model, config, calib, device, compute_dtype, offload_activations) / "checkpoint"
        overwrite = True  # a finished checkpoint left there by the same call, never saved: made again
    try:
        request = check_request(config, calib, out=out, overwrite=overwrite, streamed=True, device=device,
                                compute_dtype=compute_dtype, offload_activations=offload_activations)
        folder, report = stream_to_disk(model, config, request, progress)
    except BaseException:
        if temporary and not any(Path(out).parent.iterdir()):
            Path(out).parent.rmdir()  # nothing kept to resume from
        raise
    return QuantizedCheckpoint(folder, report, temporary)


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
    from .evaluation.task_accuracy import task_accuracy, task_manager

    manager = manager or task_manager(tasks, include_path)
    model, tokenizer, name, bos = _model_to_evaluate(model_or_path, tokenizer, device, dtype, bos)
    start = time.time()
    result = task_accuracy(model, tokenizer, tasks, limit, batch_size, bos, manager=manager)
    return {**result, **_what_was_evaluated(model, name), "bos": bos, "seconds": round(time.time() - start, 2)}
