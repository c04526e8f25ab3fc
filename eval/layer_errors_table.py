"""Per-layer errors of two rows of a perplexity table (eval/ppl_table.py --layer-errors --json), side
by side: by kind of linear, by block and layer by layer (llmquant.evaluation.report.compare_layer_errors, what
`llmquant report CKPT --compare OTHER` writes for two checkpoints); the command heads what it writes.
The one behind eval/rotation/layer_errors-w4pc.md:

    python eval/layer_errors_table.py eval/rotation/w4pc.json "w4pc asym gptq-ao-clip-rot" \\
        "w4pc asym gptq-ao-clip" --labels rotated "not rotated" > eval/rotation/layer_errors-w4pc.md
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from llmquant.evaluation.report import compare_layer_errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="a JSON file eval/ppl_table.py wrote with --layer-errors")
    parser.add_argument("ours", help="the config label of one row, e.g. 'w4pc asym gptq-ao-clip-rot'")
    parser.add_argument("theirs", help="the config label of the row to set beside it")
    parser.add_argument("--labels", nargs=2, default=None, help="what to call the two rows (default: their labels)")
    args = parser.parse_args(argv)
    rows = {row["config"]: row for row in json.loads(Path(args.json).read_text())}
    missing = [label for label in (args.ours, args.theirs) if label not in rows]
    if missing or any("layer_errors" not in rows[label]["report"] for label in (args.ours, args.theirs)):
        raise SystemExit(f"{args.json} has no per-layer errors of {missing or [args.ours, args.theirs]} "
                         f"(rows: {', '.join(rows)}; run eval/ppl_table.py with --layer-errors)")
    ours, theirs = (rows[label]["report"]["layer_errors"] for label in (args.ours, args.theirs))
    labels = args.labels or [args.ours, args.theirs]
    print(f"    python eval/layer_errors_table.py {shlex.join(argv or sys.argv[1:])}\n")
    print(f"Per-layer errors, {labels[0]} (`{args.ours}`) beside {labels[1]} (`{args.theirs}`), from {args.json}; "
          f"perplexity {rows[args.ours]['perplexity']:.3f} and {rows[args.theirs]['perplexity']:.3f}.\n")
    print("\n".join(compare_layer_errors(ours, theirs, *labels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
