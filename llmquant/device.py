"""Where a run computes and in which floating-point dtype: `--device auto|cpu|cuda|cuda:N` and
`--compute-dtype auto|float32|float16|bfloat16`, resolved and checked once, before any work starts.

auto picks CUDA when a GPU is visible, else the CPU; the auto compute dtype is float32 on the CPU
(its matmuls are fastest and exact there) and bfloat16 on a GPU that has it (float16 otherwise).
Statistics (Hessians, channel magnitudes) are accumulated in float32 whatever the compute dtype.
"""
from __future__ import annotations

import torch

from .errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device a run computes on; a clear error when the device cannot be used."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise ConfigError(f"device {spec!r}: the GPU index must be a number (cuda:0, cuda:1, ...)")
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"device {spec!r} was asked for, but CUDA is not available ({why}); "
                              "use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} GPU(s) are visible")
        return torch.device("cuda", int(index) if index else torch.cuda.current_device())
    raise ConfigError(f"unknown device {spec!r}; choose one of {', '.join(DEVICE_CHOICES)}")


def resolve_compute_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype blocks compute in on `device` (auto: float32 on the CPU, bfloat16 / float16 on a GPU)."""
    if isinstance(spec, torch.dtype):
        if spec not in COMPUTE_DTYPES.values():
            raise ConfigError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {spec}")
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if text not in COMPUTE_DTYPES:
        raise ConfigError(f"unknown compute dtype {spec!r}; choose auto or one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[text]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def move_tensors(value, device: torch.device, dtype: torch.dtype | None = None):
    """`value` with every tensor inside (nested tuples / lists / dicts) on `device`, floating-point
    tensors in `dtype` when given; other values as they are."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move_tensors(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [move_tensors(v, device, dtype) for v in value]
    if isinstance(value, dict):
        return {k: move_tensors(v, device, dtype) for k, v in value.items()}
    return value


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on a GPU (None on the CPU, where activations simply live in RAM)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_device_mib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset, or None when the run did not use a GPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
