"""Quantize a checkpoint folder with one decoder block in memory at a time, resumably.

The model is built empty (parameters on the meta device); the embeddings, final norm and head are
read from the safetensors shards (plain reads, safetensors_file.py) at the start, and each block's weights only when
its turn comes. A finished block is written at once as its own shard of the output checkpoint and
released, so memory holds the embeddings, one block and the calibration activations.

Progress lives in a hidden folder beside the output, `.NAME.partial`: `checkpoint/` (the output as it
grows: the finished blocks' shards), each block's calibration inputs under the block's own index
(`block-0000k-inputs.safetensors`), and progress.json, the only record of what is finished. Every
file is written to a temporary name, flushed and renamed; a block is committed by rewriting
progress.json last, and the inputs it no longer needs are deleted only after that, so a kill at any
instant resumes from a consistent state. A run restarted with the same command (same source files,
settings, calibration windows and llmquant / torch / transformers versions: their fingerprint is
checked) continues after the last committed block and writes the same checkpoint, byte for byte, as
an uninterrupted run; when any of them changed, it says what and starts afresh. One run at a time
holds the folder (an advisory lock). Only the finished folder is ever renamed to the output path.

A run that stops once a block is committed keeps its progress and says how to resume, whatever
stopped it (a kill, Ctrl-C, a full disk, out of memory, any other error), except for errors that
make the progress useless: a broken source or a bad setting, whose fix changes the fingerprint.

The run itself is the one a model held in memory goes through (in_memory.py): checked and planned by
planning.py, every block through pipeline.py; only the block source differs (StreamingStore here).
`llmquant.quantize(folder)` without an output works in a folder under the cache named after the call
(run_folder), so that the same call resumes, and gives a QuantizedCheckpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import _version
from ..arch import arch_for
from ..storage.checkpoint import (SAFETENSORS_INDEX, check_output_path, checkpoint_tensors, file_sha256,
                         folder_tensors_sha256, LazyTensors, replace_folder, without_tied_copies, write_file_atomically,
                         write_report_file)
from ..config import QuantConfig
from ..device import dtype_name, reset_peak_memory
from ..errors import (CheckpointError, ConfigError, DataError, LlmquantError, OutputExistsError, OutputWriteError,
                     UnsupportedArchitectureError)
from ..inference.loading import checkpoint_files, load
from ..evaluation.model_card import write_model_card
from ..models import cache_dir, resolve_model
from ..rotation.online import with_online_rotation
from .pipeline import BlockStore, LayerResult, PipelineResult, Placement
from .planning import STORAGE_TORCH_DTYPES, RunRequest, check_request, plan_quantization
from .progress_folder import (CHECKPOINT_FOLDER, PROGRESS_FILE, check_progress_folder, progress_folder_of, read_progress,
                              remove_item, remove_progress_folder)
from ..evaluation.report import REPORT_FILE, build_report, peak_rss_mib, write_report

# Errors whose fix changes the run's fingerprint (a broken or changed source, a bad setting), so
# that its progress could never be resumed: it is removed. Any other stop keeps it.
USELESS_PROGRESS_ERRORS = (ConfigError, CheckpointError, DataError, UnsupportedArchitectureError)


def inputs_name(index: int) -> str:
    """The calibration inputs of block `index` (the outputs of the block before it)."""
    return f"block-{index:05d}-inputs.safetensors"


def _unchanged(path: Path, hashes: dict) -> bool:
    """Whether a file a committed block wrote is still there, a plain file with the hash recorded."""
    return not path.is_symlink() and path.is_file() and hashes.get(path.name) == file_sha256(path)


class _FolderLock:
    """An exclusive advisory lock on the progress folder, so that two runs of the same command never
    write into it at once (fcntl; where it does not exist, as on Windows, no lock is taken)."""

    def __init__(self, folder: Path):
        self.descriptor = None
        try:
            import fcntl
        except ImportError:
            return
        self.descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        try:
            fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.descriptor)
            self.descriptor = None
            raise OutputExistsError(f"another llmquant run is writing {folder} right now; wait for it to end or "
                                    "choose another output path") from None

    def release(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def materialize(module: nn.Module, prefix: str, source: LazyTensors, stored_name=None) -> None:
    """Give `module`'s (meta) parameters their values from the checkpoint, checking shapes and values.
    The value read is the parameter itself (no copy: a float32 checkpoint costs its bytes once).
    stored_name: the checkpoint key of a parameter's full name, where the family's checkpoints name
    modules otherwise (ArchMap.stored_name)."""
    for name, param in list(module.named_parameters()):
        full = stored_name(f"{prefix}{name}") if stored_name is not None else f"{prefix}{name}"
        if full not in source:
            raise CheckpointError(f"the checkpoint has no tensor {full}")
        if list(source.shape(full)) != list(param.shape):
            raise CheckpointError(f"tensor {full} has shape {source.shape(full)} in the checkpoint, "
                                  f"but the config makes it {list(param.shape)}")
        value = source[full].to(torch.float32)
        if not all(torch.isfinite(chunk).all() for chunk in value.view(-1).split(2**22)):
            raise CheckpointError(f"{full} contains NaN or Inf; refusing to quantize it")
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


class QuantizedCheckpoint:
    """A model quantized from disk, one block at a time, into a checkpoint folder: `path` (a
    temporary folder until `save` moves it, removed if it is never saved), `report`, `load()`, and
    `model` / `tokenizer` (loaded on first use)."""

    def __init__(self, path: Path, report: dict, temporary: bool):
        self.path, self.report_data = Path(path), report
        self._model = self._tokenizer = None
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.path.parent), True) if temporary else None

    def report(self) -> dict:
        return self.report_data

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Move the checkpoint to `path` (refused if it exists, unless overwrite)."""
        target = check_output_path(path, overwrite)
        if target.resolve() == self.path.resolve():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            try:
                shutil.copytree(self.path, staging / "checkpoint")
                write_report(staging / "checkpoint", name=target.name)  # titled by its final name
                write_model_card(staging / "checkpoint", self.report_data, location=target, replacing=target)
            except OSError as exc:
                raise OutputWriteError(f"writing {target} failed: {exc}") from exc
            replace_folder(staging / "checkpoint", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None
        self.path = target
        return target

    def load(self, device="auto", dtype="auto"):
        return load(self.path, device=device, dtype=dtype)

    @property
    def model(self):
        """The checkpoint loaded once (auto device), its quantized linears running the format's kernels."""
        if self._model is None:
            self._model = self.load()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer


# Unsaved runs' folders under the cache that no call has touched for this long are removed.
STALE_RUN_SECONDS = 7 * 24 * 3600


def run_folder(model, config: QuantConfig, calib, device, compute_dtype, offload_activations) -> Path:
    """The folder under the cache where `quantize(model, ...)` without `out` works: the same for the same
    call (model folder, settings, calibration, placement), so that a call stopped by Ctrl-C, an error
    or a kill resumes when made again (streaming.quantize_to_disk checks the finer fingerprint)."""
    if isinstance(calib, torch.Tensor):
        calibration = hashlib.sha256(calib.cpu().contiguous().numpy().tobytes()).hexdigest()
    elif dataclasses.is_dataclass(calib):
        calibration = dataclasses.asdict(calib)
    else:
        calibration = calib
    call = {"model": str(Path(resolve_model(str(model))).resolve()), "config": config.to_dict(),
            "calibration": calibration, "device": str(device), "compute_dtype": str(compute_dtype),
            "offload_activations": offload_activations}
    key = hashlib.sha256(json.dumps(call, sort_keys=True, default=str).encode()).hexdigest()[:16]
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    _remove_stale_runs(runs, keep=key)
    folder = runs / f"quantize-{key}"
    folder.mkdir(exist_ok=True)
    return folder


def _remove_stale_runs(runs: Path, keep: str) -> None:
    """Unsaved runs nobody resumed within STALE_RUN_SECONDS (a killed process leaves its folder behind)."""
    now = time.time()
    for folder in runs.iterdir():
        if keep in folder.name or folder.is_symlink() or not folder.is_dir():
            continue
        touched = max((p.lstat().st_mtime for p in folder.rglob("*")), default=folder.lstat().st_mtime)
        if now - touched > STALE_RUN_SECONDS:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"removed {folder}: an unsaved quantization run untouched for {(now - touched) / 86400:.0f} days",
                  file=sys.stderr)


