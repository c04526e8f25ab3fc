"""The demo's last word: FP vs quantized perplexity, their ratio, size on disk before / after, time.

    python scripts/demo_summary.py FP_PPL_JSON QUANTIZED_PPL_JSON CHECKPOINT
"""
import json
import sys
from pathlib import Path

from llmquant.models import resolve_model


def size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20


def main(fp_json: str, quantized_json: str, checkpoint: str) -> None:
    fp, quantized = (json.loads(Path(p).read_text()) for p in (fp_json, quantized_json))
    report = json.loads((Path(checkpoint) / "quantize_report.json").read_text())
    config = report["llmquant_config"]
    fp_folder = Path(resolve_model(fp["model"]))
    rows = [("", "FP", "quantized"),
            ("model", fp["model"], checkpoint),
            ("recipe", f"{fp['dtype']}", f"{config['method']} {config['bits']}-bit, group {config['group_size']}, "
                                         f"{'symmetric' if config['sym'] else 'asymmetric'}, {config['format']} format"),
            (f"perplexity ({quantized['corpus']} {quantized['split']}, {quantized['windows']} x {quantized['seqlen']})",
             f"{fp['perplexity']:.3f}", f"{quantized['perplexity']:.3f} ({quantized['perplexity'] / fp['perplexity']:.3f}x FP)"),
            ("weights on disk", f"{size_mib(fp_folder):.1f} MiB", f"{size_mib(Path(checkpoint)):.1f} MiB "
                                                                   f"({report['bits_per_weight']:.2f} bits per quantized weight)"),
            ("time", f"eval {fp['seconds']:.0f} s", f"quantize {report['seconds']:.0f} s, eval {quantized['seconds']:.0f} s")]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width)))


if __name__ == "__main__":
    main(*sys.argv[1:4])
