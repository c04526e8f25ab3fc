"""W8A8: int8 weights per output channel (symmetric round-to-nearest) and int8 activations,
either per token at run time (dynamic) or per tensor with a scale fixed from calibration data
by an observer (static). Without smoothing this is the naive baseline SmoothQuant improves on."""
from __future__ import annotations

import torch

from ..grid import AffineGrid, QuantizedWeight
from ..grid.observers import OBSERVERS, observed_scale
from .statistics import InputGram

ACTIVATION_MODES = ("dynamic", "static")


class W8A8:
    name = "w8a8"

    def __init__(self, act_quant: str = "dynamic", observer: str = "minmax", percentile: float = 99.99):
        if act_quant not in ACTIVATION_MODES:
            raise ValueError(f"act_quant must be one of {ACTIVATION_MODES}, got {act_quant!r}")
        if observer not in OBSERVERS:
            raise ValueError(f"unknown observer {observer!r}")
        self.act_quant = act_quant
        self.observer = observer
        self.percentile = percentile
        # (histogram, its scale): linears fed one input (q/k/v, gate/up) share its statistics
        self._last_scale: tuple | None = None

    @property
    def static(self) -> bool:
        return self.act_quant == "static"

    @property
    def needs_calibration(self) -> bool:
        return self.static

    @property
    def statistics_options(self) -> dict:
        return {"histogram": True} if self.static else {}

    def input_scale(self, statistics: InputGram) -> torch.Tensor:
        histogram = statistics.histogram
        if self._last_scale is None or self._last_scale[0] is not histogram:
            options = {"percentile": self.percentile} if self.observer == "percentile" else {}
            self._last_scale = (histogram, torch.tensor([observed_scale(histogram, self.observer, **options)],
                                                        dtype=torch.float32))
        return self._last_scale[1].clone()

    def quantize(self, weight: torch.Tensor, grid: AffineGrid, statistics: InputGram | None,
                 layer_name: str = "layer") -> QuantizedWeight:
        quantized = grid.quantize(weight)
        if self.static:
            if statistics is None or statistics.histogram is None:
                raise ValueError(f"{layer_name}: static activation quantization needs calibration statistics")
            quantized.input_scale = self.input_scale(statistics)
        return quantized
