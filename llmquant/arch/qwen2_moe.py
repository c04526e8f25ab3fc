from .base import ArchMap, ExpertsMap, ScalingPair
from .llama import ATTENTION_INPUT, LLAMA, UP_TO_DOWN, VALUE_TO_OUTPUT
from .qwen3_moe import DENSE_DOWN, DENSE_GATE_UP, ROUTED_DOWN, ROUTED_GATE_UP

# Routed experts plus one shared expert that every token goes through, scaled by
# sigmoid(shared_expert_gate(x)); that gate is a linear one output wide and stays in full precision.
SHARED_GATE_UP = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
SHARED_DOWN = ("mlp.shared_expert.down_proj",)

QWEN2_MOE = ArchMap(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    blocks=LLAMA.blocks,
    sequential=(
        LLAMA.sequential[0],
        LLAMA.sequential[1],
        ROUTED_GATE_UP + SHARED_GATE_UP + DENSE_GATE_UP,
        ROUTED_DOWN + SHARED_DOWN + DENSE_DOWN,
    ),
    scaling_pairs=(
        ATTENTION_INPUT,
        VALUE_TO_OUTPUT,
        ScalingPair("post_attention_layernorm",
                    ("mlp.gate", "mlp.shared_expert_gate", *ROUTED_GATE_UP, *SHARED_GATE_UP)),
        ScalingPair("mlp.experts.*.up_proj", ROUTED_DOWN),
        ScalingPair("mlp.shared_expert.up_proj", SHARED_DOWN),
        ScalingPair("post_attention_layernorm", DENSE_GATE_UP),
        UP_TO_DOWN,
    ),
    no_clip=LLAMA.no_clip,
    optional=ROUTED_GATE_UP + ROUTED_DOWN + SHARED_GATE_UP + SHARED_DOWN + DENSE_GATE_UP + DENSE_DOWN,
    experts=ExpertsMap(),
    full_precision=("mlp.shared_expert_gate",),
)
