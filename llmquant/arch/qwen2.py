from dataclasses import replace

from .llama import LLAMA

QWEN2 = replace(LLAMA, name="qwen2", model_types=("qwen2", "qwen3"))
