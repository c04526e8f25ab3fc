"""Command line: `llmquant quantize | eval | generate | info | finetune | qat | models | ...`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ConfigError, LlmquantError


def _add_device_options(p, offload: bool = False) -> None:
    from .device import COMPUTE_DTYPES, DEVICE_CHOICES

    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help=f"where to compute: {' | '.join(DEVICE_CHOICES)} (default auto: CUDA when present)")
    p.add_argument("--compute-dtype", default="auto", choices=("auto", *COMPUTE_DTYPES),
                   help="floating-point dtype of the computation (default auto: float32 on the CPU, "
                        "bfloat16 / float16 on a GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads; default torch's); more than the free cores slows it down")
    if offload:
        p.add_argument("--offload-activations", default="auto", choices=("auto", "never", "always"),
                       help="keep calibration activations in CPU memory instead of on the GPU: auto (when they "
                            "do not fit beside a block), never, always")


class _Renamed(argparse.Action):
    """An option that was renamed: giving it is an error naming its new name, so that the old one
    is never taken silently for something else."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new}")


def _add_quantize(p):
    from .algorithms import ALGORITHMS
    from .config import STORAGE_DTYPES
    from .models import DEFAULT_MODEL

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"built-in name, local Hugging Face folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--method", default="rtn", choices=sorted(ALGORITHMS))
    p.add_argument("--bits", type=int, default=None,
                   help="2, 3, 4 or 8 (gptq format), 4 (awq); default 4; 8 for w8a8 / smoothquant")
    p.add_argument("--group-size", "--blocksize", dest="group_size", type=int, default=None,
                   help="columns per scale; -1 = per output channel (default 128; -1 for w8a8 / smoothquant); "
                        "for nf4 / fp4 the blocksize: values per absmax (default 64)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (zero point per group)")
    p.add_argument("--clip-search", action="store_true",
                   help="per group, shrink the range where that lowers the weight error (MSE clipping)")
    p.add_argument("--format", default=None,
                   help="checkpoint format: gptq (2, 3, 4 or 8 bits, act-order) or awq (4-bit GEMM layout) for weight-only "
                        "methods (default gptq); compressed-tensors for w8a8 / smoothquant, bitsandbytes for "
                        "nf4 / fp4 (their defaults)")
    p.add_argument("--dtype", default="float16", choices=STORAGE_DTYPES, help="storage dtype of unquantized tensors")
    p.add_argument("--exclude", nargs="*", default=[], metavar="NAME", help="linears to keep in floating point")
    p.add_argument("--calib", default=None, metavar="CORPUS",
                   help="calibration corpus (default wiki for methods that need data; optional for rtn, where it "
                        "adds per-layer errors): wiki | bbc | shakespeare | a text/parquet/json file | hf:NAME[:CONFIG]")
    p.add_argument("--calib-split", default=None, choices=["train", "validation", "test", "all"],
                   help="default: train for wiki / bbc / shakespeare / hf:, all for a file (calibrate on train "
                        "and evaluate on test to keep one file's evaluation text apart)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--paper-calibration", action="store_true", help="128 windows x 2048 tokens, as the GPTQ paper")
    p.add_argument("--seed", type=int, default=0)
    gptq = p.add_argument_group("gptq")
    gptq.add_argument("--act-order", action="store_true", help="columns by descending Hessian diagonal (desc_act)")
    gptq.add_argument("--static-groups", action="store_true", help="group scales fixed before the sweep")
    gptq.add_argument("--damp", type=float, default=0.01, help="damping, fraction of the mean Hessian diagonal")
    gptq.add_argument("--first-token-weight", type=float, default=1.0, metavar="W",
                      help="count each calibration window's first token (the attention sink) W times in the "
                      "Hessian (default 1: GPTQ as published)")
    gptq.add_argument("--gptq-block-size", type=int, default=128,
                      help="columns per lazy batch (default 128; not NF4's block size, which is --group-size)")
    gptq.add_argument("--block-size", action=_Renamed, new="--gptq-block-size (GPTQ's columns per lazy batch); "
                      "the NF4 / FP4 block size is --group-size (alias --blocksize)")
    awq = p.add_argument_group("awq (methods awq, awq+gptq)")
    awq.add_argument("--awq-grid", type=int, default=20, help="points of the scaling-ratio search (default 20)")
    awq.add_argument("--awq-duo", action="store_true",
                     help="scales mean|x|^a / mean|w|^(1-a) (AutoAWQ's duo scaling) instead of mean|x|^a")
    awq.add_argument("--no-awq-clip", dest="awq_clip", action="store_false", help="skip the clipping-range search")
    w8a8 = p.add_argument_group("w8a8 / smoothquant (int8 weights and activations)")
    w8a8.add_argument("--alpha", default="0.5", help="SmoothQuant migration strength in [0, 1], or 'auto' (default 0.5)")
    w8a8.add_argument("--act-quant", default="dynamic", choices=["dynamic", "static"],
                      help="activations per token at run time (dynamic) or per tensor from calibration (static)")
    w8a8.add_argument("--observer", default="minmax", choices=["minmax", "percentile", "mse", "kl"],
                      help="how a static activation scale is chosen (default minmax)")
    w8a8.add_argument("--percentile", type=float, default=99.99, help="for --observer percentile (default 99.99)")
    codebook = p.add_argument_group("nf4 / fp4 (bitsandbytes 4-bit, data-free)")
    codebook.add_argument("--double-quant", action="store_true",
                          help="store the per-block absmax constants in 8 bits (blocks of 256), as QLoRA does")
    seq = p.add_mutually_exclusive_group()
    seq.add_argument("--true-sequential", dest="true_sequential", action="store_true", default=True,
                     help="quantize q/k/v, o, gate/up, down in turn, each on inputs through the quantized ones (default)")
    seq.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                     help="one pass of statistics per block")
    p.add_argument("--moe-calibrate-all-experts", action="store_true",
                   help="mixture-of-experts models: run every calibration token through every expert for its "
                        "statistics (the output still follows the router)")
    p.add_argument("--rotate", choices=["hadamard"], default=None,
                   help="fuse randomized Hadamard rotations into the weights before rounding (QuaRot / SpinQuant "
                        "style: the same function, weights that round better; llama, mistral, qwen2 / qwen3)")
    p.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotations' random signs")
    p.add_argument("--rotate-online", choices=["down_proj"], action="append", default=None,
                   help="with --rotate: also rotate down_proj's input at run time (R4: a Hadamard matrix folded "
                        "into its weight and applied to its input in every forward), for rounded activations "
                        "(W8A8); off by default")
    mixed = p.add_argument_group("mixed precision (gptq format)")
    mixed.add_argument("--target-bpw", type=float, default=None, metavar="BITS",
                       help="choose bits and group size per layer from a sensitivity table so that the quantized "
                            "linears average at most BITS bits per weight (packed size, scales included)")
    mixed.add_argument("--sensitivity", metavar="TABLE.json",
                       help="a table from `llmquant sensitivity`; without one it is measured first on --calib")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_device_options(p, offload=True)


