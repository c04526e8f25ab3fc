"""Quantization-aware training: fine-tune a model through fake-quantized weights, then export the
trained weights and scales as a real packed checkpoint (the same formats and loader as PTQ).

Each block linear becomes a FakeQuantLinear: a trainable latent weight, rounded on the affine grid
(same scale / zero-point conventions as PTQ) in every forward pass, the straight-through estimator
passing gradients to the latent weight inside the grid's range and zeroing them outside (clipped
STE). Scales and codes start from a PTQ result (RTN, or GPTQ), the latent weights at the
full-precision weights clipped into the chosen codes' rounding intervals, so training starts
exactly from the PTQ model; the scales stay fixed, or are learned with LSQ
(Esser et al., 2019): the step size is a parameter whose gradient the paper's rule gives,
d w_hat / d s = round(w / s) - w / s inside the range and the clipped bound outside, scaled by
1 / sqrt(weights per scale * Q_P). Scales pass through fp16 in the forward pass (straight-through),
because the checkpoint stores them in fp16: the exported model computes what training last did.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..api import quantize
from ..quantization.in_memory import QuantizedModel
from ..arch import arch_for
from ..storage.checkpoint import REPORT_FILES
from ..config import QuantConfig
from ..device import resolve_compute_dtype, resolve_device
from ..errors import ConfigError
from ..formats import FORMATS
from ..grid import AffineGrid, QuantizedWeight
from ..grid.activations import fake_quantize as fake_quantize_activations
from ..models import load_fp_model
from ..quantization.pipeline import LayerResult, PipelineResult
from ..quantization.planning import linears_to_quantize
from .loop import heldout_loss, run_report, train, training_windows, TrainingSettings

SCALE_LEARNING = (None, "lsq")
ACTIVATION_GRIDS = (None, "per-token", "per-tensor")
INITS = ("rtn", "gptq")
REPORT_FILE = REPORT_FILES["qat"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 forward, identity backward."""
    return x + (x.half().float() - x).detach()


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x forward, gradient multiplied by `factor` backward (LSQ's step-size gradient scale)."""
    return x * factor + (x - x * factor).detach()


def fake_quantize_input(x: torch.Tensor, grid: str) -> torch.Tensor:
    """x on the symmetric int8 grid, one scale per token or one for the whole tensor (from its absmax)."""
    if grid == "per-token":
        return fake_quantize_activations(x, None).to(x.dtype)
    scale = (x.detach().abs().amax().float() / 127).clamp(min=1e-12).reshape(1)
    return fake_quantize_activations(x, scale).to(x.dtype)


def fake_quantize_ste(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_index: torch.Tensor,
                      maxq: int) -> torch.Tensor:
    """(clamp(round(w / s) + z, 0, maxq) - z) * s per group, differentiable in w (clipped STE) and in s (LSQ).

    Clamping w / s to [-z, maxq - z] before rounding gives the same codes as rounding first (the
    bounds are integers), and makes torch's clamp gradient exactly the clipped STE."""
    g = group_index.long()
    s, z = scale[:, g], zero[:, g].to(weight.dtype)
    return round_ste(torch.clamp(weight / s, -z, maxq - z)) * s


def latent_start(full_precision: torch.Tensor, quantized: QuantizedWeight, maxq: int) -> torch.Tensor:
    """The latent weights training starts from: the full-precision weights, clipped into the rounding
    interval of the code the PTQ method chose. Rounding them gives the PTQ codes (training starts
    from the PTQ model), yet each weight keeps its distance from the next code: a latent weight
    started at its grid point would need half a step of updates before any code could change."""
    g = quantized.group_index.long()
    scale, zero = quantized.scale[:, g].float(), quantized.zero[:, g].float()
    center = (quantized.codes.float() - zero) * scale
    # 0.49 of a step: inside the interval, away from the tie that round() would break to even
    half = 0.49 * scale
    lower = torch.where(quantized.codes.float() == 0, torch.full_like(center, -torch.inf), center - half)
    upper = torch.where(quantized.codes.float() == maxq, torch.full_like(center, torch.inf), center + half)
    return torch.maximum(torch.minimum(full_precision.float(), upper), lower)


class FakeQuantLinear(nn.Module):
    """A linear whose weight is a trainable latent tensor, fake-quantized on an affine grid in forward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, init: QuantizedWeight, maxq: int,
                 learn_scale: bool, act_quant: str | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.bits, self.group_size, self.maxq = init.bits, init.group_size, maxq
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        scale = init.scale.float().clone()
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero", init.zero.clone())
        self.register_buffer("group_index", init.group_index.clone())
        per_scale = self.in_features / init.scale.shape[1]
        positive_levels = maxq // 2 if bool((init.zero == (maxq + 1) // 2).all()) else maxq
        self.gradient_factor = 1 / math.sqrt(per_scale * positive_levels)
        self.act_quant = act_quant

    def step_size(self) -> torch.Tensor:
        scale = scale_gradient(self.scale, self.gradient_factor) if self.scale.requires_grad else self.scale
        # below fp16's smallest normal a stored scale would lose precision, and it must stay positive
        return fp16_ste(scale.clamp(min=2.0**-14))

    def fake_weight(self) -> torch.Tensor:
        return fake_quantize_ste(self.weight, self.step_size(), self.zero, self.group_index, self.maxq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = x + (fake_quantize_input(x, self.act_quant) - x).detach()
        return F.linear(x, self.fake_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight:
        scale = self.step_size().detach()
        g = self.group_index.long()
        codes = AffineGrid(self.bits).quantize_values(self.weight, scale[:, g], self.zero[:, g])
        return QuantizedWeight(codes=codes.to(torch.uint8), scale=scale, zero=self.zero.clone(),
                               group_index=self.group_index.clone(), bits=self.bits, group_size=self.group_size)


@dataclass(frozen=True)
class QATSettings:
    """learn_scales: None (scales fixed at their PTQ values) or "lsq"; init: the PTQ result training
    starts from ("rtn", or "gptq" with act-order, calibrated on wiki); scale_lr: learning rate of the LSQ step sizes (default: the
    weights' lr); act_quant: also fake-quantize each linear's input to int8 while training,
    "per-token" or "per-tensor" (dynamic: the scale from the values at hand); the exported
    checkpoint is weight-only."""

    learn_scales: str | None = None
    init: str = "rtn"
    scale_lr: float | None = None
    act_quant: str | None = None

    def __post_init__(self):
        if self.learn_scales not in SCALE_LEARNING:
            raise ConfigError(f"learn_scales must be one of {SCALE_LEARNING}, got {self.learn_scales!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.act_quant not in ACTIVATION_GRIDS:
            raise ConfigError(f"act_quant must be one of {ACTIVATION_GRIDS}, got {self.act_quant!r}")
        if self.scale_lr is not None and not self.scale_lr > 0:
            raise ConfigError(f"scale_lr must be positive, got {self.scale_lr!r}")


@dataclass
class QATResult:
    qmodel: object  # QuantizedModel: the exported checkpoint, ready to save
    settings: QATSettings
    training: TrainingSettings
    heldout_loss_before: float
    heldout_loss_after: float
    train_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def report(self) -> dict:
        return {"qat": asdict(self.settings),
                **run_report(self.training, self.heldout_loss_before, self.heldout_loss_after, self.train_losses,
                             self.seconds)}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        return self.qmodel.save(path, overwrite=overwrite, more_reports={REPORT_FILE: self.report()})


@dataclass
class QATModel:
    """A model whose selected linears are FakeQuantLinear layers, ready to train and to export."""

    model: nn.Module
    tokenizer: object
    config: QuantConfig
    settings: QATSettings
    layers: dict[str, FakeQuantLinear]
    source: str | None = None

    def parameter_groups(self, training: TrainingSettings) -> list[dict]:
        """Optimizer groups: the latent weights, and the LSQ step sizes (with their own lr)."""
        groups = [{"params": [layer.weight for layer in self.layers.values()]}]
        if self.settings.learn_scales == "lsq":
            groups.append({"params": [layer.scale for layer in self.layers.values()],
                           "lr": self.settings.scale_lr or training.lr})
        return groups

    @torch.no_grad()
    def export(self, seconds: float = 0.0):
        """The QuantizedModel of the trained weights and scales (linears back to nn.Linear holding the
        dequantized weights; packed tensors in config.format); the fake-quantized layers are consumed."""
        fmt = FORMATS[self.config.format]
        packed, results = {}, []
        for name, layer in self.layers.items():
            quantized = layer.quantized_weight()
            packed[name] = fmt.pack(quantized.to(torch.device("cpu")), self.config)
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            linear.weight = nn.Parameter(quantized.dequantize(), requires_grad=False)
            if layer.bias is not None:
                linear.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
            self.model.set_submodule(name, linear)
            # no error figures: the trained weights have no full-precision counterpart to compare with
            results.append(LayerResult(name, (layer.out_features, layer.in_features), bits=quantized.bits,
                                       group_size=quantized.group_size))
        self.layers = {}
        return QuantizedModel(self.model.eval(), self.tokenizer, self.config, packed, PipelineResult(layers=results),
                              self.source, seconds)


def prepare(model, config: QuantConfig | None = None, settings: QATSettings | None = None, calib=None,
            device="auto", compute_dtype="auto") -> QATModel:
    """Load `model` (a name or folder) on `device`, quantize it with the PTQ starting point
    (settings.init) and replace its quantized linears by FakeQuantLinear layers; everything else is
    frozen."""
    config = config or QuantConfig(bits=4, group_size=-1)
    settings = settings or QATSettings()
    if config.method != "rtn":
        raise ConfigError("QAT trains on the affine grid of --bits / --group-size; choose the starting point with "
                          f"init (rtn or gptq), not method {config.method!r}")
    target = resolve_device(device)
    model, tokenizer = load_fp_model(str(model), device=target)
    source = getattr(model.config, "_name_or_path", None)
    # GPTQ starts from its strongest variant, act-order
    ptq_config = QuantConfig(**{**config.to_dict(), "method": settings.init, "act_order": settings.init == "gptq",
                                "modules_to_not_convert": tuple(config.modules_to_not_convert)})
    full_precision = {name: linear.weight.detach().clone()
                      for name, linear in linears_to_quantize(model, arch_for(model.config), config)}
    ptq = quantize(model, ptq_config, calib if settings.init == "gptq" else None, tokenizer=tokenizer,
                   progress=False, keep_quantized=True, device=target, compute_dtype=compute_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    maxq = 2**config.bits - 1
    layers = {}
    for name, quantized in ptq.quantized_weights.items():
        quantized = quantized.to(target)
        linear = model.get_submodule(name)
        latent = latent_start(full_precision[name], quantized, maxq)
        layers[name] = FakeQuantLinear(latent, linear.bias, quantized, maxq,
                                       learn_scale=settings.learn_scales == "lsq", act_quant=settings.act_quant)
        model.set_submodule(name, layers[name])
    full_precision.clear()
    return QATModel(model, tokenizer, config, settings, layers, source)


def qat(model, config: QuantConfig | None = None, settings: QATSettings | None = None,
        training: TrainingSettings | None = None, calib=None, progress: bool = True, device="auto",
        compute_dtype="auto") -> QATResult:
    """Fine-tune `model` (a name or folder) through fake-quantized weights on `device` (forward passes
    in `compute_dtype` by autocast, latent weights in float32) and export the result as a packed
    checkpoint in config.format."""
    start = time.time()
    settings, training = settings or QATSettings(), training or TrainingSettings(lr=1e-5)
    target = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, target)
    prepared = prepare(model, config, settings, calib, target, dtype)
    train_windows, heldout = training_windows(prepared.tokenizer, prepared.model, training)
    torch.manual_seed(training.seed)
    before = heldout_loss(prepared.model, heldout)
    autocast = torch.autocast(target.type, dtype=dtype) if dtype != torch.float32 else None
    losses = train(prepared.model, prepared.parameter_groups(training), train_windows, training, progress, "qat",
                   autocast)
    after = heldout_loss(prepared.model, heldout)
    return QATResult(prepared.export(time.time() - start), settings, training, before, after, losses,
                     time.time() - start)
