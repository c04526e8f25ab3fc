"""GGUF export: llama.cpp-ready files written with the `gguf` package (GGUF v3).

The trip: model folder → architecture (metadata + per-tensor convention, llama.py / gemma3.py) →
tokenizer metadata (tokenizer.py) → each tensor's block type → block quantizer (gguf's own, or
blocks32.py / q4_k.py, importance-weighted when an imatrix is given) → a temp file renamed into place.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import data
from ..arch import arch_for
from ..storage.checkpoint import check_output_file, write_file_atomically
from ..errors import ConfigError, UnsupportedArchitectureError
from ..models import load_fp_model, resolve_model
from .blocks32 import quantize_q4_0, quantize_q4_1, quantize_q5_0
from .gemma3 import Gemma3GGUF
from .imatrix import importance_matrix
from .llama import LlamaGGUF
from .q4_k import quantize_q4_k
from .tokenizer import add_tokenizer

# requested type -> (block type of the linears, llama.cpp's general.file_type)
TYPES = {"f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3), "q4_k": ("Q4_K", 14)}
ARCHITECTURES = {"llama": LlamaGGUF(), "gemma3_text": Gemma3GGUF()}

# llama.cpp keeps the token embedding and the output head at 8 bits in its 4-bit files: at 4 bits
# they cost far more accuracy than the block linears.
EIGHT_BIT_TENSORS = ("token_embd.weight", "output.weight")


def tensor_type(gguf_name: str, shape: tuple[int, ...], wanted: str):
    """The block type one tensor is written in."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return types.F32
    if gguf_name in EIGHT_BIT_TENSORS and wanted.startswith("q4"):
        return types.Q8_0
    qtype = getattr(types, TYPES[wanted][0])
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        # rows that do not fill whole blocks: llama.cpp falls back from k-quants to Q5_0 (32-blocks)
        if qtype == types.Q4_K and shape[-1] % 32 == 0:
            return types.Q5_0
        return types.F16
    return qtype


def quantize_tensor(array: np.ndarray, qtype, importance: np.ndarray | None) -> np.ndarray:
    """The bytes (or floats) written for one tensor; importance weights the fits when given."""
    import gguf

    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return array.astype(np.float32)
    if qtype == types.F16:
        return array.astype(np.float16)
    if qtype == types.Q4_K:
        return quantize_q4_k(array, importance)
    weighted = {types.Q4_0: quantize_q4_0, types.Q4_1: quantize_q4_1, types.Q5_0: quantize_q5_0}
    if importance is not None and qtype in weighted:
        return weighted[qtype](array, importance)
    return gguf.quants.quantize(array, qtype)


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def export_gguf(model_path: str | os.PathLike, out: str | os.PathLike, tensor_type_name: str = "q8_0",
                calib=None, overwrite: bool = False) -> Path:
    """Write `out` (a .gguf file) from a model folder or built-in name. calib: a Calibration (or corpus
    name) whose activations give the importance matrix that weights the 4-bit block fits. overwrite:
    replace an existing GGUF file at `out` (never any other file)."""
    import gguf
    from transformers import AutoConfig

    if tensor_type_name not in TYPES:
        raise ConfigError(f"GGUF type must be one of {', '.join(TYPES)}, got {tensor_type_name!r}")
    if calib is not None and tensor_type_name in ("f16", "q8_0"):
        raise ConfigError(f"an importance matrix only changes the 4-bit types, not {tensor_type_name}")
    folder = Path(resolve_model(str(model_path)))
    config = AutoConfig.from_pretrained(folder)
    architecture = ARCHITECTURES.get(config.model_type)
    if architecture is None:
        raise UnsupportedArchitectureError(
            f"GGUF export writes {', '.join(ARCHITECTURES)} models, not {config.model_type}")
    target = check_output_file(out, overwrite, is_gguf_file, "a GGUF file")
    if not target.parent.is_dir():
        raise ConfigError(f"output folder {target.parent} does not exist")
    model, tokenizer = load_fp_model(str(model_path))
    importance = {}
    if calib is not None:
        calib = data.Calibration(corpus=calib) if isinstance(calib, str) else calib
        bos = tokenizer.bos_token_id if arch_for(config).bos_per_window else None
        importance = importance_matrix(model, calib.windows(tokenizer, bos))

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), architecture.name)
        writer.add_name(Path(str(getattr(config, "_name_or_path", "") or folder)).name)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(TYPES[tensor_type_name][1])
        architecture.add_metadata(writer, config)
        add_tokenizer(writer, folder, tokenizer)

        names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, architecture.name.upper()), config.num_hidden_layers)
        for hf_name, weight in model.state_dict().items():
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UnsupportedArchitectureError(f"GGUF export has no llama.cpp name for {hf_name}")
            array = architecture.tensor(hf_name, weight.float(), config).numpy()
            qtype = tensor_type(gguf_name, array.shape, tensor_type_name)
            writer.add_tensor(gguf_name, quantize_tensor(array, qtype, importance.get(hf_name[: -len(".weight")])),
                              raw_dtype=qtype if qtype not in (gguf.GGMLQuantizationType.F32,
                                                               gguf.GGMLQuantizationType.F16) else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file_atomically(target, write)
    return target
