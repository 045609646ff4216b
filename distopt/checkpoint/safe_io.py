"""Reading DCP checkpoints without unpickling anything but plain data (``weights_only`` semantics).

DCP's own reader unpickles ``.metadata`` with ``pickle.load`` and its planner reads non-tensor values with
``torch.load(weights_only=False)``: a crafted checkpoint could run code. Here the metadata unpickler admits only
DCP's own metadata records and torch's plain types, and non-tensor values go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.planner import ReadItem


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file asked to unpickle something other than plain data."""


_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED or is_dtype:
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"checkpoint metadata refers to {module}.{name}, which is not plain checkpoint data; "
                               "refusing to load it")


def read_metadata_file(path) -> Metadata:
    with open(path, "rb") as stream:
        metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{path} does not hold DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata unpickler only admits DCP's metadata records and plain types."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata_file(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_plain(planner: DefaultLoadPlanner, read_item: ReadItem, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes, with a weights-only load."""
    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpoint(f"checkpoint entry {read_item.dest_index.fqn!r} is not plain data; refusing to load "
                               f"it ({str(error).splitlines()[0]})") from None
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor values with ``torch.load(weights_only=True)``.

    It also loads checkpoints of another optimizer class's param groups: a param-group setting that the checkpoint
    lacks (distopt's ``algorithm``, or a hyperparameter torch.optim's namesake does not have, when loading a
    torch.optim checkpoint) keeps its current value instead of failing the load. Every tensor must still be
    there, and so must everything outside ``param_groups``."""

    def create_local_plan(self):
        if self.metadata is not None:
            saved = self.metadata.state_dict_metadata
            for key in [k for k in self.state_dict if k not in saved]:
                if ".param_groups." in f".{key}" and not isinstance(self.state_dict[key], torch.Tensor):
                    del self.state_dict[key]
        return super().create_local_plan()

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_plain(self, read_item, value)


class SafeEmptyLoadPlanner(_EmptyStateDictLoadPlanner):
    """Loads a whole checkpoint into an empty state dict (as torch's format utilities do), weights only."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_plain(self, read_item, value)


def reading(path) -> "_Reading":
    """Context for a DCP read of ``path``: DCP wraps every rank's error in a ``CheckpointException``; this re-raises
    an unsafe entry as :class:`UnsafeCheckpoint` and anything else as a ``CheckpointError`` naming the path."""
    return _Reading(path)


class _Reading:
    def __init__(self, path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        from .directory import CheckpointError

        if error is None or not isinstance(error, (CheckpointException, pickle.UnpicklingError, OSError)):
            return False
        failures = error.failures.values() if isinstance(error, CheckpointException) else [(error, None)]
        causes = [pair[0] if isinstance(pair, tuple) else pair for pair in failures]
        for cause in causes:
            if isinstance(cause, UnsafeCheckpoint):
                raise cause from None
        first = causes[0] if causes else error
        raise CheckpointError(f"cannot read checkpoint {self.path}: {type(first).__name__}: {first}") from error
