"""A checkpoint manager for training jobs: saves every N steps, keeps the latest k, resumes from the latest complete
checkpoint, optionally saves asynchronously. It goes through torch's standard route (``get_state_dict`` / DCP /
``set_state_dict``), so a checkpoint written on W ranks loads on any other number of ranks."""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..sharding.exchange import rank_zero_decides, wait_for_all
from . import directory as dirs
from . import lock
from .directory import CheckpointError
from .safe_io import SafeFileSystemReader, SafeLoadPlanner, read_metadata_file, reading

RESERVED = ("model", "optim", "scheduler", "train", "rng")


class CheckpointMismatch(CheckpointError):
    """A checkpoint holds another model: missing or extra FQNs, or other shapes."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


class CheckpointManager:
    """Periodic, atomic, resumable checkpoints of a model, its optimizer, an LR scheduler and a train state.

    Args:
        root: the folder that holds the checkpoints (``step-00000100``, ...).
        model, optimizer: as passed to ``get_state_dict``.
        scheduler: an LR scheduler (its ``state_dict`` is saved), or None.
        every: :meth:`maybe_save` saves when ``step % every == 0`` (0: never).
        keep: how many complete checkpoints to keep (the oldest are deleted after a new one commits).
        async_save: write in the background (``dcp.async_save`` on a separate gloo group); :meth:`save` returns once
            the state is staged in memory, so training may change it right away.
        extra: more entries to save, by name: objects with ``state_dict``/``load_state_dict`` (a data loader).
        checksums: record a CRC-32 of every file, checked on load (costs one read-back of the files on rank 0).

    Every rank calls every method together (they are collectives).
    """

    def __init__(self, root: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, *,
                 every: int = 0, keep: int = 3, async_save: bool = False, extra: Mapping[str, Any] | None = None,
                 checksums: bool = True):
        if every < 0 or keep < 1:
            raise ValueError(f"every must be >= 0 and keep >= 1, got every={every}, keep={keep}")
        clash = sorted(set(extra or {}) & set(RESERVED))
        if clash:
            raise ValueError(f"extra entries may not use the reserved names {clash}")
        self.root = Path(root)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.every, self.keep, self.async_save, self.checksums = every, keep, async_save, checksums
        self.extra = dict(extra or {})
        self.options = StateDictOptions(flatten_optimizer_state_dict=True)
        self._pending: Future | None = None
        self._commit_error: BaseException | None = None
        self._committed = threading.Event()
        # Background writes must not share the training job's process group (its collectives run meanwhile).
        self._async_group = dist.new_group(backend="gloo") if async_save and _distributed() else None
        problem = None
        if _rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                lock.acquire(self.root)
                self._finalizer = weakref.finalize(self, lock.release, self.root)
                for name in dirs.recover(self.root):
                    warnings.warn(f"checkpoint {self.root / name} was put back: a save of the same step had "
                                  "renamed it aside and was cut short", RuntimeWarning)
            except (CheckpointError, OSError) as error:  # on rank 0 only: every rank must hear of it
                problem = (type(error).__name__, f"checkpoint folder {self.root}: {error}")
        problem = rank_zero_decides(problem)
        if problem is not None:
            raise (lock.FolderInUse if problem[0] == "FolderInUse" else CheckpointError)(problem[1])

    # ------------------------------------------------------------------------------------------------------------
    # Listing

    def checkpoints(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        return [path for _, path in dirs.complete_checkpoints(self.root)]

    def latest(self) -> Path | None:
        """The newest committed checkpoint (rank 0's view, shared with every rank), or None."""
        found = self.checkpoints() if _rank() == 0 else None
        found = rank_zero_decides(found)
        return found[-1] if found else None

    # ------------------------------------------------------------------------------------------------------------
    # Saving

    def maybe_save(self, step: int) -> bool:
        """Save if ``step`` is a multiple of ``every``; return whether it did."""
        if self.every and step % self.every == 0:
            self.save(step)
            return True
        return False

    def save(self, step: int) -> None:
        """Write a checkpoint of ``step``; it becomes visible (``latest``) only once complete."""
        self.wait()
        self._abandon_after(step)
        partial, final = dirs.partial_path(self.root, step), dirs.final_path(self.root, step)
        if _rank() == 0:
            dirs.shutil.rmtree(partial, ignore_errors=True)  # left by a save that died
            partial.mkdir(parents=True)
        wait_for_all()
        state = self._state_dict(step)
        if not self.async_save:
            dcp.save(state, checkpoint_id=str(partial))
            self._commit(partial, final, step)
            wait_for_all()
            return
        self._committed.clear()
        self._pending = dcp.async_save(state, checkpoint_id=str(partial), process_group=self._async_group)
        self._pending.add_done_callback(lambda fut: self._commit_when_done(fut, partial, final, step))

    def wait(self) -> None:
        """Block until the pending asynchronous save (if any) is written and committed; raise its error."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        pending.result()
        self._committed.wait()
        wait_for_all()
        if self._commit_error is not None:
            error, self._commit_error = self._commit_error, None
            raise CheckpointError(f"committing the asynchronous checkpoint failed: {error}") from error

    def close(self) -> None:
        """Finish a pending save and let go of the folder (another job may use it then)."""
        try:
            self.wait()
        finally:
            finalizer = getattr(self, "_finalizer", None)
            if finalizer is not None:
                finalizer()

    def _commit_when_done(self, future: Future, partial: Path, final: Path, step: int) -> None:
        try:
            if future.exception() is None:
                self._commit(partial, final, step)
        except BaseException as error:  # noqa: BLE001 - reported by wait()
            self._commit_error = error
        finally:
            self._committed.set()

    def _commit(self, partial: Path, final: Path, step: int) -> None:
        if _rank() == 0:  # DCP has returned, so every rank's files and the metadata are written
            dirs.commit(partial, final, step, self.checksums)
            dirs.prune(self.root, self.keep)

    def _state_dict(self, step: int) -> dict[str, Any]:
        msd, osd = get_state_dict(self.model, self.optimizer, options=self.options)
        state: dict[str, Any] = {"model": msd, "optim": osd, "train": {"step": step, "world_size": _world()},
                                 "rng": self._rng_state()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        for name, obj in self.extra.items():
            state[name] = obj.state_dict()
        return state

    def _rng_state(self) -> dict[str, torch.Tensor]:
        """Each rank's generator states, one row per rank (so DCP keeps every rank's, not one copy)."""
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state()
        if not _distributed():
            return {k: v.unsqueeze(0) for k, v in states.items()}
        mesh = DeviceMesh.from_group(dist.group.WORLD, _device_type())
        return {k: DTensor.from_local(v.unsqueeze(0).to(_device_type()), mesh, [Shard(0)], run_check=False,
                                      shape=torch.Size((_world(), v.numel())), stride=(v.numel(), 1))
                for k, v in states.items()}

    # ------------------------------------------------------------------------------------------------------------
    # Loading

    def resume(self) -> int | None:
        """Load the newest complete and intact checkpoint; return its step, or None when there is none. Newer ones
        that fail their check are skipped with a warning that names each and why; the next :meth:`save` sets them
        aside as ``abandoned-step-N``."""
        found = self.checkpoints() if _rank() == 0 else None
        choice, skipped = None, []
        if _rank() == 0:
            for path in reversed(found):
                try:
                    dirs.verify(path)
                except CheckpointError as error:
                    skipped.append(str(error))
                    continue
                choice = path
                break
        choice, skipped = rank_zero_decides((choice, skipped))
        for reason in skipped:
            warnings.warn(f"resume skipped a checkpoint: {reason}", RuntimeWarning)
        return None if choice is None else self._load(Path(choice), verified=True)

    def load(self, path: str | Path) -> int:
        """Load the checkpoint at ``path`` into the model, optimizer, scheduler and extras; return its step."""
        return self._load(Path(path), verified=False)

    def _load(self, path: Path, verified: bool) -> int:
        self.wait()
        problem = None
        if _rank() == 0 and not verified:  # resume() has just verified it: its CRCs are not read twice
            try:
                dirs.verify(path)
            except CheckpointError as error:
                problem = str(error)
        problem = rank_zero_decides(problem)
        if problem is not None:
            raise CheckpointError(problem)
        with reading(path):
            metadata = read_metadata_file(path / ".metadata")
        state = self._state_dict(step=-1)
        same_world = self._check_against(state, metadata.state_dict_metadata, path)
        if not same_world:
            state.pop("rng")
        with reading(path):
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.options)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for name, obj in self.extra.items():
            obj.load_state_dict(state[name])
        if same_world:
            self._restore_rng(state["rng"])
        else:
            warnings.warn(f"checkpoint {path} was saved on another number of ranks: random number generator states "
                          "are not restored", RuntimeWarning)
        return int(state["train"]["step"])

    def _abandon_after(self, step: int) -> None:
        """This job saves ``step``: checkpoints numbered after it belong to a history it left (it resumed
        from an older one, or started in a used folder) and must not win ``latest()`` over its own, nor make
        ``prune`` delete its own. They are renamed ``abandoned-step-N`` (kept)."""
        moved = None
        if _rank() == 0:
            try:
                moved = dirs.abandon_after(self.root, step)
            except OSError as error:
                moved = error
        moved = rank_zero_decides(moved)
        if isinstance(moved, OSError):
            raise CheckpointError(f"cannot set aside the checkpoints after step {step} in {self.root}: {moved}")
        if moved:
            warnings.warn(f"saving step {step}: the checkpoints {moved} of an earlier history were renamed "
                          f"abandoned-step-N in {self.root}, so that this job's checkpoints are the latest",
                          RuntimeWarning)

    def _check_against(self, state: dict[str, Any], saved: Mapping[str, Any], path: Path) -> bool:
        """Compare the tensors this job expects with the checkpoint's; raise naming the FQNs that differ. Returns
        whether the checkpoint's per-rank entries (RNG states) fit this world size."""
        flat, _ = flatten_state_dict({k: v for k, v in state.items() if k != "rng"})
        expected = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
        saved_tensors = {k: v for k, v in saved.items() if isinstance(v, TensorStorageMetadata)}
        missing = sorted(k for k in expected if k not in saved)
        # Entries distopt no longer saves (SGD's and Muon's step counters, left out to match torch.optim) may sit
        # in older checkpoints: they are not read, and do not make the checkpoint another model's.
        unsaved = {key for algorithm in getattr(self.optimizer, "_algorithms", {}).values()
                   for key in algorithm.unsaved_state}
        extra = sorted(k for k in saved_tensors if k not in expected and k.split(".")[0] in ("model", "optim")
                       and not (k.startswith("optim.state.") and k.rsplit(".", 1)[-1] in unsaved))
        shapes = sorted(f"{k} (checkpoint {tuple(saved_tensors[k].size)}, here {tuple(v.shape)})"
                        for k, v in expected.items() if k in saved_tensors and
                        tuple(saved_tensors[k].size) != tuple(v.shape))
        if missing or extra or shapes:
            parts = [f"missing from the checkpoint: {missing}" if missing else "",
                     f"in the checkpoint but not here: {extra}" if extra else "",
                     f"different shapes: {shapes}" if shapes else ""]
            raise CheckpointMismatch(f"checkpoint {path} holds another model or optimizer; "
                                     + "; ".join(p for p in parts if p))
        rng = saved.get("rng.cpu")
        return isinstance(rng, TensorStorageMetadata) and rng.size[0] == _world()

    def _restore_rng(self, rng: Mapping[str, torch.Tensor]) -> None:
        local = {k: (v.to_local() if isinstance(v, DTensor) else v)[0].cpu() for k, v in rng.items()}
        torch.set_rng_state(local["cpu"])
        if "cuda" in local and torch.cuda.is_available():
            torch.cuda.set_rng_state(local["cuda"])


def _device_type() -> str:
    return "cuda" if _distributed() and dist.get_backend() == "nccl" else "cpu"
