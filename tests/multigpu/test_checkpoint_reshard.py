"""DCP save on W ranks, load on W' ranks (every pair of 1..4, FSDP2 and HSDP), through torch's standard route
(get_state_dict -> dcp.save -> dcp.load -> set_state_dict), then training continues.

The reference is the uninterrupted run: the same job trains ``BEFORE`` steps, saves, and trains ``AFTER`` more. The
resumed job starts from other initial weights and a fresh optimizer (a different owner plan whenever W' != W), loads,
and trains the same ``AFTER`` steps on the same full gradients. Parameters and every optimizer state tensor (owner
state gathered whole) must then be bitwise equal: the owner maths sees the same whole matrices at every world size
and the shard maths is elementwise, so not even the cross-world-size case needs a tolerance here.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from . import checkpointing as ck

BEFORE, AFTER = 3, 2
WORLDS = (1, 2, 3, 4)
_references: dict = {}


def _reference(ranks, tmp_path_factory, kind, mesh_kind, world, flatten):
    key = (kind, mesh_kind, world, flatten)
    if key not in _references:
        path = str(tmp_path_factory.mktemp("ckpt") / "step3")
        results = ranks(world, ck.reference_run, kind, mesh_kind, path, flatten, BEFORE, AFTER)
        _references[key] = path, results[0]
    return _references[key]


def _assert_same(resumed, reference, context):
    snapshot, plan = reference
    assert set(resumed[0][0]) == set(snapshot), context
    for rank_snapshot, _ in resumed:
        for name, value in snapshot.items():
            got = rank_snapshot[name]
            assert got.dtype == value.dtype and torch.equal(got, value), (context, name)


PAIRS = [(w, w2) for w, w2 in itertools.product(WORLDS, WORLDS)]


@pytest.mark.parametrize("kind", ck.ALGORITHMS)
@pytest.mark.parametrize("world,new_world", PAIRS)
def test_fsdp_save_on_w_load_on_w2_continues(ranks, backend, tmp_path_factory, kind, world, new_world):
    if backend != "gloo":
        pytest.skip("checkpoint resharding runs on gloo (the same maths; NCCL only moves the bytes)")
    flatten = (world + new_world) % 2 == 0  # both forms of get_state_dict, spread over the pairs
    path, reference = _reference(ranks, tmp_path_factory, kind, "fsdp", world, flatten)
    resumed = ranks(new_world, ck.resumed_run, kind, "fsdp", path, flatten, AFTER)
    _assert_same(resumed, reference, (kind, world, new_world))
    if world != new_world and kind in ("muon", "muon+adamw", "soap", "psgd", "flags", "muon_variants",
                                             "second_order"):  # these have owner plans
        assert resumed[0][1] != reference[1], "the owner plan should differ between world sizes"


@pytest.mark.parametrize("kind", ck.REDUCING)
@pytest.mark.parametrize("world,new_world", [(1, 4), (3, 2), (4, 1), (2, 3)])
def test_reducing_algorithms_reshard_and_continue_to_a_tolerance(ranks, backend, tmp_path_factory, kind, world,
                                                                 new_world):
    """Sums over shards in another order: after the resumed steps every tensor equals the uninterrupted run to
    ``rtol=atol=1e-5`` (float32 sums of at most 4 partials differ in their last bit, carried through two steps)."""
    if backend != "gloo":
        pytest.skip("checkpoint resharding runs on gloo")
    path, (snapshot, _) = _reference(ranks, tmp_path_factory, kind, "fsdp", world, True)
    resumed = ranks(new_world, ck.resumed_run, kind, "fsdp", path, True, AFTER)
    for rank_snapshot, _ in resumed:
        assert set(rank_snapshot) == set(snapshot)
        for name, value in snapshot.items():
            torch.testing.assert_close(rank_snapshot[name], value, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ck.ALGORITHMS)
@pytest.mark.parametrize("saved,loaded", [(("hsdp", 4), ("hsdp", 4)), (("hsdp", 4), ("fsdp", 2)),
                                          (("fsdp", 3), ("hsdp", 4)), (("hsdp", 2), ("fsdp", 1))])
def test_hsdp_checkpoints_reshard(ranks, backend, tmp_path_factory, kind, saved, loaded):
    if backend != "gloo":
        pytest.skip("checkpoint resharding runs on gloo")
    path, reference = _reference(ranks, tmp_path_factory, kind, saved[0], saved[1], True)
    resumed = ranks(loaded[1], ck.resumed_run, kind, loaded[0], path, True, AFTER)
    _assert_same(resumed, reference, (kind, saved, loaded))


@pytest.mark.parametrize("kind", ["adamw", "soap", "psgd"])
def test_stateful_optimizer_with_async_save(ranks, backend, tmp_path, kind):
    """The optimizer itself is DCP-Stateful; ``dcp.async_save`` returns once the state is staged, so the steps
    taken while it writes do not leak into the checkpoint."""
    if backend != "gloo":
        pytest.skip("checkpoint resharding runs on gloo")
    path = str(tmp_path / "ckpt")
    straight = ranks(2, ck.stateful_save, kind, path, BEFORE, AFTER)
    resumed = ranks(3, ck.stateful_load, kind, path, AFTER)
    for snapshot in resumed:
        assert set(snapshot) == set(straight[0])
        for name, value in straight[0].items():
            assert torch.equal(snapshot[name], value), name


@pytest.mark.parametrize("kind", ["soap", "psgd"])
def test_saved_state_is_keyed_by_fqn_and_every_tensor_is_a_dtensor_of_logical_shape(ranks, backend, kind):
    if backend != "gloo":
        pytest.skip("checkpoint resharding runs on gloo")
    results = ranks(3, ck.saved_layout, kind)
    saved = results[0][0]
    assert all(r[0] == saved for r in results), "ranks disagree on the saved keys or layouts"
    assert set(saved) == {"embed.weight", "wide.weight", "wide.bias", "tall.weight", "thin.weight", "small.weight",
                          "small.bias", "smaller.weight", "smaller.bias", "conv.weight", "conv.bias"}
    for fqn, state in saved.items():
        for key, (kind_name, _, _) in state.items():
            assert kind_name == "DTensor", (fqn, key)
    if kind == "soap":
        assert saved["wide.weight"]["owner.Q.0"] == ("DTensor", (37, 37), "(Shard(dim=0),)")
        assert saved["wide.weight"]["owner.exp_avg_sq"][1] == (37, 113)
        assert saved["wide.weight"]["step"] == ("DTensor", (), "(Replicate(),)")
        key = "owner.Q.1"
    else:
        assert saved["conv.weight"]["owner.Q.0"][1] == (48, 48)  # kron-torch merges (8, 3, 2, 2) into (48, 2)
        assert saved["conv.weight"]["owner.Q.1"][1] == (2, 2)
        key = "owner.Q.0"
    # In memory the owner holds the whole tensor and the others nothing: that layout is never what is saved.
    in_memory = [r[1]["wide.weight"][key] for r in results]
    assert sorted(in_memory) == [(0,), (0,), saved["wide.weight"][key][1]]