def _add_sensitivity(p):
    from .models import DEFAULT_MODEL
    from .quantization.sensitivity import SENSITIVITY_METHODS

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--calib", default="wiki", metavar="CORPUS")
    p.add_argument("--nsamples", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4, 8])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128, -1])
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=False)
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (default)")
    p.add_argument("--method", default="rtn", choices=SENSITIVITY_METHODS,
                   help="what rounds the candidates: rtn (default) or gptq, as the checkpoint will be quantized")
    p.add_argument("--act-order", action="store_true", help="gptq: columns by descending Hessian diagonal")
    p.add_argument("--statistics-nsamples", type=int, default=32,
                   help="gptq: calibration windows for the Hessians, drawn apart from the measured ones (default 32)")
    p.add_argument("--statistics-seqlen", type=int, default=512, help="gptq: tokens per Hessian window (default 512)")
    p.add_argument("--out", required=True, help="the table, JSON")
    p.add_argument("--overwrite", action="store_true")
    _add_device_options(p)


def _add_report(p):
    p.add_argument("checkpoint")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--compare", default=None, metavar="CHECKPOINT",
                   help="another checkpoint of the same model (e.g. quantized without --rotate): its per-layer "
                        "errors beside this one's, by kind, by block and per layer")


def _add_eval(p):
    p.add_argument("model", help="built-in name, checkpoint / model folder, or hub id")
    p.add_argument("--corpus", default="wiki", help="wiki | bbc | shakespeare | a text/parquet/json file | hf:NAME[:CONFIG]")
    p.add_argument("--split", default=None, choices=["train", "validation", "test", "all"],
                   help="default: test for wiki / bbc / shakespeare / hf:, all for a text / parquet / json file")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None)
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_true", default=None, help="start every window with BOS")
    bos.add_argument("--no-bos", dest="bos", action="store_false", help="never add BOS")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (llmquant finetune) to apply to the model")
    p.add_argument("--tasks", default=None, type=lambda text: [t for t in text.split(",") if t],
                   help="comma-separated lm-eval tasks to run instead of perplexity (built in: "
                        "llmquant_wiki_last_word; needs pip install 'llmquant[eval]')")
    p.add_argument("--limit", type=int, default=None, help="with --tasks: at most this many examples per task")
    p.add_argument("--batch-size", type=int, default=8, help="with --tasks: requests per forward pass")
    p.add_argument("--include-path", action="append", default=None, metavar="FOLDER",
                   help="with --tasks: a folder of your own lm-eval task YAMLs (repeatable)")
    _add_device_options(p)


