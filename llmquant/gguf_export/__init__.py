"""GGUF export for llama.cpp (llama and gemma3; f16, q8_0, q4_0, q4_1, q4_k; optional imatrix)."""
from .export import ARCHITECTURES, TYPES, export_gguf
from .llama import permute_for_llama_cpp

__all__ = ["ARCHITECTURES", "TYPES", "export_gguf", "permute_for_llama_cpp"]
