"""Checkpoint directories: written under a partial name, committed by one atomic rename once complete.

A committed checkpoint ``step-00000100`` holds DCP's files and ``manifest.json`` (size and CRC-32 of every file). Only
names of that form count as checkpoints, so a save that dies half-way leaves a ``.partial-`` directory that is never
mistaken for one, and the checkpoints before it stay the latest complete ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path

from .safe_io import UnsafeCheckpoint, inside

MANIFEST = "manifest.json"
_STEP = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or cannot be written."""


def final_path(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def partial_path(root: Path, step: int) -> Path:
    return root / f".partial-step-{step:08d}"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int, checksums: bool = True) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        entry = {"bytes": path.stat().st_size}
        if checksums:
            entry["crc32"] = _crc32(path)
        files[str(path.relative_to(directory))] = entry
    manifest = directory / MANIFEST
    with open(manifest, "w") as stream:
        json.dump({"step": step, "files": files}, stream, indent=1)
        stream.flush()
        os.fsync(stream.fileno())


def commit(partial: Path, final: Path, step: int, checksums: bool = True) -> None:
    """Seal ``partial`` with a manifest and rename it to ``final`` (atomic on one file system). A checkpoint of the
    same step already there (saved again after a resume) is renamed aside first and deleted only once the new one
    is in place: a crash at any point leaves one complete ``step-N`` or a ``.trash-step-N`` that :func:`recover`
    puts back."""
    write_manifest(partial, step, checksums)
    trash = final.with_name(f".trash-{final.name}")
    if final.exists():
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
    os.rename(partial, final)
    _fsync_dir(final.parent)
    shutil.rmtree(trash, ignore_errors=True)


def recover(root: Path) -> list[str]:
    """Put back a checkpoint that a crash left renamed aside (``.trash-step-N`` with no ``step-N``); delete trash
    whose checkpoint is in place. Returns what was put back."""
    restored = []
    if not root.is_dir():
        return restored
    for leftover in root.glob(".pruned-step-*"):  # a prune cut short: the checkpoint was on its way out
        shutil.rmtree(leftover, ignore_errors=True)
    for trash in sorted(root.glob(".trash-step-*")):
        final = trash.with_name(trash.name[len(".trash-"):])
        if final.exists() or not (trash / MANIFEST).is_file():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(trash, final)
            restored.append(final.name)
    return restored


def abandon_after(root: Path, step: int) -> list[str]:
    """Rename every checkpoint newer than ``step`` to ``abandoned-step-N`` (``abandoned-step-N.2``, ... when that
    name is taken): kept, but no longer a checkpoint that ``latest`` or ``prune`` sees. A job that saves ``step``
    while newer checkpoints exist continues another history (it resumed from an older one, or started afresh in a
    used folder), and its own checkpoints must be the latest. (A checkpoint of ``step`` itself is replaced by the
    save.) Returns the names moved."""
    moved = []
    for found, path in complete_checkpoints(root):
        if found > step:
            target, copy = path.with_name(f"abandoned-{path.name}"), 1
            while target.exists():
                copy += 1
                target = path.with_name(f"abandoned-{path.name}.{copy}")
            os.rename(path, target)
            moved.append(path.name)
    return moved


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the committed checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP.match(path.name)
        if match and (path / MANIFEST).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints; each is renamed away first, so a half-deleted one never
    looks complete."""
    for _, path in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        trash = path.with_name(f".pruned-{path.name}")  # not .trash-: recover() never puts these back
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def verify(directory: Path) -> int:
    """Check that ``directory`` is a complete, intact checkpoint; return its step. Raise ``CheckpointError`` naming
    what is wrong."""
    manifest = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: it has no {MANIFEST} (a save that did not "
                              "finish, or a partial copy)")
    try:
        with open(manifest) as stream:
            content = json.load(stream)
        step, files = int(content["step"]), dict(content["files"])
        for name, entry in files.items():
            if not (isinstance(name, str) and isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                    and isinstance(entry.get("crc32", 0), int)):
                raise ValueError(f"entry {name!r}: {entry!r}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {directory} is corrupt: unreadable {MANIFEST} ({error})") from None
    if ".metadata" not in files:
        raise CheckpointError(f"checkpoint {directory} is incomplete: its manifest lists no .metadata")
    for name, entry in files.items():
        try:
            path = inside(directory, name)
        except UnsafeCheckpoint as error:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {error}") from None
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} has {size} bytes, the manifest says "
                                  f"{entry['bytes']}")
        if "crc32" in entry and _crc32(path) != entry["crc32"]:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} fails its CRC-32 check")
    return step
