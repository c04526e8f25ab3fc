"""Short training runs on real text, shared by QLoRA (adapters over a quantized base) and QAT
(fake-quantized weights): windows of a corpus's train split at random offsets, AdamW with linear
warmup then linear decay, gradient clipping, and the loss on held-out windows before and after."""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import arch_for
from ..data import Windows, calibration_windows, evaluation_windows, tokenize_corpus
from ..errors import ConfigError, LlmquantError
from ..evaluation.perplexity import perplexity


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


def training_windows(tokenizer, model: nn.Module, training: TrainingSettings) -> tuple[torch.Tensor, Windows]:
    """(train windows [steps * batch_size, seqlen], held-out windows), BOS-led where the map says so."""
    bos = tokenizer.bos_token_id if arch_for(model.config).bos_per_window else None
    train_tokens = tokenize_corpus(tokenizer, training.corpus, "train")
    train = calibration_windows(train_tokens, training.steps * training.batch_size, training.seqlen, training.seed, bos)
    heldout_tokens = tokenize_corpus(tokenizer, training.corpus, training.eval_split)
    return train, evaluation_windows(heldout_tokens, training.seqlen, bos, training.eval_windows)


def heldout_loss(model: nn.Module, heldout: Windows) -> float:
    """Mean next-token NLL over the held-out windows (model in eval mode meanwhile)."""
    was_training = model.training
    model.eval()
    try:
        return perplexity(model, heldout, progress=False).mean_nll
    finally:
        model.train(was_training)


def run_report(training: TrainingSettings, loss_before: float, loss_after: float, train_losses: list[float],
               seconds: float) -> dict:
    """The report fields every training run shares: settings, held-out loss and perplexity before and
    after, the loss of each step, wall time."""
    return {
        "training": asdict(training),
        "heldout_loss_before": loss_before,
        "heldout_loss_after": loss_after,
        "heldout_perplexity_before": math.exp(loss_before),
        "heldout_perplexity_after": math.exp(loss_after),
        "train_losses": train_losses,
        "seconds": round(seconds, 2),
    }


def _learning_rate_factor(step: int, training: TrainingSettings) -> float:
    if step < training.warmup_steps:
        return (step + 1) / training.warmup_steps
    remaining = training.steps - training.warmup_steps
    return max(0.0, 1 - (step - training.warmup_steps) / max(remaining, 1))


def train(model: nn.Module, parameter_groups: list[dict], windows: torch.Tensor, training: TrainingSettings,
          progress: bool = True, description: str = "train", autocast=None) -> list[float]:
    """Run training.steps AdamW steps of causal-LM loss on `windows` (moved to the model's device);
    the training loss of each step. parameter_groups: torch optimizer groups (each may set its own
    lr); autocast: a context the forward passes run in (mixed precision), default none."""
    autocast = autocast or contextlib.nullcontext()
    parameters = [p for group in parameter_groups for p in group["params"]]
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(parameter_groups, lr=training.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(step, training))
    losses = []
    model.train()
    bar = tqdm(range(training.steps), desc=description, unit="step", disable=not progress)
    for step in bar:
        batch = windows[step * training.batch_size:(step + 1) * training.batch_size].to(device)
        with autocast:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
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
    model.eval()
    return losses
