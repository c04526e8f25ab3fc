"""GPTQ-style token perplexity: mean next-token NLL over non-overlapping windows, exponentiated."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import Windows

# Positions per lm_head call: a 512-token window of Gemma-3's 262k vocabulary would need
# ~0.5 GB of fp32 logits at once; 128 positions need an eighth of a gigabyte at most.
LOSS_CHUNK = 128


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    predicted_tokens: int
    windows: int
    seqlen: int
    bos: bool
    window_nll: list[float]  # summed NLL of each window, for sub-range comparisons

    def perplexity_of_first(self, windows: int) -> float:
        per_window = self.predicted_tokens // self.windows
        return math.exp(sum(self.window_nll[:windows]) / (per_window * min(windows, self.windows)))

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of each token given the ones before it in a [1, L] window, and the count."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[0, :-1]
    targets = input_ids[0, 1:]
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = 0.0
    for start in range(0, targets.numel(), LOSS_CHUNK):
        logits = head(hidden[start:start + LOSS_CHUNK]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total += F.cross_entropy(logits, targets[start:start + LOSS_CHUNK], reduction="sum").item()
    return total, targets.numel()


def perplexity(model, windows: Windows, progress: bool = True) -> PerplexityResult:
    device = next(model.parameters()).device
    nll, count, sums = 0.0, 0, []
    for window in tqdm(windows.input_ids, desc="perplexity", unit="window", disable=not progress):
        window_sum, window_count = window_nll(model, window[None].to(device))
        nll += window_sum
        sums.append(window_sum)
        count += window_count
    mean = nll / count
    return PerplexityResult(
        perplexity=math.exp(mean), mean_nll=mean, predicted_tokens=count,
        windows=windows.input_ids.shape[0], seqlen=windows.input_ids.shape[1], bos=windows.bos,
        window_nll=sums,
    )