def _add_generate(p):
    p.add_argument("model", help="checkpoint folder, built-in name or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (llmquant finetune) to apply to the model")
    p.add_argument("--compile", action="store_true",
                   help="run each decode step as one compiled graph (static KV cache + torch.compile); the first "
                        "step compiles (tens of seconds or more; the time is printed); "
                        "off by default since it pays back only over long generations (eval/CPU.md)")
    _add_device_options(p)


def _add_info(p):
    p.add_argument("checkpoint", help="checkpoint folder")


def _add_finetune(p):
    p.add_argument("model", help="quantized checkpoint folder (bitsandbytes NF4 / FP4, gptq or awq)")
    p.add_argument("--lora-r", type=int, default=16, help="adapter rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32, help="adapter scale numerator, alpha / r (default 32)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", nargs="*", default=None, metavar="NAME",
                   help="short names of the linears to adapt (default: every quantized linear)")
    p.add_argument("--corpus", default="wiki", help="training text: its train split (held-out: validation)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for the before / after loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="adapter folder (peft format, written atomically)")
    p.add_argument("--merge-out", default=None, metavar="DIR",
                   help="also fold the adapters into the NF4 / FP4 weights and write a new checkpoint here")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    _add_device_options(p)


def _add_qat(p):
    from .models import DEFAULT_MODEL

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"built-in name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=-1, help="columns per scale; -1 = per output channel (default)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=False, help="symmetric grid")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (default)")
    p.add_argument("--learn-scales", choices=["lsq"], default=None, help="learn the step sizes (LSQ)")
    p.add_argument("--init", choices=["rtn", "gptq"], default="rtn",
                   help="PTQ starting point (gptq: with act-order, calibrated on wiki)")
    p.add_argument("--act-quant", choices=["per-token", "per-tensor"], default=None,
                   help="also fake-quantize activations to int8 while training (the checkpoint is weight-only)")
    p.add_argument("--format", default="gptq", choices=["gptq", "awq"])
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of the latent weights")
    p.add_argument("--scale-lr", type=float, default=None, help="learning rate of the LSQ step sizes (default --lr)")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    p.add_argument("--overwrite", action="store_true")
    _add_device_options(p)


def _add_export_gguf(p):
    from .gguf_export import TYPES
    from .models import DEFAULT_MODEL

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--type", default="q8_0", choices=sorted(TYPES))
    p.add_argument("--imatrix", metavar="CORPUS", help="weight the 4-bit block fits by an importance matrix "
                   "(mean squared activations per input channel) from this corpus's train split")
    p.add_argument("--imatrix-samples", type=int, default=32, help="windows of 512 tokens for --imatrix")
    p.add_argument("--out", required=True, help="output .gguf file")
    p.add_argument("--overwrite", action="store_true")


def _alpha(text: str):
    from .errors import ConfigError

    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--alpha must be a number in [0, 1] or 'auto', got {text!r}") from None


# The least value of each integer option, for every subcommand that has it. Options that a settings
# class (QuantConfig, TrainingSettings, LoraSettings, QATSettings) checks on construction, which the
# commands do before loading anything, are left to it.
_AT_LEAST = {"max_new_tokens": 1, "threads": 1, "nsamples": 1, "seqlen": 2, "max_windows": 1, "warmup_steps": 0,
             "imatrix_samples": 1, "statistics_nsamples": 1, "statistics_seqlen": 2, "limit": 1, "batch_size": 1}
