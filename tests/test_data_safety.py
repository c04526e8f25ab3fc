"""Data safety of long runs: a run that stops after finishing blocks keeps them and resumes to the same
bytes (a kill at every write step, an exception at block k, a full disk, out of memory), errors that
make progress useless remove it, two runs never share a progress folder, overwriting is atomic and
replaces only what llmquant wrote (recognised by content), and unsaved runs without `out` resume."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import llmquant
from conftest import tiny_config
from llmquant import QuantConfig
from llmquant.storage.checkpoint import replace_folder, why_not_replaceable
from llmquant.errors import CheckpointError, OutputExistsError, OutputWriteError
from llmquant.quantization.streaming import PROGRESS_FILE, quantize_to_disk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
import fault_injection  # noqa: E402  (the faults eval/FAULTS.md injects, shared with these tests)
CONFIG = QuantConfig(method="gptq", bits=4, group_size=32)


def calibration():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model_folder(tmp_path):
    """A tiny random llama of 4 blocks without a tokenizer (calibration comes as token ids)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def quantize(folder, out, **kwargs):
    return quantize_to_disk(folder, kwargs.pop("config", CONFIG), calibration(), out, progress=False, plots=False,
                            **kwargs)


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture
def reference(tmp_path, model_folder):
    out, _ = quantize(model_folder, tmp_path / "reference")
    return out


def progress_of(out: Path) -> dict:
    return json.loads((out.with_name(f".{out.name}.partial") / PROGRESS_FILE).read_text())


def fail_at_block(monkeypatch, block: int, error: BaseException):
    fault_injection.fail_at_block(block, error, monkeypatch.setattr)


# ---- kills ----

