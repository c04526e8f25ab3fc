"""Quantize a checkpoint folder with one decoder block in memory at a time, resumably.

The model is built empty (parameters on the meta device); the embeddings, final norm and head are
read from the safetensors shards (plain reads, safetensors_file.py) at the start, and each block's weights only when
its turn comes. A finished block is written at once as its own shard of the output checkpoint and
released, so memory holds the embeddings, one block and the calibration activations.

Progress lives in a hidden folder beside the output, `.NAME.partial`: the finished blocks' shards,
the next block's calibration inputs (safetensors) and progress.json, each file written to a temp
name and renamed. A run killed at any point and restarted with the same command (same source files,
settings, calibration windows and llmquant / torch / transformers versions: their fingerprint is
checked) continues after the last finished block and writes the same checkpoint, bit for bit, as an
uninterrupted run; when any of them changed, it says what and starts afresh. Only the finished
folder is ever renamed to the output path. A run that fails with an error removes its progress;
one interrupted by a signal or Ctrl-C keeps it for the rerun.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import _version
from .arch import arch_for
from .checkpoint import (SAFETENSORS_INDEX, check_output_path, checkpoint_tensors, folder_tensors_sha256,
                         LazyTensors, replace_folder, why_not_replaceable, without_tied_copies, write_file_atomically)
from .config import QuantConfig
from .device import dtype_name, reset_peak_memory
from .errors import CheckpointError, ConfigError, LlmquantError, OutputExistsError, OutputWriteError
from .loading import checkpoint_files
from .models import resolve_model
from .pipeline import BlockStore, LayerResult, PipelineResult, Placement, quantize_blocks
from .planning import STORAGE_TORCH_DTYPES, placement_for, plan_run, prepare_model
from .report import REPORT_FILE, build_report, peak_rss_mib, write_report

PROGRESS_FILE = "progress.json"
NEXT_INPUTS_FILE = "next-block-inputs.safetensors"


def _write_atomically(path: Path, write) -> None:
    try:
        write_file_atomically(path, write)
    except OSError as exc:
        raise OutputWriteError(f"writing {path} failed: {exc}") from exc


def _check_staging(staging: Path) -> None:
    """Only our own progress folder may sit where progress is kept: never write through a symbolic
    link, nor into (or delete) a folder someone else made."""
    if not os.path.lexists(staging):
        return
    if staging.is_symlink() or not staging.is_dir():
        raise OutputExistsError(f"{staging}, where this run keeps its progress, is a symbolic link or not a folder; "
                                "remove it or choose another output path (nothing was changed)")
    if (staging / PROGRESS_FILE).is_file() or why_not_replaceable(staging) is None:
        return
    raise OutputExistsError(f"{staging}, where this run keeps its progress, holds files llmquant did not write "
                            f"(no {PROGRESS_FILE}); remove it or choose another output path (nothing was changed)")


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
            raise LlmquantError(f"{full} contains NaN or Inf; refusing to quantize it")
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


class StreamingStore(BlockStore):
    """Blocks from the source checkpoint, finished blocks to shards in the staging folder."""

    def __init__(self, prefix_of, source: LazyTensors, staging: Path, fingerprint: dict, packed: dict,
                 storage: torch.dtype, total_shards: int, stored_name=None):
        self.prefix_of, self.source, self.staging = prefix_of, source, staging
        self.stored_name = stored_name or (lambda key: key)
        self.fingerprint, self.packed, self.storage, self.total_shards = fingerprint, packed, storage, total_shards
        self.progress = {"fingerprint": fingerprint, "done": 0, "blocks": [], "seconds": 0.0}
        self.started = time.time()
        self.earlier_seconds = 0.0  # time the killed runs before this one spent
        self.layers_seen = self.scaling_seen = 0
        self.not_resumed_because: str | None = None  # why another run's progress was set aside

    def resume_point(self):
        path = self.staging / PROGRESS_FILE
        if not path.exists():
            return 0, None
        progress = json.loads(path.read_text())
        done = progress["done"]
        missing = [i for i in range(done) if not (self.staging / shard_name(i, self.total_shards)).exists()]
        if progress.get("fingerprint") != self.fingerprint or missing:
            # another run's leftovers: start over
            self.not_resumed_because = (f"{len(missing)} finished block shards are missing" if missing
                                        else _what_changed(progress.get("fingerprint"), self.fingerprint))
            return 0, None
        self.progress = progress
        self.earlier_seconds = progress["seconds"]
        inputs = self.staging / NEXT_INPUTS_FILE
        if not inputs.exists():
            return done, None
        saved = load_file(str(inputs))
        return done, [saved[str(i)] for i in range(len(saved))]

    def load(self, index, block):
        self.block_started = time.time()
        materialize(block, self.prefix_of(index) + ".", self.source, self.stored_name)

    def finish(self, index, block, next_hidden, result):
        prefix = self.prefix_of(index) + "."
        state = {prefix + key: value.cpu() for key, value in block.state_dict().items()}
        packed = {name: self.packed.pop(name) for name in list(self.packed) if name.startswith(prefix)}
        tensors = {self.stored_name(k): v for k, v in checkpoint_tensors(state, packed, self.storage).items()}
        _write_atomically(self.staging / shard_name(index, self.total_shards),
                          lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                metadata={"format": "pt"}))
        if next_hidden is not None:
            _write_atomically(self.staging / NEXT_INPUTS_FILE,
                              lambda tmp: save_file({str(i): h.cpu().contiguous() for i, h in enumerate(next_hidden)},
                                                    str(tmp)))
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
        self.save_progress()
        block.to("meta")  # release the block's memory

    def save_progress(self) -> None:
        _write_atomically(self.staging / PROGRESS_FILE, lambda tmp: tmp.write_text(json.dumps(self.progress)))

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
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or QuantConfig()
    start = time.time()
    target = check_output_path(out, overwrite)
    placement_for(device, compute_dtype, offload_activations)  # refuses an absent device first
    staging = target.with_name(f".{target.name}.partial")
    _check_staging(staging)
    folder = Path(resolve_model(str(model)))
    if not folder.is_dir():
        raise ConfigError(f"streaming quantization reads a local model folder; {model} is not one")
    files = checkpoint_files(folder)
    source = LazyTensors(files)
    model_config = AutoConfig.from_pretrained(folder)
    tokenizer = _tokenizer_of(folder, calib)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    skeleton.eval()
    arch = arch_for(model_config, skeleton)
    config = prepare_model(skeleton, arch, config)
    blocks_prefix = arch.blocks + "."
    outside = {name: p for name, p in skeleton.named_parameters() if not name.startswith(blocks_prefix)}
    for name in outside:
        module_name, _, _ = name.rpartition(".")
        if name == "lm_head.weight" and model_config.tie_word_embeddings:
            continue
        materialize(skeleton.get_submodule(module_name), module_name + ".", source, arch.stored_name)
    skeleton.tie_weights()

    # weight values are checked as each block is read
    plan = plan_run(skeleton, arch, config, calib, tokenizer, check_values=False)
    block_bytes = max(sum(p.numel() * 4 for p in block.parameters()) for block in arch.block_list(skeleton))
    plan.placement = placement_for(device, compute_dtype, offload_activations, model_config, plan.calibration,
                                   block_bytes)
    reset_peak_memory(plan.placement.device)

    storage = STORAGE_TORCH_DTYPES[config.dtype]
    n_blocks = len(arch.block_list(skeleton))
    packed: dict[str, dict[str, torch.Tensor]] = {}
    store = StreamingStore(arch.block_prefix, source, staging,
                           _fingerprint(folder, files, config, plan.calibration, plan.placement),
                           packed, storage, n_blocks + 1, arch.stored_name)
    _check_staging(staging)
    if not os.path.lexists(staging):
        try:
            staging.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()  # not exist_ok: a symbolic link put there since the check is refused
        except OSError as exc:
            raise OutputWriteError(f"cannot create {staging}: {exc}") from exc
    try:
        first, _ = store.resume_point()
        if first == 0 and any(staging.iterdir()):
            shutil.rmtree(staging)  # leftovers of a different run (ours: checked above)
            staging.mkdir()
        if first == 0:
            store.save_progress()  # marks the folder as this run's progress before anything else is written
        if store.not_resumed_because:
            print(f"not resuming {staging.name}: {store.not_resumed_because}; starting a fresh run")
        if first and progress:
            print(f"resuming {target.name} after block {first - 1} ({first} of {n_blocks} done)")
        # the embeddings, final norm and head do not change: their shard is written first, so that
        # their storage-dtype copy is gone before any block is loaded
        _write_rest_shard(staging, skeleton, blocks_prefix, storage, n_blocks, arch.stored_name)

        def pack(name, quantized, linear):
            packed[name] = plan.fmt.pack(quantized, config.for_layer(name))

        if progress:
            print(f"quantizing on {plan.placement.device} in {dtype_name(plan.placement.compute_dtype)}, "
                  f"calibration activations on {plan.placement.activations}")
        quantize_blocks(skeleton, arch, plan.algorithm, grid_for=plan.grid_for, on_quantized=pack,
                        calibration=plan.calibration, true_sequential=config.true_sequential, progress=progress,
                        store=store, placement=plan.placement)
        skeleton.to("meta")  # the embeddings are written already; free them before hashing the shards
        _finish_folder(staging, n_blocks, model_config, plan.fmt, config, folder, tokenizer)
        result = store.pipeline_result()
        report = build_report(config, str(model), plan.calibration_info, store.earlier_seconds + time.time() - start,
                              peak_rss_mib(), result, sum(b["packed_bytes"] for b in store.progress["blocks"]),
                              plan.placement)
        (staging / NEXT_INPUTS_FILE).unlink(missing_ok=True)
        report["resumed_after_blocks"] = first
        # each block's read, statistics, rounding, forward pass and write
        report["block_seconds"] = [b.get("seconds") for b in store.progress["blocks"]]
        report["checkpoint_sha256"] = folder_tensors_sha256(staging)
        report.update(report_extra or {})
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
        (staging / PROGRESS_FILE).unlink()  # after the report, which marks the folder as ours from here on
        write_report(staging, plots=plots, name=target.name)
        _move_into_place(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, LlmquantError):
            raise
        raise OutputWriteError(f"writing {target} failed: {exc}") from exc
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target, report


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
    _write_atomically(staging / shard_name(n_blocks, n_blocks + 1),
                      lambda tmp: save_file({k: v.contiguous() for k, v in rest.items()}, str(tmp), metadata={"format": "pt"}))


def _finish_folder(staging: Path, n_blocks: int, model_config, fmt, config: QuantConfig, folder: Path,
                   tokenizer) -> None:
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
    saved_config.quantization_config = fmt.quantization_config(config)
    saved_config.dtype = STORAGE_TORCH_DTYPES[config.dtype]
    saved_config.save_pretrained(staging)
    if (folder / "generation_config.json").exists():
        GenerationConfig.from_pretrained(folder).save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)


def _move_into_place(staging: Path, target: Path) -> None:
    replace_folder(staging, target)
