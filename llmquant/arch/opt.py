from .base import ArchMap, ScalingPair

OPT = ArchMap(
    name="opt",
    model_types=("opt",),
    blocks="model.decoder.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    scaling_pairs=(
        ScalingPair("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScalingPair("self_attn.v_proj", ("self_attn.out_proj",)),
        ScalingPair("final_layer_norm", ("fc1",)),
        # ReLU commutes with a positive per-channel scale.
        ScalingPair("fc1", ("fc2",)),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)
