"""distopt.checkpoint: periodic saves, keep-k, resume from the latest complete checkpoint (on another world size
too), asynchronous saves, format conversion, and bad checkpoints (another model, corrupt, incomplete, a save killed
half-way, pickled code)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from distopt.checkpoint import CheckpointError, CheckpointManager, CheckpointMismatch, UnsafeCheckpoint

from . import checkpointing as ck
from .harness import RankFailure, RankPool


@pytest.fixture
def gloo_ranks(ranks, backend):
    if backend != "gloo":
        pytest.skip("the checkpoint manager tests run on gloo")
    return ranks


def _same(a: dict, b: dict):
    assert set(a) == set(b)
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("kind,world,new_world", [("muon+adamw", 2, 2), ("soap", 2, 3), ("psgd", 3, 1)])
def test_every_keep_resume_continues_like_the_uninterrupted_run(gloo_ranks, tmp_path, async_save, kind, world,
                                                                new_world):
    root = str(tmp_path / "ckpt")
    straight = gloo_ranks(world, ck.managed_run, kind, root, 7, 2, 2, async_save, False)
    # every=2, keep=2: steps 2, 4, 6 were saved and only the latest two kept. Training went on right after each
    # asynchronous save, so the resumed run below also proves that the save captured the state of its step.
    assert straight[0][4] == ["step-00000004", "step-00000006"]
    straight = gloo_ranks(world, ck.managed_run, kind, str(tmp_path / "straight"), 9, 0, 1, async_save, False)
    resumed = gloo_ranks(new_world, ck.managed_run, kind, root, 9, 0, 1, async_save, True)
    assert resumed[0][2] == 6
    for rank_result in resumed:
        _same(rank_result[0], straight[0][0])
        assert rank_result[1] == straight[0][1]  # the scheduler resumed too
    if new_world == world:  # each rank's RNG continues where it was
        for mine, theirs in zip(resumed, straight):
            assert torch.equal(mine[3], theirs[3])


def _save_two(root):
    model, shadow = ck.build("fsdp")
    opt = ck.make_optimizer("soap", model)
    manager = CheckpointManager(root, model, opt, every=1, keep=5)
    for step in (1, 2):
        ck.train(model, shadow, opt, 1, seed=step)
        manager.maybe_save(step)
    return [p.name for p in manager.checkpoints()]


def _load(root, name, net="same"):
    model, _ = ck.build("fsdp", seed=9)
    if net == "wider":
        model.wide = torch.nn.Linear(113, 38)
    elif net == "extra":
        model.extra = torch.nn.Linear(2, 2)
    opt = ck.make_optimizer("soap", model)
    manager = CheckpointManager(root, model, opt)
    try:
        return manager.load(os.path.join(root, name))
    except CheckpointError as error:
        return f"{type(error).__name__}: {error}"


def test_bad_checkpoints_get_clear_errors_and_the_earlier_ones_stay_loadable(gloo_ranks, tmp_path):
    root = str(tmp_path / "ckpt")
    assert gloo_ranks(2, _save_two, root)[0] == ["step-00000001", "step-00000002"]
    newest = tmp_path / "ckpt" / "step-00000002"

    for net, expected in (("wider", "wide.weight"), ("extra", "extra.weight")):
        message = gloo_ranks(2, _load, root, "step-00000002", net)[0]
        assert message.startswith("CheckpointMismatch") and expected in message, message

    data = sorted(newest.glob("*.distcp"))[0]
    original = data.read_bytes()
    data.write_bytes(original[: len(original) // 2])  # truncated
    message = gloo_ranks(2, _load, root, "step-00000002")[0]
    assert "corrupt" in message and data.name in message, message
    data.write_bytes(original[:-8] + bytes(8))  # same size, other bytes
    assert "CRC-32" in gloo_ranks(2, _load, root, "step-00000002")[0]
    (newest / "manifest.json").unlink()  # as if the copy had stopped half-way
    assert "incomplete" in gloo_ranks(2, _load, root, "step-00000002")[0]
    assert gloo_ranks(2, _load, root, "step-00000001") == [1, 1]  # untouched and loadable


def _save_then_die(root):
    """Save step 1, then die (SIGKILL on rank 1) in the middle of writing step 2."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import filesystem

    model, shadow = ck.build("fsdp")
    opt = ck.make_optimizer("muon+adamw", model)
    manager = CheckpointManager(root, model, opt, every=1)
    ck.train(model, shadow, opt, 1, seed=1)
    manager.maybe_save(1)
    if dist.get_rank() == 1:
        write = filesystem.FileSystemWriter.write_data

        def write_then_die(self, plan, planner):
            write(self, plan, planner).wait()  # this rank's files are written, nothing is committed
            os.kill(os.getpid(), signal.SIGKILL)

        filesystem.FileSystemWriter.write_data = write_then_die
    ck.train(model, shadow, opt, 1, seed=2)
    manager.maybe_save(2)


