"""Quantization algorithms: pure functions of a weight, a grid and (optionally) input statistics.

An algorithm is an object with
- `name`;
- `needs_calibration`: whether `quantize` needs the layer's InputGram;
- `quantize(weight [out, in], grid, statistics) -> QuantizedWeight`.
It knows nothing of models, files or formats.
"""
from .rtn import RTN

ALGORITHMS = {RTN.name: RTN()}

__all__ = ["ALGORITHMS"]
