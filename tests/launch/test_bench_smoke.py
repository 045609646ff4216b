"""The step benchmark end to end on a tiny model: every figure is in the JSON file, and the collectives counted
during the step agree with distopt's own plan (two independent accounts of the same exchange)."""

import json

from launch.bench import main


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