def _latest_and_resume(root):
    model, _ = ck.build("fsdp", seed=3)
    opt = ck.make_optimizer("muon+adamw", model)
    manager = CheckpointManager(root, model, opt)
    return manager.latest().name, manager.resume()


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_latest(gloo_ranks, tmp_path):
    root = str(tmp_path / "ckpt")
    pool = RankPool(2)
    try:
        with pytest.raises(RankFailure, match="died"):
            pool.run(_save_then_die, root, timeout=120)
    finally:
        pool.close(force=True)
    assert (tmp_path / "ckpt" / ".partial-step-00000002").is_dir()
    assert gloo_ranks(2, _latest_and_resume, root) == [("step-00000001", 1)] * 2


def test_torch_save_conversion_round_trip(gloo_ranks, tmp_path):
    from distopt.checkpoint import dcp_to_torch_save, torch_save_to_dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    root = str(tmp_path / "ckpt")
    gloo_ranks(2, _save_two, root)
    file = tmp_path / "whole.pt"
    dcp_to_torch_save(tmp_path / "ckpt" / "step-00000002", file)
    whole = torch.load(file, weights_only=True)
    assert whole["train"]["step"] == 2 and whole["model"]["wide.weight"].shape == (37, 113)
    assert whole["optim"]["state.wide.weight.owner.Q.0"].shape == (37, 37)  # owner state, whole

    # Single process: the whole file restores a plain model and optimizer, and training continues exactly as the
    # two-rank job would (one intra-op thread, as on the ranks, for SOAP's eigh).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, shadow = ck.build(None, seed=9)
        opt = ck.make_optimizer("soap", model)
        set_state_dict(model, opt, model_state_dict=whole["model"], optim_state_dict=whole["optim"],
                       options=StateDictOptions(flatten_optimizer_state_dict=True))
        ck.train(model, shadow, opt, 2, seed=3)
        single = {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        torch.set_num_threads(threads)
    torch_save_to_dcp(file, tmp_path / "back" / "step-00000002", step=2)
    results = gloo_ranks(3, _continue_from, str(tmp_path / "back" / "step-00000002"))
    for params in results:
        for name, value in single.items():
            assert torch.equal(params[name], value), name


def _continue_from(path):
    model, shadow = ck.build("fsdp", seed=9)
    opt = ck.make_optimizer("soap", model)
    assert CheckpointManager(os.path.dirname(path), model, opt).load(path) == 2
    ck.train(model, shadow, opt, 2, seed=3)
    return {n: ck.full(p).detach().clone() for n, p in model.named_parameters()}


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_nothing_but_plain_data_is_unpickled(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from distopt.checkpoint import directory, load_whole

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad"
    dcp.save({"x": torch.ones(2), "evil": _Payload()}, checkpoint_id=str(bad / ".partial"), no_dist=True)
    directory.commit(bad / ".partial", bad / "step-00000001", 1)
    with pytest.raises(UnsafeCheckpoint, match="evil"):
        load_whole(bad / "step-00000001")
    metadata = bad / "step-00000001" / ".metadata"
    metadata.write_bytes(b"cos\nsystem\n(S'touch PWNED'\ntR.")
    directory.write_manifest(bad / "step-00000001", 1)
    with pytest.raises(UnsafeCheckpoint, match="os.system"):
        load_whole(bad / "step-00000001")
    assert not (tmp_path / "PWNED").exists()
