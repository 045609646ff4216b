"""The step benchmark's output: markdown tables on stdout and one JSON file with every figure."""

from __future__ import annotations

import json
import os
import time

NOTE = "Measured in one run; compare within a run only."
MEMORY_NOTE = ("state: optimizer state held between steps on the largest rank (local shards of DTensor state, "
               "whole owner-held tensors). step peak: the allocator's high-water mark during one step above the "
               "memory in use when it starts, on the largest rank; CPU allocators keep no peak counter, so it is "
               "replayed from the profiler's allocation events. Peak optimizer memory per rank = state + step peak.")
BYTES_NOTE = ("sent: bytes one rank sends to the others per step inside the optimizer's collectives (largest rank), "
              "counted on an extra untimed step from every torch.distributed and DTensor collective, under the "
              "bandwidth-optimal algorithm of each (ring all-reduce/all-gather/reduce-scatter, direct all-to-all "
              "without the part a rank keeps). distopt's plan (opt.plan.sent_bytes_per_rank) is in the JSON.")


def add_ratios(table: dict) -> None:
    """Per world size, every working candidate's median over every other's (``ratio_to``) and over its own
    median at world size 1 (``ratio_to_w1``, the scaling)."""
    for world, row in table.items():
        for name, entry in row.items():
            if entry["status"] != "ok":
                continue
            entry["ratio_to"] = {other: entry["median_s"] / e["median_s"] for other, e in row.items()
                                 if other != name and e["status"] == "ok"}
            own_w1 = table.get(1, {}).get(name, {})
            if own_w1.get("status") == "ok" and world != 1:
                entry["ratio_to_w1"] = entry["median_s"] / own_w1["median_s"]


def _size(n: float | None) -> str:
    if n is None:
        return "n/a"
    if n == 0:
        return "0"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _count(n: int | None) -> str:
    return "n/a" if n is None else str(n)


def _failed(entry: dict) -> str:
    return f"{entry['status']}: {entry['detail']}" if entry.get("detail") else entry["status"]


def summary_table(scenario: str, table: dict, names: list[str]) -> str:
    """Candidates x world sizes: median ms (x the baseline), the baseline being the scenario's first candidate."""
    base = names[0]
    worlds = list(table)
    lines = [f"| {scenario}: median step ms (x {base}) | " + " | ".join(f"W={w}" for w in worlds) + " |",
             "|---" * (len(worlds) + 1) + "|"]
    for name in names:
        cells = []
        for world in worlds:
            entry = table[world][name]
            if entry["status"] != "ok":
                cells.append(_failed(entry))
                continue
            ratio = entry.get("ratio_to", {}).get(base, 1.0 if name == base else None)
            cells.append(f"{entry['median_s'] * 1e3:.2f}" + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peer_ratio_table(scenario: str, table: dict, names: list[str], ours: list[str]) -> str:
    """Each of distopt's candidates against each peer: the ratio of median step times (below 1: distopt faster)."""
    peers = [n for n in names if n not in ours]
    if not peers:
        return ""
    lines = [f"| {scenario}: distopt's time ÷ the peer's | W | " + " | ".join(peers) + " |",
             "|---" * (len(peers) + 2) + "|"]
    for world, row in table.items():
        for name in ours:
            ratios = row[name].get("ratio_to", {})
            cells = [f"{ratios[p]:.2f}" if p in ratios else "n/a" for p in peers]
            lines.append(f"| {name} | {world} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _detail_row(world: int, name: str, e: dict, base: str) -> str:
    if e["status"] != "ok":
        return f"| {world} | {name} | {_failed(e)} |" + " |" * 9
    ratio = e["ratio_to"].get(base, 1.0 if name == base else None)
    scaling = f"{e['ratio_to_w1']:.2f}" if "ratio_to_w1" in e else ""
    cells = [str(world), name, f"{e['median_s'] * 1e3:.2f}", f"{e['min_s'] * 1e3:.2f}", f"{e['max_s'] * 1e3:.2f}",
             "n/a" if ratio is None else f"{ratio:.2f}", scaling, _size(e["sent_bytes_per_rank"]),
             _count(e["collectives_per_step"]), _size(e["state_bytes_per_rank"]), _size(e["step_peak_bytes_per_rank"]),
             _size(e.get("peak_bytes_per_rank"))]
    return "| " + " | ".join(cells) + " |"


def detail_table(table: dict, names: list[str]) -> str:
    """One row per world size and candidate: time spread, ratios, communication, memory."""
    base = names[0]
    lines = [f"| W | candidate | median ms | min ms | max ms | x {base} | x own W=1 | sent per rank per step | "
             "collectives per step | state per rank | step peak per rank | peak optimizer memory per rank |",
             "|---" * 12 + "|"]
    lines += [_detail_row(world, name, row[name], base) for world, row in table.items() for name in names]
    return "\n".join(lines)


#: Results go under the repository's bench_results/ (ignored by git, see write_json) unless --json says otherwise.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench_results")


def default_json_path(scenarios: list[str]) -> str:
    return os.path.join(RESULTS_DIR, f"bench-{'-'.join(scenarios)}-{time.strftime('%Y%m%d-%H%M%S')}.json")


def write_json(path: str, document: dict) -> None:
    """Write ``document`` to ``path``; a new folder gets a .gitignore of ``*`` so results are never committed."""
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):
        os.makedirs(folder)
        with open(os.path.join(folder, ".gitignore"), "w") as f:
            f.write("*\n")
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
