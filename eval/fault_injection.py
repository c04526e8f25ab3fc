"""Faults injected into streamed quantization runs, each followed by a resume: eval/FAULTS.md.

    python eval/fault_injection.py --md eval/FAULTS.md --json eval/fault_injection.json

For each fault: what the stopped run kept on disk, and whether the same command, run again, ended
with a checkpoint identical byte for byte to an uninterrupted run's (every file but the report's
timings; the report's tensor hash and per-layer records must match too), with no progress folder
left behind and nothing partial ever at the output path.

Each run is a forked child of this process (torch and llmquant are imported and warmed once, here),
so a kill is a real SIGKILL of a real process at an exact step. A write step is a filesystem call
that writes: a file opened for writing or created, a rename, a delete, a folder made or removed.
`--only kill-every-step` kills before each write step in turn (tests/test_data_safety.py runs that).

The model: by default a random-init llama of 4 blocks (hidden 64) quantized with GPTQ on 4 x 32
calibration tokens, in seconds; `--model FOLDER` takes another (without a tokenizer, calibration is
token ids; a real model such as SmolLM2 takes minutes per run).
"""
from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from llmquant import QuantConfig
from llmquant.quantization import streaming
from llmquant.quantization.streaming import PROGRESS_FILE, quantize_to_disk

# hold timings (and the card, the output path): the report JSON's other content is compared
TIMED_FILES = {"quantize_report.json", "report.md", "README.md"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CONFIG = QuantConfig(method="gptq", bits=4, group_size=32)


def calibration(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))


# ---- faults (each installed in the child before it runs) ----

def count_write_steps(counter: list, kill_before: int | None = None) -> None:
    """Count write steps; SIGKILL this process just before step `kill_before` (1-based)."""
    def step(what):
        counter.append(what)
        if kill_before is not None and len(counter) == kill_before:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(name, module, writes=lambda *a, **k: True):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            if writes(*args, **kwargs):
                step(f"{name} {args[0] if args else ''}")
            return original(*args, **kwargs)
        setattr(module, name, wrapped)

    for name in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir"):
        wrap(name, os)
    wrap("open", os, lambda path, flags, *a, **k: bool(flags & WRITE_FLAGS))
    wrap("open", builtins, lambda file, mode="r", *a, **k: any(c in mode for c in "wax+"))
    io.open = builtins.open  # what pathlib's write_text / write_bytes call


def fail_at_block(block: int, error: BaseException, patch=setattr) -> None:
    """Block `block`'s forward raises `error`, as a CUDA out-of-memory error or a fault would.
    patch: how to replace the store's method (a test passes monkeypatch.setattr, to undo it)."""
    load = streaming.StreamingStore.load

    def load_then_break(self, index, module):
        load(self, index, module)
        if index == block:
            def broken(*args, **kwargs):
                raise error
            module.register_forward_pre_hook(broken)

    patch(streaming.StreamingStore, "load", load_then_break)


