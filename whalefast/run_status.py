"""Whether a run folder holds a finished run: status.json, written first when training starts and last when it ends.

A fit or boxes fit that is killed, or stopped by a full disk, leaves status "training": commands that
use a model refuse the folder with one line saying how to continue, instead of reading a mix of old
and new files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from whalefast.errors import WhalefastError
from whalefast.io import write_json

STATUS_FILE = "status.json"
TRAINING, FINISHED = "training", "finished"


def status_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / STATUS_FILE


def training_status() -> dict:
    return {"state": TRAINING}


def mark_finished(run_dir: str | os.PathLike) -> None:
    write_json({"state": FINISHED}, status_path(run_dir))


def is_finished(run_dir: str | os.PathLike, legacy_marker: str) -> bool:
    """Whether the run in `run_dir` finished; runs from before status.json finished where `legacy_marker` (their last file) exists."""
    path = status_path(run_dir)
    if not path.is_file():
        return (Path(run_dir) / legacy_marker).is_file()
    try:
        return json.loads(path.read_text()).get("state") == FINISHED
    except (ValueError, AttributeError):
        return False


def check_finished(run_dir: str | os.PathLike, legacy_marker: str, unfinished: str) -> None:
    """A one-line error, `unfinished` after the folder's name, unless the run in `run_dir` finished."""
    if not is_finished(run_dir, legacy_marker):
        raise WhalefastError(f"{run_dir}: {unfinished}")
