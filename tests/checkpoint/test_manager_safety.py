"""The checkpoint manager must not lose a checkpoint: a process killed at each point of a commit, two jobs on one
folder, a corrupt newest checkpoint at resume, and a resume from an older checkpoint than the newest."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import distopt
from distopt.checkpoint import CheckpointError, CheckpointManager, load_whole, torch_save_to_dcp
from distopt.checkpoint import directory as dirs
from distopt.checkpoint.lock import FolderInUse

ROOT = Path(__file__).resolve().parents[2]


def _write(folder: Path, value: float, step: int = 3) -> None:
    file = folder.parent / f"value-{value}.pt"
    torch.save({"w": torch.full((4,), value)}, file)
    torch_save_to_dcp(file, folder, step=step)


KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from distopt.checkpoint import directory as dirs
    kill_at, calls = int(sys.argv[1]), [0]
    def dying(real):
        def run(*args, **kwargs):
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            calls[0] += 1
            return real(*args, **kwargs)
        return run
    os.rename, shutil.rmtree = dying(os.rename), dying(shutil.rmtree)
    root = Path(sys.argv[2])
    dirs.commit(root / ".partial-step-00000003", root / "step-00000003", 3)
    print("finished")
""")


@pytest.mark.parametrize("kill_at", range(5))
def test_a_commit_killed_at_any_point_loses_no_checkpoint(tmp_path, kill_at):
    """Saving step 3 again (as after a resume) while step 3 exists; the process dies before the rename aside, the
    rename in, the deletion of the old one, or not at all. Afterwards step 3 is whole: the old or the new."""
    root = tmp_path / "ckpt"
    root.mkdir()
    _write(root / "step-00000003", 1.0)
    _write(root / "new", 2.0)
    (root / "new").rename(root / ".partial-step-00000003")
    (root / ".partial-step-00000003" / dirs.MANIFEST).unlink()  # a partial save has no manifest yet
    done = subprocess.run([sys.executable, "-c", KILLER.format(root=str(ROOT)), str(kill_at), str(root)],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode == 0) == ("finished" in done.stdout), done.stderr
    dirs.recover(root)
    assert dirs.verify(root / "step-00000003") == 3
    value = float(load_whole(root / "step-00000003")["w"][0])
    assert value in (1.0, 2.0)
    if done.returncode == 0:
        assert value == 2.0 and not list(root.glob(".trash-*"))


HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import torch, distopt
    from distopt.checkpoint import CheckpointManager
    model = torch.nn.Linear(3, 2)
    manager = CheckpointManager(sys.argv[1], model, distopt.AdamW(model.parameters()))
    print("holding", flush=True)
    time.sleep(600)
""")


def _manager(root, model=None):
    model = model or torch.nn.Linear(3, 2)
    return CheckpointManager(root, model, distopt.AdamW(model.parameters()), keep=10)


def test_a_second_job_on_the_same_folder_is_refused_until_the_first_is_gone(tmp_path):
    root = tmp_path / "ckpt"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT)), str(root)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(FolderInUse, match=rf"in use by another job .*\"pid\": {holder.pid}"):
            _manager(root)
    finally:
        holder.kill()  # as a crash would: the kernel drops the lock with the process
        holder.wait()
    manager = _manager(root)
    manager.save(1)
    manager.close()


def _train_and_save(manager, model, steps):
    for step in steps:
        model.weight.grad = torch.full_like(model.weight, float(step))
        model.bias.grad = torch.ones_like(model.bias)
        manager.optimizer.step()
        manager.save(step)


def test_resume_skips_a_corrupt_newest_checkpoint_and_says_which(tmp_path):
    root = tmp_path / "ckpt"
    model = torch.nn.Linear(3, 2)
    manager = _manager(root, model)
    _train_and_save(manager, model, (1, 2, 3))
    manager.close()
    data = sorted((root / "step-00000003").glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:-4])
    manager = _manager(root, model)
    with pytest.warns(RuntimeWarning, match=r"skipped a checkpoint: checkpoint .*step-00000003 is corrupt"):
        assert manager.resume() == 2
    _train_and_save(manager, model, (3,))
    assert dirs.verify(root / "step-00000003") == 3  # the resumed run's own step 3 replaced the corrupt one
    manager.close()


def test_when_every_checkpoint_is_corrupt_new_saves_are_not_pruned_for_them(tmp_path):
    root = tmp_path / "ckpt"
    model = torch.nn.Linear(3, 2)
    manager = _manager(root, model)
    _train_and_save(manager, model, (1000, 2000))
    manager.close()
    for step in (1000, 2000):
        (root / f"step-{step:08d}" / ".metadata").write_bytes(b"broken")
    manager = CheckpointManager(root, model, distopt.AdamW(model.parameters()), keep=2)
    with pytest.warns(RuntimeWarning):
        assert manager.resume() is None
    with pytest.warns(RuntimeWarning, match="earlier history"):
        _train_and_save(manager, model, (10, 20, 30))
    assert [p.name for p in manager.checkpoints()] == ["step-00000020", "step-00000030"]
    manager.close()


def test_a_run_resumed_from_an_older_checkpoint_has_the_latest_checkpoints(tmp_path):
    root = tmp_path / "ckpt"
    model = torch.nn.Linear(3, 2)
    manager = _manager(root, model)
    _train_and_save(manager, model, (1, 2, 3, 4))
    manager.close()
    model = torch.nn.Linear(3, 2)
    manager = _manager(root, model)
    assert manager.load(root / "step-00000002") == 2
    assert manager.latest().name == "step-00000004"  # loading alone (say, to evaluate) moves nothing
    with pytest.warns(RuntimeWarning, match=r"\['step-00000004'\] of an earlier history"):
        _train_and_save(manager, model, (3,))
    assert [p.name for p in manager.checkpoints()] == ["step-00000001", "step-00000002", "step-00000003"]
    manager.close()
    again = _manager(root)
    assert again.resume() == 3  # the resumed run's step 3, not the abandoned step 4
    again.close()


def test_a_cut_short_prune_is_not_put_back(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    _write(root / "step-00000001", 1.0, step=1)
    (root / "step-00000001").rename(root / ".pruned-step-00000001")
    (root / ".pruned-step-00000001" / ".metadata").unlink()  # the deletion had begun
    assert dirs.recover(root) == [] and not (root / ".pruned-step-00000001").exists()
    assert dirs.complete_checkpoints(root) == []


@pytest.mark.parametrize("files", [{".metadata": 5}, {".metadata": {}}, {".metadata": {"bytes": "5"}}, [[1, 2]]])
def test_a_malformed_manifest_is_a_checkpoint_error(tmp_path, files):
    folder = tmp_path / "step-00000003"
    _write(folder, 1.0)
    (folder / dirs.MANIFEST).write_text(json.dumps({"step": 3, "files": files}))
    with pytest.raises(CheckpointError, match="unreadable manifest.json"):
        dirs.verify(folder)


def test_a_folder_that_cannot_be_locked_is_still_usable(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    root.mkdir()
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.warns(RuntimeWarning, match="cannot lock checkpoint folder .* continuing without the guard"):
        manager = _manager(root)
    assert manager.resume() is None
    manager.close()
