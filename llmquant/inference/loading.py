"""Loading a checkpoint folder into a transformers model whose quantized linears stay packed.

Only safetensors are read (nothing is unpickled) and no remote code runs unless asked for.
The model skeleton is built without allocating weights, quantized linears are swapped in
for the tensors the checkpoint holds, and every tensor is assigned from the file, so memory
is the packed size.
"""
from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..arch import declared_arch_for
from ..storage.checkpoint import SAFETENSORS_INDEX, LazyTensors
from .cpu import prepare_for_cpu
from ..device import check_gpu_can_run, resolve_compute_dtype, resolve_device
from ..errors import CheckpointError, ConfigError, ModelNotFoundError
from ..formats import format_for_quantization_config
from ..formats.gptq import dynamic_override
from ..arch.moe import unfuse_experts
from ..rotation.online import attach_from_checkpoint, without_transform_tensors


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors weights")
    for f in files:
        if f.parent.resolve() != folder.resolve() or not f.is_file():
            raise CheckpointError(f"weight file {f} listed in the index is missing or outside {folder}")
    return files


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = LazyTensors(files)
    return {key: tensors[key] for key in tensors.keys()}


def _read_config(folder: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: not a model checkpoint")
    try:
        quantization_config = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    except (ValueError, OSError, AttributeError) as exc:
        raise CheckpointError(f"{folder}/config.json is not a JSON object: {exc}") from exc
    if quantization_config is not None and not isinstance(quantization_config, dict):  # transformers: AttributeError
        raise CheckpointError(f"{folder}: config.json's quantization_config must be a mapping, "
                              f"got {quantization_config!r}")
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{folder}/config.json cannot be read: {exc}") from exc


def _format_of(folder: Path, quantization_config) -> tuple[dict, object]:
    """(quantization_config as a dict, the format that reads it)."""
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    fmt = format_for_quantization_config(quantization_config)
    if fmt is None:
        raise CheckpointError(
            f"{folder}: quant_method {quantization_config.get('quant_method')!r} is not a format llmquant reads"
        )
    return quantization_config, fmt


def _module_config(folder: Path, quantization_config: dict, name: str) -> dict:
    """The quantization_config one module was stored with (GPTQModel's `dynamic` overrides applied)."""
    module_config = dynamic_override(quantization_config, name)
    if module_config is None:
        raise CheckpointError(f"{folder}: quantization_config.dynamic leaves {name} unquantized, "
                              "but the checkpoint holds quantized tensors for it")
    return module_config


@contextmanager
def _naming(folder: Path):
    """CheckpointErrors from the formats and the modules name a tensor; this adds the folder it is in."""
    try:
        yield
    except CheckpointError as exc:
        raise CheckpointError(f"{folder}: {exc}") from exc


def _own_tensors(tensors, name: str, suffixes) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors of the quantized linear `name` (suffix -> tensor), bias included."""
    return {suffix: tensors[f"{name}.{suffix}"] for suffix in (*suffixes, "bias") if f"{name}.{suffix}" in tensors}


def _build_checked(fmt, folder: Path, quantization_config: dict, name: str, own: dict[str, torch.Tensor],
                   in_features: int, out_features: int, dtype: torch.dtype) -> nn.Module:
    """The empty quantized linear for `own`, its config and shapes checked by build_linear and every
    tensor's dtype and values by check_tensors, before anything reads them."""
    shapes = {suffix: tuple(tensor.shape) for suffix, tensor in own.items() if suffix in fmt.tensor_suffixes}
    module_config = _module_config(folder, quantization_config, name)
    with _naming(folder):
        module = fmt.build_linear(name, module_config, shapes, "bias" in own, in_features, out_features, dtype)
        fmt.check_tensors(name, module, own)
    return module


def _check_unquantized(folder: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The floating-point parts (embeddings, norms, kept linears) fit the model's own tensors: a
    wrong shape or an integer tensor is named here, not by torch's load_state_dict or a matmul."""
    for key, tensor in tensors.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(f"{folder}: {key} has shape {tuple(tensor.shape)}, the model's is {tuple(want.shape)}")
        if tensor.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"{folder}: {key} is {tensor.dtype}, the model holds {want.dtype} there")


def load(path: str | os.PathLike, dtype="auto", trust_remote_code: bool = False, device="auto", device_map=None,
         cpu_paths: bool = True):
    """A transformers CausalLM from a checkpoint folder (quantized or not), in eval mode.

    device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; the quantized linears run the
    Triton kernels on a GPU and the torch ops on the CPU, chosen by their tensors' device.
    dtype: compute dtype of the floating-point parts ("auto": float32 on the CPU, bfloat16 / float16
    on a GPU). device_map: instead of one device, an accelerate device map ("auto", "balanced", or
    a dict of module name -> device) that spreads the blocks over GPUs and CPU memory.
    cpu_paths: convert the quantized linears left on the CPU to their fast paths now (llmquant.inference.cpu);
    False leaves it to their first CPU call (a base about to train adapters takes itself off them).
    """
    target = resolve_device(device)
    dtype = resolve_compute_dtype(dtype, target)
    model = _load_on_cpu(path, dtype, trust_remote_code, _gpus_of(target, device_map))
    model = _dispatch(model, device_map, dtype) if device_map is not None else model.to(target)
    if cpu_paths:
        # after placement: only the layers left on the CPU are converted (and their memory spent)
        prepare_for_cpu(model)  # logs what runs where
    return model


def _gpus_of(target: torch.device, device_map) -> list[torch.device]:
    """The GPUs a load may put quantized linears on: the target, or those of a device map (every
    visible one for a map accelerate infers)."""
    if device_map is None:
        return [target] if target.type == "cuda" else []
    if isinstance(device_map, dict):
        return sorted({torch.device("cuda", d) if isinstance(d, int) else torch.device(d) for d in device_map.values()
                       if isinstance(d, int) or str(d).startswith("cuda")}, key=str)
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _check_gpus_run(fmt, gpus: list[torch.device], what: str) -> None:
    """Refuse a GPU that cannot run this format's linears, before any tensor is read. On a GPU they
    run the Triton kernels (unless LLMQUANT_KERNELS=reference), FP8 weights FP8 matmuls."""
    from . import ops

    if not gpus or ops.backend_for("cuda") != ops.TRITON:
        return
    for gpu in gpus:
        check_gpu_can_run(gpu, ["triton", "fp8"] if fmt.holds_fp8_weights else ["triton"], what)


def _dispatch(model, device_map, dtype):
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        options = {}
        if device_map in ("balanced", "balanced_low_0"):
            from accelerate.utils import get_balanced_memory

            options["max_memory"] = get_balanced_memory(model, dtype=dtype, low_zero=device_map == "balanced_low_0",
                                                        no_split_module_classes=no_split)
        elif device_map != "auto":
            raise ConfigError(f"device_map must be auto, balanced, balanced_low_0 or a dict, got {device_map!r}")
        device_map = infer_auto_device_map(model, no_split_module_classes=no_split, dtype=dtype, **options)
    return dispatch_model(model, device_map=device_map)


def _load_on_cpu(path, dtype: torch.dtype, trust_remote_code: bool, gpus: list[torch.device] = ()):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(f"no checkpoint folder at {folder}")
    config = _read_config(folder, trust_remote_code)
    quantization_config = getattr(config, "quantization_config", None)
    if quantization_config is None:
        checkpoint_files(folder)  # same clear error for a folder without weights
        try:  # use_safetensors: never fall back to unpickling a .bin beside them
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=trust_remote_code,
                                                         use_safetensors=True)
        except OSError as exc:
            raise CheckpointError(f"{folder}: cannot load its safetensors weights: {exc}") from exc
        return model.eval()
    quantization_config, fmt = _format_of(folder, quantization_config)
    _check_gpus_run(fmt, gpus, f"{folder.name} ({fmt.name} checkpoint)")
    tensors = without_transform_tensors(read_tensors(checkpoint_files(folder)), quantization_config)
    arch = declared_arch_for(config)
    if arch is not None:  # checkpoint keys -> module paths (Mixtral's block_sparse_moe -> mlp)
        tensors = {arch.module_name(key): tensor for key, tensor in tensors.items()}

    skeleton_config = copy.deepcopy(config)
    del skeleton_config.quantization_config  # else transformers would look for its own GPTQ backend
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(skeleton_config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config.quantization_config = quantization_config
    if arch is not None and arch.experts is not None and not any(k.endswith(".gate_up_proj") for k in tensors):
        unfuse_experts(model, arch)  # the checkpoint holds each expert's projections (quantized) apart

    marker = "." + fmt.marker_suffix
    quantized = sorted(k[: -len(marker)] for k in tensors if k.endswith(marker))
    if not quantized:
        raise CheckpointError(f"{folder}: config says {fmt.name} but no tensor ends in {marker}")
    for name in quantized:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{folder}: quantized tensors for {name}, which the model has no module for") from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{folder}: {name} is a {type(linear).__name__} in the model, not a linear layer")
        own = _own_tensors(tensors, name, fmt.tensor_suffixes)
        model.set_submodule(name, _build_checked(fmt, folder, quantization_config, name, own, linear.in_features,
                                                 linear.out_features, dtype))

    # A quantized linear's own tensors (scales, absmax, ...) keep their stored dtype; bias and the
    # unquantized parts take the compute dtype.
    quantized_tensors = {f"{name}.{suffix}" for name in quantized for suffix in fmt.tensor_suffixes}
    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{folder}: tensors the model has no place for: {', '.join(unexpected[:5])}")
    _check_unquantized(folder, {k: t for k, t in tensors.items() if k not in quantized_tensors}, expected)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and key not in quantized_tensors:
            tensors[key] = tensor.to(dtype)
    with _naming(folder):  # the bitsandbytes linears read their quant_state JSON here
        model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if still_empty:
        raise CheckpointError(f"{folder}: the checkpoint lacks {', '.join(still_empty[:5])}")
    with _naming(folder):
        attach_from_checkpoint(model, quantization_config)  # R4: the inputs rotated at run time
    return model.eval()


def load_quantized_linear(path: str | os.PathLike, name: str, in_features: int, out_features: int,
                          dtype: torch.dtype = torch.float32) -> nn.Module:
    """One quantized linear of a checkpoint, reading only its own tensors (for reports on big models)."""
    folder = Path(path).expanduser()
    quantization_config = getattr(_read_config(folder, False), "quantization_config", None)
    if quantization_config is None:
        raise CheckpointError(f"{folder} is not a quantized checkpoint")
    quantization_config, fmt = _format_of(folder, quantization_config)
    source = LazyTensors(checkpoint_files(folder))
    own = {key[len(name) + 1:]: key for key in source.keys() if key.startswith(name + ".")}
    if fmt.marker_suffix not in own:
        raise CheckpointError(f"{folder} holds no quantized tensors for {name}")
    own = {suffix: source[key] for suffix, key in own.items()}
    module = _build_checked(fmt, folder, quantization_config, name, own, in_features, out_features, dtype)
    with _naming(folder):
        module.load_state_dict(own, strict=False, assign=True)
    return module.eval()
