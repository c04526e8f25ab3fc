from .base import ArchMap

# Attention projections see the same normed input; o_proj sees the attention output;
# gate and up share the post-attention normed input; down sees the gated product.
LLAMA_STYLE_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

LLAMA = ArchMap(name="llama", model_types=("llama",), blocks="model.layers", sequential=LLAMA_STYLE_SEQUENTIAL)