# Options naming a corpus, and the option naming its split where there is one.
_CORPORA = {"calib": "calib_split", "corpus": "split", "imatrix": None}
# Outputs that are one file: (subcommand, option) -> whether its missing folders are created.
_FILE_OUTPUTS = {("sensitivity", "out"): False, ("export-gguf", "out"): False, ("eval", "json"): True}
# Outputs that are folders, created with their missing parents.
_FOLDER_OUTPUTS = {("quantize", "out"), ("finetune", "out"), ("finetune", "merge_out"), ("qat", "out")}


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_writable_location(path: Path, option: str) -> None:
    """Refuse an output whose nearest existing folder is a file or cannot be written in."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{option} {path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write in {ancestor} (permission denied)")


def _check_arguments(args) -> None:
    """Refuse, before any model loads or anything is written, every argument that cannot work: a
    number out of range, a corpus, table or adapter that is not there, an output that cannot be
    written. The error names the option and what is wrong with it."""
    import math

    from .data import check_corpus
    from .errors import DataError

    for dest, least in _AT_LEAST.items():
        value = getattr(args, dest, None)
        if value is not None and value < least:
            raise ConfigError(f"{_option(dest)} must be at least {least}, got {value}")
    for size in getattr(args, "group_sizes", None) or ():
        if size != -1 and size < 1:
            raise ConfigError(f"--group-sizes must each be a positive integer or -1, got {size}")
    if getattr(args, "prompt", None) == "" and not args.chat:
        raise ConfigError("--prompt is empty: give the text to continue")
    if getattr(args, "target_bpw", None) is not None:
        from .quantization.sensitivity import DEFAULT_BITS

        if not (math.isfinite(args.target_bpw) and args.target_bpw > 0):
            raise ConfigError(f"--target-bpw must be a positive number of bits per weight, got {args.target_bpw}")
        if args.sensitivity is None and args.target_bpw <= min(DEFAULT_BITS):
            raise ConfigError(f"--target-bpw {args.target_bpw} cannot be met: without --sensitivity the candidates "
                              f"measured are {', '.join(map(str, DEFAULT_BITS))}-bit, and each costs more than its "
                              "bits per weight (its scales are stored too)")

    for dest, split in _CORPORA.items():
        corpus = getattr(args, dest, None)
        if isinstance(corpus, str):
            try:
                check_corpus(corpus, getattr(args, split, None) if split else None)
            except DataError as exc:
                raise DataError(f"{_option(dest)}: {exc}") from None
    table = getattr(args, "sensitivity", None)
    if isinstance(table, str) and not Path(table).expanduser().is_file():
        raise ConfigError(f"--sensitivity: no such file: {table}")
    if getattr(args, "adapter", None) is not None:
        from .training.qlora import check_adapter_folder

        check_adapter_folder(args.adapter)

    for (command, dest), makes_folders in _FILE_OUTPUTS.items():
        if command == args.command and getattr(args, dest) is not None:
            target = Path(getattr(args, dest)).expanduser()
            if target.is_dir():
                raise ConfigError(f"{_option(dest)} {target} is a folder: give a file name")
            if not makes_folders and not target.parent.is_dir():
                raise ConfigError(f"{_option(dest)} {target}: output folder {target.parent} does not exist")
            _check_writable_location(target, _option(dest))
    for command, dest in _FOLDER_OUTPUTS:
        if command == args.command and getattr(args, dest) is not None:
            _check_writable_location(Path(getattr(args, dest)).expanduser(), _option(dest))


def _placement_checked(args):
    """Refuse a device or dtype that cannot be used before anything loads or is written."""
    from .device import resolve_compute_dtype, resolve_device

    resolve_compute_dtype(args.compute_dtype, resolve_device(args.device))


def cmd_quantize(args) -> int:
    from .config import QuantConfig
    from .data import Calibration
    from .quantization.planning import check_request
    from .evaluation.report import describe_mib
    from .quantization.streaming import stream_to_disk

    config = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                         format=args.format, dtype=args.dtype, modules_to_not_convert=tuple(args.exclude),
                         true_sequential=args.true_sequential, act_order=args.act_order,
                         static_groups=args.static_groups, damp=args.damp, gptq_block_size=args.gptq_block_size,
                         first_token_weight=args.first_token_weight,
                         clip_search=args.clip_search, awq_grid=args.awq_grid, awq_duo_scaling=args.awq_duo,
                         awq_clip=args.awq_clip, alpha=_alpha(args.alpha), act_quant=args.act_quant,
                         observer=args.observer, percentile=args.percentile, double_quant=args.double_quant,
                         moe_calibrate_all_experts=args.moe_calibrate_all_experts, rotate=args.rotate,
                         rotate_seed=args.rotate_seed, rotate_online=tuple(args.rotate_online or ()))
    nsamples, seqlen = (128, 2048) if args.paper_calibration else (args.nsamples, args.seqlen)
    calib = Calibration(args.calib, nsamples, seqlen, args.seed, args.calib_split) if args.calib is not None else None
    # Everything that can be refused is refused before the model loads (and before a sensitivity measurement).
    request = check_request(config, calib, out=args.out, overwrite=args.overwrite, streamed=True, device=args.device,
                            compute_dtype=args.compute_dtype, offload_activations=args.offload_activations,
                            default_calib=Calibration(Calibration.corpus, nsamples, seqlen, args.seed, args.calib_split))
    mixed = None
    if args.target_bpw is not None:
        config, mixed = _mixed_precision(args, config, request.calib or Calibration(Calibration.corpus, nsamples,
                                                                                    seqlen, args.seed))
    # built-in names, folders and hub ids (their local snapshot) alike: one block in memory at a time,
    # one shard per block, resumable after a kill
    extra = {"command": _command_line(args), **({"mixed_precision": mixed} if mixed else {})}
    out, report = stream_to_disk(args.model, config, request, report_extra=extra)
    gpu = f", peak GPU {report['peak_gpu_mib']:.0f} MiB" if report.get("peak_gpu_mib") is not None else ""
    print(f"wrote {out}: {len(report['layers'])} layers, {report['bits_per_weight']:.3f} bits per quantized weight, "
          f"{report['quantized_layers_packed_bytes'] / 2**20:.1f} MiB packed vs "
          f"{report['quantized_layers_fp16_bytes'] / 2**20:.1f} MiB fp16, {report['seconds']:.1f} s, "
          f"peak RSS {describe_mib(report['peak_rss_mib'])}{gpu}")
    errors = sorted((layer["relative_output_error"], layer["name"]) for layer in report["layers"]
                    if layer["relative_output_error"] is not None)
    if errors:
        print(f"relative output error per layer: median {errors[len(errors) // 2][0]:.4g}, "
              f"worst {errors[-1][0]:.4g} ({errors[-1][1]})")
    if report["scaling"]:
        key = "ratio" if "ratio" in report["scaling"][0] else "alpha"
        values = [r[key] for r in report["scaling"]]
        print(f"scaling: {len(values)} groups, {key} {min(values, key=float)}..{max(values, key=float)}")
    return 0


def _mixed_precision(args, config, calib):
    """The config with per-layer bits / group sizes chosen for --target-bpw. Without a table, the
    sensitivity is measured on 2 x 256 tokens of `calib`'s corpus, rounded as the run will round,
    with GPTQ's Hessians from windows of `calib`'s size drawn apart (seed + 1)."""
    from collections import Counter
    from dataclasses import replace

    from .quantization.allocation import allocate
    from .data import Calibration
    from .errors import ConfigError
    from .quantization.sensitivity import SensitivityTable, rounding_for, sensitivity_of

    if config.format != "gptq":
        raise ConfigError("--target-bpw writes per-layer overrides in the gptq format; use --format gptq")
    if args.sensitivity:
        table = SensitivityTable.load(args.sensitivity)
    else:
        print(f"measuring sensitivity on {calib.corpus} ({rounding_for(config).name}, 2 windows x 256 tokens; "
              "pass --sensitivity to reuse a table)")
        table = sensitivity_of(args.model, Calibration(calib.corpus, 2, 256, calib.seed, calib.split), sym=config.sym,
                               config=config, statistics_calib=replace(calib, seed=calib.seed + 1),
                               device=args.device, compute_dtype=args.compute_dtype)
    if table.sym != config.sym:
        raise ConfigError(f"the sensitivity table was measured on a {'symmetric' if table.sym else 'asymmetric'} "
                          f"grid; quantize with {'--sym' if table.sym else '--asym'} to match")
    allocation = allocate(table, args.target_bpw)
    counts = Counter(allocation.choices.values())
    print(f"mixed precision for {args.target_bpw} bits per weight: {allocation.bits_per_weight:.3f} allocated, "
          f"predicted rise ({allocation.metric}) {allocation.predicted_delta_loss:.4f}; "
          + ", ".join(f"{n} x w{b}g{g}" for (b, g), n in sorted(counts.items())))
    overrides = {name: {"bits": b, "group_size": g} for name, (b, g) in allocation.choices.items()}
    summary = {"target_bits_per_weight": args.target_bpw, "allocated_bits_per_weight": allocation.bits_per_weight,
               "metric": allocation.metric, "predicted_delta_loss": allocation.predicted_delta_loss,
               "delta_loss": allocation.delta_loss,
               "sensitivity_method": table.method, "sensitivity_calibration": table.calibration}
    return replace(config, layer_overrides=overrides), summary


def cmd_sensitivity(args) -> int:
    from .storage.checkpoint import check_output_file, write_file_atomically
    from .config import QuantConfig
    from .data import Calibration
    from .quantization.sensitivity import SensitivityTable, sensitivity_of

    out = check_output_file(args.out, args.overwrite, SensitivityTable.is_table, "a sensitivity table")
    _placement_checked(args)
    config = QuantConfig(method=args.method, act_order=args.act_order, sym=args.sym)
    statistics = Calibration(args.calib, args.statistics_nsamples, args.statistics_seqlen, args.seed + 1)
    table = sensitivity_of(args.model, Calibration(args.calib, args.nsamples, args.seqlen, args.seed), args.bits,
                           args.group_sizes, args.sym, config=config, statistics_calib=statistics,
                           device=args.device, compute_dtype=args.compute_dtype)
    write_file_atomically(out, table.save)
    worst = sorted(table.rows, key=lambda r: -r["kl"])[:3]
    print(f"wrote {out}: {len(table.rows)} measurements, base loss {table.base_loss:.4f}; most sensitive: "
          + "; ".join(f"{r['modules'][0]} w{r['bits']}g{r['group_size']} KL {r['kl']:.4f}" for r in worst))
    return 0


def cmd_report(args) -> int:
    from .evaluation.report import REPORT_FILE
    from .errors import CheckpointError
    from .evaluation.report import write_report

    folder = Path(args.checkpoint).expanduser()
    if not (folder / REPORT_FILE).is_file():
        raise CheckpointError(f"{folder} has no {REPORT_FILE}: not a checkpoint llmquant wrote")
    path = write_report(folder, plots=args.plots, activations=args.plots, compare_with=args.compare and Path(args.compare).expanduser())
    print(f"wrote {path}")
    return 0


def cmd_eval(args) -> int:
    from .api import evaluate

    _placement_checked(args)
    if args.json:
        Path(args.json).expanduser().parent.mkdir(parents=True, exist_ok=True)
    if args.tasks is not None:
        return _eval_tasks(args)
    model = _model_with_adapter(args.model, args.adapter, args.device, args.compute_dtype)
    result = evaluate(model[0] if model else args.model, args.corpus, args.split, args.seqlen, args.max_windows,
                      args.bos, tokenizer=model[1] if model else None, device=args.device, dtype=args.compute_dtype)
    if args.adapter:
        result["adapter"] = args.adapter
    print(f"{args.model}: perplexity {result['perplexity']:.4f}  ({result['windows']} windows x {result['seqlen']} tokens, "
          f"{result['predicted_tokens']} predicted, corpus {result['corpus']}, split {result['split']}, "
          f"bos={result['bos']}, {result['device']} {result['dtype']})")
    if args.json:
        Path(args.json).expanduser().write_text(json.dumps(result, indent=2) + "\n")
    if not args.adapter:
        _record_on_checkpoint(args.model, "perplexity", f"{result['corpus']} ({result['split']})",
                              f"{result['windows']} x {result['seqlen']} tokens, bos={result['bos']}",
                              f"{result['perplexity']:.4f}", result)
    return 0


def _record_on_checkpoint(model: str, what: str, on: str, setting: str, value: str, result: dict) -> None:
    """A measurement of a checkpoint llmquant wrote goes into its model card (others are left alone)."""
    from .evaluation.model_card import record_eval

    if Path(model).expanduser().is_dir():
        record_eval(Path(model).expanduser(), what, on, setting, value, f"{result['device']} {result['dtype']}")


def _eval_tasks(args) -> int:
    from .api import evaluate_tasks
    from .evaluation.task_accuracy import task_manager

    manager = task_manager(args.tasks, args.include_path)  # unknown tasks are refused before the model loads
    model = _model_with_adapter(args.model, args.adapter, args.device, args.compute_dtype)
    result = evaluate_tasks(model[0] if model else args.model, args.tasks, args.limit, args.batch_size, args.bos,
                            tokenizer=model[1] if model else None, device=args.device, dtype=args.compute_dtype,
                            manager=manager)
    if args.adapter:
        result["adapter"] = args.adapter
    for task, metrics in result["tasks"].items():
        print(f"{task}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
              + f"  ({result['samples'][task]['effective']} examples, lm-eval {result['lm_eval']}, "
                f"{result['device']} {result['dtype']})")
    if args.json:
        Path(args.json).expanduser().write_text(json.dumps(result, indent=2) + "\n")
    if not args.adapter:
        for task, metrics in result["tasks"].items():
            _record_on_checkpoint(args.model, "task accuracy (lm-eval)", task,
                                  f"{result['samples'][task]['effective']} examples, 0-shot",
                                  ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()), result)
    return 0


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from .api import load_with_tokenizer
    from .inference.generation import timed_generate

    _placement_checked(args)
    model, tokenizer = (_model_with_adapter(args.model, args.adapter, args.device, args.compute_dtype)
                        or load_with_tokenizer(args.model, args.device, args.compute_dtype))
    if args.chat:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    inputs = {key: value.to(next(model.parameters()).device) for key, value in inputs.items()}
    # tokens are printed as they come (the prompt too, unless it is a chat template)
    printer = TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=True)
    _, speed = timed_generate(model, inputs, args.max_new_tokens, printer, compile_decode=args.compile)
    threads = torch.get_num_threads()
    print(f"{speed.describe()} ({threads} thread{'' if threads == 1 else 's'})", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .evaluation.report import REPORT_FILE
    from .inference.cpu import describe_cpu, describe_head, path_table, prepare_for_cpu, prepare_output_head, summary
    from .inference.loading import load

    folder = Path(args.checkpoint).expanduser()
    model = load(folder, device="cpu")  # the paths listed are the CPU's
    qc = getattr(model.config, "quantization_config", None)
    print(f"{folder}: {model.config.model_type}; "
          f"{sum(f.stat().st_size for f in folder.glob('*.safetensors')) / 2**20:.1f} MiB of weights on disk "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters kept in floating point: "
          "embeddings, norms, head, unquantized layers)")
    if qc is None:
        print("not quantized")
        return 0
    keys = ("quant_method", "bits", "group_size", "sym", "desc_act", "zero_point", "version", "format",
            "bnb_4bit_quant_type", "bnb_4bit_use_double_quant")
    print("quantization_config: " + ", ".join(f"{k}={qc[k]}" for k in keys if k in qc))
    if (folder / REPORT_FILE).is_file():
        print(f"quantized by llmquant ({REPORT_FILE} beside it)")
    layers = prepare_for_cpu(model)  # already converted at load: this only collects the paths
    print(f"CPU: {describe_cpu()}; paths: {summary(layers)}")
    print(path_table(layers))
    print(f"output head: {describe_head(prepare_output_head(model))}")
    return 0


def _model_with_adapter(model_path, adapter, device="auto", compute_dtype="auto"):
    """(peft model, tokenizer) for a checkpoint with a LoRA adapter, or None without one."""
    if adapter is None:
        return None
    from .api import load_with_tokenizer
    from .training.qlora import load_adapter

    model, tokenizer = load_with_tokenizer(model_path, device, compute_dtype)
    return load_adapter(model, adapter), tokenizer


def _training_summary(report: dict) -> str:
    return (f"{report['training']['steps']} steps in {report['seconds']:.0f} s; held-out loss "
            f"{report['heldout_loss_before']:.4f} -> {report['heldout_loss_after']:.4f} (perplexity "
            f"{report['heldout_perplexity_before']:.3f} -> {report['heldout_perplexity_after']:.3f})")


def cmd_finetune(args) -> int:
    from .storage.checkpoint import check_output_path
    from .training.qlora import LoraSettings, TrainingSettings, finetune, merge_into_checkpoint

    check_output_path(args.out, args.overwrite)
    if args.merge_out:
        check_output_path(args.merge_out, args.overwrite)
    _placement_checked(args)
    lora = LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout, tuple(args.targets) if args.targets else None)
    training = TrainingSettings(args.corpus, args.steps, args.batch_size, args.seqlen, args.lr, args.warmup_steps,
                                eval_windows=args.eval_windows, seed=args.seed)
    result = finetune(args.model, lora, training, device=args.device, compute_dtype=args.compute_dtype)
    out = result.save_adapter(args.out, overwrite=args.overwrite)
    report = result.report()
    print(f"wrote {out}: {report['trainable_parameters']} trainable parameters, {_training_summary(report)}")
    if args.merge_out:
        merged = merge_into_checkpoint(result.model, result.tokenizer, args.merge_out, overwrite=args.overwrite)
        print(f"wrote {merged}: adapters folded into the weights and re-quantized")
    return 0


def cmd_qat(args) -> int:
    from .storage.checkpoint import check_output_path
    from .config import QuantConfig
    from .training.qat import QATSettings, qat
    from .training.loop import TrainingSettings

    check_output_path(args.out, args.overwrite)
    _placement_checked(args)
    config = QuantConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, format=args.format)
    settings = QATSettings(args.learn_scales, args.init, args.scale_lr, args.act_quant)
    training = TrainingSettings(args.corpus, args.steps, args.batch_size, args.seqlen, args.lr, args.warmup_steps,
                                eval_windows=args.eval_windows, seed=args.seed)
    result = qat(args.model, config, settings, training, device=args.device, compute_dtype=args.compute_dtype)
    out = result.save(args.out, overwrite=args.overwrite)
    report = result.report()
    print(f"wrote {out}: {_training_summary(report)}")
    return 0


def cmd_export_gguf(args) -> int:
    from .data import Calibration
    from .gguf_export import export_gguf

    calib = Calibration(args.imatrix, args.imatrix_samples, 512) if args.imatrix else None
    out = export_gguf(args.model, args.out, args.type, calib=calib, overwrite=args.overwrite)
    print(f"wrote {out}: {out.stat().st_size / 2**20:.1f} MiB")
    return 0


def cmd_models(args) -> int:
    from .arch import ARCHITECTURES, supported_model_types
    from .arch.derived import survey
    from .models import BUILTIN_MODELS

    for model in BUILTIN_MODELS.values():
        print(f"{model.name:16s} {model.description}  [pip: {model.pip_name}]")
    print(f"architectures: {', '.join(supported_model_types())}")
    print("declared maps (llmquant/arch):")
    for arch in ARCHITECTURES:
        kind = "mixture-of-experts" if arch.experts is not None else "dense"
        print(f"  {arch.name:12s} {kind:18s} model types {', '.join(arch.model_types)}")
    print("derived from the module tree (checked now on a tiny random model of each family; any other family "
          "whose decoder follows the usual layout is derived the same way when it is quantized):")
    for model_type, arch, reason in survey():
        if arch is not None:
            steps = " | ".join(", ".join(name.rpartition(".")[2] for name in step) for step in arch.sequential)
            print(f"  {model_type:12s} derived: {arch.blocks} [{steps}]")
        else:
            print(f"  {model_type:12s} refused: {reason}")
    return 0


# Each command's help line, and the function that adds its options (which import torch for their choices).
COMMAND_HELP = {
    "quantize": "quantize a model and write a checkpoint folder",
    "sensitivity": "loss rise on calibration data when only one group of linears is quantized, per candidate "
                   "bits / group size",
    "report": "write report.md and its plots beside a checkpoint (from quantize_report.json)",
    "eval": "token perplexity of a model or checkpoint on a corpus, or its task accuracy (lm-evaluation-harness, "
            "--tasks)",
    "generate": "generate text with a (quantized) model",
    "info": "what a checkpoint holds and which CPU path each quantized linear takes",
    "finetune": "QLoRA: train LoRA adapters over a quantized checkpoint on real text",
    "qat": "quantization-aware training through fake-quantized weights, exported as a checkpoint",
    "export-gguf": "write a llama.cpp GGUF file (llama, gemma3)",
    "models": "list built-in models and supported architectures",
}
COMMAND_OPTIONS = {"quantize": _add_quantize, "sensitivity": _add_sensitivity, "report": _add_report,
                   "eval": _add_eval, "generate": _add_generate, "info": _add_info, "finetune": _add_finetune,
                   "qat": _add_qat, "export-gguf": _add_export_gguf}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, given `command`, of that command alone with the others' names and
    help lines: `llmquant --help` then starts without importing torch (options' choices need it)."""
    parser = argparse.ArgumentParser(prog="llmquant", description="LLM weight quantization")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_line in COMMAND_HELP.items():
        options = sub.add_parser(name, help=help_line)
        if name in COMMAND_OPTIONS and command in (None, name):
            COMMAND_OPTIONS[name](options)
    return parser


