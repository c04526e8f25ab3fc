import os

# The Triton interpreter must be chosen before any kernel is compiled (REFERENCE section 7).
os.environ.setdefault("TRITON_INTERPRET", "1")

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
