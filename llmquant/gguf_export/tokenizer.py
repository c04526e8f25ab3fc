"""The tokenizer in GGUF metadata, from the model folder's tokenizer.json.

Two kinds are written: byte-level BPE (GPT-2 style, tokenizer model "gpt2", with merges) and
sentencepiece-style BPE with byte fallback (model "llama": tokens, scores, token types; the merges
are written too so that readers that rebuild a BPE, like transformers, need not guess them). For the
latter, scores follow sentencepiece's convention as llama.cpp's converter writes it: the n-th normal
piece scores -n, byte pieces 0, control and user-defined pieces -1000. `tokenizer.ggml.pre` names
llama.cpp's pre-tokenizer (pretokenizer.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UnsupportedArchitectureError
from .pretokenizer import pre_tokenizer_name

BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _is_byte_level(data: dict) -> bool:
    parts = [data.get("pre_tokenizer") or {}, data.get("decoder") or {}]
    parts += [p for part in list(parts) for p in part.get("pretokenizers", part.get("decoders", []))]
    return any(part.get("type") == "ByteLevel" for part in parts)


def add_tokenizer(writer, folder: Path, tokenizer) -> None:
    import gguf

    path = folder / "tokenizer.json"
    if not path.exists():
        raise UnsupportedArchitectureError(f"GGUF export needs a fast tokenizer (tokenizer.json) in {folder}")
    data = json.loads(path.read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise UnsupportedArchitectureError(f"GGUF export writes BPE tokenizers; this one is {model.get('type')}")
    byte_level = _is_byte_level(data)
    if not byte_level and not model.get("byte_fallback"):
        raise UnsupportedArchitectureError("GGUF export writes byte-level BPE or BPE with byte fallback "
                                           "(sentencepiece style); this tokenizer is neither")
    pre = pre_tokenizer_name(tokenizer, byte_level)
    tokens = [None] * len(tokenizer)
    for token, index in model["vocab"].items():
        if index < len(tokens):
            tokens[index] = token
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for index, token in added.items():
        if index < len(tokens):
            tokens[index] = token["content"]

    types, scores, normal_rank = [], [], 0
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index] = f"[PAD{index}]"
            kind, score = gguf.TokenType.UNUSED, -1000.0
        elif index in added:
            kind = gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED
            score = -1000.0
        elif not byte_level and BYTE_PIECE.match(token):
            kind, score = gguf.TokenType.BYTE, 0.0
        else:
            kind, score = gguf.TokenType.NORMAL, -float(normal_rank)
            normal_rank += 1
        types.append(kind)
        scores.append(score)

    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not byte_level:
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(False)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for what, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                        ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{what}_token_id")(int(value))
    # what the tokenizer does, not its attribute (which transformers does not always keep in step)
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(adds_bos)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