COMMANDS = {"quantize": cmd_quantize, "sensitivity": cmd_sensitivity, "report": cmd_report, "eval": cmd_eval, "generate": cmd_generate, "info": cmd_info, "finetune": cmd_finetune,
            "qat": cmd_qat, "export-gguf": cmd_export_gguf, "models": cmd_models}


def _log_to_stderr(level: int) -> None:
    """llmquant's own log lines (e.g. the CPU path of each layer at load) on stderr, whatever sys.stderr
    is when they are written."""
    import logging

    class StderrHandler(logging.StreamHandler):
        stream = property(lambda self: sys.stderr, lambda self, value: None)

    logger = logging.getLogger("llmquant")
    if not any(isinstance(h, logging.StreamHandler) and type(h).__name__ == "StderrHandler" for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def free_cores() -> tuple[int, int, float]:
    """(cores this process may use, of them not busy now, the 1-minute load average)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return cores, max(1, cores - round(load)), load


def _use_threads(threads: int) -> None:
    """torch.set_num_threads, with a warning where there are fewer free cores: a thread that waits for a
    busy core stalls every parallel region (on a busy machine, more threads than free cores decode many
    times slower than one)."""
    import torch

    cores, free, load = free_cores()
    if threads > free:
        print(f"llmquant: warning: --threads {threads} is more than the {free} free core{'s' * (free != 1)} "
              f"({cores} cores, load {load:.1f}); each step waits for the slowest thread: try --threads {free}",
              file=sys.stderr)
    torch.set_num_threads(threads)


def _command_line(args) -> str:
    """The command as typed (the model card records what made a checkpoint)."""
    import shlex

    return "llmquant " + shlex.join(args.argv)


def main(argv: list[str] | None = None) -> int:
    import logging

    args_given = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_given if not a.startswith("-")), "")  # the parser has no options before it
    args = build_parser(command).parse_args(args_given)
    args.argv = args_given
    _log_to_stderr(logging.WARNING if args.command == "info" else logging.INFO)  # info prints the paths itself
    try:
        _check_arguments(args)
        if getattr(args, "threads", None) is not None:
            _use_threads(args.threads)
        return COMMANDS[args.command](args)
    except LlmquantError as exc:
        print(f"llmquant {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
