from .base import ArchMap, ExpertsMap, ScalingPair
from .qwen3_moe import DENSE_DOWN, DENSE_GATE_UP, ROUTED_DOWN, ROUTED_GATE_UP

# Multi-head latent attention: the normed input feeds q_a_proj (or q_proj when q_lora_rank is None)
# and kv_a_proj_with_mqa; q_b_proj reads q_a_layernorm's output, kv_b_proj kv_a_layernorm's (the
# latent part of kv_a's output, its rope part bypasses the norm). The first
# `first_k_dense_replace` blocks have a dense MLP, the others routed experts (sigmoid router with
# grouped top-k, kept in full precision) plus `shared_experts`, which every token goes through.
SHARED_GATE_UP = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
SHARED_DOWN = ("mlp.shared_experts.down_proj",)
LATENT_INPUT = ("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")

DEEPSEEK_V3 = ArchMap(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    blocks="model.layers",
    sequential=(
        LATENT_INPUT,
        ("self_attn.q_b_proj", "self_attn.kv_b_proj"),
        ("self_attn.o_proj",),
        ROUTED_GATE_UP + SHARED_GATE_UP + DENSE_GATE_UP,
        ROUTED_DOWN + SHARED_DOWN + DENSE_DOWN,
    ),
    scaling_pairs=(
        ScalingPair("input_layernorm", LATENT_INPUT[:1] + LATENT_INPUT[2:]),
        ScalingPair("input_layernorm", LATENT_INPUT[1:]),
        ScalingPair("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
        ScalingPair("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
        ScalingPair("post_attention_layernorm", ("mlp.gate", *ROUTED_GATE_UP, *SHARED_GATE_UP)),
        ScalingPair("mlp.experts.*.up_proj", ROUTED_DOWN),
        ScalingPair("mlp.shared_experts.up_proj", SHARED_DOWN),
        ScalingPair("post_attention_layernorm", DENSE_GATE_UP),
        ScalingPair("mlp.up_proj", DENSE_DOWN),
    ),
    optional=("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.q_b_proj") + ROUTED_GATE_UP + ROUTED_DOWN
    + SHARED_GATE_UP + SHARED_DOWN + DENSE_GATE_UP + DENSE_DOWN,
    experts=ExpertsMap(),
)
