"""llama in GGUF: llama.cpp's rotary embedding rotates interleaved pairs, HF's rotates two halves
of each head, so the q / k rows are permuted as llama.cpp's converter does."""
from __future__ import annotations

import torch


def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection reordered from HF's rotary layout (two halves per head) to llama.cpp's
    (interleaved pairs)."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class LlamaGGUF:
    name = "llama"

    def add_metadata(self, writer, config) -> None:
        rope = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
        writer.add_rope_freq_base(float(rope))
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)

    def tensor(self, hf_name: str, weight: torch.Tensor, config) -> torch.Tensor:
        if hf_name.endswith("q_proj.weight"):
            return permute_for_llama_cpp(weight, config.num_attention_heads)
        if hf_name.endswith("k_proj.weight"):
            return permute_for_llama_cpp(weight, config.num_key_value_heads)
        return weight
