from .base import ArchMap

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
)
