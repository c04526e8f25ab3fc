"""Round-to-nearest: every weight to its closest grid point, independently; data-free."""
from __future__ import annotations

import torch

from ..grid import AffineGrid, QuantizedWeight


class RTN:
    name = "rtn"
    needs_calibration = False

    def quantize(self, weight: torch.Tensor, grid: AffineGrid, statistics=None, layer_name: str = "layer") -> QuantizedWeight:
        return grid.quantize(weight)
