"""llmquant: LLM weight quantization into checkpoints the ecosystem loads."""
import importlib

from ._version import __version__
from .errors import LlmquantError

# The public names, imported on first use: `llmquant --help` and `llmquant models` start without
# loading torch (the CLI imports this package first).
_PUBLIC = {"quantize": "api", "QuantizedModel": "quantization.in_memory", "QuantConfig": "config",
           "Calibration": "data", "load": "inference.loading", "compiled_decode_options": "inference.generation"}

__all__ = ["quantize", "load", "compiled_decode_options", "QuantConfig", "QuantizedModel", "Calibration", "LlmquantError", "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # llmquant.api, llmquant.quantization, ... as attributes, as after an eager import
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
