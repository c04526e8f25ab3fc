"""CPU inference speed of every checkpoint format llmquant writes, against fp32 and llama.cpp, in one run.

    bash scripts/setup_llama_cpp.sh      # llama-cpp-python, from a local wheel or PyPI's sdist
    bash scripts/setup_llama_cpp.sh --class avx2   # and an AVX2-class build beside it, for --class avx2
    OMP_NUM_THREADS=2 python eval/bench_cpu.py --threads 2 --md eval/CPU.md --json eval/runs/cpu-bench.json
    OMP_NUM_THREADS=2 python eval/bench_cpu.py --class avx2 --md eval/CPU.md     # the AVX2 class, forced
    OMP_NUM_THREADS=2 python eval/bench_cpu.py --model llama1b-shape --only "GPTQ w4 g128 sym" --md eval/CPU.md

--model: smollm2 (SmolLM2-135M, the default) or llama1b-shape (a random-init model of Llama-3.2-1B's
shape: hidden 2048, 16 layers, MLP 8192, vocab 128256, 32 heads / 8 kv heads, tied embeddings, stored
in bf16 as Llama-3.2-1B is, SmolLM2's tokenizer; made once into --work, then quantized by RTN like the
others; its prefill and decode lengths are smaller (a 128-token window, 16 new tokens), so a run
fits on 2 cores; speed does not depend on the values of the weights). --class avx2 re-executes this
script with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, FBGEMM_ENABLE_INSTRUCTIONS=AVX2 and
MKL_ENABLE_INSTRUCTIONS=AVX2 (torch, oneDNN, FBGEMM, MKL and llmquant's CPU class then plan for an AVX2 CPU: no int8 dot product, no native bf16); --class native without them. The
llama.cpp rows of the AVX2 class come from the AVX2-class build (scripts/setup_llama_cpp.sh --class avx2:
no AVX-512, VNNI or AMX); a build with more than AVX2 is refused there (it would not be the same class
as the torch rows), and the table's header names the build's ISA. With --md, the table goes into its
own section of the file per model and class (others are kept; --md-section names another section, for
a run of some rows beside a full table).

For SmolLM2-135M: fp32 and bf16 (transformers' own model), then each quantized checkpoint loaded by
llmquant (which converts its linears to the CPU fast paths of llmquant.inference.cpu), then llama.cpp
(llama-cpp-python) on our own GGUF exports of the same model (q8_0, q4_0, q4_k). Per model, on the same
token ids: prefill tok/s of a 512-token window of the wiki test split (one forward)
and decode tok/s at batch 1 (greedy, 64 new tokens after a short prompt, the tokens after the first over
the time they took). All models are loaded, then measured in --repeats rounds that visit each once
(best of the rounds per row), so a slow spell of a shared machine falls on every row alike. Ratios are
to fp32 in the same run; the load average of the
machine before and after goes beside the table.

Checkpoints are quantized on first use into --work (kept for later runs). The speed of a format does
not depend on how its codes were chosen, so round-to-nearest makes them, except GPTQ act-order, which
needs a real GPTQ run to write a permuted g_idx (a short calibration: 8 windows x 512 tokens), and
static W8A8, which needs calibrated activation scales (8 windows).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# inductor's cache keys miss a forced capability: code generated for the native class (16 float lanes)
# and taken from the cache under ATEN_CPU_CAPABILITY=avx2 (8 lanes) wrote past its buffers (SIGSEGV), so
# each class compiles into a cache of its own (set before torch is imported: inductor fixes the folder
# at its first use)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir())
                                            / f"torchinductor-llmquant-{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}")
import torch

from llmquant.inference.cpu import describe_cpu, prepare_for_cpu, summary
from llmquant.inference.cpu.capability import AVX2_CLASS_VARIABLES
from llmquant.data import tokenize_corpus
from llmquant.inference.generation import timed_generate
from llmquant.gguf_export.llama_cpp_runner import (beyond_avx2, build_folder_for, describe_build,
                                                   extra_buffer_types_note, loaded_build_features,
                                                   open_in_llama_cpp)
from llmquant.inference.loading import load
from llmquant.models import builtin_model_path, cache_dir, load_fp_model

PROMPT = "The history of the printing press begins"
CLASS_VARIABLES = {"avx2": AVX2_CLASS_VARIABLES, "native": {}}


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    prefill_tokens: int
    new_tokens: int


MODELS = {
    "smollm2": ModelSpec("smollm2", "SmolLM2-135M", 512, 64),
    "llama1b-shape": ModelSpec("llama1b-shape", "random-init Llama-3.2-1B shape (1.24B parameters)", 128, 16),
}
LLAMA_1B_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                      rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)
MODEL = "smollm2-135m"  # the model whose tokenizer every spec uses, and --model smollm2 itself
PREFILL_TOKENS = MODELS["smollm2"].prefill_tokens
NEW_TOKENS = MODELS["smollm2"].new_tokens


@dataclass(frozen=True)
class Checkpoint:
    name: str  # row label
    folder: str  # under --work
    quantize_args: tuple[str, ...]  # `llmquant quantize MODEL ...`
    environment: dict = field(default_factory=dict)  # set while it loads (a CPU path variant)


CALIBRATION = ("--calib", "wiki", "--nsamples", "8", "--seqlen", "512")
CHECKPOINTS = [
    Checkpoint("GPTQ w4 g128 sym", "gptq-w4g128-sym", ("--method", "rtn", "--bits", "4", "--group-size", "128", "--sym")),
    Checkpoint("GPTQ w4 g128 asym", "gptq-w4g128-asym", ("--method", "rtn", "--bits", "4", "--group-size", "128", "--asym")),
    Checkpoint("GPTQ w4 g128 act-order", "gptq-w4g128-actorder",
               ("--method", "gptq", "--bits", "4", "--group-size", "128", "--act-order", *CALIBRATION)),
    Checkpoint("GPTQ w8 per-channel", "gptq-w8pc", ("--method", "rtn", "--bits", "8", "--group-size", "-1", "--sym")),
    Checkpoint("AWQ w4 g64", "awq-w4g64", ("--method", "rtn", "--bits", "4", "--group-size", "64", "--asym",
                                            "--format", "awq")),
    Checkpoint("W8A8 dynamic", "w8a8-dynamic", ("--method", "w8a8", "--act-quant", "dynamic")),
    Checkpoint("W8A8 dynamic, int8pack variant", "w8a8-dynamic", ("--method", "w8a8", "--act-quant", "dynamic"),
               {"LLMQUANT_CPU_W8A8": "int8pack"}),
    Checkpoint("W8A8 static", "w8a8-static", ("--method", "w8a8", "--act-quant", "static", *CALIBRATION)),
    Checkpoint("NF4 (double quant)", "nf4-dq", ("--method", "nf4", "--double-quant")),
    Checkpoint("FP4", "fp4", ("--method", "fp4",)),
]
GGUF_TYPES = ("q8_0", "q4_0", "q4_k")


@contextlib.contextmanager
def environment(variables: dict):
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def current_class() -> str:
    return "avx2" if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2" else "native"


def import_llama_cpp(cpu_class: str) -> str | None:
    """Import the llama.cpp build for `cpu_class`: None when it is imported, else why there is none.
    The AVX2 class takes an AVX2-class build only: one with AVX-512, VNNI or AMX beside torch held to
    AVX2 would compare two CPU classes."""
    folder = build_folder_for(cpu_class, Path(sys.prefix))
    if folder is not None:
        sys.path.insert(0, str(folder))  # ahead of the venv's own (native) build
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python is not installed (bash scripts/setup_llama_cpp.sh)"
    if cpu_class == "avx2" and (extra := beyond_avx2(loaded_build_features())):
        return (f"the llama.cpp found ({Path(llama_cpp.__file__).parent}) is built for {', '.join(extra)}, "
                "beyond the AVX2 class; build one for it: bash scripts/setup_llama_cpp.sh --class avx2")
    return None


def llama_cpp_build_class() -> str:
    extra = beyond_avx2(loaded_build_features())
    return "AVX2-class build" if not extra else "build with " + ", ".join(extra)


def run_cli(args: list[str]) -> None:
    command = [sys.executable, "-m", "llmquant.cli", *args]
    print("$", shlex.join(["llmquant", *args]), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})


def ensure_llama_1b_shape(work: Path) -> Path:
    """A random-init model of Llama-3.2-1B's shape in bf16 (with SmolLM2's tokenizer), made once."""
    folder = work / "llama1b-shape-fp"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    print(f"making {folder} (random init, Llama-3.2-1B shape)", flush=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B_SHAPE, torch_dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(builtin_model_path(MODEL)).save_pretrained(folder)
    return folder


def source_model(work: Path, spec: ModelSpec) -> str:
    return MODEL if spec.key == "smollm2" else str(ensure_llama_1b_shape(work))


def ensure_checkpoint(work: Path, checkpoint: Checkpoint, spec: ModelSpec) -> Path:
    folder = work / (checkpoint.folder if spec.key == "smollm2" else f"{spec.key}-{checkpoint.folder}")
    if not (folder / "config.json").is_file():
        run_cli(["quantize", source_model(work, spec), *checkpoint.quantize_args, "--out", str(folder), "--overwrite"])
    return folder


def ensure_gguf(work: Path, kind: str) -> Path:
    path = work / f"smollm2-{kind}.gguf"
    if not path.is_file():
        run_cli(["export-gguf", MODEL, "--type", kind, "--out", str(path), "--overwrite"])
    return path


def best(values: list[float]) -> float:
    return max(values)


class TorchRunner:
    """One model measured the same way each round: prefill of `window`, decode after `prompt_ids`.
    compile_decode: decode steps as one compiled graph each (llmquant.inference.generation); the prompt's forward
    is the eager one, measured in the model's eager row, so this row has no prefill of its own."""

    def __init__(self, model, prompt_ids: torch.Tensor, window: torch.Tensor, new_tokens: int = NEW_TOKENS,
                 compile_decode: bool = False):
        self.model, self.window, self.new_tokens, self.compile_decode = model, window, new_tokens, compile_decode
        self.inputs = {"input_ids": prompt_ids, "attention_mask": torch.ones_like(prompt_ids)}
        # warm-up: first-call allocations, oneDNN primitives; compiled: the compilation, for the same shapes
        start = time.perf_counter()
        warm_tokens = new_tokens if compile_decode else 4
        timed_generate(model, self.inputs, warm_tokens, exact_length=True, compile_decode=compile_decode)
        self.warm_up_seconds = time.perf_counter() - start

    def once(self) -> tuple[float | None, float]:
        prefill = None
        if not self.compile_decode:
            with torch.no_grad():
                start = time.perf_counter()
                self.model(input_ids=self.window, use_cache=True, logits_to_keep=1)
                prefill = self.window.shape[1] / (time.perf_counter() - start)
        decode = timed_generate(self.model, self.inputs, self.new_tokens, exact_length=True,
                                compile_decode=self.compile_decode)[1].decode_tokens_per_second
        return prefill, decode


