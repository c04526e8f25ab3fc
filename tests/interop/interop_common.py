"""What every interop test measures, the same way: logits on a batch of real prompts and perplexity
on the first wiki test windows, for our loader, theirs and full precision; and, when
LLMQUANT_INTEROP_REPORT names a file, one JSON line per comparison (eval/interop_table.py turns
them into eval/INTEROP.md)."""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

from llmquant.api import evaluate
from llmquant.data import tokenize_corpus

PROMPTS = 4  # prompts in the logit batch
PROMPT_TOKENS = 48  # tokens per prompt
WINDOWS = 2  # 512-token wiki test windows for perplexity
SEQLEN = 512


def prompt_batch(tokenizer) -> torch.Tensor:
    """[PROMPTS, PROMPT_TOKENS] token ids: stretches of the wiki test split spread over its length."""
    tokens = tokenize_corpus(tokenizer, "wiki", "test")
    stride = tokens.numel() // PROMPTS
    return torch.stack([tokens[i * stride: i * stride + PROMPT_TOKENS] for i in range(PROMPTS)])


@torch.no_grad()
def logits_of(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch).logits.float()


def perplexity_of(model, tokenizer) -> float:
    return evaluate(model, seqlen=SEQLEN, max_windows=WINDOWS, progress=False, tokenizer=tokenizer)["perplexity"]


@dataclass
class Reference:
    model: object
    tokenizer: object
    batch: torch.Tensor
    logits: torch.Tensor
    perplexity: float

    @classmethod
    def build(cls, name: str) -> "Reference":
        from llmquant.models import load_fp_model

        model, tokenizer = load_fp_model(name)
        batch = prompt_batch(tokenizer)
        return cls(model, tokenizer, batch, logits_of(model, batch), perplexity_of(model, tokenizer))


def versions(*packages: str) -> str:
    found = []
    for package in packages:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return ", ".join(found)


def record(**row) -> None:
    """Append one comparison to the report file, if one is asked for."""
    path = os.environ.get("LLMQUANT_INTEROP_REPORT")
    if not path:
        return
    row = {key: (round(value, 6) if isinstance(value, float) else value) for key, value in row.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **row}) + "\n")


def max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def relative(a: float, b: float) -> float:
    return a / b - 1


def with_our_weights(reference_model, ours):
    """The full-precision model carrying our checkpoint's weights: every quantized linear's weight
    dequantized, and every other tensor as stored (embeddings and norms in the checkpoint's fp16)."""
    model = copy.deepcopy(reference_model)
    quantized = {name for name, module in ours.named_modules() if hasattr(module, "dequantized_weight")}
    for name in quantized:
        model.get_submodule(name).weight.data = ours.get_submodule(name).dequantized_weight()
    targets = dict(model.named_parameters())
    for name, tensor in ours.named_parameters():
        if name.rsplit(".", 1)[0] not in quantized and name in targets:
            targets[name].data = tensor.data.to(targets[name].dtype)
    return model


def switch_activation_quantization(model, enabled: bool) -> None:
    """compressed-tensors' own switch (read by its quantized forward; absent means on)."""
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            module.quantization_enabled = enabled


def weights_only_difference(theirs, ours, reference) -> float:
    """Max |Δ logit| between their model with activation quantization switched off and the FP model
    carrying our dequantized weights: the weights alone, apart from activation rounding."""
    switch_activation_quantization(theirs, False)
    difference = max_abs_difference(logits_of(theirs, reference.batch),
                                    logits_of(with_our_weights(reference.model, ours), reference.batch))
    switch_activation_quantization(theirs, True)
    return difference


GGUF_TYPES = ("q8_0", "q4_0", "q4_1", "q4_k")
_GGUF_FILES: dict[tuple[str, str], object] = {}
_GGUF_IN_TRANSFORMERS: dict[str, dict] = {}


def gguf_export(folder, model: str, tensor_type: str):
    """Our GGUF export of a built-in model, written once per session."""
    from llmquant.gguf_export import export_gguf

    key = (model, tensor_type)
    if key not in _GGUF_FILES:
        _GGUF_FILES[key] = export_gguf(model, folder / f"{model}-{tensor_type}.gguf", tensor_type)
    return _GGUF_FILES[key]


def gguf_in_transformers(path, reference: Reference) -> dict:
    """Our GGUF file loaded by transformers' GGUF loader (dequantized to fp32), measured once per file:
    its logits on the prompt batch, llmquant's perplexity of it, and whether its tokenizer gives the
    Hugging Face tokenizer's ids on the whole wiki test split."""
    if str(path) not in _GGUF_IN_TRANSFORMERS:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmquant.data import corpus_text

        start = time.time()
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        text = corpus_text("wiki", "test")
        _GGUF_IN_TRANSFORMERS[str(path)] = {
            "logits": logits_of(model, reference.batch),
            "perplexity": perplexity_of(model, reference.tokenizer),
            "tokens_equal": tokenizer(text, add_special_tokens=False).input_ids
            == reference.tokenizer(text, add_special_tokens=False).input_ids,
            "seconds": time.time() - start,
        }
    return _GGUF_IN_TRANSFORMERS[str(path)]