class StreamingStore(BlockStore):
    """Blocks from the source checkpoint, finished blocks to shards in the progress folder."""

    def __init__(self, prefix_of, source: LazyTensors, staging: Path, fingerprint: dict, packed: dict,
                 storage: torch.dtype, total_shards: int, stored_name=None, needs_inputs: bool = True,
                 prepare_block=None):
        super().__init__(prepare_block)
        self.prefix_of, self.source, self.staging = prefix_of, source, staging
        self.folder = staging / CHECKPOINT_FOLDER
        self.stored_name = stored_name or (lambda key: key)
        self.fingerprint, self.packed, self.storage, self.total_shards = fingerprint, packed, storage, total_shards
        self.needs_inputs = needs_inputs  # whether blocks run on calibration inputs
        # hashes: sha256 of each finished shard and of the inputs the next block reads, checked on resume
        self.progress = {"fingerprint": fingerprint, "done": 0, "blocks": [], "seconds": 0.0, "hashes": {},
                         "finished": False}
        self.started = time.time()
        self.earlier_seconds = 0.0  # time the killed runs before this one spent
        self.layers_seen = self.scaling_seen = 0
        self.not_resumed_because: str | None = None  # why another run's progress was set aside

    @property
    def done(self) -> int:
        return self.progress["done"]

    def start(self) -> int:
        """Take up the progress folder's record (progress.json, read as the only truth): resume after its
        last committed block, or clear what cannot be reused and start afresh. Returns the first block."""
        progress = read_progress(self.staging)
        reason = self._why_not_resumable(progress) if progress is not None else "fresh"
        if reason is not None:
            if reason != "fresh":
                self.not_resumed_because = reason
            for item in list(self.staging.iterdir()):
                remove_item(item)
            self.save_progress()  # marks the folder as this run's progress before anything else is written
            self.folder.mkdir()
            return 0
        self.progress = progress
        self.earlier_seconds = progress["seconds"]
        # what a killed run wrote after its last commit: temporary files, the shard of the block it
        # was finishing, inputs no longer needed; the finishing steps write the rest again
        keep_inputs = inputs_name(self.done)
        self.folder.mkdir(exist_ok=True)
        for item in self.staging.iterdir():
            if item.name not in (PROGRESS_FILE, CHECKPOINT_FOLDER, keep_inputs):
                remove_item(item)
        for item in self.folder.iterdir():
            if item.name not in progress["hashes"]:
                remove_item(item)
        return self.done

    def _why_not_resumable(self, progress: dict) -> str | None:
        if progress.get("fingerprint") != self.fingerprint:
            return _what_changed(progress.get("fingerprint"), self.fingerprint)
        done, hashes = progress.get("done"), progress.get("hashes")
        if not isinstance(done, int) or not isinstance(hashes, dict) or not 0 <= done < self.total_shards:
            return f"its {PROGRESS_FILE} is not one this version writes"
        for index in range(done):
            if not _unchanged(self.folder / shard_name(index, self.total_shards), hashes):
                return f"the shard of finished block {index} is missing or has changed"
        if self._reads_saved_inputs(done) and not _unchanged(self.staging / inputs_name(done), hashes):
            return f"the calibration inputs of block {done} are missing or have changed"
        return None

    def _reads_saved_inputs(self, first: int) -> bool:
        """Whether a run starting at block `first` reads its inputs from the progress folder (block 0's
        come from the embeddings, and a run whose blocks are all done needs none)."""
        return self.needs_inputs and 0 < first < self.total_shards - 1

    def resume_point(self):
        if not self._reads_saved_inputs(self.done):
            return self.done, None
        saved = load_file(str(self.staging / inputs_name(self.done)))
        return self.done, [saved[str(i)] for i in range(len(saved))]

    def load(self, index, block):
        self.block_started = time.time()
        materialize(block, self.prefix_of(index) + ".", self.source, self.stored_name)
        self.prepared(block)

    def finish(self, index, block, next_hidden, result):
        prefix = self.prefix_of(index) + "."
        state = {prefix + key: value.cpu() for key, value in block.state_dict().items()}
        packed = {name: self.packed.pop(name) for name in list(self.packed) if name.startswith(prefix)}
        tensors = {self.stored_name(k): v for k, v in checkpoint_tensors(state, packed, self.storage).items()}
        shard = self.folder / shard_name(index, self.total_shards)
        write_file_atomically(shard, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                           metadata={"format": "pt"}))
        self.progress["hashes"][shard.name] = file_sha256(shard)
        if next_hidden is not None and self._reads_saved_inputs(index + 1):
            inputs = self.staging / inputs_name(index + 1)
            write_file_atomically(inputs, lambda tmp: save_file({str(i): h.cpu().contiguous()
                                                                 for i, h in enumerate(next_hidden)}, str(tmp)))
            self.progress["hashes"][inputs.name] = file_sha256(inputs)
        # the records this block added to the run's result
        self.progress["blocks"].append({
            "layers": [dataclasses.asdict(r) for r in result.layers[self.layers_seen:]],
            "scaling": result.scaling[self.scaling_seen:],
            "packed_bytes": sum(t.numel() * t.element_size() for p in packed.values() for t in p.values()),
            "seconds": round(time.time() - self.block_started, 3),
        })
        self.layers_seen, self.scaling_seen = len(result.layers), len(result.scaling)
        self.progress["done"] = index + 1
        self.progress["seconds"] += time.time() - self.started
        self.started = time.time()
        self.progress["hashes"].pop(inputs_name(index), None)
        self.save_progress()  # the block's commit: until this rename, a resumed run redoes the block
        (self.staging / inputs_name(index)).unlink(missing_ok=True)
        block.to("meta")  # release the block's memory

    def save_progress(self) -> None:
        write_file_atomically(self.staging / PROGRESS_FILE, lambda tmp: tmp.write_text(json.dumps(self.progress)))

    def pipeline_result(self) -> PipelineResult:
        result = PipelineResult()
        for record in self.progress["blocks"]:
            result.layers.extend(LayerResult(**{**layer, "shape": tuple(layer["shape"])}) for layer in record["layers"])
            result.scaling.extend(record["scaling"])
        return result


