"""Planning a quantization run: everything checked and chosen before any block is touched.

A RunPlan holds the checkpoint format, the algorithm, the grid of every linear to quantize, the
calibration windows and where the run computes (a pipeline Placement). Both the in-memory and the
streamed runs are planned here, so they refuse the same inputs with the same errors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .algorithms import CODEBOOK_METHODS, FP8_METHODS, algorithm_for
from .arch import ArchMap
from .config import PER_CHANNEL, QuantConfig
from .data import Calibration
from .device import free_device_memory, resolve_compute_dtype, resolve_device
from .errors import ConfigError, LlmquantError, UnsupportedArchitectureError
from .formats import FORMATS
from .grid import AffineGrid
from .grid.codebook import CodebookGrid
from .grid.fp8 import Fp8Grid
from .moe import unfuse_experts
from .pipeline import Placement

STORAGE_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ACTIVATION_OFFLOAD = ("auto", "never", "always")
# Calibration activations stay on the GPU when inputs and outputs of a block together take at most
# this share of the memory left once a block and its statistics are there.
ACTIVATION_SHARE_OF_FREE = 0.5


@dataclass
class RunPlan:
    fmt: object
    algorithm: object
    grids: dict[str, AffineGrid | CodebookGrid]
    calibration: torch.Tensor | None
    calibration_info: dict | None
    placement: Placement

    def grid_for(self, name: str, linear: nn.Linear):
        return self.grids.get(name)


def calibration_windows_for(calib, tokenizer, arch: ArchMap, vocab_size: int) -> tuple[torch.Tensor | None, dict | None]:
    """(token windows, their description for the report) from a Calibration, corpus name or tensor."""
    if isinstance(calib, str):
        calib = Calibration(corpus=calib)
    if isinstance(calib, Calibration):
        if tokenizer is None:
            raise ConfigError("calibration from a corpus needs the model's tokenizer (pass tokenizer=)")
        bos = tokenizer.bos_token_id if arch.bos_per_window else None
        calibration = calib.windows(tokenizer, bos)
        info = {"corpus": calib.corpus, "split": calib.split, "nsamples": calib.nsamples,
                "seqlen": calib.seqlen, "seed": calib.seed}
    elif isinstance(calib, torch.Tensor):
        calibration = calib.long()
        info = {"windows": list(calibration.shape)}
    elif calib is None:
        return None, None
    else:
        raise ConfigError(f"calib must be a Calibration, a corpus name or a tensor of token ids, got {type(calib).__name__}")
    if calibration.numel() == 0 or int(calibration.max()) >= vocab_size or int(calibration.min()) < 0:
        raise ConfigError(f"calibration token ids must lie in [0, {vocab_size}) for this model's embedding "
                          "(is the tokenizer the model's own?)")
    return calibration, info


def placement_for(device="auto", compute_dtype="auto", offload_activations: str = "auto", model_config=None,
                  calibration: torch.Tensor | None = None, block_bytes: int = 0) -> Placement:
    """Where the run computes. offload_activations: "never" keeps calibration activations on the
    compute device, "always" keeps them in CPU memory (each batch moved over as it runs), "auto"
    keeps them on a GPU when a block's inputs and outputs fit beside the block, else on the CPU."""
    if offload_activations not in ACTIVATION_OFFLOAD:
        raise ConfigError(f"offload_activations must be one of {', '.join(ACTIVATION_OFFLOAD)}, got {offload_activations!r}")
    target = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, target)
    if target.type == "cpu" or offload_activations == "always":
        return Placement(target, dtype, torch.device("cpu"))
    if offload_activations == "never" or calibration is None or model_config is None:
        return Placement(target, dtype, target)
    element = torch.finfo(dtype).bits // 8
    # a block's inputs and its outputs are both held while it runs
    needed = 2 * calibration.numel() * model_config.hidden_size * element
    free = free_device_memory(target) - 4 * block_bytes  # the block in fp32, its statistics and workspace
    return Placement(target, dtype, target if needed <= ACTIVATION_SHARE_OF_FREE * free else torch.device("cpu"))


