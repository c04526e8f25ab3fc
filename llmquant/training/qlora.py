"""QLoRA (Dettmers et al., 2023): LoRA adapters trained over a frozen quantized base.

The base stays packed (NF4 / FP4, or GPTQ / AWQ); each forward dequantizes a layer's weight,
and gradients flow through that dequantized weight to the layer's input, so only the adapters
(peft's LoRA A and B matrices) are trained. Adapters are saved in peft's own format and load
back over the same checkpoint; `merge_into_checkpoint` folds them into the weights and
re-quantizes them on the base's NF4 / FP4 grid, giving a new checkpoint without adapters.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import _version
from ..storage.checkpoint import (DEFAULT_MAX_SHARD_SIZE, REPORT_FILES, without_tied_copies, write_folder_atomically,
                                  write_model_files, write_report_file)
from ..config import QuantConfig
from ..inference.cpu import disable_cpu_paths
from ..errors import ConfigError, LlmquantError
from ..formats import FORMATS
from ..grid.codebook import CodebookGrid
from ..inference.loading import load
from ..models import resolve_model
from ..inference.nn import QUANTIZED_LINEARS, AWQLinear, BnB4bitLinear, GPTQLinear
from .loop import heldout_loss, run_report, train, training_windows, TrainingSettings

# Quantized linears whose forward is differentiable in its input (W8A8 rounds activations: it is not).
TRAINABLE_BASES = (BnB4bitLinear, GPTQLinear, AWQLinear)
REPORT_FILE = REPORT_FILES["finetune"]


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
            "trainable_parameters": trainable,
            "train_loss_first_10": _mean(self.train_losses[:10]),
            "train_loss_last_10": _mean(self.train_losses[-10:]),
            **run_report(self.training, self.heldout_loss_before, self.heldout_loss_after, self.train_losses,
                         self.seconds),
        }

    def save_adapter(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        def write(folder: Path) -> None:
            self.model.save_pretrained(str(folder))
            write_report_file(folder, REPORT_FILE, self.report())

        return write_folder_atomically(path, write, overwrite)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@functools.cache
def _lora_layer_class():
    """Built once (peft is imported lazily), so every adapter uses the same class."""
    from peft.tuners.lora.layer import Linear

    class QuantizedLoraLinear(Linear):
        """peft's LoRA linear over one of our quantized linears (peft cannot infer their sizes)."""

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

    return QuantizedLoraLinear


def _with_quantized_bases(config):
    """The peft LoraConfig, told which LoRA layer wraps each of our quantized linears."""
    config._register_custom_module({base: _lora_layer_class() for base in TRAINABLE_BASES})
    return config


def _peft_config(lora: LoraSettings, targets: list[str]):
    from peft import LoraConfig

    return _with_quantized_bases(LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=targets, bias="none", task_type="CAUSAL_LM"))


def quantized_linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                   if isinstance(module, TRAINABLE_BASES)})


def attach_lora(model: nn.Module, lora: LoraSettings):
    """The peft model with fresh LoRA adapters on the quantized linears (the base is frozen, and off
    the CPU fast paths: their converted copies, a dequantized cache 4x an NF4 weight, would break the
    memory QLoRA promises, and the training's gradients run the reference op anyway)."""
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
    disable_cpu_paths(model)
    return get_peft_model(model, _peft_config(lora, targets))


