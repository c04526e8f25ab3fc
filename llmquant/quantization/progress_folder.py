"""The hidden folder beside a streamed run's output, `.NAME.partial`, where it keeps its progress
(streaming.py writes it): what a run may find there before it starts, and how it is removed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ..storage.checkpoint import TEMPORARY_SUFFIX, check_output_path
from ..errors import OutputExistsError

PROGRESS_FILE = "progress.json"
CHECKPOINT_FOLDER = "checkpoint"  # inside the progress folder: the output as it grows


def progress_folder_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def check_streamed_output(path, overwrite: bool) -> Path:
    """check_output_path for a streamed run, after removing what a finished run left beside its
    output; the progress folder there must be one llmquant wrote."""
    target = Path(path).expanduser()
    remove_finished_leftover(progress_folder_of(target), target)
    target = check_output_path(target, overwrite)
    check_progress_folder(progress_folder_of(target))
    return target


def read_progress(staging: Path):
    """progress.json as written by a run (a plain file holding a JSON object), or None."""
    path = staging / PROGRESS_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None


def check_progress_folder(staging: Path) -> None:
    """Only our own progress folder may sit where progress is kept: never write through a symbolic
    link, nor into (or delete) a folder someone else made."""
    if not os.path.lexists(staging):
        return
    if staging.is_symlink() or not staging.is_dir():
        raise OutputExistsError(f"{staging}, where this run keeps its progress, is a symbolic link or not a folder; "
                                "remove it or choose another output path (nothing was changed)")
    if read_progress(staging) is not None or all(_is_first_progress_write(item) for item in staging.iterdir()):
        return
    raise OutputExistsError(f"{staging}, where this run keeps its progress, holds files llmquant did not write "
                            f"(no {PROGRESS_FILE}); remove it or choose another output path (nothing was changed)")


def _is_first_progress_write(item: Path) -> bool:
    """A temporary file of the first progress.json (a run killed before it was renamed)."""
    return item.name.startswith(f".{PROGRESS_FILE}.") and item.name.endswith(TEMPORARY_SUFFIX) and item.is_file()


def remove_finished_leftover(staging: Path, target: Path) -> None:
    """A run killed between moving its checkpoint to the output and deleting its progress folder
    leaves that folder behind, finished (or emptied) and without the checkpoint: remove it."""
    if not os.path.lexists(target) or staging.is_symlink() or not staging.is_dir():
        return
    progress = read_progress(staging)
    finished = progress.get("finished") if progress is not None else not any(staging.iterdir())
    if finished and not os.path.lexists(staging / CHECKPOINT_FOLDER):
        remove_progress_folder(staging)
        print(f"removed {staging}, the progress of the finished run that wrote {target}", file=sys.stderr)


def remove_item(item: Path) -> None:
    shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def remove_progress_folder(staging: Path) -> None:
    """Delete progress.json last, so that a kill part-way leaves a folder a later run still recognises."""
    for item in staging.iterdir():
        if item.name != PROGRESS_FILE:
            remove_item(item)
    (staging / PROGRESS_FILE).unlink(missing_ok=True)
    staging.rmdir()