# Source files hashed by content up to this size (config, generation config, tokenizer files, chat
# template...); larger ones (a stray .bin, a .gguf) by size and modification time like the weights.
HASHED_FILE_BYTES = 64 * 2**20


def _fingerprint(folder: Path, files: list[Path], config: QuantConfig, calibration: torch.Tensor | None,
                 placement: Placement) -> dict:
    """What a run's output depends on, so that a resumed run never mixes two: the versions of llmquant,
    torch and transformers, the settings, the calibration windows, the source's weight files (size and
    modification time) and every other file of the source folder (content): config.json,
    generation_config.json, the tokenizer's files; and where the run computes, which changes its
    numerics (compute dtype, GPU kernels)."""
    import transformers
    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    weights = {f.name for f in files}
    parts = {
        "llmquant": _version.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "settings": sha256(json.dumps(config.to_dict(), sort_keys=True).encode()),
        "placement": placement.to_dict(),
        "source folder": str(folder.resolve()),
        "weight files": sha256(json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode()),
        "calibration windows": sha256(calibration.numpy().tobytes()) if calibration is not None else None,
    }
    for path in sorted(folder.iterdir()):
        if path.name in weights or path.name.startswith(".") or not path.is_file():
            continue
        size = path.stat().st_size
        parts[f"source file {path.name}"] = (sha256(path.read_bytes()) if size <= HASHED_FILE_BYTES
                                             else f"{size} bytes, modified {path.stat().st_mtime_ns}")
    return parts


