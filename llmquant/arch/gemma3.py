from .base import ArchMap
from .llama import LLAMA_STYLE_SEQUENTIAL

GEMMA3 = ArchMap(
    name="gemma3",
    model_types=("gemma3_text",),
    blocks="model.layers",
    sequential=LLAMA_STYLE_SEQUENTIAL,
    bos_per_window=True,
)
