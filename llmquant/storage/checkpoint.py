"""Writing a checkpoint folder atomically: everything goes to a hidden temporary folder beside the
target, which is renamed into place only when complete. A failed or killed run leaves no
half-written checkpoint at the output path (at most a hidden `.NAME.tmp-*` folder)."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import CheckpointError, OutputExistsError, OutputWriteError
from .safetensors_file import SafetensorsFile

DEFAULT_MAX_SHARD_SIZE = "4GB"
SAFETENSORS_INDEX = "model.safetensors.index.json"


# The report each command writes beside its output: what marks a folder as one llmquant wrote.
REPORT_FILES = {"quantize": "quantize_report.json", "qat": "qat_report.json", "finetune": "finetune_report.json",
                "save": "save_report.json"}
# What write_file_atomically's temporary files end in (a killed run can leave one behind).
TEMPORARY_SUFFIX = ".tmp"
# The report's entry naming the folder's tensor files and their sha256.
TENSOR_FILES_KEY = "tensor_files"


def _regular_file(path: Path) -> bool:
    """A plain file, never reached through a symbolic link."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_file_hashes(folder: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """{file name: sha256} of the folder's safetensors files: what a report names as its own.
    known: hashes the writer already took of files it wrote (not read again)."""
    known = known or {}
    return {f.name: known.get(f.name) or file_sha256(f) for f in sorted(Path(folder).glob("*.safetensors"))}


def write_report_file(folder: Path, name: str, report: dict, known_hashes: dict[str, str] | None = None) -> Path:
    """Write one of REPORT_FILES into a finished folder, naming its tensor files and their hashes:
    what later marks the folder, by its content, as one llmquant wrote (why_not_replaceable).
    known_hashes: sha256 of files the caller wrote and hashed already."""
    report = {**report, TENSOR_FILES_KEY: tensor_file_hashes(folder, known_hashes)}
    return write_file_atomically(Path(folder) / name, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))


def _names_its_own_tensors(folder: Path, report_path: Path) -> bool:
    """Whether a report (a plain file) parses and names exactly the folder's tensor files, each a plain
    file with the hash it gives. Reports written before TENSOR_FILES_KEY existed are matched by their
    checkpoint_sha256 (name, dtype, shape and bytes of every tensor) instead."""
    if not _regular_file(report_path):
        return False
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(report, dict):
        return False
    tensor_files = sorted(folder.glob("*.safetensors"))
    if not all(_regular_file(f) for f in tensor_files):
        return False
    listed = report.get(TENSOR_FILES_KEY)
    if isinstance(listed, dict):
        return (sorted(listed) == [f.name for f in tensor_files]
                and all(listed[f.name] == file_sha256(f) for f in tensor_files))
    recorded = report.get("checkpoint_sha256")
    if not isinstance(recorded, str) or not tensor_files:
        return False
    try:
        return recorded == folder_tensors_sha256(folder)
    except (CheckpointError, OSError):
        return False


def why_not_replaceable(folder: Path) -> str | None:
    """None when llmquant may replace `folder` (an empty folder, or a folder whose report, written by
    llmquant, names its tensor files and their hashes); otherwise what makes it someone else's."""
    if folder.is_symlink():
        return "is a symbolic link"
    if not folder.is_dir():
        return "exists and is not a folder"
    if not any(folder.iterdir()):
        return None
    if any(_names_its_own_tensors(folder, folder / name) for name in REPORT_FILES.values()):
        return None
    return (f"is not empty and is not a folder llmquant wrote (no {' / '.join(REPORT_FILES.values())} that "
            "names its tensor files and their hashes; were they changed since?)")


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless overwriting, and overwriting anything but an empty folder or
    llmquant's own output; called before any work starts."""
    target = Path(path).expanduser()
    if not os.path.lexists(target):
        return target
    if not overwrite:
        raise OutputExistsError(f"output {target} already exists; pass --overwrite (overwrite=True) to replace it")
    problem = why_not_replaceable(target)
    if problem is not None:
        raise OutputExistsError(f"output {target} {problem}: --overwrite replaces only an empty folder or one "
                                "llmquant wrote; choose another output path (nothing was changed)")
    return target


def check_output_file(path: str | os.PathLike, overwrite: bool, is_ours: Callable[[Path], bool], what: str) -> Path:
    """check_output_path for an output that is one file: --overwrite replaces only `what` (a file
    that is_ours recognizes), never another file, a folder or a symbolic link."""
    target = Path(path).expanduser()
    if not os.path.lexists(target):
        return target
    if not overwrite:
        raise OutputExistsError(f"output {target} already exists; pass --overwrite (overwrite=True) to replace it")
    if target.is_symlink() or not target.is_file() or not is_ours(target):
        raise OutputExistsError(f"output {target} is not {what}: --overwrite replaces only {what}; choose another "
                                "output path (nothing was changed)")
    return target