def test_sigkill_at_every_write_step_then_resume_gives_the_uninterrupted_checkpoint(tmp_path):
    """eval/fault_injection.py --only kill-every-step: a real SIGKILL before each file created, written,
    renamed or deleted by a streamed GPTQ run of 4 blocks with calibration inputs, then a resume, in turn."""
    run = subprocess.run([sys.executable, str(ROOT / "eval" / "fault_injection.py"), "--only", "kill-every-step",
                          "--work", str(tmp_path), "--json", "-"],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0, [r for r in results if r["problem"]] or run.stderr[-3000:]
    assert len(results) >= 60 and all(r["status"] == "killed" for r in results)
    assert [r for r in results if r["problem"] is not None] == []
    # kills landed before, between and after every block's commit, and after the final rename
    assert {r["blocks_done"] for r in results} >= {None, 0, 1, 2, 3, 4}
    assert any(r["output_after_stop"] for r in results)


# ---- exceptions ----

def test_out_of_memory_at_block_k_keeps_the_finished_blocks_and_resumes_to_the_same_bytes(
        tmp_path, model_folder, reference, monkeypatch, capsys):
    out = tmp_path / "out"
    fail_at_block(monkeypatch, 2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(torch.OutOfMemoryError) as raised:
        quantize(model_folder, out)
    hint = "2 of 4 blocks are finished and kept in"
    assert any(hint in note and "run the same command again" in note for note in raised.value.__notes__)
    assert hint in capsys.readouterr().err
    assert not out.exists() and progress_of(out)["done"] == 2
    monkeypatch.undo()
    _, report = quantize(model_folder, out)
    assert report["resumed_after_blocks"] == 2
    assert shards(out) == shards(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out", "reference"]


@pytest.mark.parametrize("block,kept", [(0, False), (3, True)])
def test_any_error_keeps_progress_only_once_a_block_is_finished(tmp_path, model_folder, monkeypatch, block, kept):
    fail_at_block(monkeypatch, block, RuntimeError("a fault in the forward pass"))
    with pytest.raises(RuntimeError, match="a fault in the forward pass"):
        quantize(model_folder, tmp_path / "out")
    assert (tmp_path / ".out.partial").exists() == kept


def test_an_error_that_makes_progress_useless_removes_it(tmp_path, model_folder):
    """A NaN in block 2's weights: fixing the source changes the fingerprint, so the finished blocks
    could never be resumed."""
    from safetensors.torch import load_file

    weights = load_file(str(model_folder / "model.safetensors"))
    weights["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(model_folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.up_proj\.weight contains NaN"):
        quantize(model_folder, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("damaged,named", [("checkpoint/model-00002-of-00005.safetensors", "shard of finished block 1"),
                                           ("block-00003-inputs.safetensors", "calibration inputs of block 3")])
def test_progress_whose_files_changed_since_is_not_resumed(tmp_path, model_folder, reference, monkeypatch, capsys,
                                                           damaged, named):
    """A finished shard or the saved inputs altered in place, same size: resuming on them would be wrong."""
    fail_at_block(monkeypatch, 3, RuntimeError("stop"))
    with pytest.raises(RuntimeError):
        quantize(model_folder, tmp_path / "out")
    monkeypatch.undo()
    path = tmp_path / ".out.partial" / damaged
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    capsys.readouterr()
    _, report = quantize(model_folder, tmp_path / "out")
    assert report["resumed_after_blocks"] == 0
    assert named in capsys.readouterr().out
    assert shards(tmp_path / "out") == shards(reference)


# ---- a full disk ----

def capped_save_file(monkeypatch, capacity: int) -> list[int]:
    return fault_injection.disk_holding(capacity, patch=monkeypatch.setattr)


def test_a_full_disk_after_some_blocks_keeps_them_and_says_how_to_resume(tmp_path, model_folder, reference,
                                                                         monkeypatch):
    with monkeypatch.context() as patch:
        sizes = capped_save_file(patch, 2**40)
        quantize(model_folder, tmp_path / "measured")
    # the files of an uninterrupted run, in order: the rest shard, then each block's shard and the
    # next block's inputs; the disk holds those of the first two blocks and a part of the third's
    capped_save_file(monkeypatch, sum(sizes[:5]) + sizes[5] // 2)
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError, match="No space left on device.*run the same command again to resume"):
        quantize(model_folder, out)
    assert progress_of(out)["done"] == 2 and not out.exists()
    leftovers = sorted(p.name for p in (tmp_path / ".out.partial").rglob("*"))
    assert not [name for name in leftovers if name.endswith(".tmp")]  # the failed write is gone
    monkeypatch.undo()
    _, report = quantize(model_folder, out)
    assert report["resumed_after_blocks"] == 2
    assert shards(out) == shards(reference)


def test_a_full_disk_before_any_block_leaves_nothing(tmp_path, model_folder, monkeypatch):
    capped_save_file(monkeypatch, 100)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        quantize(model_folder, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 128 KiB tmpfs, which holds the first block or two of the 4-block model but not all of it
    (root may mount one; where it cannot, this test says so and does not run)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_filesystem_keeps_finished_blocks_and_resumes(tmp_path, model_folder, reference,
                                                                    small_filesystem):
    out = small_filesystem / "out"
    with pytest.raises(OutputWriteError, match="No space left on device.*run the same command again to resume"):
        quantize(model_folder, out)
    done = progress_of(out)["done"]
    assert done >= 1 and not out.exists()
    # room again: the user moves the progress folder to a bigger disk and runs the same command there
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    shutil.move(str(out.with_name(".out.partial")), str(bigger / ".out.partial"))
    _, report = quantize(model_folder, bigger / "out")
    assert report["resumed_after_blocks"] == done
    assert shards(bigger / "out") == shards(reference)


# ---- one run at a time; leftovers of a finished run ----

def test_a_second_run_into_the_same_progress_folder_is_refused(tmp_path, model_folder):
    import fcntl

    staging = tmp_path / ".out.partial"
    staging.mkdir()
    holder = os.open(staging, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as a running llmquant holds it
    try:
        with pytest.raises(OutputExistsError, match="another llmquant run is writing"):
            quantize(model_folder, tmp_path / "out")
    finally:
        os.close(holder)
    assert staging.exists()


def test_the_progress_folder_of_a_finished_run_is_removed_by_the_next_run(tmp_path, model_folder, reference,
                                                                         capsys):
    """A kill between the final rename and deleting the progress folder leaves it behind."""
    staging = tmp_path / ".reference.partial"
    staging.mkdir()
    (staging / PROGRESS_FILE).write_text(json.dumps({"done": 4, "finished": True}))
    with pytest.raises(OutputExistsError):
        quantize(model_folder, reference)
    assert not staging.exists() and "removed" in capsys.readouterr().err


# ---- overwriting ----

def test_overwrite_keeps_the_old_checkpoint_when_moving_the_new_one_in_fails(tmp_path, model_folder, reference,
                                                                             monkeypatch):
    before = shards(reference)
    new = tmp_path / "new"
    shutil.copytree(reference, new)
    (new / "marker").write_text("new")
    real_replace = os.replace

    def replace_failing_for_the_new_folder(source, destination):
        if Path(source) == new:
            raise OSError(5, "Input/output error")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_failing_for_the_new_folder)
    with pytest.raises(OSError, match="Input/output error"):
        replace_folder(new, reference)
    monkeypatch.undo()
    assert shards(reference) == before and not (reference / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new", "reference"]  # no .old- folder left


def test_overwrite_replaces_the_old_checkpoint(tmp_path, model_folder, reference):
    out, report = quantize(model_folder, reference, config=QuantConfig(method="rtn", bits=8, group_size=32),
                           overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "reference"]


def test_saving_a_checkpoint_over_another_goes_through_the_atomic_replace(tmp_path, model_folder, reference,
                                                                          monkeypatch):
    from llmquant.quantization import streaming

    checkpoint = llmquant.quantize(str(model_folder), QuantConfig(method="rtn", bits=8, group_size=32), None,
                                   progress=False)
    before = shards(reference)
    monkeypatch.setattr(streaming, "replace_folder", lambda new, target: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(reference, overwrite=True)
    assert shards(reference) == before  # the old checkpoint was never deleted first
    monkeypatch.undo()
    checkpoint.save(reference, overwrite=True)
    assert json.loads((reference / "config.json").read_text())["quantization_config"]["bits"] == 8


@pytest.mark.parametrize("tamper,named", [
    (lambda folder: (folder / "model-00001-of-00005.safetensors").write_bytes(
        (folder / "model-00002-of-00005.safetensors").read_bytes()), "names its tensor files and their hashes"),
    (lambda folder: (folder / "extra.safetensors").write_bytes(b"x"), "names its tensor files"),
    (lambda folder: _symlinked_report(folder), "names its tensor files"),
    (lambda folder: (folder / "quantize_report.json").write_text("{not json"), "names its tensor files"),
])
def test_only_folders_whose_report_names_their_own_tensors_are_replaced(tmp_path, model_folder, reference, tamper,
                                                                        named):
    tamper(reference)
    assert named in why_not_replaceable(reference)
    with pytest.raises(OutputExistsError, match=named):
        quantize(model_folder, reference, overwrite=True)


def _symlinked_report(folder: Path) -> None:
    real = folder.parent / "report-elsewhere.json"
    (folder / "quantize_report.json").rename(real)
    (folder / "quantize_report.json").symlink_to(real)


def test_a_checkpoint_of_an_earlier_version_is_recognised_by_its_tensor_hash(tmp_path, reference):
    report = json.loads((reference / "quantize_report.json").read_text())
    del report["tensor_files"]  # as versions before the tensor_files record wrote it
    (reference / "quantize_report.json").write_text(json.dumps(report))
    assert why_not_replaceable(reference) is None
    (reference / "model-00001-of-00005.safetensors").write_bytes(
        (reference / "model-00002-of-00005.safetensors").read_bytes())
    assert why_not_replaceable(reference) is not None


def test_every_llmquant_writer_marks_its_folder_by_content(tmp_path):
    """QAT and QLoRA outputs, the in-memory save and a merged checkpoint are all replaceable by llmquant."""
    from conftest import tiny_model

    qmodel = llmquant.quantize(tiny_model("llama"), QuantConfig(method="rtn", bits=4, group_size=32), progress=False)
    saved = qmodel.save(tmp_path / "saved", more_reports={"qat_report.json": {"qat": "settings"}})
    for name in ("quantize_report.json", "qat_report.json"):
        assert set(json.loads((saved / name).read_text())["tensor_files"]) == {
            p.name for p in saved.glob("*.safetensors")}
    assert why_not_replaceable(saved) is None


# ---- runs without an output folder ----

def test_a_run_without_out_resumes_when_the_same_call_is_made_again(tmp_path, model_folder, reference, monkeypatch):
    from llmquant.quantization import streaming

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    finish = streaming.StreamingStore.finish

    def interrupted(self, index, *args):
        finish(self, index, *args)
        if index == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(streaming.StreamingStore, "finish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            llmquant.quantize(str(model_folder), CONFIG, calibration(), progress=False)
    runs = list((tmp_path / "cache" / "runs").iterdir())
    assert len(runs) == 1 and progress_of(runs[0] / "checkpoint")["done"] == 2
    checkpoint = llmquant.quantize(str(model_folder), CONFIG, calibration(), progress=False)
    assert checkpoint.report()["resumed_after_blocks"] == 2 and checkpoint.path.parent == runs[0]
    assert shards(checkpoint.path) == shards(reference)
    saved = checkpoint.save(tmp_path / "saved")
    assert shards(saved) == shards(reference) and not runs[0].exists()


def test_another_call_gets_another_folder_and_stale_runs_are_removed(tmp_path, model_folder, monkeypatch, capsys):
    from llmquant.quantization import streaming

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    one = streaming.run_folder(str(model_folder), CONFIG, calibration(), "auto", "auto", "auto")
    assert streaming.run_folder(str(model_folder), CONFIG, calibration(), "auto", "auto", "auto") == one
    stale = tmp_path / "cache" / "runs" / "quantize-0123456789abcdef"
    (stale / ".checkpoint.partial").mkdir(parents=True)
    (stale / ".checkpoint.partial" / PROGRESS_FILE).write_text("{}")
    old = time.time() - streaming.STALE_RUN_SECONDS - 3600
    for path in (stale / ".checkpoint.partial" / PROGRESS_FILE, stale / ".checkpoint.partial", stale):
        os.utime(path, (old, old))
    other = streaming.run_folder(str(model_folder), QuantConfig(method="rtn", bits=8, group_size=32), None, "auto", "auto",
                           "auto")
    assert other != one and one.exists() and not stale.exists()
    assert f"removed {stale}" in capsys.readouterr().err
