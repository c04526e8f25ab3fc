"""Where the error went: report.md and plots beside a checkpoint, from its quantize_report.json.

Per layer: relative output error on the calibration inputs, relative weight error, bits, group
size, method; per block: mean errors and, for mixed-precision runs, the sensitivity table's
predicted loss rise of the chosen settings; totals: bits per weight and size. Plots (matplotlib,
PNG): errors by layer and by block, a histogram of the worst layer's weight before and after, and
for AWQ / SmoothQuant the per-channel activation range at the first layer's input before and
after the smoothing. Also the check that these numbers can be recomputed from the checkpoint and
the calibration data (recompute_layer_errors), and, given a second run of the same model (e.g. the
same recipe without rotation), its errors beside this run's, layer by layer (compare_layer_errors).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError

from .._version import __version__
from ..arch import arch_for
from ..storage.checkpoint import REPORT_FILES, LazyTensors
from ..data import Calibration
from ..device import peak_device_mib
from ..errors import CheckpointError, LlmquantError, ModelNotFoundError
from ..inference.loading import checkpoint_files, load, load_quantized_linear
from ..models import load_fp_model, resolve_model
from ..arch.moe import expert_coverage
from ..inference.ops import use_backend
from ..algorithms.statistics import InputGram, run_with_input_hooks

REPORT_FILE = REPORT_FILES["quantize"]
SCALING_METHODS = ("awq", "awq+gptq", "smoothquant")


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process in MiB, or None where the platform does not say (Windows
    has no `resource` module)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux KiB


def describe_mib(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f} MiB"


def build_report(config, source, calibration, seconds, peak_rss, pipeline, packed_bytes: int,
                 placement=None) -> dict:
    """quantize_report.json: what was run (with the llmquant version), where, and what it gave.
    Peak GPU memory is reported only for a run that computed on a GPU."""
    quantized = sum(r.shape[0] * r.shape[1] for r in pipeline.layers)
    report = {
        "llmquant_version": __version__,
        "llmquant_config": config.to_dict(),
        "source_model": source,
        "calibration": calibration,
        "seconds": round(seconds, 2),
        "peak_rss_mib": peak_rss,
    }
    if placement is not None:
        report["placement"] = placement.to_dict()
        if placement.device.type == "cuda":
            report["peak_gpu_mib"] = peak_device_mib(placement.device)
    report.update({
        "quantized_parameters": quantized,
        "quantized_layers_fp16_bytes": 2 * quantized,
        "quantized_layers_packed_bytes": packed_bytes,
        "bits_per_weight": 8 * packed_bytes / max(quantized, 1),
        "scaling": pipeline.scaling,
        "layers": [{**dataclasses.asdict(r), "shape": list(r.shape)} for r in pipeline.layers],
    })
    coverage = expert_coverage(pipeline.layers)
    if coverage:  # mixture-of-experts: calibration tokens each expert saw
        report["expert_tokens"] = coverage
    return report


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


@torch.no_grad()
def recompute_layer_errors(checkpoint: str | Path, source_model: str, windows: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{layer: (relative output error, relative weight error)} recomputed from the checkpoint (its
    dequantized weights, fed the calibration windows) and the source model's weights: what the
    pipeline reports for weight-only methods without scaling (RTN, GPTQ, NF4)."""
    reference, _ = load_fp_model(source_model)
    quantized = load(checkpoint)
    layers = {name: module for name, module in quantized.named_modules() if hasattr(module, "dequantized_weight")}
    grams = {name: InputGram(module.in_features) for name, module in layers.items()}
    with use_backend("reference"):  # the pipeline's fp32 numerics, not the CPU fast paths' bf16 rounding
        run_with_input_hooks(quantized, {module: grams[name].add_batch for name, module in layers.items()}, windows)
    errors = {}
    for name, module in layers.items():
        original = reference.get_submodule(name).weight.float()
        restored = module.dequantized_weight(torch.float32)
        weight_error = float(((restored - original) ** 2).sum() / (original ** 2).sum())
        errors[name] = (grams[name].relative_output_error(original, restored), weight_error)
    return errors


def _figure(value: float | None) -> str:
    return "–" if value is None else f"{value:.3e}"


def _mean(values: list) -> str:
    values = [v for v in values if v is not None]
    return _figure(sum(values) / len(values) if values else None)


