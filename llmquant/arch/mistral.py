from .base import ArchMap
from .llama import LLAMA_STYLE_SEQUENTIAL

MISTRAL = ArchMap(name="mistral", model_types=("mistral",), blocks="model.layers", sequential=LLAMA_STYLE_SEQUENTIAL)
