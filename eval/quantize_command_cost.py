"""Wall time, CPU time and peak resident memory of whole `llmquant quantize` commands, each measured by
`/usr/bin/time -v` in its own process (the CLI as a user runs it: reading the model, calibrating,
quantizing block by block, writing the checkpoint). The command behind eval/RESULTS.md's GPTQ time
and memory table:

    OMP_NUM_THREADS=2 python eval/quantize_command_cost.py --json eval/quantize-command-cost.json

Each model's command is given by --args (default: GPTQ with act-order, w4 g128 asym, the default
calibration); the checkpoints go to a temporary folder and are removed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_ARGS = "--method gptq --act-order --bits 4 --group-size 128 --asym"
FIELDS = {"Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall", "User time (seconds)": "user_seconds",
          "System time (seconds)": "system_seconds", "Maximum resident set size (kbytes)": "peak_rss_kib"}


def wall_seconds(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return sum(value * 60 ** power for power, value in enumerate(reversed(parts)))


def measure(model: str, extra: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "checkpoint"
        command = [sys.executable, "-m", "llmquant.cli", "quantize", model, *shlex.split(extra), "--out", str(out)]
        done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        row = {"model": model, "command": "llmquant quantize " + shlex.join([model, *shlex.split(extra), "--out", "OUT"])}
        for line in done.stderr.splitlines():
            match = re.match(r"\s*(.+?): (.+)$", line)
            if match and match.group(1) in FIELDS:
                row[FIELDS[match.group(1)]] = match.group(2).strip()
        row["wall_seconds"] = wall_seconds(row.pop("wall"))
        row["user_seconds"], row["system_seconds"] = float(row["user_seconds"]), float(row["system_seconds"])
        row["peak_rss_gib"] = int(row.pop("peak_rss_kib")) / 2**20
        row["checkpoint_mib"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--args", default=DEFAULT_ARGS, help="the quantize options after the model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        raise SystemExit("/usr/bin/time is not installed (Debian: apt-get install time)")
    rows = []
    for model in args.models:
        rows.append(measure(model, args.args))
        r = rows[-1]
        print(f"{model}: wall {r['wall_seconds']:.1f} s, user {r['user_seconds']:.1f} s, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    load = os.getloadavg()
    result = {"threads": os.environ.get("OMP_NUM_THREADS", "unset"), "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_after": load, "rows": rows}
    print("| model | wall time | user + system CPU | peak RSS |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['wall_seconds']:.1f} s | {r['user_seconds'] + r['system_seconds']:.1f} s | "
              f"{r['peak_rss_gib']:.2f} GiB |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
