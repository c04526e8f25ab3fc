"""The checks on SmolLM2-135M itself that eval/RESULTS.md's rotation section quotes, re-made:

1. the rotated FP model computes the original's logits: max |Δ logit| over 32 random tokens (seeded),
   R1 + R2 fused (seed 0), and with R4 (down_proj's input rotated online) as well;
2. the residual stream's huge channels (507 and 247): on the first wiki test window, in blocks 1, 5,
   12, 20 and 29, each channel's mean magnitude after the post-attention RMSNorm's normalization (before
   its scale) and at the MLP's input (after it), against the median channel's, and the norm's weight on
   them against its median;
3. RTN w4 per-channel asymmetric, quantized in memory (never saved), with and without rotation:
   perplexity on the first 8 wiki test windows.

    OMP_NUM_THREADS=1 python eval/rotation/rotation_checks.py --json eval/rotation/rotation-checks.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from llmquant import QuantConfig, quantize
from llmquant.api import evaluate
from llmquant.arch import arch_for
from llmquant.data import evaluation_windows, tokenize_corpus
from llmquant.models import load_fp_model
from llmquant.rotation.fused import rotate_model

MODEL = "smollm2-135m"
CHANNELS = (507, 247)
BLOCKS = (1, 5, 12, 20, 29)


def logit_check(model, tokenizer, online: tuple[str, ...]) -> dict:
    ids = torch.randint(0, tokenizer.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    rotated = copy.deepcopy(model)
    with torch.no_grad():
        before = model(ids).logits
        rotate_model(rotated, arch_for(rotated.config, rotated), seed=0, online=online)
        after = rotated(ids).logits
    return {"rotations": "R1, R2" + (", R4 (" + ", ".join(online) + ")" if online else ""),
            "max_abs_logit_difference": float((after - before).abs().max()),
            "max_abs_logit": float(before.abs().max())}


def outlier_channels(model, tokenizer) -> list[dict]:
    window = evaluation_windows(tokenize_corpus(tokenizer, "wiki", "test"), 512, None, 1).input_ids[:1]
    inputs = {}

    def keep(index):
        def hook(module, args):
            x = args[0].detach()[0].float()
            normalized = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + module.variance_epsilon)
            inputs[index] = normalized.abs().mean(dim=0)  # mean |x| per channel over the tokens, before the scale
        return hook

    handles = [model.model.layers[i].post_attention_layernorm.register_forward_pre_hook(keep(i)) for i in BLOCKS]
    with torch.no_grad():
        model(window)
    for handle in handles:
        handle.remove()
    rows = []
    for index in BLOCKS:
        normalized = inputs[index]
        weight = model.model.layers[index].post_attention_layernorm.weight.detach().abs()
        scaled = normalized * weight  # the MLP's input
        rows.append({"block": index, "median_channel_normalized": float(normalized.median()),
                     "median_channel_mlp_input": float(scaled.median()), "median_norm_weight": float(weight.median()),
                     **{f"channel_{c}_normalized": float(normalized[c]) for c in CHANNELS},
                     **{f"channel_{c}_mlp_input": float(scaled[c]) for c in CHANNELS},
                     **{f"channel_{c}_norm_weight": float(weight[c]) for c in CHANNELS}})
    return rows


def rtn_in_memory(rotate: bool) -> float:
    model, tokenizer = load_fp_model(MODEL)
    config = QuantConfig(method="rtn", bits=4, group_size=-1, sym=False, rotate="hadamard" if rotate else None)
    qmodel = quantize(model, config, tokenizer=tokenizer, progress=False)
    return evaluate(qmodel.model, max_windows=8, tokenizer=tokenizer, progress=False)["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_fp_model(MODEL)
    result = {"command": "python " + " ".join(sys.argv), "model": MODEL,
              "logits": [logit_check(model, tokenizer, ()), logit_check(model, tokenizer, ("down_proj",))],
              "outlier_channels": outlier_channels(model, tokenizer),
              "rtn_w4pc_asym_in_memory_first_8_windows": {"not rotated": rtn_in_memory(False),
                                                          "rotated": rtn_in_memory(True)}}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
