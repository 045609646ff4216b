"""One ``torch.save`` file from a DCP checkpoint and back, for single-process use and inspection.

These follow torch's format utilities (``torch.distributed.checkpoint.format_utils``) with the weights-only
reader and planner of :mod:`.safe_io`; the DCP side is written as a committed checkpoint directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from . import directory as dirs
from .safe_io import SafeEmptyLoadPlanner, SafeFileSystemReader, read_metadata_file, reading


def load_whole(checkpoint: str | Path) -> dict[str, Any]:
    """Every entry of a (verified) DCP checkpoint, whole, in this process: no process group needed."""
    path = Path(checkpoint)
    dirs.verify(path)
    state: dict[str, Any] = {}
    with reading(path):
        read_metadata_file(path / ".metadata")  # checked before DCP reads it (DCP would flatten the error to text)
        _load_state_dict(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeEmptyLoadPlanner(),
                         no_dist=True)
    return state


def dcp_to_torch_save(checkpoint: str | Path, file: str | Path) -> None:
    """Write a DCP checkpoint directory as one ``torch.save`` file (run it on one rank)."""
    torch.save(load_whole(checkpoint), file)


def torch_save_to_dcp(file: str | Path, checkpoint: str | Path, step: int = 0) -> None:
    """Write a ``torch.save`` file (plain data only: loaded with ``weights_only=True``) as a committed DCP
    checkpoint directory that :class:`~distopt.checkpoint.CheckpointManager` and ``dcp.load`` accept."""
    state = torch.load(file, weights_only=True)
    final = Path(checkpoint)
    partial = final.with_name(f".partial-{final.name}")
    shutil.rmtree(partial, ignore_errors=True)
    dcp.save(state, storage_writer=FileSystemWriter(str(partial)), no_dist=True)
    dirs.commit(partial, final, step)
