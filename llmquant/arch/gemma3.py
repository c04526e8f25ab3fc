from dataclasses import replace

from .base import ScalingPair
from .llama import ATTENTION_INPUT, LLAMA, UP_TO_DOWN, VALUE_TO_OUTPUT

# Gemma-3 norms the attention output (post_attention_layernorm) before the residual add; the
# MLP's input norm is pre_feedforward_layernorm. Its RMSNorm multiplies by (1 + weight).
GEMMA3 = replace(
    LLAMA,
    name="gemma3",
    model_types=("gemma3_text",),
    scaling_pairs=(
        ATTENTION_INPUT,
        VALUE_TO_OUTPUT,
        ScalingPair("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        UP_TO_DOWN,
    ),
    norm_weight_offset=1.0,
    bos_per_window=True,
)
