"""QLoRA (Dettmers et al., 2023): LoRA adapters trained over a frozen quantized base.

The base stays packed (NF4 / FP4, or GPTQ / AWQ); each forward dequantizes a layer's weight,
and gradients flow through that dequantized weight to the layer's input, so only the adapters
(peft's LoRA A and B matrices) are trained. Adapters are saved in peft's own format and load
back over the same checkpoint; `merge_into_checkpoint` folds them into the weights and
re-quantizes them on the base's NF4 / FP4 grid, giving a new checkpoint without adapters.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import arch_for
from .checkpoint import write_folder_atomically
from .data import calibration_windows, evaluation_windows, tokenize_corpus
from .errors import ConfigError, LlmquantError
from .nn import AWQLinear, BnB4bitLinear, GPTQLinear
from .perplexity import perplexity

# Quantized linears whose forward is differentiable in its input (W8A8 rounds activations: it is not).
TRAINABLE_BASES = (BnB4bitLinear, GPTQLinear, AWQLinear)
REPORT_FILE = "finetune_report.json"


@dataclass(frozen=True)
class LoraSettings:
    """r: adapter rank; alpha: scale numerator (updates are scaled by alpha / r); dropout on the
    adapter's input; targets: short module names to adapt (default: every quantized linear)."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class TrainingSettings:
    """steps optimizer steps of batch_size windows of seqlen tokens from the corpus's train split, at
    random offsets; AdamW with linear warmup then linear decay; held-out loss on eval_windows
    windows of the validation split, before and after."""

    corpus: str = "wiki"
    steps: int = 200
    batch_size: int = 4
    seqlen: int = 256
    lr: float = 2e-4
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    eval_windows: int = 16
    eval_split: str = "validation"
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_windows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ConfigError(f"seqlen must be an integer >= 2, got {self.seqlen!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")


@dataclass
class FinetuneResult:
    model: nn.Module  # the peft model: the quantized base with LoRA layers injected
    tokenizer: object
    lora: LoraSettings
    training: TrainingSettings
    source: str | None
    heldout_loss_before: float
    heldout_loss_after: float
    train_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def report(self) -> dict:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {
            "base_checkpoint": self.source,
            "lora": asdict(self.lora),
            "training": asdict(self.training),
            "trainable_parameters": trainable,
            "heldout_loss_before": self.heldout_loss_before,
            "heldout_loss_after": self.heldout_loss_after,
            "heldout_perplexity_before": math.exp(self.heldout_loss_before),
            "heldout_perplexity_after": math.exp(self.heldout_loss_after),
            "train_loss_first_10": _mean(self.train_losses[:10]),
            "train_loss_last_10": _mean(self.train_losses[-10:]),
            "train_losses": self.train_losses,
            "seconds": round(self.seconds, 2),
        }

    def save_adapter(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        def write(folder: Path) -> None:
            self.model.save_pretrained(str(folder))
            (folder / REPORT_FILE).write_text(json.dumps(self.report(), indent=2) + "\n")

        return write_folder_atomically(path, write, overwrite)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _lora_layer_class():
    from peft.tuners.lora.layer import Linear

    class QuantizedLoraLinear(Linear):
        """peft's LoRA linear over one of our quantized linears (peft cannot infer their sizes)."""

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

    return QuantizedLoraLinear


def _peft_config(lora: LoraSettings, targets: list[str]):
    from peft import LoraConfig

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    config._register_custom_module({base: _lora_layer_class() for base in TRAINABLE_BASES})
    return config


def quantized_linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                   if isinstance(module, TRAINABLE_BASES)})


def attach_lora(model: nn.Module, lora: LoraSettings):
    """The peft model with fresh LoRA adapters on the quantized linears (the base is frozen)."""
    from peft import get_peft_model

    available = quantized_linear_names(model)
    if not available:
        raise ConfigError("QLoRA trains adapters over a weight-only quantized checkpoint (bitsandbytes, gptq, awq); "
                          "this model has no such layer")
    targets = list(lora.targets or available)
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise ConfigError(f"LoRA targets {', '.join(unknown)} are not quantized linears of this model; "
                          f"available: {', '.join(available)}")
    return get_peft_model(model, _peft_config(lora, targets))


def load_adapter(model: nn.Module, path: str | os.PathLike):
    """`model` (a loaded quantized checkpoint) with the adapters saved at `path`, for inference."""
    from peft import LoraConfig, PeftModel

    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise LlmquantError(f"{folder} is not an adapter folder (no adapter_config.json)")
    config = LoraConfig.from_pretrained(str(folder))
    config._register_custom_module({base: _lora_layer_class() for base in TRAINABLE_BASES})
    return PeftModel.from_pretrained(model, str(folder), config=config).eval()


