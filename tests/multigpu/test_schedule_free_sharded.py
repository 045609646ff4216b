"""SFAdamW's eval/train swap on FSDP2 shards, and a DCP checkpoint taken in eval mode resuming on another world
size: the swap is elementwise (``lerp`` of the shard with its ``z``), so every world size gives the same bits as one
process, before and after the checkpoint."""

from __future__ import annotations

import pytest
import torch

from . import checkpointing as ck


def _same(a: dict, b: dict, context):
    assert set(a) == set(b), context
    for name, value in a.items():
        assert torch.equal(value, b[name]), (context, name)


@pytest.mark.parametrize("world,new_world", [(1, 3), (4, 2), (2, 1)])
def test_eval_mode_checkpoint_resumes_on_another_world_size(ranks, backend, tmp_path, world, new_world):
    if backend != "gloo":
        pytest.skip("checkpoint resharding runs on gloo")
    path = str(tmp_path / "eval-mode")
    reference = ranks(world, ck.schedule_free_run, "fsdp", path, False)
    resumed = ranks(new_world, ck.schedule_free_run, "fsdp", path, True)
    for rank_result in resumed:
        _same(rank_result[0], reference[0][0], (world, new_world))
    single = ranks(1, ck.schedule_free_run, "fsdp", str(tmp_path / "single"), False)
    _same(reference[0][1], single[0][1], "x at step 3, sharded against one process")
    _same(reference[0][0], single[0][0], "x at step 5, sharded against one process")
    y_and_x = reference[0][1]
    assert any(not torch.equal(y_and_x[k], ck_value) for k, ck_value in reference[0][0].items() if k in y_and_x)
