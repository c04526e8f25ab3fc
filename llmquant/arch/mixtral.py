from .base import ArchMap, ExpertsMap, ScalingPair
from .llama import ATTENTION_INPUT, LLAMA, VALUE_TO_OUTPUT

# Every block is mixture-of-experts; each expert is w2(act(w1(x)) * w3(x)). transformers 5 builds the
# MoE block at `mlp`, while Mixtral checkpoints (and what transformers itself saves) name it
# `block_sparse_moe`.
MIXTRAL = ArchMap(
    name="mixtral",
    model_types=("mixtral",),
    blocks=LLAMA.blocks,
    sequential=(
        LLAMA.sequential[0],
        LLAMA.sequential[1],
        ("mlp.experts.*.w1", "mlp.experts.*.w3"),
        ("mlp.experts.*.w2",),
    ),
    scaling_pairs=(
        ATTENTION_INPUT,
        VALUE_TO_OUTPUT,
        ScalingPair("post_attention_layernorm", ("mlp.gate", "mlp.experts.*.w1", "mlp.experts.*.w3")),
        ScalingPair("mlp.experts.*.w3", ("mlp.experts.*.w2",)),
    ),
    no_clip=LLAMA.no_clip,
    experts=ExpertsMap(gate="w1", up="w3", down="w2"),
    stored_names=((".mlp.", ".block_sparse_moe."),),
)