def _save(fig, ax, path: Path) -> str:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_errors(layers: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(11, 4))
    kinds = defaultdict(list)
    for i, layer in enumerate(layers):
        kinds[layer["name"].rsplit(".", 1)[-1]].append((i, layer))
    # one colour per kind of layer, shared by its two series (tab10 repeats past 10 series)
    colours = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    for number, (kind, points) in enumerate(kinds.items()):
        xs = [i for i, _ in points]
        colour = colours(number)
        if points[0][1]["relative_output_error"] is not None:
            ax.scatter(xs, [l["relative_output_error"] for _, l in points], s=12, color=colour, label=f"{kind} output")
        ax.scatter(xs, [l["relative_weight_error"] for _, l in points], s=6, marker="x", alpha=0.5, color=colour,
                   label=f"{kind} weight")
    ax.set_yscale("log")
    ax.set_xlabel("layer (pipeline order)")
    ax.set_ylabel("relative squared error")
    ax.set_title("Error by layer: output (dots, on calibration inputs) and weight (crosses)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "errors_by_layer.png", dpi=110)
    plt.close(fig)
    files.append("errors_by_layer.png")

    by_block = defaultdict(list)
    for layer in layers:
        by_block[_block_of(layer["name"])].append(layer)
    blocks = sorted(b for b in by_block if b is not None)
    fig, ax = plt.subplots(figsize=(11, 3.5))
    key = "relative_output_error" if layers and layers[0]["relative_output_error"] is not None else "relative_weight_error"
    ax.bar(blocks, [sum(l[key] for l in by_block[b]) / len(by_block[b]) for b in blocks])
    ax.set_xlabel("block")
    ax.set_ylabel(f"mean {key.replace('_', ' ')}")
    ax.set_title("Error by block")
    fig.tight_layout()
    fig.savefig(out / "errors_by_block.png", dpi=110)
    plt.close(fig)
    files.append("errors_by_block.png")
    return files


@torch.no_grad()
def _plot_weight_histogram(checkpoint: Path, source_model: str, layer: dict, out: Path) -> str:
    """Reads only this layer: its weight from the source shards, its tensors from the checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = layer["name"]
    out_features, in_features = layer["shape"]
    source = LazyTensors(checkpoint_files(Path(resolve_model(source_model))))
    if f"{name}.weight" not in source:
        raise CheckpointError(f"the source model {source_model} has no tensor {name}.weight")
    original = source[f"{name}.weight"].float().flatten()
    restored = load_quantized_linear(checkpoint, name, in_features, out_features).dequantized_weight(torch.float32).flatten()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    low, high = float(original.min()), float(original.max())
    ax.hist(original.numpy(), bins=400, range=(low, high), alpha=0.6, label="full precision")
    ax.hist(restored.numpy(), bins=400, range=(low, high), alpha=0.6, label="quantized (dequantized)")
    ax.set_yscale("log")
    ax.set_title(f"{name}: weight values before and after")
    return _save(fig, ax, out / "weight_histogram.png")


@torch.no_grad()
def _input_absmax(model, layer: str, windows: torch.Tensor) -> torch.Tensor:
    seen = []
    run_with_input_hooks(model, {model.get_submodule(layer): lambda x: seen.append(x.abs().flatten(0, -2).amax(0))},
                         windows)
    return torch.stack(seen).amax(0).float()


def _plot_activation_outliers(checkpoint: Path, source_model: str, layer: str, windows, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = _input_absmax(load_fp_model(source_model)[0], layer, windows)
    after = _input_absmax(load(checkpoint), layer, windows)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(before.numpy(), lw=0.7, label=f"before (max/median {float(before.max() / before.median()):.1f})")
    ax.plot(after.numpy(), lw=0.7, label=f"after smoothing (max/median {float(after.max() / after.median()):.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("input channel")
    ax.set_ylabel("max |x| over calibration tokens")
    ax.set_title(f"Activation outliers at the input of {layer}")
    return _save(fig, ax, out / "activation_outliers.png")


def layer_errors(report: dict) -> dict[str, tuple[float | None, float | None]]:
    """{layer: (relative output error, relative weight error)} of a quantize_report.json."""
    return {layer["name"]: (layer["relative_output_error"], layer["relative_weight_error"])
            for layer in report["layers"]}


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "–" if ours is None or not theirs else f"{ours / theirs:.2f}"


def compare_layer_errors(ours: dict, theirs: dict, our_label: str, their_label: str) -> list[str]:
    """Markdown: each layer's errors in two runs of one model (layer_errors of each), by kind of
    linear, by block and layer by layer, with the ratio ours / theirs. Relative output errors compare
    across a rotation: the rotations are orthogonal, so each linear's output keeps its norm and its
    error's norm; weight errors are of different matrices (rotated, with the norms folded in)."""
    shared = [name for name in ours if name in theirs]

    def mean(run: dict, which: int, names: list[str]) -> float | None:  # which: 0 output, 1 weight error
        values = [run[name][which] for name in names if run[name][which] is not None]
        return sum(values) / len(values) if values else None

    def table(title: str, column: str, groups: dict[str, list[str]]) -> list[str]:
        lines = [f"### {title}", "", f"| {column} | output error, {our_label} | output error, {their_label} | ratio "
                 f"| weight error, {our_label} | weight error, {their_label} |", "|---|---|---|---|---|---|"]
        for group, names in groups.items():
            output = mean(ours, 0, names), mean(theirs, 0, names)
            weight = mean(ours, 1, names), mean(theirs, 1, names)
            lines.append(f"| {group} | {_figure(output[0])} | {_figure(output[1])} | {_ratio(*output)} | "
                         f"{_figure(weight[0])} | {_figure(weight[1])} |")
        return lines + [""]

    kinds, blocks = defaultdict(list), defaultdict(list)
    for name in shared:
        kinds[name.rsplit(".", 1)[-1]].append(name)
        blocks[str(_block_of(name))].append(name)
    return (table("Mean by kind", "kind", kinds) + table("Mean by block", "block", blocks)
            + table("Per layer", "layer", {name: [name] for name in shared}))


# Settings that mean something only for some methods: (config key, label, methods).
_METHOD_SETTINGS = (
    ("act_order", "act-order (desc_act)", ("gptq", "awq+gptq")), ("static_groups", "static groups", ("gptq", "awq+gptq")),
    ("true_sequential", "true-sequential", ("gptq", "awq", "awq+gptq", "smoothquant")),
    ("damp_percent", "damping", ("gptq", "awq+gptq")), ("first_token_weight", "first-token weight", ("gptq", "awq+gptq")),
    ("alpha", "alpha", ("smoothquant",)),
    ("act_quant", "activations", ("smoothquant", "w8a8")), ("observer", "observer", ("smoothquant", "w8a8")),
)


def recipe_rows(report: dict) -> list[tuple[str, str]]:
    """(setting, value) of a run's recipe, in words: what report.md and the model card show."""
    config = report["llmquant_config"]
    method = config["method"]
    rows = [("method", method), ("format", config["format"])]
    if method in ("nf4", "fp4"):
        rows += [("block size", str(config["group_size"])), ("double quantization", str(config.get("double_quant")))]
    else:
        rows += [("bits", str(config["bits"])),
                 ("group size", "per output channel" if config["group_size"] == -1 else str(config["group_size"])),
                 ("grid", "symmetric" if config["sym"] else "asymmetric")]
    rows += [(label, str(config[key])) for key, label, methods in _METHOD_SETTINGS
             if method in methods and config.get(key) not in (None, False)
             and (key != "observer" or config.get("act_quant") == "static")]
    calibration = report.get("calibration")
    if isinstance(calibration, dict):
        rows.append(("calibration", f"{calibration.get('corpus')} ({calibration.get('split')} split), "
                                    f"{calibration.get('nsamples')} x {calibration.get('seqlen')} tokens, "
                                    f"seed {calibration.get('seed')}"))
    else:
        rows.append(("calibration", str(calibration) if calibration else "none (data-free)"))
    rotation = report.get("rotation")
    if rotation:
        rows.append(("rotation", f"R1 {rotation['R1 (residual)']}, R2 {rotation['R2 (attention values)']}, "
                                 f"seed {rotation['seed']} (fused into the weights)"))
        rows.append(("online rotation (R4)", rotation.get("R4 (online)", "off")))
    mixed = report.get("mixed_precision")
    if mixed:
        rows.append(("mixed precision", f"target {mixed.get('target_bits_per_weight')} bits per weight"))
    rows.append(("bits per weight (packed)", f"{report['bits_per_weight']:.3f}"))
    rows.append(("weights stored as", str(config.get("dtype"))))
    return rows


def write_report(folder: str | Path, plots: bool = True, name: str | None = None, activations: bool = False,
                 compare_with: str | Path | None = None) -> Path:
    """report.md (+ PNGs) in the checkpoint folder, from its quantize_report.json. The weight
    histogram reads one layer only; activations=True also runs both whole models on calibration
    windows for the AWQ / SmoothQuant outlier plot (what `llmquant report` does). compare_with:
    another checkpoint folder of the same model, whose per-layer errors are set beside these."""
    folder = Path(folder)
    report = json.loads((folder / REPORT_FILE).read_text())
    layers = report["layers"]
    config = report["llmquant_config"]
    mixed = report.get("mixed_precision") or {}
    lines = [f"# Quantization report: {name or folder.name}", "",
             f"- source: `{report.get('source_model')}`; recipe: "
             + "; ".join(f"{label} {value}" for label, value in recipe_rows(report)),
             f"- quantized linears: {len(layers)}, {report['quantized_parameters']:,} weights, "
             f"**{report['bits_per_weight']:.3f} bits per weight** (packed: codes, scales, zeros, indices)",
             f"- packed size {report['quantized_layers_packed_bytes'] / 2**20:.1f} MiB vs "
             f"{report['quantized_layers_fp16_bytes'] / 2**20:.1f} MiB in fp16; checkpoint on disk "
             f"{sum(f.stat().st_size for f in folder.glob('*.safetensors')) / 2**20:.1f} MiB",
             f"- {report.get('seconds')} s, peak RSS "
             f"{describe_mib(report.get('peak_rss_mib'))}; checkpoint sha256 `{report.get('checkpoint_sha256')}`", ""]
    if mixed:
        lines += [f"Mixed precision: target {mixed['target_bits_per_weight']} bits per weight, allocated "
                  f"{mixed['allocated_bits_per_weight']:.3f}; predicted rise {mixed['predicted_delta_loss']:.4f} "
                  f"({mixed.get('metric', 'kl')}: the sum of the sensitivity table's per-group rises; candidates "
                  f"rounded by {mixed.get('sensitivity_method', 'rtn')}).", ""]
    header, lines = lines, []
    by_block = defaultdict(list)
    for layer in layers:
        by_block[_block_of(layer["name"])].append(layer)
    rise_column = " predicted rise (sensitivity) |" if mixed else ""
    lines += ["## Per block", "", "| block | mean output error | mean weight error | mean bits |" + rise_column,
              "|---|---|---|---|" + ("---|" if mixed else "")]
    for block in sorted(b for b in by_block if b is not None):
        group = by_block[block]
        outputs = [l["relative_output_error"] for l in group if l["relative_output_error"] is not None]
        weights = [l["relative_weight_error"] for l in group]
        rise = f" {sum(mixed.get('delta_loss', {}).get(l['name'], 0.0) for l in group):.4f} |" if mixed else ""
        lines.append(f"| {block} | {_mean(outputs)} | {_mean(weights)} | "
                     f"{sum(l['bits'] for l in group) / len(group):.2f} |" + rise)
    lines += ["", "## Per layer", "", "| layer | shape | bits | group | output error | weight error |", "|---|---|---|---|---|---|"]
    for layer in layers:
        lines.append(f"| {layer['name']} | {layer['shape'][0]}x{layer['shape'][1]} | {layer['bits']} | "
                     f"{layer['group_size']} | {_figure(layer['relative_output_error'])} | "
                     f"{_figure(layer['relative_weight_error'])} |")
    figures = []
    if plots and all(l["relative_weight_error"] is not None for l in layers):
        figures += _plot_errors(layers, folder)
        source = report.get("source_model")
        worst = max(layers, key=lambda l: l["relative_output_error"] or l["relative_weight_error"])
        try:
            if not source:  # a model quantized in memory from an object with no path
                raise ModelNotFoundError("no source model was recorded")
            figures.append(_plot_weight_histogram(folder, source, worst, folder))
            calibration = report.get("calibration") or {}
            if activations and config["method"] in SCALING_METHODS and "corpus" in calibration:
                model, tokenizer = load_fp_model(source)
                arch = arch_for(model.config)
                windows = Calibration(calibration["corpus"], min(4, calibration["nsamples"]), calibration["seqlen"],
                                      calibration["seed"], calibration.get("split")).windows(
                    tokenizer, tokenizer.bos_token_id if arch.bos_per_window else None)
                figures.append(_plot_activation_outliers(folder, source, layers[0]["name"], windows, folder))
        # The source model may be gone, moved, unreadable (transformers' safetensors reader raises its
        # own error type) or its calibration corpus uninstalled: the rest of the report stands. Anything
        # else is a fault in the plotting and propagates.
        except (LlmquantError, OSError, SafetensorError) as exc:
            header += [f"(plots needing the source model were skipped: {type(exc).__name__}: {exc})", ""]
    if compare_with is not None:
        other = Path(compare_with)
        if not (other / REPORT_FILE).is_file():
            raise CheckpointError(f"{other} has no {REPORT_FILE}: not a checkpoint llmquant wrote")
        other_report = json.loads((other / REPORT_FILE).read_text())
        lines += ["", f"## Beside `{other.name}`", "",
                  f"Its recipe: {'; '.join(f'{label} {value}' for label, value in recipe_rows(other_report))}.", ""]
        lines += compare_layer_errors(layer_errors(report), layer_errors(other_report), "this run", other.name)
    lines = header + [f"![{f}]({f})" for f in figures] + [""] + lines
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
