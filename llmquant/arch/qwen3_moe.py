from .base import ArchMap, ExpertsMap, ScalingPair
from .llama import ATTENTION_INPUT, LLAMA, UP_TO_DOWN, VALUE_TO_OUTPUT

# Mixture-of-experts MLP (transformers 5 layout): the router `mlp.gate` (not a linear, kept in full
# precision) and the routed experts `mlp.experts` read the post-attention normed input. Blocks listed
# in `mlp_only_layers` (or off `decoder_sparse_step`) keep a dense llama MLP instead.
ROUTED_GATE_UP = ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")
ROUTED_DOWN = ("mlp.experts.*.down_proj",)
DENSE_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
DENSE_DOWN = ("mlp.down_proj",)

QWEN3_MOE = ArchMap(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    blocks=LLAMA.blocks,
    sequential=(
        LLAMA.sequential[0],
        LLAMA.sequential[1],
        ROUTED_GATE_UP + DENSE_GATE_UP,
        ROUTED_DOWN + DENSE_DOWN,
    ),
    scaling_pairs=(
        ATTENTION_INPUT,
        VALUE_TO_OUTPUT,
        # the router reads the same normed input: it takes the scales too, and its input (every
        # token) gives the group's statistics
        ScalingPair("post_attention_layernorm", ("mlp.gate", *ROUTED_GATE_UP)),
        ScalingPair("mlp.experts.*.up_proj", ROUTED_DOWN),
        ScalingPair("post_attention_layernorm", DENSE_GATE_UP),
        UP_TO_DOWN,
    ),
    no_clip=LLAMA.no_clip,
    optional=ROUTED_GATE_UP + ROUTED_DOWN + DENSE_GATE_UP + DENSE_DOWN,
    experts=ExpertsMap(),
)
