"""Quantization algorithms: pure functions of a weight, a grid and (optionally) input statistics.

An algorithm is an object with
- `name`;
- `needs_calibration`: whether `quantize` needs the layer's InputGram;
- `quantize(weight [out, in], grid, statistics, layer_name) -> QuantizedWeight`;
- optionally `transform_block(groups, grid_for, no_clip)`: rescale / clip a block's weights
  before its layers are rounded (AWQ), given the block's scaling groups and their statistics.
It knows nothing of models, files or formats. ALGORITHMS maps a method name to a factory that
builds the algorithm from a QuantConfig.
"""
from .awq import AWQ
from .gptq import GPTQ
from .rtn import RTN
from .smoothquant import SmoothQuant
from .w8a8 import W8A8


def _gptq(config):
    return GPTQ(config.gptq_block_size, config.damp, config.act_order, config.static_groups,
                config.first_token_weight)


def _awq(rounding):
    return lambda config: AWQ(rounding(config), n_grid=config.awq_grid, duo_scaling=config.awq_duo_scaling,
                              clip=config.awq_clip)


def _w8a8(config):
    return W8A8(config.act_quant, config.observer, config.percentile)


ALGORITHMS = {
    RTN.name: lambda config: RTN(),
    GPTQ.name: _gptq,
    "awq": _awq(lambda config: RTN()),
    "awq+gptq": _awq(_gptq),
    W8A8.name: _w8a8,
    SmoothQuant.name: lambda config: SmoothQuant(config.alpha, _w8a8(config)),
    # QLoRA's data types: round-to-nearest on a blockwise 4-bit codebook grid (NF4 / FP4).
    "nf4": lambda config: RTN(),
    "fp4": lambda config: RTN(),
    # FP8 e4m3, data-free round-to-nearest: W8A8-FP8 (per-channel weights, dynamic per-token
    # activations: llm-compressor's FP8_DYNAMIC) and weight-only with square block scales.
    "fp8": lambda config: RTN(),
    "fp8-block": lambda config: RTN(),
}
# Methods whose rounding is GPTQ, and so take its options (act_order, static_groups, ...).
GPTQ_ROUNDING = ("gptq", "awq+gptq")
# Methods that quantize activations too (int8 weights per channel, int8 activations).
ACTIVATION_METHODS = (W8A8.name, SmoothQuant.name)
# Methods whose grid is a 4-bit codebook with blockwise absmax (bitsandbytes' NF4 / FP4).
CODEBOOK_METHODS = ("nf4", "fp4")
# Methods whose grid is FP8 e4m3 with fp32 scales.
FP8_METHODS = ("fp8", "fp8-block")


def algorithm_for(config):
    return ALGORITHMS[config.method](config)


__all__ = ["ACTIVATION_METHODS", "ALGORITHMS", "CODEBOOK_METHODS", "FP8_METHODS", "GPTQ_ROUNDING", "algorithm_for"]
