"""The float16 decode head (llmquant/inference/cpu/head.py) measured on SmolLM2 checkpoints: its error
against the fp32 head over one-row decode steps of real text, and decode speed with it and without.

    OMP_NUM_THREADS=1 python eval/cpu_head.py --checkpoints gptq-w4g128-sym nf4-dq --steps 1024 \\
        --json eval/cpu-head.json --md eval/cpu-head.md

The checkpoints are those eval/bench_cpu.py builds under ~/.cache/llmquant/bench-cpu/ (run it once
first). Error: the wiki test split fed one token per step through the KV cache, in runs of --run
tokens (the cache reset between runs); at each step the hidden state entering the head is multiplied
by the fp32 head and by the float16 gemv (HalfGemvHead, used directly, so the comparison holds on a
CPU where prepare_output_head would not give it): max |Δ logit| (absolute, and relative to the step's
largest |logit|), the perplexity of the next token under each, the share of steps whose top-1 token
is the same. Speed: greedy decode of --new-tokens tokens after eval/bench_cpu.py's prompt, best of
--rounds rounds interleaved, for the fp32 model, and for each checkpoint with the head's own fp32
forward and with the float16 gemv, whichever prepare_output_head chose on this CPU (that choice is
recorded too); × fp32 against the fp32 model's decode in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH_FOLDER = Path("~/.cache/llmquant/bench-cpu").expanduser()
PROMPT = "The history of the printing press begins"  # eval/bench_cpu.py's


def head_error(model, tokens: torch.Tensor, steps: int, run: int) -> dict:
    from llmquant.inference.cpu.head import HalfGemvHead

    head = model.get_output_embeddings()
    gemv = HalfGemvHead(head)
    if gemv.half_weight() is None:
        return {"error": "the head's weights are not float16 numbers: no float16 gemv"}
    hidden = []
    hook = head.register_forward_hook(lambda module, inputs, output: hidden.append(inputs[0][:, -1:].detach()))
    worst_abs = worst_rel = 0.0
    nll_fp32 = nll_half = 0.0
    agree = count = 0
    try:
        with torch.inference_mode():
            for start in range(0, steps, run):
                ids = tokens[start:min(start + run, steps) + 1]
                past = None
                for position in range(ids.numel() - 1):
                    hidden.clear()
                    out = model(input_ids=ids[position:position + 1][None], past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    h = hidden[-1].reshape(1, -1).float()
                    exact = F.linear(h, head.weight.float())[0]
                    half = gemv(h)[0]
                    delta = (half - exact).abs().max().item()
                    worst_abs = max(worst_abs, delta)
                    worst_rel = max(worst_rel, delta / exact.abs().max().item())
                    target = ids[position + 1]
                    nll_fp32 -= F.log_softmax(exact.double(), -1)[target].item()
                    nll_half -= F.log_softmax(half.double(), -1)[target].item()
                    agree += int(exact.argmax() == half.argmax())
                    count += 1
    finally:
        hook.remove()
    return {"steps": count, "max_abs_delta_logit": worst_abs, "max_rel_delta_logit": worst_rel,
            "perplexity_fp32_head": math.exp(nll_fp32 / count), "perplexity_float16_head": math.exp(nll_half / count),
            "top1_agreement": agree / count}


def decode_tokens_per_second(model, inputs: dict, new_tokens: int) -> float:
    from llmquant.inference.generation import timed_generate

    _, speed = timed_generate(model, inputs, new_tokens, exact_length=True)
    return speed.decode_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=["gptq-w4g128-sym", "nf4-dq"])
    parser.add_argument("--steps", type=int, default=1024)
    parser.add_argument("--run", type=int, default=256, help="tokens per KV-cache run")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()

    from llmquant.data import tokenize_corpus
    from llmquant.inference.cpu import describe_cpu, describe_head, prepare_for_cpu, prepare_output_head, summary
    from llmquant.inference.cpu.head import HalfGemvHead
    from llmquant.inference.loading import load
    from llmquant.models import load_fp_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    missing = [c for c in args.checkpoints if not (BENCH_FOLDER / c).is_dir()]
    if missing:
        raise SystemExit(f"no {', '.join(missing)} under {BENCH_FOLDER}: eval/bench_cpu.py builds them (run it once)")
    fp32, tokenizer = load_fp_model("smollm2-135m", dtype=torch.float32)
    fp32.eval()
    tokens = tokenize_corpus(tokenizer, "wiki", "test")
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    models = {}
    result = {"cpu": describe_cpu(), "threads": torch.get_num_threads(), "steps": args.steps, "run": args.run,
              "new_tokens": args.new_tokens, "rounds": args.rounds, "checkpoints": {}}
    for name in args.checkpoints:
        model = load(BENCH_FOLDER / name).eval()
        paths = summary(prepare_for_cpu(model))
        gemv = prepare_output_head(model)
        print(f"{name}: head error over {args.steps} one-row steps", flush=True)
        result["checkpoints"][name] = {"cpu_paths": paths, "head": describe_head(gemv),
                                       "head_float16_copy_mib": model.get_output_embeddings().weight.numel() * 2 / 2**20,
                                       "error": head_error(model, tokens, args.steps, args.run)}
        models[name] = (model, gemv)
    # Both heads timed whatever prepare_output_head chose on this CPU (its choice is recorded above).
    gemvs = {name: HalfGemvHead(model.get_output_embeddings()) for name, (model, _) in models.items()}
    for name, (model, chosen) in models.items():
        if chosen is not None:
            del model.get_output_embeddings().forward
        if gemvs[name].half_weight() is None:
            del gemvs[name]
    decode = {"fp32": [], **{f"{n}, {h}": [] for n in models for h in ("fp32 head", "float16 gemv head")
                             if h == "fp32 head" or n in gemvs}}
    for model in [fp32] + [m for m, _ in models.values()]:
        decode_tokens_per_second(model, inputs, 4)  # warm-up, not counted
    for round_index in range(args.rounds):
        decode["fp32"].append(decode_tokens_per_second(fp32, inputs, args.new_tokens))
        for name, (model, _) in models.items():
            decode[f"{name}, fp32 head"].append(decode_tokens_per_second(model, inputs, args.new_tokens))
            if name in gemvs:
                head = model.get_output_embeddings()
                head.forward = gemvs[name]
                decode[f"{name}, float16 gemv head"].append(decode_tokens_per_second(model, inputs, args.new_tokens))
                del head.forward
        print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in decode.items()), flush=True)
    best = {k: max(v) for k, v in decode.items()}
    result["decode_tokens_per_second"] = decode
    lines = [f"CPU: {result['cpu']}; {result['threads']} thread(s)", "",
             "| checkpoint | head prepare_output_head chose | max abs Δ logit | max rel Δ | ppl fp32 head | ppl float16 head "
             "| top-1 equal |", "|---|---|---|---|---|---|---|"]
    for name, entry in result["checkpoints"].items():
        e = entry["error"]
        if "error" in e:
            lines.append(f"| {name} | {entry['head']} | {e['error']} | | | | |")
            continue
        lines.append(f"| {name} | {entry['head']} | {e['max_abs_delta_logit']:.4f} | {e['max_rel_delta_logit']:.2e} | "
                     f"{e['perplexity_fp32_head']:.4f} | {e['perplexity_float16_head']:.4f} | "
                     f"{100 * e['top1_agreement']:.1f}% |")
    lines += ["", "| decode | tok/s (best) | × fp32 |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / best['fp32']:.2f} |" for k, v in best.items()]
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.md:
        args.md.write_text(table + "\n")


if __name__ == "__main__":
    main()
