"""FP vs quantized zero-shot task accuracy (lm-evaluation-harness) as a markdown table.

    python eval/task_table.py --model smollm2-135m --configs w4pc w3pc --limit 300 \
        --md eval/tasks-smollm2.md --json eval/tasks-smollm2.json

Each config is quantized by RTN with an asymmetric grid (per output channel: the steep end of the
accuracy ladder on this already-4-bit model; eval/RESULTS.md), saved, loaded back and evaluated with
`llmquant.api.evaluate_tasks` on the same examples as the FP model.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import llmquant
from llmquant import QuantConfig
from llmquant.api import evaluate_tasks
from llmquant.evaluation.task_accuracy import WIKI_LAST_WORD


def parse_config(name: str) -> tuple[int, int]:
    match = re.fullmatch(r"w(\d)(?:g(\d+)|pc)", name)
    if not match:
        raise SystemExit(f"config {name!r}: use w<bits>g<group> or w<bits>pc")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", nargs="+", default=["w4pc", "w3pc"])
    parser.add_argument("--tasks", nargs="+", default=[WIKI_LAST_WORD])
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--md")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = [{"config": "FP32", **evaluate_tasks(args.model, args.tasks, args.limit, device="cpu")}]
    for name in args.configs:
        bits, group_size = parse_config(name)
        start = time.time()
        checkpoint = llmquant.quantize(args.model, QuantConfig(method="rtn", bits=bits, group_size=group_size,
                                                               sym=False), progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            saved = checkpoint.save(Path(tmp) / "ckpt")
            result = evaluate_tasks(saved, args.tasks, args.limit, device="cpu")
        rows.append({"config": f"RTN {name} asym", "quantize_seconds": round(time.time() - start, 1), **result})
    command = "python eval/task_table.py " + " ".join(sys.argv[1:])
    lines = ["```", command, "```", "",
             "| model | " + " | ".join(f"{t} acc | {t} target PPL" for t in args.tasks) + " | examples |",
             "|---|" + "---|---|" * len(args.tasks) + "---|"]
    for row in rows:
        cells = [f"{row['tasks'][t]['acc']:.4f} | {row['tasks'][t]['perplexity']:.2f}" for t in args.tasks]
        examples = ", ".join(str(v["effective"]) for v in row["samples"].values())
        lines.append(f"| {row['config']} | " + " | ".join(cells) + f" | {examples} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "rows": rows}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
