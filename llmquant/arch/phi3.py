from .base import ArchMap, ScalingPair

# Phi-3 fuses q, k, v into one linear and gate, up into another (their outputs are split after the
# matmul). The value part of qkv_proj feeds o_proj and the up half of gate_up_proj feeds down_proj,
# but a scaling pair folds into a whole previous operation, so only the norms are scaling pairs.
PHI3 = ArchMap(
    name="phi3",
    model_types=("phi3",),
    blocks="model.layers",
    sequential=(
        ("self_attn.qkv_proj",),
        ("self_attn.o_proj",),
        ("mlp.gate_up_proj",),
        ("mlp.down_proj",),
    ),
    scaling_pairs=(
        ScalingPair("input_layernorm", ("self_attn.qkv_proj",)),
        ScalingPair("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ),
    # q and k are rows of qkv_proj, so it is not clipped (AWQ's q/k rule)
    no_clip=("self_attn.qkv_proj",),
)
