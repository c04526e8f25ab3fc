"""Quantization algorithms: pure functions of a weight, a grid and (optionally) input statistics.

An algorithm is an object with
- `name`;
- `needs_calibration`: whether `quantize` needs the layer's InputGram;
- `quantize(weight [out, in], grid, statistics, layer_name) -> QuantizedWeight`.
It knows nothing of models, files or formats. ALGORITHMS maps a method name to a factory that
builds the algorithm from a QuantConfig.
"""
from .gptq import GPTQ
from .rtn import RTN

ALGORITHMS = {
    RTN.name: lambda config: RTN(),
    GPTQ.name: lambda config: GPTQ(config.block_size, config.damp, config.act_order, config.static_groups),
}


def algorithm_for(config):
    return ALGORITHMS[config.method](config)


__all__ = ["ALGORITHMS", "algorithm_for"]
