"""llama.cpp's importance matrix: for every block linear, the mean of x_j^2 over the calibration
tokens of each input channel j (the diagonal of the per-token input Gram matrix). It weights the
squared error of the block fits, so channels that carry large activations are rounded best."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from ..algorithms.statistics import run_with_input_hooks


@torch.no_grad()
def importance_matrix(model, windows: torch.Tensor) -> dict[str, np.ndarray]:
    """{module name: mean x^2 per input channel} for the linears inside the decoder blocks."""
    sums, counts, hooks = {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            def accumulate(inputs, name=name):
                x = inputs.reshape(-1, inputs.shape[-1]).float()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks[module] = accumulate
    run_with_input_hooks(model, hooks, windows)
    stats = {name: (sums[name] / counts[name]).numpy() for name in sums}
    bad = [name for name, value in stats.items() if not np.isfinite(value).all()]
    if bad:
        raise DataError(f"importance matrix: non-finite activations reach {bad[0]}")
    return stats
