"""GGUF export (work in progress, branch gguf-export): llama.cpp-ready files written with the `gguf`
package. Today: llama-family models, tokenizer of the GPT-2 BPE kind (tokenizer.json), tensor types
f16, q8_0, q4_0, q4_1 (gguf's own block quantizers). Q/K rows are permuted as llama.cpp's converter
does, so that its rotary embedding (interleaved pairs) sees what the HF model's (halves) did.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, UnsupportedArchitectureError
from .gguf_q4k import quantize_q4_k

TYPES = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k": "Q4_K"}
LLAMA_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection reordered from HF's rotary layout (two halves per head) to llama.cpp's
    (interleaved pairs)."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# llama.cpp keeps the token embedding and the output head at 8 bits in its 4-bit files: at 4 bits
# they cost far more accuracy than the block linears.
EIGHT_BIT_TENSORS = ("token_embd.weight", "output.weight")


def _tensor_type(name: str, array: np.ndarray, wanted: str):
    import gguf

    if array.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if name in EIGHT_BIT_TENSORS and wanted.startswith("q4"):
        wanted = "q8_0"
    qtype = getattr(gguf.GGMLQuantizationType, TYPES[wanted])
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        # rows that do not fill whole blocks: llama.cpp falls back from k-quants to Q5_0 (32-blocks)
        if wanted == "q4_k" and array.shape[-1] % 32 == 0:
            return gguf.GGMLQuantizationType.Q5_0
        return gguf.GGMLQuantizationType.F16
    return qtype


def _add_tokenizer(writer, folder: Path, tokenizer) -> None:
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise UnsupportedArchitectureError(f"GGUF export writes BPE tokenizers so far; this one is {model.get('type')}")
    vocab = model["vocab"]
    tokens = [None] * len(tokenizer)
    for token, index in vocab.items():
        if index < len(tokens):
            tokens[index] = token
    special = {t["id"]: t for t in data.get("added_tokens", [])}
    for index, added in special.items():
        if index < len(tokens):
            tokens[index] = added["content"]
    types = []
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index] = f"[PAD{index}]"
            types.append(gguf.TokenType.UNUSED)
        elif index in special and special[index].get("special"):
            types.append(gguf.TokenType.CONTROL)
        elif index in special:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for what, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                        ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{what}_token_id")(int(value))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


@torch.no_grad()
def importance_matrix(model, windows: torch.Tensor) -> dict[str, np.ndarray]:
    """llama.cpp's imatrix: per block linear, the mean of x_j^2 over the calibration tokens of its
    input channel j (the diagonal of the input Gram matrix, per token)."""
    sums, counts, handles = {}, {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            def hook(mod, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(module.register_forward_pre_hook(hook))
    try:
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).numpy() for name in sums}


def export_gguf(model_path: str | os.PathLike, out: str | os.PathLike, tensor_type: str = "q8_0",
                calib=None) -> Path:
    """Write `out` (a .gguf file) from a model folder or built-in name. calib: a Calibration (or corpus
    name) whose activations weight the Q4_K block fits (an importance matrix); None for plain fits."""
    import gguf

    from .models import load_fp_model, resolve_model

    if tensor_type not in TYPES:
        raise ConfigError(f"GGUF type must be one of {', '.join(TYPES)}, got {tensor_type!r}")
    model, tokenizer = load_fp_model(str(model_path))
    folder = Path(resolve_model(str(model_path)))
    config = model.config
    if config.model_type != "llama":
        raise UnsupportedArchitectureError(f"GGUF export writes llama models so far, not {config.model_type}")
    target = Path(out).expanduser()
    tmp = target.with_name(f".{target.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(str(getattr(config, "_name_or_path", "model")))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type({"f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q4_k": 15}[tensor_type])
    _add_tokenizer(writer, folder, tokenizer)

    importance = {}
    if calib is not None:
        from .data import Calibration

        calib = Calibration(corpus=calib) if isinstance(calib, str) else calib
        importance = importance_matrix(model, calib.windows(tokenizer))
    state = model.state_dict()
    named = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not config.tie_word_embeddings:
        named["lm_head.weight"] = "output.weight"
    for i in range(config.num_hidden_layers):
        for hf, short in LLAMA_TENSORS.items():
            named[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{short}.weight"
    for hf_name, gguf_name in named.items():
        weight = state[hf_name].float()
        if hf_name.endswith("q_proj.weight"):
            weight = permute_for_llama_cpp(weight, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = permute_for_llama_cpp(weight, config.num_key_value_heads)
        array = weight.numpy()
        qtype = _tensor_type(gguf_name, array, tensor_type)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q4_K:
            weights = importance.get(hf_name[: -len(".weight")])
            writer.add_tensor(gguf_name, quantize_q4_k(array, weights), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
