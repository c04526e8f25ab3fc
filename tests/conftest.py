import os

# The Triton interpreter must be chosen before any kernel is compiled (REFERENCE section 7).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Whether the float16 gemv is taken is measured per CPU (llmquant.inference.cpu.capability.half_gemv_is_faster):
# pinned here so that every machine runs the same paths; tests/test_cpu_half_gemv.py covers the choice.
os.environ.setdefault("LLMQUANT_CPU_HALF_GEMV", "on")
# So is whether FBGEMM's float16 GEMM takes every call (capability.half_gemm_is_faster): off, so that the
# other paths stay covered everywhere; tests/test_cpu_fbgemm_half.py runs it.
os.environ.setdefault("LLMQUANT_CPU_HALF_GEMM", "off")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    from llmquant.models import builtin_model_path

    return builtin_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer), fp32. Session-wide: tests must not modify it."""
    from llmquant.models import load_fp_model

    return load_fp_model(str(smollm2_path))


def tiny_config(kind: str):
    """Small random-init configs of each mapped family; sizes are multiples of 32 so every bit width packs."""
    from transformers import Gemma3TextConfig, LlamaConfig, OPTConfig

    if kind == "llama":
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "gemma3":
        return Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128)
    if kind == "opt":
        return OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=128)
    return _tiny_config_more(kind)


# Mixture-of-experts families: 4 experts of width 32, 2 per token; one dense and one MoE block
# where the family mixes them.
MOE_KINDS = ("qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3")
BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)


def _tiny_config_more(kind: str):
    from transformers import (DeepseekV3Config, Gemma2Config, MixtralConfig, Phi3Config, Qwen2MoeConfig,
                              Qwen3MoeConfig)

    if kind == "qwen3_moe":  # the first block dense (mlp_only_layers), the second MoE
        return Qwen3MoeConfig(**BASE, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                              num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=True)
    if kind == "mixtral":
        return MixtralConfig(**BASE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(**BASE, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                              num_experts=4, num_experts_per_tok=2)
    if kind == "deepseek_v3":  # first block dense, then routed + shared experts; latent attention
        return DeepseekV3Config(**{**BASE, "num_key_value_heads": 4}, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4,
                                num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                                first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=32,
                                qk_nope_head_dim=16, v_head_dim=16, rope_interleave=False)
    if kind == "phi3":
        return Phi3Config(**BASE, intermediate_size=128, pad_token_id=0)
    if kind == "gemma2":
        return Gemma2Config(**BASE, intermediate_size=128, head_dim=16, sliding_window=8)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind)).eval()


@pytest.fixture
def tiny_folder(tmp_path, smollm2):
    """A tiny random llama saved as a Hugging Face folder, with a (borrowed) tokenizer."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    smollm2[1].save_pretrained(folder)
    return folder
