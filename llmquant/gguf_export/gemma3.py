"""gemma3 in GGUF (text model): llama.cpp stores every RMSNorm weight as 1 + w (Gemma normalizes by
(1 + w)), names the head size explicitly and reads the sliding window; rotary is the NEOX kind, so
no q / k permutation. The global layers' rope base is the file's; llama.cpp fixes the local one."""
from __future__ import annotations

import torch


class Gemma3GGUF:
    name = "gemma3"

    def add_metadata(self, writer, config) -> None:
        rope = config.rope_parameters
        rope = rope.get("full_attention", rope)["rope_theta"]
        writer.add_rope_freq_base(float(rope))
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)

    def tensor(self, hf_name: str, weight: torch.Tensor, config) -> torch.Tensor:
        return weight + 1 if hf_name.endswith("norm.weight") else weight
