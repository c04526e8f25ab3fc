"""Re-make eval/RESULTS.md's QLoRA and QAT tables: each run is the CLI a user types (`llmquant quantize`,
`finetune`, `qat`, `eval`), in its own process, and the JSON keeps every command, the training
report (held-out loss before / after, the loss of each step, training seconds), the wall time of each
command and the perplexity of each evaluation.

    OMP_NUM_THREADS=1 python eval/training_table.py --runs qlora-smollm2 qlora-gemma3 qat-w4pc \\
        --threads 1 --json eval/training-a.json
    OMP_NUM_THREADS=1 python eval/training_table.py --runs qat-w4pc-lsq qat-w3g64 qat-w3g64-lsq \\
        qat-w3g64-lsq-gptq --threads 1 --json eval/training-b.json

(the two halves run side by side on a 2-core machine, one thread each). The checkpoints go under
--work (default eval/runs, git-ignored); the JSON is written after every run, so an interrupted
table keeps the runs it finished.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench_cpu import cpu_name  # eval/ is this script's folder, first on sys.path

QAT_TRAINING = "--steps 60 --batch-size 2 --seqlen 256 --lr 1e-4"
QLORA_SMOLLM2_TRAINING = "--lora-r 16 --steps 200 --batch-size 2 --seqlen 256"
QLORA_GEMMA3_TRAINING = "--lora-r 16 --steps 80 --batch-size 2 --seqlen 256 --eval-windows 8"


def qat_run(grid: str, extra: str = "") -> list[tuple[str, str]]:
    return [("train", f"qat smollm2-135m {grid} {extra} {QAT_TRAINING} --out {{work}}/checkpoint"),
            ("eval", "eval {work}/checkpoint --max-windows 40")]


# Each run: (step name, llmquant arguments) in order; {work} is the run's folder.
RUNS: dict[str, list[tuple[str, str]]] = {
    "qlora-smollm2": [
        ("quantize", "quantize smollm2-135m --method nf4 --double-quant --out {work}/base"),
        ("train", f"finetune {{work}}/base {QLORA_SMOLLM2_TRAINING} --out {{work}}/adapter --merge-out {{work}}/merged"),
        ("eval base", "eval {work}/base --max-windows 40"),
        ("eval adapter", "eval {work}/base --adapter {work}/adapter --max-windows 40"),
        ("eval merged", "eval {work}/merged --max-windows 40"),
        ("eval fp held-out", "eval smollm2-135m --split validation --seqlen 256 --max-windows 16"),
        ("eval base held-out", "eval {work}/base --split validation --seqlen 256 --max-windows 16"),
        ("eval merged held-out", "eval {work}/merged --split validation --seqlen 256 --max-windows 16"),
    ],
    "qlora-gemma3": [
        ("quantize", "quantize gemma3-270m --method nf4 --double-quant --out {work}/base"),
        ("train", f"finetune {{work}}/base {QLORA_GEMMA3_TRAINING} --out {{work}}/adapter"),
        ("eval base", "eval {work}/base --max-windows 8"),
        ("eval adapter", "eval {work}/base --adapter {work}/adapter --max-windows 8"),
    ],
    "qat-w4pc": qat_run("--bits 4 --group-size -1 --asym"),
    "qat-w4pc-lsq": qat_run("--bits 4 --group-size -1 --asym", "--learn-scales lsq"),
    "qat-w3g64": qat_run("--bits 3 --group-size 64 --asym"),
    "qat-w3g64-lsq": qat_run("--bits 3 --group-size 64 --asym", "--learn-scales lsq"),
    "qat-w3g64-lsq-gptq": qat_run("--bits 3 --group-size 64 --asym", "--learn-scales lsq --init gptq"),
}
TRAINING_REPORTS = ("adapter/finetune_report.json", "checkpoint/qat_report.json")


def run_step(arguments: str, work: Path, threads: int) -> dict:
    words = shlex.split(arguments.format(work=work))
    if words[0] != "quantize":
        words += ["--threads", str(threads)]
    result_file = work / f"step-{time.monotonic_ns()}.json"
    if words[0] == "eval":
        words += ["--json", str(result_file)]
    if words[0] in ("quantize", "finetune", "qat"):
        words.append("--overwrite")
    command = [sys.executable, "-m", "llmquant.cli", *words]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    step = {"command": "llmquant " + shlex.join(words).replace(str(work), "RUN"), "wall_seconds": round(seconds, 1)}
    if result_file.exists():
        evaluation = json.loads(result_file.read_text())
        result_file.unlink()
        step["perplexity"] = evaluation["perplexity"]
        step["mean_nll"] = evaluation.get("mean_nll")
    return step


def run(name: str, work_root: Path, threads: int) -> dict:
    work = work_root / f"training-table-{name}"
    work.mkdir(parents=True, exist_ok=True)
    steps = {}
    for step_name, arguments in RUNS[name]:
        steps[step_name] = run_step(arguments, work, threads)
        print(f"{name} / {step_name}: {steps[step_name]}", file=sys.stderr, flush=True)
    result = {"steps": steps}
    for report in TRAINING_REPORTS:
        if (work / report).exists():
            training = json.loads((work / report).read_text())
            result["training_report"] = {key: training[key] for key in
                                         ("training", "heldout_perplexity_before", "heldout_perplexity_after",
                                          "heldout_loss_before", "heldout_loss_after", "seconds", "train_losses")
                                         if key in training}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=sorted(RUNS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("eval/runs"))
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    table = {"command": "python " + shlex.join(sys.argv), "cpu": cpu_name(),
             "cpu_count": os.cpu_count(), "threads": args.threads, "runs": {}}
    for name in args.runs:
        table["runs"][name] = run(name, args.work.resolve(), args.threads)
        table["runs"][name]["load_average_after"] = os.getloadavg()
        args.json.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