def prepare_model(model, arch: ArchMap, config: QuantConfig) -> QuantConfig:
    """Make the model's linears what the run quantizes, before planning: fused experts become one
    linear per projection (moe.py). Returns the config as its checkpoint is written: the linears the
    map keeps in full precision listed as not converted, so that loaders leave them alone."""
    from dataclasses import replace

    unfuse_experts(model, arch, config.moe_calibrate_all_experts)
    kept = [name for name in arch.full_precision_names(model) if name not in config.modules_to_not_convert]
    return replace(config, modules_to_not_convert=(*config.modules_to_not_convert, *kept)) if kept else config


def plan_run(model, arch: ArchMap, config: QuantConfig, calib, tokenizer, check_values: bool = True,
             placement: Placement | None = None) -> RunPlan:
    """What a quantization run needs, checked before any work."""
    layers = list(linears_to_quantize(model, arch, config))
    _check_layers(layers, config, check_values)
    fmt = FORMATS[config.format]
    algorithm = algorithm_for(config)
    if arch.derived and hasattr(algorithm, "transform_block"):
        raise UnsupportedArchitectureError(
            f"{config.method} folds scales into the operation before each linear, which a derived map "
            f"({arch.name}) does not know; use rtn, gptq, w8a8 or nf4 / fp4, or declare a map in llmquant/arch")
    grids = {name: grid_for_config(config.for_layer(name), fmt) for name, _ in layers}
    if calib is None and algorithm.needs_calibration:
        calib = Calibration()
    calibration, info = calibration_windows_for(calib, tokenizer, arch, model.get_input_embeddings().num_embeddings)
    return RunPlan(fmt, algorithm, grids, calibration, info, placement or Placement())


def linears_to_quantize(model: nn.Module, arch: ArchMap, config: QuantConfig):
    """(name, linear) of every block linear the config quantizes, in pipeline order."""
    try:
        blocks = arch.block_list(model)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(f"{arch.name} map: no block list at {arch.blocks!r}") from exc
    for index, block in enumerate(blocks):
        for short_name in arch.block_linear_names(block):
            name = f"{arch.block_prefix(index)}.{short_name}"
            try:
                linear = block.get_submodule(short_name)
            except AttributeError as exc:
                raise UnsupportedArchitectureError(f"{arch.name} map names {name}, which this model lacks") from exc
            if not isinstance(linear, nn.Linear):
                raise UnsupportedArchitectureError(f"{name} is a {type(linear).__name__}, not nn.Linear")
            if any(name == m or name.endswith("." + m) for m in config.modules_to_not_convert):
                continue
            yield name, linear


def grid_for_config(config: QuantConfig, fmt) -> AffineGrid | CodebookGrid | Fp8Grid:
    if config.method in FP8_METHODS:
        block = config.group_size if config.method == "fp8-block" else 0
        return Fp8Grid(block, dynamic_activations=not block)
    if config.method in CODEBOOK_METHODS:
        return CodebookGrid(config.method, config.group_size, config.double_quant)
    return AffineGrid(config.bits, config.sym, config.group_size, min_zero=fmt.grid_min_zero(config),
                      clip_search=config.clip_search)


def _check_layers(layers, config: QuantConfig, check_values: bool = True) -> None:
    fmt = FORMATS[config.format]
    unknown = set(config.layer_overrides) - {name for name, _ in layers}
    if unknown:
        raise ConfigError(f"layer overrides name linears this model does not quantize: {', '.join(sorted(unknown)[:3])}")
    # codebook blocks run over the flattened weight; FP8 blocks may be partial at the edges
    row_groups = config.method not in CODEBOOK_METHODS + FP8_METHODS
    for name, linear in layers:
        layer_config = config.for_layer(name)
        if row_groups and layer_config.group_size != PER_CHANNEL and layer_config.group_size > linear.in_features:
            raise ConfigError(
                f"group_size {layer_config.group_size} is larger than in_features {linear.in_features} of {name}; "
                "use -1 for one group per output channel"
            )
        fmt.check_layer(name, linear.out_features, linear.in_features, layer_config)
        if check_values and not torch.isfinite(linear.weight).all():
            raise LlmquantError(f"{name}.weight contains NaN or Inf; refusing to quantize it")
