"""Planning a quantization run: everything checked and chosen before any block is touched.

Two stages, each done once per run whatever holds the model:
- check_request, before any model is read: the output path, the device and compute dtype, the
  calibration (the default corpus where the method needs data and none was given, and whether that
  corpus can be read). The CLI calls it first, so that a bad argument is refused before anything
  slow (a sensitivity measurement) starts.
- plan_quantization, once the model's skeleton is there (real weights in memory, or on the meta
  device when streamed from disk): the model made what the run quantizes (unfused experts, the
  rotation outside the blocks), the format, the algorithm, the grid of every linear, the calibration
  windows and where the run computes (a pipeline Placement, sized by the largest block).
Both block sources (in_memory.py: the model held in memory; streaming.py: a folder read one block
at a time) are planned here, so they refuse the same inputs with the same errors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..algorithms import CODEBOOK_METHODS, FP8_METHODS, algorithm_for
from ..arch import ArchMap
from ..arch.moe import unfuse_experts
from ..config import PER_CHANNEL, QuantConfig
from ..data import Calibration, check_corpus
from ..device import free_device_memory, resolve_compute_dtype, resolve_device
from ..errors import ConfigError, LlmquantError, UnsupportedArchitectureError
from ..formats import FORMATS
from ..grid import AffineGrid
from ..grid.codebook import CodebookGrid
from ..grid.fp8 import Fp8Grid
from ..rotation.fused import Rotation, rotate_block, start_rotation
from ..storage.checkpoint import check_output_path
from .pipeline import BlockStore, PipelineResult, Placement, quantize_blocks
from .progress_folder import check_streamed_output

STORAGE_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ACTIVATION_OFFLOAD = ("auto", "never", "always")
# Calibration activations stay on the GPU when inputs and outputs of a block together take at most
# this share of the memory left once a block and its statistics are there.
ACTIVATION_SHARE_OF_FREE = 0.5


@dataclass(frozen=True)
class RunRequest:
    """A quantization call as checked before any model is read (check_request)."""

    device: torch.device
    compute_dtype: torch.dtype
    offload_activations: str
    calib: Calibration | torch.Tensor | None  # the default corpus already filled in where needed
    out: Path | None = None
    overwrite: bool = False


def check_request(config: QuantConfig, calib=None, *, out=None, overwrite: bool = False, streamed: bool = False,
                  device="auto", compute_dtype="auto", offload_activations: str = "auto",
                  default_calib: Calibration | None = None) -> RunRequest:
    """Refuse what cannot work before any model is read: an output that exists (unless overwrite) or
    is not llmquant's to replace (streamed: nor the progress folder beside it), an absent device, a dtype it cannot compute in, an unknown
    activation placement, a calibration corpus that cannot be read. A method that needs data and got
    none takes default_calib (by default Calibration(): the library's corpus and sizes)."""
    placement = placement_for(device, compute_dtype, offload_activations)  # the device resolved once, here
    check_output = check_streamed_output if streamed else check_output_path
    target = check_output(out, overwrite) if out is not None else None
    if calib is None and algorithm_for(config).needs_calibration:
        calib = default_calib or Calibration()
    if isinstance(calib, str):
        calib = Calibration(corpus=calib)
    if isinstance(calib, Calibration):
        check_corpus(calib.corpus, calib.split)
    return RunRequest(placement.device, placement.compute_dtype, offload_activations, calib, target, overwrite)


@dataclass
class RunPlan:
    fmt: object
    algorithm: object
    grids: dict[str, AffineGrid | CodebookGrid]
    calibration: torch.Tensor | None
    calibration_info: dict | None
    config: QuantConfig  # as its checkpoint is written (prepare_model)
    placement: Placement = Placement()
    rotation: Rotation | None = None  # applied outside the blocks already; to each block as it is read

    def grid_for(self, name: str, linear: nn.Linear):
        return self.grids.get(name)

    def block_preparation(self, arch: ArchMap, model_config):
        """What each block needs once its weights are there and before it is quantized, or None."""
        if self.rotation is None:
            return None
        rotation = self.rotation
        return lambda block: rotate_block(block, arch, rotation, model_config)

    def run(self, model, arch: ArchMap, store: BlockStore, packed: dict, progress: bool = True,
            kept: dict | None = None) -> PipelineResult:
        """Every block through the pipeline from `store` (the model in memory, or a folder streamed from
        disk), each result packed for the format into `packed` as it comes (and kept format-neutral in
        `kept` when given)."""
        def pack(name, quantized, linear):
            packed[name] = self.fmt.pack(quantized, self.config.for_layer(name))
            if kept is not None:
                kept[name] = quantized

        return quantize_blocks(model, arch, self.algorithm, grid_for=self.grid_for, on_quantized=pack,
                               calibration=self.calibration, true_sequential=self.config.true_sequential,
                               progress=progress, store=store, placement=self.placement)


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
    unfuse_experts(model, arch, config.moe_calibrate_all_experts)
    kept = [name for name in arch.full_precision_names(model) if name not in config.modules_to_not_convert]
    return replace(config, modules_to_not_convert=(*config.modules_to_not_convert, *kept)) if kept else config


def plan_quantization(model, arch: ArchMap, config: QuantConfig, request: RunRequest, tokenizer,
                      weights_loaded: bool) -> RunPlan:
    """The plan of a run on `model`: its blocks' weights real (weights_loaded: their values are
    checked here) or on the meta device (each checked as it is read); everything outside the blocks
    real. Makes the model what the run quantizes first (prepare_model; the rotation outside the
    blocks, which unties a tied head)."""
    config = prepare_model(model, arch, config)
    rotation = start_rotation(model, arch, config.rotate_seed, config.rotate_online) if config.rotate else None
    plan = plan_run(model, arch, config, request.calib, tokenizer, check_values=weights_loaded)
    plan.placement = placement_for(request.device, request.compute_dtype, request.offload_activations, model.config,
                                   plan.calibration, largest_block_bytes(model, arch))
    plan.rotation = rotation
    return plan


def largest_block_bytes(model, arch: ArchMap) -> int:
    """The float32 bytes of the largest block (a mixture-of-experts model's first blocks may be dense)."""
    return max(sum(p.numel() * 4 for p in block.parameters()) for block in arch.block_list(model))


def plan_run(model, arch: ArchMap, config: QuantConfig, calib, tokenizer, check_values: bool = True) -> RunPlan:
    """What a quantization run needs, checked before any work. calib: as check_request left it."""
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
        raise ConfigError(f"{config.method} needs calibration data (check_request gives it the default corpus)")
    calibration, info = calibration_windows_for(calib, tokenizer, arch, model.get_input_embeddings().num_embeddings)
    return RunPlan(fmt, algorithm, grids, calibration, info, config)


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
