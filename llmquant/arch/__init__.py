"""Architecture maps, one file per model family; `arch_for(config)` picks one."""
from ..errors import UnsupportedArchitectureError
from .base import ArchMap, ScalingPair
from .gemma3 import GEMMA3
from .llama import LLAMA
from .mistral import MISTRAL
from .opt import OPT
from .qwen2 import QWEN2

ARCHITECTURES = (LLAMA, GEMMA3, MISTRAL, QWEN2, OPT)


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHITECTURES for t in arch.model_types)


def arch_for(config) -> ArchMap:
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
    )


__all__ = ["ArchMap", "ScalingPair", "ARCHITECTURES", "arch_for", "supported_model_types"]
