"""QuantConfig: the user's choice of algorithm, grid and checkpoint format, validated up front."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .algorithms import ACTIVATION_METHODS, ALGORITHMS, CODEBOOK_METHODS, FP8_METHODS, GPTQ_ROUNDING
from .algorithms.w8a8 import ACTIVATION_MODES
from .errors import ConfigError
from .formats import FORMATS
from .grid import PER_CHANNEL
from .grid.codebook import BLOCKSIZES
from .grid.observers import OBSERVERS
from .rotation.online import ONLINE_ROTATIONS
from .rotation.fused import ROTATIONS

SUPPORTED_BITS = range(2, 9)
STORAGE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    group_size: columns of the input dimension sharing one scale / zero point;
        -1 means one group per output channel. It need not divide in_features.
    sym: symmetric grid (zero point fixed at mid-range). The default, because vLLM's
        fast GPTQ kernels (Marlin) only take symmetric checkpoints.
    dtype: storage dtype of the tensors left in floating point (embeddings, norms, bias).
    modules_to_not_convert: names (or name suffixes) of linears inside decoder blocks to keep in FP.
    clip_search: per group, shrink the range where that lowers the weight error (the reference
        GPTQ quantizer's MSE option); applies to every method's grid.
    true_sequential: within a block, quantize the architecture map's steps in order, each seeing
        inputs through the already-quantized steps before it; else one pass of statistics per block.
    GPTQ only: act_order (desc_act: columns by descending Hessian diagonal), static_groups (group
        scales fixed from the unquantized weight before the sweep), damp (fraction of the mean
        Hessian diagonal added before inversion), gptq_block_size (columns per lazy batch: it only
        orders the arithmetic, and is not NF4's block size, which is group_size), first_token_weight
        (each calibration window's first token counts that many times in the Hessian: the attention
        sink every later token reads; 1 = GPTQ as published); also taken by awq+gptq.
    AWQ only: awq_grid (points of the scaling-ratio grid, and the clip grid's step 1/awq_grid),
        awq_duo_scaling (s = mean|x|^a / mean|w|^(1-a) instead of mean|x|^a), awq_clip (search
        the clipping range per group after scaling).
    W8A8 methods (w8a8, smoothquant) quantize weights to int8 per output channel, symmetric, and
        activations to int8: act_quant "dynamic" (per token at run time) or "static" (one scale per
        tensor from calibration, chosen by `observer`: minmax, percentile (at `percentile` %), mse
        or kl). SmoothQuant's migration strength `alpha` is in [0, 1] or "auto" (searched per group).
    moe_calibrate_all_experts: mixture-of-experts models: every calibration token also runs through
        every expert, so that each expert's statistics cover all of them (the block's output still
        uses the router's choice); otherwise an expert sees only the tokens routed to it.
    NF4 / FP4 (methods nf4, fp4; data-free): group_size is bitsandbytes' blocksize, values of the
        row-major flattened weight sharing one absmax (32..4096, a power of two); double_quant
        stores those absmax constants in 8 bits (blocks of 256).
    FP8 (methods fp8, fp8-block; data-free): float8 e4m3 weights with fp32 scales, written as
        compressed-tensors float-quantized. fp8: one scale per output channel and activations
        rounded to e4m3 per token at run time (W8A8-FP8); fp8-block: weight-only, one scale per
        group_size x group_size block (128: DeepSeek-V3's blocks).
    rotate: "hadamard" fuses randomized Hadamard rotations (seeded by rotate_seed) into the weights
        before rounding (rotation/fused.py): the same function, weights that round better; any method.
        rotate_online: inputs also rotated at run time, ("down_proj",) for R4 (rotation/online.py):
        down_proj's weight takes a Hadamard matrix H and its input is multiplied by H in every forward,
        for rounded activations (W8A8); off by default, needs rotate.
    bits / group_size / format default by method: 4 / 128 / gptq for weight-only methods,
        8 / -1 / compressed-tensors for W8A8 methods, 4 / 64 / bitsandbytes for NF4 / FP4,
        8 / -1 (fp8) or 128 (fp8-block) / compressed-tensors-fp8 for FP8.
    """

    method: str = "rtn"
    bits: int | None = None
    group_size: int | None = None
    sym: bool = True
    format: str | None = None
    dtype: str = "float16"
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)
    true_sequential: bool = True
    clip_search: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    gptq_block_size: int = 128
    first_token_weight: float = 1.0
    awq_grid: int = 20
    awq_duo_scaling: bool = False
    awq_clip: bool = True
    alpha: float | str = 0.5
    act_quant: str = "dynamic"
    observer: str = "minmax"
    percentile: float = 99.99
    double_quant: bool = False
    moe_calibrate_all_experts: bool = False
    # Rotations fused into the weights before rounding (rotation/fused.py): None or "hadamard", seeded.
    rotate: str | None = None
    rotate_seed: int = 0
    rotate_online: tuple[str, ...] = field(default_factory=tuple)
    # Mixed precision: module name -> {"bits": b, "group_size": g} replacing the defaults above for
    # that linear (written as GPTQModel's `dynamic` per-module overrides).
    layer_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        quantizes_activations = self.method in ACTIVATION_METHODS
        codebook = self.method in CODEBOOK_METHODS
        fp8 = self.method in FP8_METHODS
        defaults = ((8, PER_CHANNEL, "compressed-tensors") if quantizes_activations
                    else (4, 64, "bitsandbytes") if codebook
                    else (8, 128 if self.method == "fp8-block" else PER_CHANNEL, "compressed-tensors-fp8") if fp8
                    else (4, 128, "gptq"))
        for name, default in zip(("bits", "group_size", "format"), defaults):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.rotate is not None and self.rotate not in ROTATIONS:
            raise ConfigError(f"rotate must be one of {', '.join(ROTATIONS)} or None, got {self.rotate!r}")
        if isinstance(self.rotate_online, str):
            object.__setattr__(self, "rotate_online", (self.rotate_online,))
        object.__setattr__(self, "rotate_online", tuple(self.rotate_online))
        unknown = [name for name in self.rotate_online if name not in ONLINE_ROTATIONS]
        if unknown or len(set(self.rotate_online)) != len(self.rotate_online):
            raise ConfigError(f"rotate_online takes each of {', '.join(ONLINE_ROTATIONS)} at most once, "
                              f"got {list(self.rotate_online)}")
        if self.rotate_online and self.rotate is None:
            raise ConfigError("rotate_online (R4) rotates down_proj's input on top of the fused rotations: "
                              "give rotate 'hadamard' as well")
        if quantizes_activations and (self.bits != 8 or self.group_size != PER_CHANNEL or not self.sym):
            raise ConfigError(f"{self.method} quantizes weights to symmetric int8 per output channel "
                              f"(bits 8, group_size -1, sym); got bits={self.bits}, group_size={self.group_size}, "
                              f"sym={self.sym}")
        self._check_activation_options(quantizes_activations)
        self._check_codebook_options(codebook)
        self._check_fp8_options(fp8)
        if not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or (self.group_size < 1 and self.group_size != PER_CHANNEL):
            raise ConfigError(
                f"group_size must be a positive integer or -1 (per output channel), got {self.group_size!r}"
            )
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp <= 1):
            raise ConfigError(f"damp must be a fraction from 0 to 1 of the mean Hessian diagonal, got {self.damp!r}")
        if isinstance(self.first_token_weight, bool) or not isinstance(self.first_token_weight, (int, float)) \
                or not (0 < self.first_token_weight < float("inf")):
            raise ConfigError(f"first_token_weight must be a positive number, got {self.first_token_weight!r}")
        if self.first_token_weight != 1 and self.method not in GPTQ_ROUNDING:
            raise ConfigError(f"first_token_weight applies to methods {', '.join(GPTQ_ROUNDING)}, not {self.method!r}")
        if not isinstance(self.gptq_block_size, int) or self.gptq_block_size < 1:
            raise ConfigError(f"gptq_block_size must be a positive integer, got {self.gptq_block_size!r}")
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))

        if (self.act_order or self.static_groups) and self.method not in GPTQ_ROUNDING:
            raise ConfigError(f"act_order and static_groups apply to methods {', '.join(GPTQ_ROUNDING)}, "
                              f"not {self.method!r}")
        if not isinstance(self.awq_grid, int) or self.awq_grid < 2:
            raise ConfigError(f"awq_grid must be an integer >= 2, got {self.awq_grid!r}")

        if self.method not in ALGORITHMS:
            raise ConfigError(f"unknown method {self.method!r}; available: {', '.join(sorted(ALGORITHMS))}")
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r}; available: {', '.join(sorted(FORMATS))}")
        fmt = FORMATS[self.format]
        if fp8 != fmt.holds_fp8_weights:
            raise ConfigError(f"FP8 methods ({', '.join(FP8_METHODS)}) are written with --format compressed-tensors-fp8, "
                              f"which holds nothing else; got method {self.method!r} with format {self.format!r}")
        if quantizes_activations and not fmt.holds_activation_quantization:
            raise ConfigError(f"the {self.format} format holds weight-only checkpoints; {self.method} quantizes "
                              "activations too: use --format compressed-tensors")
        if fmt.holds_activation_quantization and not quantizes_activations:
            raise ConfigError(f"llmquant writes {self.format} for int8 W8A8 methods ({', '.join(ACTIVATION_METHODS)}), "
                              f"not {self.method!r}; use --format gptq or awq")
        if codebook and not fmt.holds_codebook_weights:
            raise ConfigError(f"{self.method} weights are written in the bitsandbytes format, not {self.format!r}")
        if fmt.holds_codebook_weights and not codebook:
            raise ConfigError(f"the {self.format} format holds NF4 / FP4 weights (methods {', '.join(CODEBOOK_METHODS)}), "
                              f"not {self.method!r}; use --format gptq or awq")
        if self.bits not in fmt.bits:
            holders = [name for name, other in FORMATS.items() if self.bits in other.bits
                       and other.holds_activation_quantization == quantizes_activations
                       and other.holds_codebook_weights == codebook]
            where = (f"use --format {' or '.join(holders)}" if holders else
                     "no format llmquant writes holds them in a layout transformers / vLLM load ("
                     + "; ".join(f"{name}: {', '.join(map(str, other.bits))}" for name, other in FORMATS.items())
                     + f"); choose --bits {' or '.join(map(str, fmt.bits))}")
            raise ConfigError(f"the {self.format} format holds {' / '.join(map(str, fmt.bits))}-bit weights, not "
                              f"{self.bits}-bit; {where}")
        fmt.check_config(self)
        self._check_layer_overrides()

    def _check_layer_overrides(self) -> None:
        if not self.layer_overrides:
            return
        if self.format != "gptq":
            raise ConfigError("per-layer bits / group sizes are written as GPTQModel `dynamic` overrides: "
                              "use a weight-only affine method (rtn, gptq, awq) with --format gptq")
        for name, override in self.layer_overrides.items():
            if not isinstance(override, dict) or set(override) - {"bits", "group_size"}:
                raise ConfigError(f"layer override for {name} must be a dict of bits / group_size, got {override!r}")
            QuantConfig(method=self.method, bits=override.get("bits", self.bits),
                        group_size=override.get("group_size", self.group_size), sym=self.sym, format=self.format)

    def for_layer(self, name: str) -> "QuantConfig":
        """The config one linear is quantized with: the defaults, or its override."""
        override = self.layer_overrides.get(name)
        if not override:
            return self
        return replace(self, bits=override.get("bits", self.bits), group_size=override.get("group_size", self.group_size),
                       layer_overrides={})

    def _check_activation_options(self, quantizes_activations: bool) -> None:
        if self.act_quant not in ACTIVATION_MODES:
            raise ConfigError(f"act_quant must be one of {', '.join(ACTIVATION_MODES)}, got {self.act_quant!r}")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer {self.observer!r}; available: {', '.join(OBSERVERS)}")
        if not (isinstance(self.percentile, (int, float)) and 0 < self.percentile <= 100):
            raise ConfigError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if not (self.alpha == "auto" or (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1)):
            raise ConfigError(f"alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
        if not quantizes_activations and (self.act_quant != "dynamic" or self.observer != "minmax"):
            raise ConfigError(f"act_quant / observer apply to methods that quantize activations (w8a8, smoothquant), "
                              f"not {self.method!r}")
        if self.act_quant == "dynamic" and self.observer != "minmax":
            raise ConfigError("an observer fixes a static activation scale: use it with act_quant 'static'")
        if self.method != "smoothquant" and self.alpha != 0.5:
            raise ConfigError(f"alpha applies to method smoothquant, not {self.method!r}")

    def _check_fp8_options(self, fp8: bool) -> None:
        if not fp8:
            return
        if self.bits != 8 or not self.sym or self.clip_search:
            raise ConfigError(f"{self.method} is float8 e4m3 with a scale (bits 8, symmetric, no clip search); "
                              f"got bits={self.bits}, sym={self.sym}, clip_search={self.clip_search}")
        if self.method == "fp8" and self.group_size != PER_CHANNEL:
            raise ConfigError("fp8 (W8A8-FP8) scales weights per output channel (group_size -1); "
                              "use fp8-block for block scales")
        if self.method == "fp8-block" and (self.group_size < 16 or self.group_size % 16):
            raise ConfigError(f"fp8-block scales square blocks of group_size x group_size weights, a multiple of 16 "
                              f"(128 as DeepSeek-V3); got {self.group_size}")

    def _check_codebook_options(self, codebook: bool) -> None:
        if self.double_quant and not codebook:
            raise ConfigError(f"double_quant applies to the NF4 / FP4 methods, not {self.method!r}")
        if not codebook:
            return
        if self.bits != 4:
            raise ConfigError(f"{self.method} is a 4-bit data type; got bits={self.bits}")
        if self.group_size not in BLOCKSIZES:
            raise ConfigError(f"{self.method} blocksize (group_size) must be one of {', '.join(map(str, BLOCKSIZES))}, "
                              f"got {self.group_size}")
        if not self.sym or self.clip_search:
            raise ConfigError(f"{self.method} is a fixed table scaled by each block's absmax: "
                              "asymmetric grids and clip search do not apply")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        d["rotate_online"] = list(self.rotate_online)
        d["layer_overrides"] = {name: dict(o) for name, o in sorted(self.layer_overrides.items())}
        return d
