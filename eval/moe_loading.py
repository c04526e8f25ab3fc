"""Which loaders read llmquant's mixture-of-experts and FP8 checkpoints: llmquant's own, transformers
(through its GPTQ / compressed-tensors integrations) and GPTQModel, on tiny random-init models of
each MoE family (the tests' configs) and a dense llama for comparison.

    python eval/moe_loading.py --md eval/MOE_LOADING.md

Per family and checkpoint kind: max |logits| difference of llmquant's loaded checkpoint against the
in-memory fake-quantized model, and whether transformers (and GPTQModel, for GPTQ) loads it, with
the difference of their logits against llmquant's loader and whether their expert weights equal
llmquant's dequantized ones. Loaders that are not installed are reported as such.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import io
import sys
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import llmquant  # noqa: E402
from llmquant import QuantConfig  # noqa: E402
from llmquant.arch.moe import ExpertList  # noqa: E402

from conftest import MOE_KINDS, tiny_model  # noqa: E402  (the tests' tiny configs)

KINDS = {
    "gptq w4 g32": QuantConfig(method="gptq", bits=4, group_size=32, dtype="float32"),
    "compressed-tensors int8 W8A8": QuantConfig(method="w8a8", dtype="float32"),
    "compressed-tensors W8A8-FP8": QuantConfig(method="fp8", dtype="float32"),
    "compressed-tensors FP8 32x32 blocks": QuantConfig(method="fp8-block", group_size=32, dtype="float32"),
}
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def relative(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{((a - b).abs().max() / a.abs().max()).item():.1e}"


def experts_equal(ours, fused_gate_up_of) -> str:
    """Whether transformers' fused expert weights equal llmquant's dequantized ones (first MoE block,
    first expert's gate rows)."""
    for index, layer in enumerate(ours.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(experts, ExpertList):
            gate = getattr(experts[0], experts[0].names[0]).dequantized_weight()
            theirs = fused_gate_up_of(index)[0, : gate.shape[0]].float()
            return "equal" if torch.allclose(theirs, gate, atol=1e-6) else "DIFFERENT"
    return "–"


def quietly(fn):
    """fn() with the loaders' own logging kept out of the table's output."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return fn()
    finally:
        logging.set_verbosity(level)


def try_transformers(folder: Path, ours, reference):
    from transformers import AutoModelForCausalLM

    try:
        model = quietly(lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    except Exception as exc:  # what it says is the finding
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:110]}", "–"
    with torch.no_grad():
        logits = model(IDS).logits

    def fused(index):
        return model.model.layers[index].mlp.experts.gate_up_proj.detach()

    return f"loads; Δ vs llmquant {relative(reference, logits)}", experts_equal(ours, fused)


def try_gptqmodel(folder: Path, reference):
    if version("gptqmodel") == "not installed":
        return "not installed"
    from gptqmodel import GPTQModel

    try:
        model = quietly(lambda: GPTQModel.load(str(folder), device="cpu", dtype=torch.float32)).model
    except Exception as exc:
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:110]}"
    with torch.no_grad():
        logits = model(IDS).logits
    return f"loads; Δ vs llmquant {relative(reference, logits)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--md", default=None, help="write the table here")
    parser.add_argument("--kinds", nargs="+", default=[*MOE_KINDS, "llama"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from llmquant.models import builtin_model_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("smollm2-135m"))  # GPTQModel wants one beside
    rows, gptq_folders = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            for label, config in KINDS.items():
                qmodel = quietly(lambda: llmquant.quantize(tiny_model(kind), config, calib=CALIB, tokenizer=tokenizer,
                                                                   progress=False))
                with torch.no_grad():
                    fake = qmodel.model(IDS).logits
                folder = qmodel.save(Path(tmp) / f"{kind}-{config.method}")
                ours = llmquant.load(folder, device="cpu")
                with torch.no_grad():
                    reference = ours(IDS).logits
                transformers_result, transformers_experts = try_transformers(folder, ours, reference)
                rows.append([kind, label, relative(fake, reference), transformers_result, transformers_experts, "–"])
                if config.method == "gptq":
                    gptq_folders.append((len(rows) - 1, folder, reference))
                print(" | ".join(rows[-1]), flush=True)
        # last: GPTQModel replaces transformers' MoE classes in the whole process as it loads
        for row_index, folder, reference in gptq_folders:
            rows[row_index][5] = try_gptqmodel(folder, reference)
            print(" | ".join(rows[row_index]), flush=True)
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "compressed-tensors", "optimum",
                                                       "gptqmodel"))
    lines = ["| family | checkpoint | llmquant: Δ vs fake-quantized | transformers | its experts | GPTQModel |",
             "|---|---|---|---|---|---|", *[f"| {' | '.join(row)} |" for row in rows], "",
             f"Versions: {versions}. Δ: max |difference of logits| / max |logits|; W8A8 rows differ from the "
             "fake-quantized model by the activation rounding only the loaded layers do. \"its experts\": "
             "transformers' fused gate_up_proj of the first expert equals llmquant's dequantized gate weight."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.md:
        Path(args.md).write_text("# Loading llmquant's MoE and FP8 checkpoints\n\nMeasured on a 2-core x86_64 CPU, "
                                 "tiny random-init models.\n\nCommand: `python eval/moe_loading.py --md "
                                 f"{args.md}`\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
