"""Loading a checkpoint must not run code or read outside its folder, whatever its files hold. Each test crafts
what an attacker would write, manifest included (a manifest is recomputable, so it proves nothing)."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from distopt.checkpoint import CheckpointError, UnsafeCheckpoint, load_whole, torch_save_to_dcp
from distopt.checkpoint import directory as dirs
from distopt.checkpoint.safe_io import read_metadata_file


def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _call_through_attribute(module: str, dotted: str, argument: str) -> bytes:
    """A protocol-4 pickle that resolves ``module`` then the dotted ``dotted`` (STACK_GLOBAL) and calls the result
    with ``argument``: the route by which ``torch.distributed.checkpoint.metadata`` used to hand out ``os``."""
    return (b"\x80\x04" + _text(module) + b"\x94" + _text(dotted) + b"\x94\x93\x94" + _text(argument)
            + b"\x85R."), None


def _checkpoint(tmp_path: Path) -> Path:
    file = tmp_path / "plain.pt"
    torch.save({"w": torch.arange(6.0), "step": 3}, file)
    folder = tmp_path / "step-00000003"
    torch_save_to_dcp(file, folder, step=3)
    return folder


def _tamper(folder: Path, name: str, content: bytes) -> None:
    (folder / name).write_bytes(content)
    dirs.write_manifest(folder, 3)  # the attacker recomputes the manifest


@pytest.mark.parametrize("module,dotted", [
    ("torch.distributed.checkpoint.metadata", "os.makedirs"),      # a module that was admitted whole
    ("torch.distributed.checkpoint.metadata", "torch.serialization.os.makedirs"),
    ("torch", "serialization.os.makedirs"),                          # torch's dtypes are admitted, not its attributes
    ("pathlib", "os.makedirs"),
    ("collections", "os.makedirs"),
    ("os", "makedirs"),
])
def test_metadata_cannot_reach_a_function_through_a_module_attribute(tmp_path, module, dotted):
    folder = _checkpoint(tmp_path)
    target = tmp_path / "made-by-the-checkpoint"
    payload, _ = _call_through_attribute(module, dotted, str(target))
    _tamper(folder, ".metadata", payload)
    with pytest.raises(UnsafeCheckpoint, match="not plain checkpoint data"):
        load_whole(folder)
    with pytest.raises(UnsafeCheckpoint):
        read_metadata_file(folder / ".metadata")
    assert not target.exists()


def test_a_real_checkpoint_still_loads(tmp_path):
    state = load_whole(_checkpoint(tmp_path))
    assert torch.equal(state["w"], torch.arange(6.0)) and state["step"] == 3


@pytest.mark.parametrize("entry", ["../outside.bin", "/etc/hostname", "sub/../../outside.bin", "..\\outside.bin"])
def test_manifest_entries_outside_the_folder_are_refused(tmp_path, entry):
    folder = _checkpoint(tmp_path)
    (tmp_path / "outside.bin").write_bytes(b"x")
    manifest = folder / dirs.MANIFEST
    content = manifest.read_text().replace('"files": {', f'"files": {{"{entry.replace(chr(92), chr(92) * 2)}": '
                                           '{"bytes": 1}, ', 1)
    manifest.write_text(content)
    with pytest.raises(CheckpointError, match="inside the checkpoint|outside the checkpoint"):
        dirs.verify(folder)


def test_a_link_leading_out_of_the_folder_is_refused(tmp_path):
    folder = _checkpoint(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"secret")
    os.symlink(outside, folder / "link")
    manifest = folder / dirs.MANIFEST
    manifest.write_text(manifest.read_text().replace('"files": {', '"files": {"link/data.bin": {"bytes": 6}, ', 1))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        dirs.verify(folder)


@pytest.mark.parametrize("relative", ["../../../../etc/hostname", "/etc/hostname"])
def test_dcp_storage_paths_outside_the_folder_are_refused(tmp_path, relative):
    folder = _checkpoint(tmp_path)
    with open(folder / ".metadata", "rb") as stream:
        metadata = pickle.load(stream)  # our own, trusted file: read it to forge a variant
    for info in metadata.storage_data.values():
        info.relative_path = relative
    _tamper(folder, ".metadata", pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpoint, match="not a plain relative path"):
        load_whole(folder)
