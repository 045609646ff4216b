"""Reading DCP checkpoints without running code from them or reading outside their folder.

DCP's own reader unpickles ``.metadata`` with ``pickle.load`` and its planner reads non-tensor values with
``torch.load(weights_only=False)``: a crafted checkpoint could run code. Here the metadata unpickler admits an exact
list of (module, name) pairs (DCP's records, torch's sizes, dtypes and layouts, paths), refuses every dotted name,
and non-tensor values go through ``torch.load(weights_only=True)``. Every file the metadata or the manifest names
must lie inside the checkpoint folder.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePath, PureWindowsPath
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


#: Exactly the (module, name) pairs that DCP's metadata pickles hold: its records, torch's sizes, dtypes and
#: layouts, and paths. Nothing is admitted by module: a module's namespace holds more than records (the metadata
#: module's holds ``os`` and ``torch``), and pickle protocol 4 reaches any of it through a dotted name.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = frozenset({
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "MetadataIndex"), (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorStorageMetadata"), (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"), (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name in torch's own table, nothing else
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
} | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)})


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if "." not in name and (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"checkpoint metadata refers to {module}.{name}, which is not plain checkpoint data; "
                               "refusing to load it")


def read_metadata_file(path) -> Metadata:
    """DCP's metadata, unpickled with the allow-list, and every storage file it names checked to lie inside the
    checkpoint folder."""
    with open(path, "rb") as stream:
        metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{path} does not hold DCP metadata")
    folder = Path(path).parent
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str):
            raise UnsafeCheckpoint(f"{path} names a storage file that is not a relative path: {relative!r}")
        inside(folder, relative)
    return metadata


def inside(folder, relative: str) -> Path:
    """``folder / relative``, refused (``UnsafeCheckpoint``) unless it stays inside ``folder``: no absolute path,
    no ``..``, and no link that leads out."""
    folder = Path(folder)
    parts = PurePath(relative).parts
    if not relative or PurePath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or ".." in parts \
            or "\\" in relative:
        raise UnsafeCheckpoint(f"checkpoint {folder} names the file {relative!r}, which is not a plain relative path "
                               "inside the checkpoint")
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UnsafeCheckpoint(f"checkpoint {folder} names the file {relative!r}, which leads outside the checkpoint "
                               "(through a link)")
    return path


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
