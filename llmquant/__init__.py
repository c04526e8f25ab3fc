"""llmquant: LLM weight quantization into checkpoints the ecosystem loads."""
from ._version import __version__
from .api import QuantizedModel, quantize
from .config import QuantConfig
from .data import Calibration
from .errors import LlmquantError
from .loading import load

__all__ = ["quantize", "load", "QuantConfig", "QuantizedModel", "Calibration", "LlmquantError", "__version__"]
