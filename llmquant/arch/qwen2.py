from .base import ArchMap
from .llama import LLAMA_STYLE_SEQUENTIAL

QWEN2 = ArchMap(name="qwen2", model_types=("qwen2", "qwen3"), blocks="model.layers", sequential=LLAMA_STYLE_SEQUENTIAL)
