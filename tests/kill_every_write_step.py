"""Kill a streamed quantization with SIGKILL at each of its write steps in turn, resume it, and compare.

Run as a script (tests/test_data_safety.py does): `python kill_every_write_step.py MODEL_FOLDER WORK_DIR`.
Prints one JSON line per kill point. Each run is a forked child of this process (torch and llmquant
are imported once, here, before any computation), so each kill is a real SIGKILL of a real process
at an exact step: the child counts the filesystem calls that write (a file opened for writing or
created, a rename, a delete, a folder made or removed) and kills itself just before step N.
The resumed run (no kill) must end with a checkpoint identical, file for file and byte for byte, to
an uninterrupted run's (quantize_report.json's timings aside: its tensors' hash and per-layer
records must match), no progress folder left, and nothing partial ever at the output path.
"""
import builtins
import io
import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)

from llmquant import QuantConfig  # noqa: E402
from llmquant.streaming import quantize_to_disk  # noqa: E402

TIMED_FILES = {"quantize_report.json", "report.md"}  # hold timings; compared by content below
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install_kill_switch(kill_before: int | None, counter: list) -> None:
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


def quantize(folder: Path, out: Path) -> None:
    quantize_to_disk(folder, QuantConfig(method="gptq", bits=4, group_size=32),
                     torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)),
                     out, progress=False, plots=False)


def run_child(folder: Path, out: Path, kill_before: int | None) -> tuple[int, int]:
    """(exit status, write steps counted) of one run in a forked child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        counter = []
        code = 0
        try:
            install_kill_switch(kill_before, counter)
            quantize(folder, out)
        except BaseException:
            traceback.print_exc()
            code = 1
        os.write(write, str(len(counter)).encode())
        os._exit(code)
    os.close(write)
    steps = os.read(read, 64)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return status, int(steps or b"-1")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def same_checkpoint(out: Path, reference: dict[str, bytes]) -> str | None:
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


def main(folder: Path, work: Path) -> None:
    out = work / "out"
    staging = work / ".out.partial"
    quantize(folder, work / "warm-up")  # here, not in a child: every lazy import and first-use cache once
    counter = []
    install_kill_switch(None, counter)  # counts only
    quantize(folder, work / "reference")
    total = len(counter)
    reference = folder_bytes(work / "reference")
    for kill_before in range(1, total + 1):
        status, _ = run_child(folder, out, kill_before)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        problem = None if killed else f"the run was not killed (status {status})"
        if problem is None and out.exists():
            problem = same_checkpoint(out, reference)  # killed after the final rename: must be whole
        progress = staging / "progress.json"
        done = json.loads(progress.read_text())["done"] if progress.exists() else None
        if problem is None:
            finished_before = out.exists()
            status, _ = run_child(folder, out, None)
            if finished_before:
                problem = None if status != 0 else "the run over a finished output did not refuse it"
            elif status != 0:
                problem = f"the resumed run failed (status {status})"
            else:
                problem = same_checkpoint(out, reference)
        resumed = json.loads((out / "quantize_report.json").read_text())["resumed_after_blocks"] if out.exists() else None
        if problem is None and os.path.lexists(staging):
            problem = f"{staging.name} was left behind: {sorted(p.name for p in staging.iterdir())}"
        print(json.dumps({"kill_before_step": kill_before, "steps": total, "done_at_kill": done,
                          "resumed_after_blocks": resumed, "problem": problem}), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
