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

from llmquant.inference import ops
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


# What the checkpoint means is what llmquant's reference ops compute (dequantize, then an fp32 matmul).
# llmquant.load runs the CPU fast paths by default, and the int4 one rounds activations to bf16: a
# deliberate speed trade-off (eval/CPU.md, perplexity within 0.1%), not the file's semantics, and on
# a sensitive model (2 bits, per channel) it moves logits by more than any loader difference. So an
# outside loader is compared with the reference ops.
def logits_of_ours(model, batch: torch.Tensor) -> torch.Tensor:
    with ops.use_backend("reference"):
        return logits_of(model, batch)


def perplexity_of_ours(model, tokenizer) -> float:
    with ops.use_backend("reference"):
        return perplexity_of(model, tokenizer)


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


def with_our_weights(reference_model, ours, weight_dtype: torch.dtype = torch.float32):
    """The full-precision model carrying our checkpoint's weights: every quantized linear's weight
    dequantized (then rounded to weight_dtype and back, as a loader that dequantizes into it holds
    them), and every other tensor as stored (embeddings and norms in the checkpoint's fp16)."""
    model = copy.deepcopy(reference_model)
    quantized = {name for name, module in ours.named_modules() if hasattr(module, "dequantized_weight")}
    for name in quantized:
        weight = ours.get_submodule(name).dequantized_weight()
        model.get_submodule(name).weight.data = weight.to(weight_dtype).float()
    targets = dict(model.named_parameters())
    for name, tensor in ours.named_parameters():
        if name.rsplit(".", 1)[0] not in quantized and name in targets:
            targets[name].data = tensor.data.to(targets[name].dtype)
    return model


def assert_gptq_torch_weights_are_ours_in_fp16(theirs, ours) -> None:
    """gptqmodel's TorchLinear dequantizes (q - z) * s in the scales' fp16, one rounding of llmquant's
    exact fp32 product: every linear's weight must be ours rounded to fp16, bit for bit."""
    quantized = [(name, m) for name, m in ours.named_modules() if hasattr(m, "dequantized_weight")]
    assert quantized
    with torch.no_grad():
        for name, our_module in quantized:
            their_weight = theirs.get_submodule(name).dequantize_weight().t().float()
            assert torch.equal(their_weight, our_module.dequantized_weight().half().float()), name


def worst_layer_difference(theirs, ours, batch: torch.Tensor) -> tuple[float, str]:
    """(max |Δ| / max |output|, layer) over every quantized linear: each of their linears run on the
    input our linear got in our forward on `batch`, against our linear's output. Unlike whole-model
    logits, no difference upstream reaches a layer, so rounding-boundary flips cannot cascade."""
    seen = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
             for name, module in ours.named_modules() if hasattr(module, "dequantized_weight")]
    try:
        logits_of_ours(ours, batch)
    finally:
        for hook in hooks:
            hook.remove()
    worst = (0.0, "")
    with torch.no_grad():
        for name, (x, our_out) in seen.items():
            their_out = theirs.get_submodule(name)(x)
            worst = max(worst, (max_abs_difference(their_out, our_out) / float(our_out.abs().max()), name))
    return worst


def perplexity_shift_under_nudge(ours, tokenizer, baseline: float, nudge: float = 1e-6) -> float:
    """Relative change from `baseline` (our model's perplexity_of_ours) when its input embeddings are
    scaled by (1 + nudge): how
    far fp32 noise alone moves this checkpoint's perplexity on the measured windows. Static per-tensor
    activation scales put many inputs near a rounding boundary of a wide step, so a 1e-6 nudge flips
    codes that then cascade through the blocks (SmolLM2 W8A8 static: several %)."""
    hook = ours.get_input_embeddings().register_forward_hook(lambda m, args, out: out * (1 + nudge))
    try:
        return relative(perplexity_of_ours(ours, tokenizer), baseline)
    finally:
        hook.remove()


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