class LlamaCppRunner:
    def __init__(self, path: Path, prompt_ids: list[int], window: list[int], threads: int):
        self.llm = open_in_llama_cpp(path, n_ctx=2 * PREFILL_TOKENS, n_batch=PREFILL_TOKENS, n_threads=threads,
                                     n_threads_batch=threads)
        self.prompt_ids, self.window = prompt_ids, window
        self.once()  # warm-up

    def once(self) -> tuple[float, float]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(self.window)
        prefill = len(self.window) / (time.perf_counter() - start)
        self.llm.reset()
        times = []
        for _token in self.llm.generate(self.prompt_ids, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == NEW_TOKENS:
                break
        return prefill, (len(times) - 1) / (times[-1] - times[0])


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**20


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(rows: list[dict], meta: dict) -> str:
    fp32 = next(r for r in rows if r["model"] == "fp32")
    ran_llama_cpp = meta["llama_cpp"] != "not run"
    lines = [
        f"## {meta['model']}, {meta['cpu_class_title']}"
        + (f", beside llama.cpp ({meta['llama_cpp_build_class']})" if ran_llama_cpp else ""),
        "",
        f"{meta['model']} on a {meta['cores']}-core {meta['cpu']} ({platform.machine()}), llmquant's CPU class: "
        f"{meta['capability']}; {meta['threads']} threads, torch {meta['torch']}, "
        + (f"llama-cpp-python {meta['llama_cpp']} ({meta['llama_cpp_build']}; {meta['llama_cpp_buffers']})"
           if ran_llama_cpp else f"no llama.cpp rows ({meta['llama_cpp_absent']})")
        + f"; {meta['date']}. Load average (1/5/15 min) before the run {meta['load_before']}, "
        f"after {meta['load_after']} (other work shared the cores: read the ratios, which come from the same run).",
        "",
        "    " + meta["command"],
        "",
        f"Prefill: one forward of a {meta['prefill_tokens']}-token window of the wiki test split. Decode: batch 1, greedy, "
        f"{meta['new_tokens']} new tokens after a {meta['prompt_tokens']}-token prompt, {meta['repeats']} rounds. "
        "Every model is loaded first, then measured once per round in the same order; best of the rounds. "
        "Size: the checkpoint's safetensors (or GGUF) file(s), embeddings included.",
        "",
        "| model | runs as | size MiB | prefill tok/s | × fp32 | decode tok/s | × fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        prefill = ("as eager | " if r["prefill"] is None
                   else f"{r['prefill']:.1f} | {r['prefill'] / fp32['prefill']:.2f} | ")
        lines.append(f"| {r['model']} | {r['runs_as']} | {r['size_mib']:.0f} | {prefill}{r['decode']:.1f} | "
                     f"{r['decode'] / fp32['decode']:.2f} |")
    compiled = [r for r in rows if "first_call_seconds" in r]
    if compiled:
        lines += ["", "Compiled decode (static KV cache, torch.compile fullgraph, inductor): × fp32 is against the "
                  "eager fp32 row. First call (compiling, then one generation of the same length): "
                  + ", ".join(f"{r['model'].removesuffix(', compiled decode')} {r['first_call_seconds']:.0f} s"
                              for r in compiled) + "."]
    return "\n".join(lines) + "\n"


NOTES_MARKER = "<!-- eval/bench_cpu.py writes everything above this line; the notes below are kept -->"


def section_markers(key: str) -> tuple[str, str]:
    return f"<!-- bench_cpu.py section {key} -->", f"<!-- end of section {key} -->"


def write_keeping_notes(path: Path, table: str, key: str) -> None:
    """Write this run's table into its section (model and class) of the file; other sections, and the
    hand-written notes after NOTES_MARKER, are kept."""
    start, end = section_markers(key)
    text = path.read_text() if path.is_file() else f"# CPU inference speed\n\n{NOTES_MARKER}\n"
    if NOTES_MARKER not in text:
        text += f"\n{NOTES_MARKER}\n"
    head, notes = text.split(NOTES_MARKER, 1)
    block = f"{start}\n{table}{end}\n"
    if start in head and end in head:
        before, rest = head.split(start, 1)
        head = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        head = head.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(f"{head}{NOTES_MARKER}{notes}")


def reexec_for_class(cpu_class: str) -> None:
    """Run this script again with the class's variables (torch and oneDNN read them once, at import)."""
    wanted = CLASS_VARIABLES[cpu_class]
    names = {name for variables in CLASS_VARIABLES.values() for name in variables}
    if all(os.environ.get(name) == wanted.get(name) for name in names):
        return
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(wanted)

    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4, help="measurement rounds (best of them per row)")
    parser.add_argument("--work", default=str(cache_dir() / "bench-cpu"), help="where checkpoints are kept")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (fp32 always runs)")
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    parser.add_argument("--md", default=None)
    parser.add_argument("--md-section", default=None,
                        help="the section of --md to write (default: MODEL-CLASS, e.g. smollm2-native); another "
                             "name keeps the default one, e.g. for a run of some rows beside a full table")
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--class", dest="cpu_class", choices=sorted(CLASS_VARIABLES), default=None,
                        help="avx2: force the AVX2 class (re-executes with capability.AVX2_CLASS_VARIABLES: "
                             "torch, oneDNN, FBGEMM and MKL capped at AVX2); native: the CPU's own "
                             "(default: as the environment says)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="leave the bf16 model out (memory)")
    parser.add_argument("--compile", action="store_true",
                        help="add a compiled-decode row for each model (llmquant generate --compile)")
    parser.add_argument("--compile-only", nargs="*", default=None,
                        help="with --compile: the rows to add a compiled row for (default: all)")
    args = parser.parse_args()
    if args.cpu_class is not None:
        reexec_for_class(args.cpu_class)
    spec = MODELS[args.model]

    torch.set_num_threads(args.threads)
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    selected = [c for c in CHECKPOINTS if args.only is None or c.name in args.only]
    folders = {c.name: ensure_checkpoint(work, c, spec) for c in selected}  # (two rows may share a folder)
    llama_cpp_absent = import_llama_cpp(current_class()) if args.llama_cpp else "--no-llama-cpp"
    if llama_cpp_absent is not None:
        args.llama_cpp = False
        print(f"no llama.cpp rows: {llama_cpp_absent}", flush=True)
    ggufs = {k: ensure_gguf(work, k) for k in GGUF_TYPES
             if args.llama_cpp and spec.key == "smollm2" and (args.only is None or k in args.only)}

    load_before = loadavg()
    _, tokenizer = load_fp_model(MODEL)
    prompt_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    window = tokenize_corpus(tokenizer, "wiki", "test")[:spec.prefill_tokens][None]
    source = source_model(work, spec)
    fp_size = size_mib(builtin_model_path(MODEL) if spec.key == "smollm2" else Path(source))
    # Every model is loaded first and then measured in rounds, each round visiting every model once, so
    # that a slow spell of a shared machine falls on all rows alike rather than on whichever ran then.
    contenders = []  # (row label, runs as, size MiB, runner)
    compiled_rows = []  # (row label, model, runs as, size MiB): the models a compiled row is added for
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and ((args.only is not None and name not in args.only) or not args.bf16):
            continue
        model, _ = load_fp_model(source, dtype=dtype)
        contenders.append((name, f"transformers, {name} weights", fp_size,
                           TorchRunner(model, prompt_ids, window, spec.new_tokens)))
        compiled_rows.append((name, model, f"transformers, {name} weights", fp_size))
    for checkpoint in selected:
        with environment(checkpoint.environment):
            model = load(folders[checkpoint.name])
            paths = "; ".join(summary(prepare_for_cpu(model)).split("; ")[:-1])  # paths, stacked count
        contenders.append((checkpoint.name, paths, size_mib(folders[checkpoint.name]),
                           TorchRunner(model, prompt_ids, window, spec.new_tokens)))
        compiled_rows.append((checkpoint.name, model, paths, size_mib(folders[checkpoint.name])))
    compile_seconds = {}
    for name, model, runs_as, size in compiled_rows if args.compile else []:
        if args.compile_only is not None and name not in args.compile_only:
            continue
        print(f"compiling the decode step of {name}", flush=True)
        runner = TorchRunner(model, prompt_ids, window, spec.new_tokens, compile_decode=True)
        compile_seconds[f"{name}, compiled decode"] = runner.warm_up_seconds
        contenders.append((f"{name}, compiled decode", runs_as, size, runner))
    llama_version = "not run"
    if ggufs:
        import llama_cpp

        llama_version = llama_cpp.__version__
        for kind, path in ggufs.items():
            contenders.append((f"llama.cpp {kind} (our GGUF export)", "llama.cpp", size_mib(path),
                               LlamaCppRunner(path, prompt_ids[0].tolist(), window[0].tolist(), args.threads)))
    measured = {name: [] for name, *_ in contenders}
    for round_number in range(args.repeats):
        for name, _, _, runner in contenders:
            measured[name].append(runner.once())
            prefill = measured[name][-1][0]
            print(f"round {round_number + 1}: {name}: prefill "
                  + ("(eager row)" if prefill is None else f"{prefill:.1f} tok/s")
                  + f", decode {measured[name][-1][1]:.1f} tok/s", flush=True)
    rows = [{"model": name, "runs_as": runs_as, "size_mib": size,
             "prefill": None if measured[name][0][0] is None else best([p for p, _ in measured[name]]),
             "decode": best([d for _, d in measured[name]]), "rounds": measured[name],
             **({"first_call_seconds": compile_seconds[name]} if name in compile_seconds else {})}
            for name, runs_as, size, _ in contenders]

    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "capability": describe_cpu(), "threads": args.threads,
            "torch": torch.__version__, "llama_cpp": llama_version, "date": time.strftime("%Y-%m-%d"),
            **({"llama_cpp_build": describe_build(), "llama_cpp_build_class": llama_cpp_build_class(),
                "llama_cpp_compiled_features": " ".join(loaded_build_features()),
                "llama_cpp_buffers": extra_buffer_types_note()} if ggufs else
               {"llama_cpp_absent": llama_cpp_absent or "no GGUF row in this run"}),
            "load_before": load_before, "load_after": loadavg(), "repeats": args.repeats,
            "prompt_tokens": prompt_ids.shape[1], "model": spec.title, "prefill_tokens": spec.prefill_tokens,
            "new_tokens": spec.new_tokens,
            "cpu_class_title": ("AVX2 class (forced: " + ", ".join(f"{k}={v}" for k, v in AVX2_CLASS_VARIABLES.items())
                                + ")"
                                if current_class() == "avx2" else "native class"),
            "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python eval/bench_cpu.py "
                       + shlex.join(sys.argv[1:])}
    text = markdown(rows, meta)
    print(text)
    if args.md:
        write_keeping_notes(Path(args.md), text, args.md_section or f"{spec.key}-{current_class()}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