def check_adapter_folder(path: str | os.PathLike) -> Path:
    """The adapter folder at `path`, refused unless it holds what load_adapter reads."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise LlmquantError(f"no such adapter folder: {folder}")
    if not (folder / "adapter_config.json").is_file():
        raise LlmquantError(f"{folder} is not an adapter folder (no adapter_config.json)")
    if not (folder / "adapter_model.safetensors").is_file():  # else peft would unpickle adapter_model.bin
        raise LlmquantError(f"{folder} has no adapter_model.safetensors; llmquant reads only safetensors adapters")
    return folder


def load_adapter(model: nn.Module, path: str | os.PathLike):
    """`model` (a loaded quantized checkpoint) with the adapters saved at `path`, for inference."""
    from peft import LoraConfig, PeftModel

    folder = check_adapter_folder(path)
    config = _with_quantized_bases(LoraConfig.from_pretrained(str(folder)))
    return PeftModel.from_pretrained(model, str(folder), config=config).eval()


def finetune(checkpoint: str | os.PathLike, lora: LoraSettings | None = None,
             training: TrainingSettings | None = None, progress: bool = True, device="auto",
             compute_dtype="auto") -> FinetuneResult:
    """Train LoRA adapters over a quantized checkpoint folder on real text, on `device` (the base
    loaded in `compute_dtype`; the adapters train in float32)."""
    lora, training = lora or LoraSettings(), training or TrainingSettings()
    start = time.time()
    from transformers import AutoTokenizer

    folder = resolve_model(str(checkpoint))
    # nothing converted for the CPU paths at load: attach_lora takes the base off them before any call
    model = load(folder, dtype=compute_dtype, device=device, cpu_paths=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if getattr(model.config, "quantization_config", None) is None:
        raise ConfigError(f"{checkpoint} is not a quantized checkpoint; quantize it first (QLoRA trains over a "
                          "frozen quantized base)")
    train_windows, heldout = training_windows(tokenizer, model, training)
    torch.manual_seed(training.seed)
    peft_model = attach_lora(model, lora)
    inner = peft_model.get_base_model()  # the transformers model, LoRA layers injected in place
    before = heldout_loss(inner, heldout)
    adapters = [p for p in peft_model.parameters() if p.requires_grad]
    losses = train(peft_model, [{"params": adapters}], train_windows, training, progress, "qlora")
    after = heldout_loss(inner, heldout)
    return FinetuneResult(peft_model, tokenizer, lora, training, str(checkpoint), before, after, losses,
                          time.time() - start)


@torch.no_grad()
def merge_into_checkpoint(peft_model, tokenizer, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fold the adapters into an NF4 / FP4 base: W' = dequant(W) + (alpha / r) B A, re-quantized on the
    base's grid (quant type, block size, double quantization), written as a new bitsandbytes checkpoint."""
    from peft.tuners.lora import LoraLayer

    fmt = FORMATS["bitsandbytes"]
    model = peft_model.get_base_model()
    quantization_config = model.config.quantization_config
    compute_dtype = quantization_config.get("bnb_4bit_compute_dtype", "float16")
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
        config = QuantConfig(method=grid.quant_type, group_size=grid.blocksize, double_quant=grid.double_quant,
                             dtype=compute_dtype)
        tensors = fmt.pack(grid.quantize(weight), config)
        # built as the loader builds it, from the tensors' shapes
        merged = fmt.build_linear(name, quantization_config, {k: tuple(v.shape) for k, v in tensors.items()},
                                  base.bias is not None, base.in_features, base.out_features, weight.dtype)
        if base.bias is not None:
            tensors["bias"] = base.bias
        merged.load_state_dict(tensors, assign=True)
        model.set_submodule(name, merged)
    return save_loaded_model(model, tokenizer, path, overwrite, storage_dtype=getattr(torch, compute_dtype))


def save_loaded_model(model, tokenizer, path: str | os.PathLike, overwrite: bool = False,
                      storage_dtype: torch.dtype = torch.float16, max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a loaded (quantized) model as a checkpoint folder: its quantized linears' tensors as they
    are, every other floating-point tensor in `storage_dtype`; config (with its quantization_config),
    generation config and tokenizer beside them."""
    quantized = tuple(name + "." for name, module in model.named_modules() if isinstance(module, QUANTIZED_LINEARS))
    tensors = {}
    for key, tensor in without_tied_copies(model.state_dict()).items():
        exact = key.startswith(quantized) and not key.endswith(".bias")
        tensors[key] = tensor.to(storage_dtype) if tensor.is_floating_point() and not exact else tensor

    def write(folder: Path) -> None:
        write_model_files(folder, model, tensors, tokenizer, storage_dtype, max_shard_size)
        write_report_file(folder, REPORT_FILES["save"], {"llmquant_version": _version.__version__,
                                                         "saved_from": getattr(model.config, "_name_or_path", None)})

    return write_folder_atomically(path, write, overwrite)
