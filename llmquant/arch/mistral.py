from dataclasses import replace

from .llama import LLAMA

MISTRAL = replace(LLAMA, name="mistral", model_types=("mistral",))