def _windows(tokenizer, model, training: TrainingSettings):
    bos = tokenizer.bos_token_id if arch_for(model.config).bos_per_window else None
    train_tokens = tokenize_corpus(tokenizer, training.corpus, "train")
    train = calibration_windows(train_tokens, training.steps * training.batch_size, training.seqlen, training.seed, bos)
    heldout_tokens = tokenize_corpus(tokenizer, training.corpus, training.eval_split)
    heldout = evaluation_windows(heldout_tokens, training.seqlen, bos, training.eval_windows)
    return train, heldout


def _learning_rate_factor(step: int, training: TrainingSettings) -> float:
    if step < training.warmup_steps:
        return (step + 1) / training.warmup_steps
    remaining = training.steps - training.warmup_steps
    return max(0.0, 1 - (step - training.warmup_steps) / max(remaining, 1))


def finetune(checkpoint: str | os.PathLike, lora: LoraSettings | None = None,
             training: TrainingSettings | None = None, progress: bool = True) -> FinetuneResult:
    """Train LoRA adapters over a quantized checkpoint folder on real text (CPU-sized runs)."""
    from .api import load_with_tokenizer

    lora, training = lora or LoraSettings(), training or TrainingSettings()
    start = time.time()
    model, tokenizer = load_with_tokenizer(checkpoint)
    if getattr(model.config, "quantization_config", None) is None:
        raise ConfigError(f"{checkpoint} is not a quantized checkpoint; quantize it first (QLoRA trains over a "
                          "frozen quantized base)")
    train, heldout = _windows(tokenizer, model, training)
    torch.manual_seed(training.seed)
    peft_model = attach_lora(model, lora)
    inner = peft_model.get_base_model()  # the transformers model, LoRA layers injected in place
    before = perplexity(inner, heldout, progress=False).mean_nll
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=training.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(step, training))
    losses = []
    peft_model.train()
    bar = tqdm(range(training.steps), desc="qlora", unit="step", disable=not progress)
    for step in bar:
        batch = train[step * training.batch_size:(step + 1) * training.batch_size]
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise LlmquantError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    peft_model.eval()
    after = perplexity(inner, heldout, progress=False).mean_nll
    return FinetuneResult(peft_model, tokenizer, lora, training, str(checkpoint), before, after, losses,
                          time.time() - start)


@torch.no_grad()
def merge_into_checkpoint(peft_model, tokenizer, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fold the adapters into an NF4 / FP4 base: W' = dequant(W) + (alpha / r) B A, re-quantized on the
    base's grid (quant type, block size, double quantization), written as a new bitsandbytes checkpoint."""
    from peft.tuners.lora import LoraLayer

    from .checkpoint import save_loaded_model
    from .formats import FORMATS
    from .grid.codebook import CodebookGrid

    fmt = FORMATS["bitsandbytes"]
    model = peft_model.get_base_model()
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if not isinstance(base, BnB4bitLinear):
            raise ConfigError(f"merging re-quantizes NF4 / FP4 layers; {name} is a {type(base).__name__}")
        weight = base.dequantized_weight()
        for adapter in module.active_adapters:
            weight = weight + module.get_delta_weight(adapter).float()
        grid = CodebookGrid(base.quant_type, base.blocksize, base.nested)
        config = _storage_config(model, grid)
        tensors = fmt.pack(grid.quantize(weight), config)
        merged = BnB4bitLinear(base.in_features, base.out_features, base.quant_type, blocks=base.absmax.numel(),
                               nested_blocks=base.nested_absmax.numel() if base.nested else 0,
                               bias=base.bias is not None, dtype=weight.dtype)
        if base.bias is not None:
            tensors["bias"] = base.bias
        merged.load_state_dict(tensors, assign=True)
        model.set_submodule(name, merged)
    storage = getattr(torch, model.config.quantization_config.get("bnb_4bit_compute_dtype", "float16"))
    return save_loaded_model(model, tokenizer, path, overwrite, storage_dtype=storage)


def _storage_config(model, grid):
    from .config import QuantConfig

    qc = model.config.quantization_config
    return QuantConfig(method=grid.quant_type, group_size=grid.blocksize, double_quant=grid.double_quant,
                       dtype=qc.get("bnb_4bit_compute_dtype", "float16"))
