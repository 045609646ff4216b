"""Sharded checkpoints: a manager for training jobs, format conversion, and weights-only DCP reading."""

from .convert import dcp_to_torch_save, load_whole, torch_save_to_dcp
from .directory import CheckpointError
from .manager import CheckpointManager, CheckpointMismatch
from .safe_io import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpoint

__all__ = ["CheckpointManager", "CheckpointError", "CheckpointMismatch", "UnsafeCheckpoint", "SafeFileSystemReader",
           "SafeLoadPlanner", "dcp_to_torch_save", "torch_save_to_dcp", "load_whole"]
