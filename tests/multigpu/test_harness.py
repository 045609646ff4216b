"""The harness itself: a failing rank fails the test with its traceback, and a hang becomes a timeout."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from .harness import Pools, RankFailure, RankPool


def _rank_and_sum():
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    return "ok"


def _abort_on_rank_one():
    if dist.get_rank() == 1:
        os.abort()  # as a C++ std::terminate in a background thread would
    dist.barrier()


def _rank_zero_waits_in_a_collective_nobody_joins():
    if dist.get_rank() == 0:
        dist.barrier()
    return "done"


def _sleep_forever():
    time.sleep(3600)


def test_every_rank_runs_and_communicates(pools):
    results = pools.run(3, _rank_and_sum)
    assert results == [(0, 6.0), (1, 6.0), (2, 6.0)]


def test_failing_rank_fails_with_its_traceback():
    pool = RankPool(2)
    try:
        with pytest.raises(RankFailure) as info:
            pool.run(_raise_on_rank_one, timeout=60)
        message = str(info.value)
        assert "rank 1 raised" in message and "deliberate failure on rank 1" in message
        assert "_raise_on_rank_one" in message  # the rank's own traceback, not just the exception text
        assert not pool.alive
    finally:
        pool.close(force=True)


def test_rank_killed_by_a_signal_fails_with_its_stderr():
    pool = RankPool(2)
    try:
        with pytest.raises(RankFailure) as info:
            pool.run(_abort_on_rank_one, timeout=60)
        message = str(info.value)
        assert "ranks that died: {1: -6}" in message
        assert "stderr of rank 1" in message and "Fatal Python error: Aborted" in message
        assert "_abort_on_rank_one" in message  # faulthandler's stack of the aborting thread
    finally:
        pool.close(force=True)


@pytest.mark.parametrize("fn", [_rank_zero_waits_in_a_collective_nobody_joins, _sleep_forever])
def test_hang_becomes_a_timeout_failure(fn):
    pool = RankPool(2)
    try:
        start = time.monotonic()
        with pytest.raises(RankFailure, match="timed out after 4 s") as info:
            pool.run(fn, timeout=4)
        assert time.monotonic() - start < 30
        assert fn.__name__ in str(info.value)  # where the hung ranks were
    finally:
        pool.close(force=True)


def _mesh_twice_and_open_files():
    from .harness import mesh

    first = mesh("cpu", (2, 2))
    opened = len(os.listdir("/proc/self/fd"))
    again = mesh("cpu", (2, 2))
    return first is again, len(os.listdir("/proc/self/fd")) - opened


def test_meshes_are_made_once_per_pool(pools):
    """A 2-D mesh made per test leaves process groups (sockets, threads) behind for the life of the pool; the
    harness's mesh is made once and reused."""
    for same, more_files in pools.run(4, _mesh_twice_and_open_files):
        assert same and more_files == 0


_KEPT: dict = {}


def _keep_and_return(values):
    _KEPT["tensor"] = values.clone()
    _KEPT["address"] = _KEPT["tensor"].data_ptr()
    return _KEPT["tensor"], values.data_ptr() != 0


def _kept_tensor_is_where_it_was():
    time.sleep(0.5)  # time for any background pickling of the last result to have run
    kept = _KEPT["tensor"]
    return kept.data_ptr() == _KEPT["address"], kept.is_shared()


def test_results_and_arguments_are_copied_not_moved_to_shared_memory(pools):
    """A queue's own pickling moves a tensor's storage into shared memory, in place and later, from its feeder
    thread: a rank that still used the tensor it returned wrote into freed memory (heap corruption seen in CI). The
    harness pickles results and arguments by copy, at once, so neither side's tensors move."""
    values = torch.arange(6.0)
    address = values.data_ptr()
    returned = pools.run(2, _keep_and_return, values)
    assert all(torch.equal(tensor, values) for tensor, _ in returned)
    time.sleep(0.5)
    assert values.data_ptr() == address and not values.is_shared()
    for unmoved, shared in pools.run(2, _kept_tensor_is_where_it_was):
        assert unmoved and not shared


def _abort_on_rank_one_the_first_time(marker: str):
    if dist.get_rank() == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os.abort()
    return dist.get_rank()


def test_a_rank_killed_by_a_signal_is_said_and_run_again_on_fresh_processes(tmp_path):
    """A C++ abort not caused by the call itself (heap damage carried over from earlier work in the same processes)
    is reported as a warning with the rank's stderr, and the call runs once more on fresh processes."""
    pools = Pools()
    try:
        with pytest.warns(RuntimeWarning, match="rank 1 killed by signal 6.*Fatal Python error: Aborted"):
            assert pools.run(2, _abort_on_rank_one_the_first_time, str(tmp_path / "marker")) == [0, 1]
    finally:
        pools.close()


def test_a_crash_the_call_causes_every_time_still_fails():
    pools = Pools()
    try:
        with pytest.warns(RuntimeWarning, match="killed by signal 6"), pytest.raises(RankFailure, match="died"):
            pools.run(2, _abort_on_rank_one, timeout=60)
    finally:
        pools.close()
