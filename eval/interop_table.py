"""The interop table of eval/INTEROP.md, from the figures the interop suite records.

    python eval/interop_table.py --run          # run both interop parts (recording), then write the table
    python eval/interop_table.py RESULTS.jsonl  # write the table from figures recorded earlier

The suite appends one JSON line per comparison to $LLMQUANT_INTEROP_REPORT (tests/interop/
interop_common.py: record). The table replaces what lies between the markers in eval/INTEROP.md;
the prose around it is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "eval" / "INTEROP.md"
START, END = "<!-- interop-table:start -->", "<!-- interop-table:end -->"
PARTS = ("scripts/test_interop.sh", "scripts/test_llama_cpp.sh")


def figure(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict]) -> str:
    lines = ["| format | loader | loads? | max abs Δ logit vs ours (max abs logit) | PPL ours | PPL theirs | PPL FP | "
             "tokens equal (wiki test) | versions |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "max_logit_difference" in row:
            delta = f"{figure(row['max_logit_difference'])} ({figure(row.get('max_logit'), 1)})"
            if "max_logit_difference_weights_only" in row:
                delta += f"; activations unquantized: {figure(row['max_logit_difference_weights_only'])}"
            if "max_layer_difference" in row:
                delta += (f"; per layer on our inputs: {row['max_layer_difference']:.1e} of max |output|"
                          f"; our PPL under a 1e-6 nudge: {100 * row['perplexity_shift_under_nudge']:+.2f}%")
        elif "max_logit_difference_vs_fp" in row:
            delta = f"vs FP: {figure(row['max_logit_difference_vs_fp'])}"
        else:
            delta = "–"
        loads = figure(row.get("loads"))
        if row.get("error"):
            loads += f": {row['error']}"
        tokens = figure(row.get("tokens_equal_on_wiki_test"))
        if row.get("tokens"):
            tokens += f" ({row['tokens']} tokens)"
        lines.append(f"| {row['format']} | {row['loader']} | {loads} | {delta} | {figure(row.get('perplexity_ours'))} | "
                     f"{figure(row.get('perplexity_theirs'))} | {figure(row.get('perplexity_fp'))} | {tokens} | "
                     f"{row.get('versions', '–')} |")
    return "\n".join(lines)


def latest(rows: list[dict]) -> list[dict]:
    """One row per (format, loader): the last recorded, in first-seen order."""
    kept: dict[tuple, dict] = {}
    for row in rows:
        kept[(row["format"], row["loader"])] = row
    return list(kept.values())


def write(results: Path, seconds: dict | None = None) -> None:
    rows = latest([json.loads(line) for line in results.read_text().splitlines() if line.strip()])
    block = table(rows)
    if seconds:
        block += "\n\nWall time of each part (this run): " + ", ".join(f"`{k}` {v:.0f} s" for k, v in seconds.items())
    page = PAGE.read_text() if PAGE.exists() else f"# Interop\n\n{START}\n{END}\n"
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{START}\n{block}\n{END}{tail}")
    print(f"wrote {len(rows)} rows to {PAGE}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, default=ROOT / "eval" / "interop_results.jsonl")
    parser.add_argument("--run", action="store_true", help="run both interop parts first (recording into RESULTS)")
    args = parser.parse_args(argv)
    seconds = {}
    if args.run:
        args.results.unlink(missing_ok=True)
        env = {**os.environ, "LLMQUANT_INTEROP_REPORT": str(args.results.resolve())}
        for part in PARTS:
            start = time.time()
            code = subprocess.call(["bash", part], cwd=ROOT, env=env)
            seconds[part] = time.time() - start
            if code:
                print(f"{part} failed (exit {code}); the table shows what it recorded", file=sys.stderr)
    write(args.results, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
