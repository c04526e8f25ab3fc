"""README.md beside every checkpoint, as the Hugging Face hub reads a model card: YAML front matter
(base_model, library_name, tags, pipeline_tag), the recipe, the command that made it, what was
measured on it (`llmquant eval` records its results beside the checkpoint and rewrites the card),
the loaders that read its format (the versions eval/INTEROP.md tested) and how to load it with each.

A README.md that llmquant did not write (no MARKER line) is never overwritten: the card then goes to
README.llmquant.md.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .._version import __version__
from ..storage.checkpoint import write_file_atomically
from .report import REPORT_FILE, recipe_rows

CARD_FILE = "README.md"
ASIDE_FILE = "README.llmquant.md"  # where the card goes when the user has a README.md of their own
EVALS_FILE = "llmquant_evals.json"  # `llmquant eval` results on this checkpoint, newest last
MARKER = "<!-- model card written by llmquant: it rewrites this file; delete this line to keep your edits -->"

# Which loaders read each format, as eval/INTEROP.md tested them (versions from its table).
LOADERS = {
    "gptq": [("llmquant", f"llmquant {__version__}"), ("transformers + gptqmodel", "transformers 5.24, gptqmodel 7.7.0"),
             ("vLLM (GPTQ / Marlin kernels; symmetric grids)", "not run here (CUDA only)")],
    "awq": [("llmquant", f"llmquant {__version__}"), ("transformers + gptqmodel (AWQ)", "transformers 5.24, gptqmodel 7.7.0"),
            ("vLLM (AWQ kernels)", "not run here (CUDA only)")],
    "compressed-tensors": [("llmquant", f"llmquant {__version__}"),
                           ("transformers + compressed-tensors", "transformers 5.24, compressed-tensors 0.20.1"),
                           ("vLLM (compressed-tensors W8A8)", "not run here (CUDA only)")],
    "compressed-tensors-fp8": [("llmquant", f"llmquant {__version__}"),
                               ("vLLM (compressed-tensors FP8)", "not run here (CUDA only)")],
    "bitsandbytes": [("llmquant", f"llmquant {__version__}"),
                     ("transformers + bitsandbytes", "transformers 5.24, bitsandbytes 0.50.2")],
}
R4_LOADING = ("down_proj's input is rotated online (R4), which only llmquant runs: transformers 5.24 with "
              "compressed-tensors 0.20.1 loads this checkpoint without the rotation (a different function); "
              "vLLM's compressed-tensors transforms are untested with it (the llmquant README, "
              "\"Online rotation before down_proj\").")
_TRANSFORMERS_NEEDS = {"gptq": "pip install gptqmodel", "awq": "pip install gptqmodel",
                       "compressed-tensors": "pip install compressed-tensors",
                       "bitsandbytes": "pip install bitsandbytes"}
_METHOD_TAGS = {"rtn": "rtn", "gptq": "gptq", "awq": "awq", "awq+gptq": "awq", "smoothquant": "smoothquant",
                "w8a8": "int8", "nf4": "nf4", "fp4": "fp4", "fp8": "fp8", "fp8-block": "fp8"}


def _base_model(source) -> str | None:
    from ..models import BUILTIN_MODELS

    if source in BUILTIN_MODELS:
        return BUILTIN_MODELS[source].hub_id
    text = str(source or "")
    return text if text.count("/") == 1 and not text.startswith((".", "/", "~")) else None


def _bits_text(config: dict) -> str:
    if config["method"] in ("nf4", "fp4"):
        return "4-bit"
    if config["method"] in ("smoothquant", "w8a8", "fp8", "fp8-block"):
        return "8-bit"
    return f"{config['bits']}-bit"


def _python_call(report: dict) -> str:
    config = {k: v for k, v in report["llmquant_config"].items() if v is not None}
    return ("import llmquant\nfrom llmquant import QuantConfig\n\n"
            f"checkpoint = llmquant.quantize({report.get('source_model')!r}, QuantConfig(**{config!r}))\n"
            "checkpoint.save('OUT')")


def render(location: Path, report: dict, evals: list[dict]) -> str:
    config = report["llmquant_config"]
    base = _base_model(report.get("source_model"))
    tags = ["llmquant", _METHOD_TAGS.get(config["method"], config["method"]), config["format"], _bits_text(config),
            "quantized"]
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": list(dict.fromkeys(tags))}
    if base:
        front = {"base_model": base, **front}
    lines = ["---", *(f"{key}: {json.dumps(value)}" for key, value in front.items()), "---", MARKER, "",
             f"# {location.name}", "",
             f"`{report.get('source_model')}` quantized by llmquant {report.get('llmquant_version')}: "
             f"{config['method']}, {_bits_text(config)}, {config['format']} format.", "",
             "## Recipe", "", "| setting | value |", "|---|---|",
             *(f"| {name} | {value} |" for name, value in recipe_rows(report)), "",
             "## How it was made", ""]
    if report.get("command"):
        lines += ["```bash", report["command"], "```"]
    else:
        lines += ["With the Python API:", "", "```python", _python_call(report), "```"]
    lines += ["", f"Quantization took {report.get('seconds')} s; per-layer errors: report.md and quantize_report.json.",
              "", "## Measured", ""]
    if evals:
        lines += ["| what | corpus / task | setting | result | device | llmquant |", "|---|---|---|---|---|---|"]
        for e in evals:
            lines.append(f"| {e['what']} | {e['on']} | {e['setting']} | {e['result']} | {e['device']} | "
                         f"{e['llmquant']} |")
        lines += ["", "Rerun: `llmquant eval THIS_FOLDER` (perplexity) or `llmquant eval THIS_FOLDER --tasks ...`."]
    else:
        lines.append("Nothing yet: `llmquant eval THIS_FOLDER --corpus wiki --max-windows 40` measures perplexity "
                     "and records it here.")
    # R4 multiplies down_proj's input at run time: a loader that does not is left with another function
    online = bool(config.get("rotate_online"))
    loaders = LOADERS.get(config["format"], [])[:1] if online else LOADERS.get(config["format"], [])
    lines += ["", "## Loading", "", "| loader | tested with |", "|---|---|",
              *(f"| {name} | {versions} |" for name, versions in loaders), ""]
    if online:
        lines += [R4_LOADING, ""]
    lines += ["```python", "import llmquant", "", "model = llmquant.load(\"THIS_FOLDER\")  # quantized linears stay packed",
              "```"]
    if config["format"] in _TRANSFORMERS_NEEDS and not online:
        lines += ["", f"With transformers ({_TRANSFORMERS_NEEDS[config['format']]}):", "", "```python",
                  "from transformers import AutoModelForCausalLM", "",
                  "model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\")", "```"]
    return "\n".join(lines).replace("THIS_FOLDER", str(location)) + "\n"


def _users_readme(folder: Path) -> Path | None:
    readme = folder / CARD_FILE
    if readme.is_file() and not readme.is_symlink() and MARKER not in readme.read_text(errors="replace"):
        return readme
    return None


def write_model_card(folder: Path, report: dict | None = None, location: Path | None = None,
                     replacing: Path | None = None) -> Path:
    """(Re)write the card of a checkpoint folder from its quantize_report.json and recorded evals.
    location: where the checkpoint will be read from (the snippets name it; default: `folder`);
    replacing: the folder this one is about to replace, whose README.md, if the user wrote it, is
    carried over (and the card written beside it as README.llmquant.md)."""
    folder = Path(folder)
    report = report or json.loads((folder / REPORT_FILE).read_text())
    users = _users_readme(Path(replacing)) if replacing is not None and Path(replacing).is_dir() else None
    if users is not None:
        shutil.copyfile(users, folder / CARD_FILE)
    evals_file = folder / EVALS_FILE
    evals = json.loads(evals_file.read_text()) if evals_file.is_file() else []
    path = folder / ASIDE_FILE if _users_readme(folder) is not None else folder / CARD_FILE
    text = render(Path(location or folder), report, evals)
    return write_file_atomically(path, lambda tmp: tmp.write_text(text))


def record_eval(folder: Path, what: str, on: str, setting: str, result: str, device: str) -> None:
    """Add a measurement to a checkpoint llmquant wrote (a folder with quantize_report.json) and
    rewrite its card; any other folder is left as it is."""
    folder = Path(folder)
    if not (folder / REPORT_FILE).is_file() or not folder.is_dir():
        return
    evals_file = folder / EVALS_FILE
    evals = json.loads(evals_file.read_text()) if evals_file.is_file() else []
    evals.append({"what": what, "on": on, "setting": setting, "result": result, "device": device,
                  "llmquant": __version__})
    write_file_atomically(evals_file, lambda tmp: tmp.write_text(json.dumps(evals, indent=1) + "\n"))
    write_model_card(folder)
