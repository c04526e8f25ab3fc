"""llmquant: LLM weight quantization into checkpoints the ecosystem loads."""
__version__ = "0.1.0"

from .api import QuantizedModel, quantize  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .data import Calibration  # noqa: E402
from .errors import LlmquantError  # noqa: E402
from .loading import load  # noqa: E402

__all__ = ["quantize", "load", "QuantConfig", "QuantizedModel", "Calibration", "LlmquantError", "__version__"]