def _what_changed(before, now: dict) -> str:
    if not isinstance(before, dict):
        return "it was written by an llmquant version that kept no record of its source"
    changes = []
    for key in sorted(set(before) | set(now)):
        if before.get(key) == now.get(key):
            continue
        if key in ("llmquant", "torch", "transformers"):
            changes.append(f"{key} {before.get(key)} -> {now.get(key)}")
        elif key not in before or key not in now:
            changes.append(f"{key} {'appeared' if key in now else 'is gone'}")
        else:
            changes.append(f"{key} changed")
    return "since it was written, " + ", ".join(changes)


def quantize_to_disk(model: str | os.PathLike, config: QuantConfig | None, calib, out: str | os.PathLike,
                     overwrite: bool = False, progress: bool = True, report_extra: dict | None = None,
                     plots: bool = True, device="auto", compute_dtype="auto",
                     offload_activations: str = "auto") -> tuple[Path, dict]:
    """Quantize a model (built-in name, folder, or hub id: its local snapshot) into the checkpoint
    folder `out`, one block in memory at a time; rerun after a kill to resume. Returns (out, the
    report). report_extra: more entries for quantize_report.json; plots: draw report.md's figures
    (loads the source again). device / compute_dtype / offload_activations: where blocks compute
    and where calibration activations live (planning.placement_for)."""
    config = config or QuantConfig()
    request = check_request(config, calib, out=out, overwrite=overwrite, streamed=True, device=device,
                            compute_dtype=compute_dtype, offload_activations=offload_activations)
    return stream_to_disk(model, config, request, progress, report_extra, plots)