def disk_holding(capacity: int, sizes: list | None = None, patch=setattr) -> list[int]:
    """safetensors' save_file on a disk that holds `capacity` bytes of the run's files: past that it
    writes what fits and fails as safetensors does (its own SafetensorError, not an OSError).
    Returns (and fills `sizes` with) the sizes of the files written whole."""
    used = [] if sizes is None else sizes

    def save_until_full(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        if sum(used) + size > capacity:
            os.truncate(filename, max(0, capacity - sum(used)))
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        used.append(size)

    patch(streaming, "save_file", save_until_full)
    return used


# ---- runs ----

class Runner:
    def __init__(self, model: Path, work: Path):
        from transformers import AutoConfig

        self.model, self.work = model, work
        self.calibration = calibration(AutoConfig.from_pretrained(model).vocab_size)

    def quantize(self, out: Path) -> None:
        quantize_to_disk(self.model, CONFIG, self.calibration, out, progress=False, plots=False)

    def child(self, out: Path, fault=None) -> tuple[int, str]:
        """(wait status, last line of the error) of one run in a forked child with `fault` installed."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            message, code = "", 0
            try:
                if fault is not None:
                    fault()
                self.quantize(out)
            except BaseException as exc:  # the child reports whatever stopped it
                message = "\n".join([f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", [])])
                code = 1
            os.write(write, message.encode()[:4000])
            os._exit(code)
        os.close(write)
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        os.close(read)
        _, status = os.waitpid(pid, 0)
        return status, b"".join(chunks).decode(errors="replace")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def differs(out: Path, reference: dict[str, bytes]) -> str | None:
    """None when `out` is the reference checkpoint; else what differs."""
    written = folder_bytes(out)
    if sorted(written) != sorted(reference):
        return f"files differ: {sorted(set(written) ^ set(reference))}"
    for name, data in reference.items():
        if name not in TIMED_FILES and written[name] != data:
            return f"{name} differs"
    mine, theirs = (json.loads(r["quantize_report.json"]) for r in (written, reference))
    for key in ("checkpoint_sha256", "layers", "tensor_files", "llmquant_config"):
        if mine.get(key) != theirs.get(key):
            return f"quantize_report.json's {key} differs"
    return None


def kept(staging: Path) -> dict:
    progress = staging / PROGRESS_FILE
    if not staging.exists():
        return {"progress_folder": False, "blocks_done": None}
    done = json.loads(progress.read_text()).get("done") if progress.exists() else None
    return {"progress_folder": True, "blocks_done": done}


def stop_and_resume(runner: Runner, reference: dict[str, bytes], fault, out: Path, move_to: Path | None = None) -> dict:
    """Run with the fault, note what it kept, run again without it (from `move_to` where the progress
    folder was moved to a disk with room), compare, clean up."""
    staging = out.with_name(f".{out.name}.partial")
    status, message = runner.child(out, fault)
    row = {"status": ("killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
                      else "error" if os.WEXITSTATUS(status) else "finished"),
           "error": message.replace(str(runner.work), "WORK"), **kept(staging), "output_after_stop": out.exists(),
           "says_how_to_resume": "run the same command again" in message}
    problem = differs(out, reference) if out.exists() else None  # killed after the final rename: must be whole
    if move_to is not None and staging.exists():
        shutil.move(str(staging), str(move_to.with_name(staging.name)))
        out, staging = move_to, move_to.with_name(staging.name)
    if problem is None:
        finished_before = out.exists()
        status, message = runner.child(out)
        if finished_before:
            problem = None if status else "a run over the finished output did not refuse it"
        elif status:
            problem = f"the resumed run failed: {message}"
        else:
            problem = differs(out, reference)
            row["resumed_after_blocks"] = json.loads((out / "quantize_report.json").read_text())["resumed_after_blocks"]
    if problem is None and staging.exists():
        problem = f"{staging.name} was left behind: {sorted(p.name for p in staging.iterdir())}"
    row["identical_after_resume"] = problem is None
    row["problem"] = problem
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return row


def small_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def scenarios(runner: Runner, reference, total_steps: int, write_sizes: list[int], only: str | None):
    """(name, how, row) for each fault."""
    out = runner.work / "out"
    if only in (None, "kill-every-step"):
        for step in range(1, total_steps + 1):
            row = stop_and_resume(runner, reference, lambda step=step: count_write_steps([], step), out)
            yield "kill-every-step", f"SIGKILL before write step {step} of {total_steps}", row
    if only == "kill-every-step":
        return
    yield ("ctrl-c", "KeyboardInterrupt at block 1",
           stop_and_resume(runner, reference, lambda: fail_at_block(1, KeyboardInterrupt()), out))
    for block in (0, 2):
        yield ("exception", f"RuntimeError from block {block}'s forward",
               stop_and_resume(runner, reference, lambda b=block: fail_at_block(b, RuntimeError("a fault")), out))
    yield ("out of memory", "torch.OutOfMemoryError from block 2's forward",
           stop_and_resume(runner, reference,
                           lambda: fail_at_block(2, torch.OutOfMemoryError("CUDA out of memory (simulated)")), out))
    capacity = sum(write_sizes[:5]) + write_sizes[5] // 2
    yield ("disk full", f"size-capped writer: {capacity} bytes (full during block 2's shard)",
           stop_and_resume(runner, reference, lambda: disk_holding(capacity), out))
    yield ("disk full", "size-capped writer: 100 bytes (full at the first file)",
           stop_and_resume(runner, reference, lambda: disk_holding(100), out))
    mount = runner.work / "tmpfs"
    if small_tmpfs(mount, "128k"):
        try:
            yield ("disk full", "a real 128 KiB tmpfs; the progress folder then moved to a disk with room",
                   stop_and_resume(runner, reference, None, mount / "out", move_to=out))
        finally:
            subprocess.run(["umount", str(mount)], check=True)
    useless = runner.work / "nan-model"
    shutil.copytree(runner.model, useless)
    from safetensors.torch import load_file

    weights_file = next(useless.glob("*.safetensors"))
    weights = load_file(str(weights_file))
    name = next(k for k in weights if ".layers.2." in k and k.endswith("up_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    nan_runner = Runner(useless, runner.work)
    status, message = nan_runner.child(out)
    staging = out.with_name(f".{out.name}.partial")
    yield ("useless progress", "NaN in block 2's weights (fixing the source changes the fingerprint)",
           {"status": "error" if status else "finished", "error": message.replace(str(runner.work), "WORK"),
            "says_how_to_resume": "run the same command again" in message, **kept(staging),
            "output_after_stop": out.exists(), "identical_after_resume": None,
            "problem": None if status and not staging.exists() and not out.exists() else "progress was kept"})


def tiny_model(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def markdown(rows: list[dict], command: str, model: str) -> str:
    kills = [r for r in rows if r["fault"] == "kill-every-step"]
    lines = ["# Faults injected into streamed quantization", "",
             "```", command, "```", "",
             f"Model: {model}; GPTQ w4 g32 on 4 x 32 calibration tokens; each run a forked child (real SIGKILL).",
             "\"identical\": the same command, run again, ended with a checkpoint identical byte for byte to an "
             "uninterrupted run's (report timings aside), no progress folder left, nothing partial at the output path.",
             ""]
    if kills:
        done = sorted({r["blocks_done"] for r in kills if r["blocks_done"] is not None})
        ok = sum(r["identical_after_resume"] for r in kills)
        lines += [f"Kill at each write step: {len(kills)} kill points (every file created, written, renamed or "
                  f"deleted), {ok} of {len(kills)} resumed identical; blocks committed at the kills: {done}; "
                  f"killed after the final rename (output already whole): "
                  f"{sum(r['output_after_stop'] for r in kills)}.", ""]
        failed = [r for r in kills if not r["identical_after_resume"]]
        lines += [f"- step {r['how']}: {r['problem']}" for r in failed]
    lines += ["| fault | how | the stopped run's error | says how to resume | kept on disk | resumed after blocks "
              "| identical |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["fault"] == "kill-every-step":
            continue
        kept_text = (f"progress folder, {r['blocks_done']} blocks done" if r["progress_folder"] else "nothing")
        first_line = r["error"].splitlines()[0] if r["error"] else r["status"]
        stopped = first_line if len(first_line) <= 110 else first_line[:107] + "..."
        identical = {True: "yes", False: f"NO: {r['problem']}", None: "n/a (removed)" if r["problem"] is None
                     else f"NO: {r['problem']}"}[r["identical_after_resume"]]
        lines.append(f"| {r['fault']} | {r['how']} | {stopped.replace('|', '/')} | "
                     f"{'yes' if r['says_how_to_resume'] else 'no'} | {kept_text} | "
                     f"{r.get('resumed_after_blocks', '-')} | {identical} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model folder (default: a random-init 4-block llama)")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--only", choices=["kill-every-step"])
    parser.add_argument("--md", help="write the markdown table here")
    parser.add_argument("--json", help="write the rows here ('-' for standard output, one per line)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # every run alike, and a fork never inherits a busy thread pool
    work = Path(args.work or tempfile.mkdtemp(prefix="faults-"))
    model = Path(args.model) if args.model else tiny_model(work / "model")
    runner = Runner(model, work)
    start = time.time()
    runner.quantize(work / "warm-up")  # here, not in a child: lazy imports and first-use caches once
    counter, sizes = [], []
    count_write_steps(counter)
    disk_holding(2**62, sizes)  # records each file's size
    original = (os.replace, os.rename, os.unlink, os.remove, os.rmdir, os.mkdir, os.open, builtins.open,
                streaming.save_file)
    runner.quantize(work / "reference")
    (os.replace, os.rename, os.unlink, os.remove, os.rmdir, os.mkdir, os.open, builtins.open,
     streaming.save_file) = original
    io.open = builtins.open
    reference = folder_bytes(work / "reference")
    rows = []
    for fault, how, row in scenarios(runner, reference, len(counter), sizes, args.only):
        rows.append({"fault": fault, "how": how, **row})
        if args.json == "-":
            print(json.dumps(rows[-1]), flush=True)
    command = "python eval/fault_injection.py " + " ".join(sys.argv[1:])
    if args.md:
        Path(args.md).write_text(markdown(rows, command, str(args.model or "random-init llama, 4 blocks, hidden 64")))
    if args.json and args.json != "-":
        Path(args.json).write_text(json.dumps({"command": command, "seconds": round(time.time() - start, 1),
                                               "rows": rows}, indent=1) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in rows if r["problem"] is not None]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
