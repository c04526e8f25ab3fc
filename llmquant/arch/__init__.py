"""Architecture maps, one file per model family; `arch_for(config)` picks one, and for a family
without one, `arch_for(config, model)` derives a map from the model's module tree (derived.py)."""
from ..errors import UnsupportedArchitectureError
from .base import EVERY_INDEX, ArchMap, ExpertsMap, ScalingPair
from .deepseek_v3 import DEEPSEEK_V3
from .gemma2 import GEMMA2
from .gemma3 import GEMMA3
from .llama import LLAMA
from .mistral import MISTRAL
from .mixtral import MIXTRAL
from .opt import OPT
from .phi3 import PHI3
from .qwen2 import QWEN2
from .qwen2_moe import QWEN2_MOE
from .qwen3_moe import QWEN3_MOE

ARCHITECTURES = (LLAMA, GEMMA3, GEMMA2, MISTRAL, QWEN2, OPT, PHI3, QWEN3_MOE, MIXTRAL, QWEN2_MOE, DEEPSEEK_V3)


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHITECTURES for t in arch.model_types)


def declared_arch_for(config) -> ArchMap | None:
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    return None


def arch_for(config, model=None) -> ArchMap:
    """The declared map of config.model_type; else, given the model, one derived from its module tree."""
    arch = declared_arch_for(config)
    if arch is not None:
        return arch
    model_type = getattr(config, "model_type", None)
    if model is None:
        raise UnsupportedArchitectureError(
            f"no declared architecture map for {model_type!r} (declared: {', '.join(supported_model_types())}); "
            "a map is derived from the model itself where its decoder follows the usual layout"
        )
    from .derived import derive_arch

    return derive_arch(model)


__all__ = ["ArchMap", "EVERY_INDEX", "ExpertsMap", "ScalingPair", "ARCHITECTURES", "arch_for", "declared_arch_for",
           "supported_model_types"]
