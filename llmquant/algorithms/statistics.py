"""Statistics of the inputs a linear layer sees during calibration, accumulated batch by batch."""
from __future__ import annotations

import torch

from ..errors import DataError

from ..grid.observers import AbsHistogram


class InputGram:
    """Accumulates G = sum over rows x of x^T x (fp32), the second moment of a linear's inputs,
    and per input channel the sum and the maximum of |x|.

    G is what GPTQ's Hessian is made of (H = 2 G / rows), and it gives a layer's output error
    exactly without storing activations: ||X dW^T||^2 = tr(dW G dW^T). The channel magnitudes
    are what activation-aware scaling (AWQ: mean |x|; SmoothQuant: max |x|) is computed from.

    Optional, for algorithms that ask (`statistics_options`): `histogram` keeps an AbsHistogram
    of all |x| (static activation observers), `keep_rows` keeps the first that many input rows
    (searches that need real activations, e.g. SmoothQuant's alpha under activation rounding);
    gram=False skips G (its rows x in^2 multiply-adds) for users of the channel magnitudes only.
    `first_token_weight` counts the first position of each calibration window (inputs [windows,
    tokens, features]) that many times in G: that token is the attention sink every later token reads
    through its value vector, so its error weighs on the whole window, far beyond its one row of G.
    """

    def __init__(self, in_features: int, device=None, histogram: bool = False, keep_rows: int = 0,
                 gram: bool = True, first_token_weight: float = 1.0):
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if gram else None
        self.channel_abs_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.channel_abs_max = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.rows = 0
        self.histogram = AbsHistogram() if histogram else None
        self.keep_rows = keep_rows
        self.first_token_weight = first_token_weight
        self._kept: list[torch.Tensor] = []

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise DataError("calibration activations contain NaN or Inf; refusing to quantize on them")
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)
            if self.first_token_weight != 1 and inputs.dim() == 3:
                first = x.view(inputs.shape[0], inputs.shape[1], -1)[:, 0]
                self.gram.addmm_(first.t(), first, alpha=self.first_token_weight - 1)
        magnitude = x.abs()
        self.channel_abs_sum += magnitude.sum(dim=0)
        torch.maximum(self.channel_abs_max, magnitude.amax(dim=0), out=self.channel_abs_max)
        if self.histogram is not None:
            self.histogram.add(x)
        kept = sum(r.shape[0] for r in self._kept)
        if kept < self.keep_rows:
            self._kept.append(x[: self.keep_rows - kept].clone())
        self.rows += x.shape[0]

    def kept_rows(self) -> torch.Tensor:
        if not self._kept:
            raise ValueError("no input rows were kept (keep_rows=0)")
        return torch.cat(self._kept)

    def channel_abs_mean(self) -> torch.Tensor:
        return self.channel_abs_sum / max(self.rows, 1)

    def rescaled(self, scales: torch.Tensor) -> "InputGram":
        """The statistics of the inputs divided channel-wise by `scales` (x -> x / s)."""
        s = scales.float().to(self.channel_abs_max.device)
        result = InputGram.__new__(InputGram)
        result.gram = self.gram / s[:, None] / s[None, :] if self.gram is not None else None
        result.channel_abs_sum = self.channel_abs_sum / s
        result.channel_abs_max = self.channel_abs_max / s
        result.rows = self.rows
        result.histogram = None  # a histogram of |x| cannot be rescaled per channel
        result.keep_rows = self.keep_rows
        result.first_token_weight = self.first_token_weight
        result._kept = [r / s for r in self._kept]
        return result

    def output_energy(self, weight: torch.Tensor) -> float:
        """||X W^T||_F^2 over the accumulated rows."""
        if self.gram is None:
            raise ValueError("these statistics kept no Gram matrix (gram=False)")
        w = weight.float()
        return float(torch.einsum("oi,ij,oj->", w, self.gram, w))

    def relative_output_error(self, weight: torch.Tensor, quantized_weight: torch.Tensor) -> float:
        """||X W^T - X W_hat^T||^2 / ||X W^T||^2."""
        reference = self.output_energy(weight)
        return self.output_energy(weight.float() - quantized_weight.float()) / max(reference, 1e-30)


@torch.no_grad()
def run_with_input_hooks(model, on_input: dict, windows: torch.Tensor) -> None:
    """Run the token windows through `model`, one at a time, calling on_input[module](x) with the
    input of each listed module; the hooks are removed afterwards, whatever happens."""
    handles = [module.register_forward_pre_hook(lambda m, args, call=call: call(args[0]))
               for module, call in on_input.items()]
    try:
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
