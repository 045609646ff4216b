"""The step benchmark: its collective counter against bytes worked out by hand, and a run end to end on a tiny
model, where every figure is in the JSON file and the collectives counted during the step agree with distopt's own
plan (two independent accounts of the same exchange)."""

import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from launch.bench import main
from launch.bench_candidates import SCENARIOS, candidates, short_reason
from launch.bench_measure import CollectiveCounter
from launch.bench_report import peer_ratio_table


@pytest.fixture
def rank_1_of_4():
    """This process as rank 1 of 4 on the "fake" backend: collectives run through the dispatcher and move nothing."""
    dist.init_process_group("fake", rank=1, world_size=4, store=FakeStore())
    yield
    dist.destroy_process_group()


def _counted(fn):
    with CollectiveCounter() as counter:
        fn()
    return counter.calls, counter.sent_bytes


def test_counter_bytes_sent_per_collective(rank_1_of_4):
    x = torch.zeros(1000)  # 4000 bytes
    # Ring all-reduce: each rank sends 2 (W-1)/W of the buffer; all-gather: its shard to the W-1 others.
    assert _counted(lambda: dist.all_reduce(x)) == (1, 2 * 3 / 4 * 4000)
    assert _counted(lambda: dist.all_gather_into_tensor(torch.empty(4000), x)) == (1, 3 * 4000)
    # All-to-all of 10 rows of 3 floats, 4, 3, 2, 1 rows to ranks 0..3: rank 1 keeps its 3 rows, sends 7.
    rows = torch.zeros(10, 3)
    assert _counted(lambda: dist.all_to_all_single(torch.empty(10, 3), rows, [1, 2, 3, 4], [4, 3, 2, 1])) == (1, 7 * 12)
    # A DTensor redistribution (functional collectives under DTensor dispatch): 2x4 float shard to 3 others.
    sharded = distribute_tensor(torch.zeros(8, 4), init_device_mesh("cpu", (4,)), [Shard(0)], src_data_rank=None)
    assert _counted(sharded.full_tensor) == (1, 3 * 32)
    assert _counted(lambda: torch.zeros(3) + 1) == (0, 0)


def test_bench_writes_every_figure_and_counts_the_plans_bytes(tmp_path):
    path = tmp_path / "bench.json"
    main(["--scenario", "muon", "--only", "distopt.Muon (eager)", "--world-sizes", "2", "--dim", "32",
          "--layers", "1", "--steps", "2", "--warmup", "0", "--json", str(path)])
    document = json.loads(path.read_text())
    assert document["note"] == "Measured in one run; compare within a run only."
    assert document["machine"]["matmul_512_ms"]["bfloat16"] > 0
    rows = document["results"]["muon"]
    assert set(rows) == {"2"}
    entry = rows["2"]["distopt.Muon (eager)"]
    assert entry["status"] == "ok", entry
    assert 0 < entry["min_s"] <= entry["median_s"] <= entry["max_s"]
    assert len(entry["steps_s"]) == 2
    assert entry["step_peak_bytes_per_rank"] > 0
    assert entry["sent_bytes_per_rank"] > 0 and entry["collectives_per_step"] == 2
    assert entry["sent_bytes_per_rank"] == entry["plan"]["sent_bytes_per_rank"]
    assert entry["collectives_per_step"] == entry["plan"]["collectives_per_step"]
    # Muon keeps one float32 momentum buffer of 12 d^2 values, half on each rank, and a step count per matrix.
    momentum = 12 * 32 * 32 * 4 // 2
    assert momentum <= entry["state_bytes_per_rank"] <= momentum + 6 * 8


def test_a_failure_reason_is_one_short_line_cut_at_a_word():
    long = RuntimeError("aten.op got mixed torch.Tensor and DTensor, " + "need to convert all of them " * 8 + "\nsecond line")
    reason = short_reason(long)
    assert reason.startswith("RuntimeError: aten.op got mixed") and reason.endswith(" ...")
    assert "\n" not in reason and len(reason) <= len("RuntimeError: ") + 124 and " ..." not in reason[:-4]
    assert reason[: -len(" ...")].endswith(("them", "to", "convert", "all", "of", "need"))
    compiled = RuntimeError("Dynamo failed to run FX node\nsaw: got ValueError('shapes differ') from user code")
    assert short_reason(compiled) == "ValueError: shapes differ"
    assert short_reason(KeyError()) == "KeyError"


def test_peer_ratio_table_sets_distopt_against_each_peer():
    ok = lambda ms, **ratios: {"status": "ok", "median_s": ms / 1e3, "ratio_to": ratios}  # noqa: E731
    table = {1: {"ours": ok(2.0, fast=2.0, slow=0.5), "fast": ok(1.0), "slow": ok(4.0)},
             2: {"ours": ok(3.0, slow=0.6), "fast": {"status": "not installed"}, "slow": ok(5.0)}}
    text = peer_ratio_table("demo", table, ["ours", "fast", "slow"], ["ours"])
    assert text.splitlines()[0] == "| demo: distopt's time ÷ the peer's | W | fast | slow |"
    assert "| ours | 1 | 2.00 | 0.50 |" in text and "| ours | 2 | n/a | 0.60 |" in text
    assert peer_ratio_table("demo", table, ["ours"], ["ours"]) == ""


def test_every_algorithm_has_a_scenario_with_peers():
    from distopt.algos import CHAINS, REGISTRY

    scenario_of = {"psgdkron": "psgd"}
    covered = {scenario_of.get(name, name) for name in (*REGISTRY, *CHAINS)} | {"lion_k"}
    assert covered <= set(SCENARIOS), covered - set(SCENARIOS)
    for scenario in covered:
        chosen = candidates(scenario)
        assert any(c.ours for c in chosen) and any(not c.ours for c in chosen), scenario