def replace_folder(new: Path, target: Path) -> None:
    """Move the finished folder `new` to `target`, replacing what is there only if llmquant may
    (checked again: the output can have changed during a long run). The old folder is renamed aside
    first and deleted only once the new one is in place; if that move fails, the old one is put back,
    so an interruption at any point leaves the old or the new checkpoint at `target`, never neither
    (at worst the old one under a hidden `.NAME.old-*` name beside it)."""
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    check_output_path(target, overwrite=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, aside / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside / target.name, target)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_safetensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata.get("total_size")}, "weight_map": split.tensor_to_filename}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return sorted(split.filename_to_tensors)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _apply_umask(folder: Path) -> None:
    """mkdtemp makes a private folder; the finished checkpoint gets the usual permissions."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for item in folder.rglob("*"):
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) to a fresh temporary file beside `path` (mkstemp: a name no one else holds), flush it
    to disk, then rename it to `path`; on any error the temporary file is removed. A failed write (a
    full disk: safetensors reports it as its own SafetensorError, not an OSError) is an
    OutputWriteError naming the file."""
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(descriptor)
    tmp = Path(name)
    try:
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private; the result gets the usual permissions
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the rename must never publish a file whose bytes are not on disk yet
            os.replace(tmp, path)
        except (OSError, SafetensorError) as exc:
            if isinstance(exc, OutputWriteError):
                raise
            raise OutputWriteError(f"writing {path} failed: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_folder_atomically(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call write(tmp_folder), then move the folder to `path`; on any error remove it."""
    target = check_output_path(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        try:
            write(tmp)
        except (OSError, SafetensorError) as exc:
            if isinstance(exc, OutputWriteError):
                raise
            raise OutputWriteError(f"writing {target} failed: {exc}") from exc
        _apply_umask(tmp)
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def tensors_sha256(tensors) -> str:
    """One hash of a checkpoint's tensors, independent of how they are sharded: name, dtype, shape
    and bytes of each, in name order. tensors: a mapping (keys() and [name]), read one at a time."""
    digest = hashlib.sha256()
    for name in sorted(tensors.keys()):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return digest.hexdigest()


class LazyTensors:
    """The tensors of several safetensors files (one checkpoint), each read only when asked for."""

    def __init__(self, files: list[Path]):
        self._files = {}
        for f in files:
            reader = SafetensorsFile(f)
            for key in reader.keys():
                if key in self._files:
                    raise CheckpointError(f"tensor {key} appears in more than one weight file")
                self._files[key] = reader

    def keys(self):
        return self._files.keys()

    def __contains__(self, name) -> bool:
        return name in self._files

    def __getitem__(self, name) -> torch.Tensor:
        return self._files[name][name]

    def shape(self, name) -> list[int]:
        return self._files[name].shape(name)


def folder_tensors_sha256(folder: Path) -> str:
    return tensors_sha256(LazyTensors(sorted(Path(folder).glob("*.safetensors"))))


def without_tied_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with each storage kept once (tied weights, e.g. lm_head = embed_tokens, share it)."""
    kept, seen = {}, set()
    for key, tensor in tensors.items():
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if pointer in seen:
            continue
        seen.add(pointer)
        kept[key] = tensor
    return kept


def checkpoint_tensors(state: dict[str, torch.Tensor], packed: dict[str, dict[str, torch.Tensor]],
                       storage_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors from a (part of a) model's state: each quantized linear's weight replaced
    by its packed tensors, every other floating-point tensor in the storage dtype."""
    tensors = {}
    for key, tensor in state.items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in packed and leaf == "weight":
            for suffix, value in packed[module_name].items():
                tensors[f"{module_name}.{suffix}"] = value
            continue
        tensors[key] = (tensor.to(storage_dtype) if tensor.is_floating_point() else tensor).cpu()
    return tensors


def write_model_files(folder: Path, model, tensors: dict[str, torch.Tensor], tokenizer, storage_dtype: torch.dtype,
                      max_shard_size=DEFAULT_MAX_SHARD_SIZE, quantization_config: dict | None = None) -> None:
    """Weights, config (a copy of the model's, with `dtype` the storage dtype and, when given, this
    quantization_config), generation config and tokenizer of a checkpoint, into `folder`."""
    write_safetensors(folder, tensors, max_shard_size)
    config = copy.deepcopy(model.config)
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.dtype = storage_dtype
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
