from .base import ArchMap, ScalingPair

# Attention projections see the same normed input; o_proj sees the attention output;
# gate and up share the post-attention normed input; down sees the gated product.
LLAMA_STYLE_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ATTENTION_INPUT = ScalingPair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
# Attention output is a weighted sum of v rows, and down's input is act(gate) * up: both linear
# in the previous projection's output channels.
VALUE_TO_OUTPUT = ScalingPair("self_attn.v_proj", ("self_attn.o_proj",))
UP_TO_DOWN = ScalingPair("mlp.up_proj", ("mlp.down_proj",))

LLAMA = ArchMap(
    name="llama",
    model_types=("llama",),
    blocks="model.layers",
    sequential=LLAMA_STYLE_SEQUENTIAL,
    scaling_pairs=(
        ATTENTION_INPUT,
        VALUE_TO_OUTPUT,
        ScalingPair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        UP_TO_DOWN,
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)