def stream_to_disk(model: str | os.PathLike, config: QuantConfig, request: RunRequest, progress: bool = True,
                   report_extra: dict | None = None, plots: bool = True) -> tuple[Path, dict]:
    """quantize_to_disk once its arguments are checked (planning.check_request, which gives request.out)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.time()
    target = request.out
    staging = progress_folder_of(target)
    folder = Path(resolve_model(str(model)))
    if not folder.is_dir():
        raise ConfigError(f"streaming quantization reads a local model folder; {model} is not one")
    files = checkpoint_files(folder)
    source = LazyTensors(files)
    model_config = AutoConfig.from_pretrained(folder)
    tokenizer = _tokenizer_of(folder, request.calib)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    skeleton.eval()
    arch = arch_for(model_config, skeleton)
    blocks_prefix = arch.blocks + "."
    _materialize_outside(skeleton, blocks_prefix, source, arch.stored_name, model_config.tie_word_embeddings)
    # weight values are checked as each block is read
    plan = plan_quantization(skeleton, arch, config, request, tokenizer, weights_loaded=False)
    config = plan.config
    model_config.tie_word_embeddings = skeleton.config.tie_word_embeddings  # a rotation unties the head
    reset_peak_memory(plan.placement.device)

    storage = STORAGE_TORCH_DTYPES[config.dtype]
    n_blocks = len(arch.block_list(skeleton))
    packed: dict[str, dict[str, torch.Tensor]] = {}
    store = StreamingStore(arch.block_prefix, source, staging,
                           _fingerprint(folder, files, config, plan.calibration, plan.placement),
                           packed, storage, n_blocks + 1, arch.stored_name, needs_inputs=plan.calibration is not None,
                           prepare_block=plan.block_preparation(arch, model_config))
    lock = _take_progress_folder(staging)
    try:
        first = store.start()
        if store.not_resumed_because:
            print(f"not resuming {staging.name}: {store.not_resumed_because}; starting a fresh run")
        if first and progress:
            print(f"resuming {target.name} after block {first - 1} ({first} of {n_blocks} done)")
        # the embeddings, final norm and head do not change: their shard is written first, so that
        # their storage-dtype copy is gone before any block is loaded
        _write_rest_shard(store.folder, skeleton, blocks_prefix, storage, n_blocks, arch.stored_name)
        if progress:
            print(f"quantizing on {plan.placement.device} in {dtype_name(plan.placement.compute_dtype)}, "
                  f"calibration activations on {plan.placement.activations}")
        plan.run(skeleton, arch, store, packed, progress)
        skeleton.to("meta")  # the embeddings are written already; free them before hashing the shards
        _finish_folder(store.folder, n_blocks, model_config, plan.fmt, config, folder, tokenizer,
                       plan.rotation.description if plan.rotation is not None else None)
        result = store.pipeline_result()
        report = build_report(config, str(model), plan.calibration_info, store.earlier_seconds + time.time() - start,
                              peak_rss_mib(), result, sum(b["packed_bytes"] for b in store.progress["blocks"]),
                              plan.placement)
        report["resumed_after_blocks"] = first
        if plan.rotation is not None:
            report["rotation"] = plan.rotation.description
        # each block's read, statistics, rounding, forward pass and write
        report["block_seconds"] = [b.get("seconds") for b in store.progress["blocks"]]
        report["checkpoint_sha256"] = folder_tensors_sha256(store.folder)
        report.update(report_extra or {})
        # the block shards were hashed as they were committed (and checked on resume): not read again
        write_report_file(store.folder, REPORT_FILE, report, known_hashes=store.progress["hashes"])
        write_report(store.folder, plots=plots, name=target.name)
        write_model_card(store.folder, report, location=target, replacing=target)
        store.progress["finished"] = True
        store.save_progress()
        replace_folder(store.folder, target)
        remove_progress_folder(staging)
    except BaseException as exc:
        _after_failure(exc, staging, store.done, n_blocks)
        raise
    finally:
        lock.release()
    return target, report


def _materialize_outside(skeleton, blocks_prefix: str, source: LazyTensors, stored_name, tied: bool) -> None:
    """Everything outside the blocks (embeddings, final norm, head) read from the checkpoint."""
    for name, _ in list(skeleton.named_parameters()):
        if name.startswith(blocks_prefix) or (name == "lm_head.weight" and tied):
            continue
        module_name, _, _ = name.rpartition(".")
        materialize(skeleton.get_submodule(module_name), module_name + ".", source, stored_name)
    skeleton.tie_weights()


def _take_progress_folder(staging: Path) -> _FolderLock:
    """Create the progress folder if needed (never through a symbolic link put there since it was
    checked) and lock it for this run."""
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create {staging}: {exc}") from exc
    check_progress_folder(staging)
    return _FolderLock(staging)


def _after_failure(exc: BaseException, staging: Path, done: int, n_blocks: int) -> None:
    """Keep the progress of a run that committed a block, unless the error makes it useless; say how to
    resume. The exception itself is re-raised by the caller (an LlmquantError's message gains the hint)."""
    if done == 0 or isinstance(exc, USELESS_PROGRESS_ERRORS):
        shutil.rmtree(staging, ignore_errors=True)
        return
    hint = (f"{done} of {n_blocks} blocks are finished and kept in {staging}: run the same command again to resume "
            "after them (delete that folder to discard them)")
    if isinstance(exc, LlmquantError) and exc.args:
        exc.args = (f"{exc.args[0]}; {hint}",) + exc.args[1:]
    elif hasattr(exc, "add_note"):
        exc.add_note(hint)
    print(f"llmquant: {hint}", file=sys.stderr)


def _tokenizer_of(folder: Path, calib):
    """The model's tokenizer; a folder without one quantizes only on calibration token ids (or none)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        if calib is None or isinstance(calib, torch.Tensor):
            return None
        raise ConfigError(f"{folder} has no tokenizer to cut calibration text with ({exc}); "
                          "give calibration token ids instead") from exc


def _write_rest_shard(staging: Path, skeleton, blocks_prefix: str, storage, n_blocks: int, stored_name) -> None:
    """The last shard: everything outside the blocks (embeddings, final norm, head)."""
    rest = {k: v for k, v in without_tied_copies(skeleton.state_dict()).items() if not k.startswith(blocks_prefix)}
    rest = {stored_name(k): v for k, v in checkpoint_tensors(rest, {}, storage).items()}
    write_file_atomically(staging / shard_name(n_blocks, n_blocks + 1),
                      lambda tmp: save_file({k: v.contiguous() for k, v in rest.items()}, str(tmp), metadata={"format": "pt"}))


def _finish_folder(staging: Path, n_blocks: int, model_config, fmt, config: QuantConfig, folder: Path,
                   tokenizer, rotation: dict | None = None) -> None:
    """The index, config, generation config and tokenizer beside the shards."""
    from transformers import GenerationConfig

    weight_map, total = {}, 0
    for index in range(n_blocks + 1):
        shard = LazyTensors([staging / shard_name(index, n_blocks + 1)])
        for key in shard.keys():
            weight_map[key] = shard_name(index, n_blocks + 1)
        total += (staging / shard_name(index, n_blocks + 1)).stat().st_size
    (staging / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                        indent=2, sort_keys=True))
    saved_config = copy.deepcopy(model_config)
    saved_config.quantization_config = with_online_rotation(fmt, config, rotation)
    saved_config.dtype = STORAGE_TORCH_DTYPES[config.dtype]
    saved_config.save_pretrained(staging)
    if (folder / "generation_config.json").exists():
        GenerationConfig.from_pretrained(folder).save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)

