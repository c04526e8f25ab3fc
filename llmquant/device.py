"""Where a run computes and in which floating-point dtype: `--device auto|cpu|cuda|cuda:N` and
`--compute-dtype auto|float32|float16|bfloat16`, resolved and checked once, before any work starts.

auto picks CUDA when a GPU is visible, else the CPU; the auto compute dtype is float32 on the CPU
(its matmuls are fastest and exact there) and bfloat16 on a GPU that has it (float16 otherwise).
Statistics (Hessians, channel magnitudes) are accumulated in float32 whatever the compute dtype.

A GPU too old for what a run will do on it (bfloat16, the Triton kernels, FP8) is refused here,
before any work, by name and by what it lacks (check_gpu_can_run), rather than by a compiler or
CUDA error in the middle of the run.
"""
from __future__ import annotations

import torch

from .errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What each GPU path needs: (lowest compute capability, what it is, what to do instead).
# Triton compiles for Turing (7.5) and later; bfloat16 arithmetic (and Triton's bf16 dot) starts with
# Ampere (8.0); e4m3 FP8 (Triton's fp8e4nv, cuBLASLt's FP8 GEMM behind torch._scaled_mm) with Ada (8.9).
GPU_FEATURES = {
    "triton": ((7, 5), "the Triton kernels of the quantized linears",
               "LLMQUANT_KERNELS=reference runs the (slower) torch reference ops instead"),
    "bfloat16": ((8, 0), "bfloat16 arithmetic", "use --compute-dtype float16"),
    "fp8": ((8, 9), "FP8 (e4m3) matmuls", "run it on the CPU or on an FP8 GPU (L4, L40, H100, ...)"),
}


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
        spec = dtype_name(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if device.type != "cuda":
            return torch.float32
        # by capability: torch.cuda.is_bf16_supported() also says yes where bfloat16 is only emulated
        return torch.float16 if gpu_lacks(device, ["bfloat16"]) else torch.bfloat16
    if text not in COMPUTE_DTYPES:
        raise ConfigError(f"unknown compute dtype {spec!r}; choose auto or one of {', '.join(COMPUTE_DTYPES)}")
    dtype = COMPUTE_DTYPES[text]
    if dtype == torch.bfloat16:
        check_gpu_can_run(device, ["bfloat16"], "compute dtype bfloat16")
    return dtype


def gpu_lacks(device: torch.device, features) -> list[str]:
    """The GPU_FEATURES a CUDA device lacks (none on the CPU)."""
    if device.type != "cuda":
        return []
    capability = tuple(torch.cuda.get_device_capability(device))
    return [feature for feature in features if capability < GPU_FEATURES[feature][0]]


def check_gpu_can_run(device: torch.device, features, what: str) -> None:
    """Refuse, before any work, a GPU that lacks one of `features` (keys of GPU_FEATURES) that `what`
    needs: the error names the GPU, its compute capability, what it lacks and what to do instead."""
    missing = gpu_lacks(device, features)
    if not missing:
        return
    major, minor = torch.cuda.get_device_capability(device)
    needs = "; ".join(f"{GPU_FEATURES[f][1]} needs compute capability {'.'.join(map(str, GPU_FEATURES[f][0]))} "
                      f"({GPU_FEATURES[f][2]})" for f in missing)
    raise ConfigError(f"{what} cannot run on {torch.cuda.get_device_name(device)} ({device}, compute capability "
                      f"{major}.{minor}): {needs}")


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
