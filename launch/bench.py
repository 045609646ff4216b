"""Side-by-side optimizer-step benchmarks on FSDP2, at several world sizes, in one run.

    python launch/bench.py --scenario adamw sgd lion             # elementwise (also adam nadam rmsprop adopt laprop
                                                                 # ademamix); world sizes 1, 2 and 4
    python launch/bench.py --scenario muon --dion-path ~/dion     # soap and psgd alike; dion's Muon as a peer
    python launch/bench.py --scenario checkpoint                 # checkpoint save/load (launch/checkpoint_bench.py)
    bash scripts/peers.sh --dion ~/dion                          # installs the peers; clones microsoft/dion

Each world size spawns W gloo ranks on this machine (CPU). Every candidate (launch/bench_candidates.py) gets its own
FSDP2 copy of the same GPT-like model and the same gradients; steps are interleaved across candidates, so machine
noise hits them alike. All ranks start each step together; a step's time is its slowest rank's, and the figures are
the median, min and max over the timed steps after warm-up. Two extra untimed steps count the collectives and the
bytes sent, and the step's peak memory (launch/bench_measure.py). Peers that are not installed, or that fail on
DTensor parameters, are reported as such. Output: markdown tables and a JSON file (launch/bench_report.py).
Compare figures only within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import sys
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch.bench_candidates import SCENARIOS, candidates  # noqa: E402
from launch.bench_measure import machine, machine_line  # noqa: E402
from launch.bench_precision import PARAM_DTYPE  # noqa: E402
from launch.bench_report import (BYTES_NOTE, MEMORY_NOTE, NOTE, add_ratios, default_json_path,  # noqa: E402
                                 detail_table, peer_ratio_table, summary_table, write_json)
from launch.bench_run import CandidateRun  # noqa: E402


class Block(nn.Module):
    """The matrices of one GPT-like layer: q, k, v, o (d x d) and an MLP at 4d. Only shapes matter here."""

    def __init__(self, dim: int):
        super().__init__()
        for name in ("q", "k", "v", "o"):
            setattr(self, name, nn.Linear(dim, dim, bias=False))
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return x + self.o(self.v(x)) + self.down(torch.relu(self.up(x)))


class GPTMatrices(nn.Module):
    """``layers`` blocks of :class:`Block`: 6 matrices, 12 d^2 parameters each."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def threads_per_rank(args, world: int) -> int:
    return args.threads or max(1, (os.cpu_count() or 1) // world)


def _copy(template: nn.Module, mesh) -> nn.Module:
    """An FSDP2 copy of ``template``: every block a unit, then the root, as in a real job."""
    model = GPTMatrices(template.dim, len(template.layers)).to(next(template.parameters()).dtype)
    model.load_state_dict(template.state_dict())
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _rank_main(rank, world, init_file, args, results):
    """One rank of the step benchmark of ``args.scenario``: every candidate on its own model copy, the same
    gradients, steps interleaved across candidates so that machine noise hits them alike."""
    torch.set_num_threads(threads_per_rank(args, world))
    with rank_process(rank, world, init_file, results):
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        dtype = PARAM_DTYPE.get(args.scenario, torch.float32)
        template = GPTMatrices(args.dim, args.layers).to(dtype)
        grads = [torch.randn_like(p) * 1e-2 for p in template.parameters()]
        runs = []
        for candidate in candidates(args.scenario, args.dion_path, args.only):
            params = list(_copy(template, mesh).parameters())
            sharded = [distribute_tensor(g, mesh, p.placements, src_data_rank=None) for p, g in zip(params, grads)]
            runs.append(CandidateRun(candidate, params, sharded, mesh))
        for step in range(args.warmup + args.steps):
            for run in runs:
                run.timed_step(record=step >= args.warmup)
        for run in runs:
            run.measure()
        out = {run.name: run.summary() for run in runs}
        if rank == 0:
            results.put(out)


@contextlib.contextmanager
def rank_process(rank: int, world: int, init_file: str, results):
    """One benchmark rank's process group; a failure reaches the parent as the rank's traceback."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        yield
    except Exception:  # noqa: BLE001
        results.put(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_world(world: int, args, target=None) -> dict:
    """Spawn ``world`` ranks of ``target(rank, world, init_file, args, results)`` (default: the step benchmark) in
    a temporary folder; return what rank 0 put in ``results``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target or _rank_main, args=(rank, world, os.path.join(tmp, "rdzv"), args, results))
                 for rank in range(world)]
        for proc in procs:
            proc.start()
        out = _first_result(results, procs, world)
        for proc in procs:
            proc.join()
    if isinstance(out, str):
        raise RuntimeError(f"benchmark failed at world size {world}:\n{out}")
    return out


def _first_result(results, procs, world: int):
    """What the first rank to report put in ``results``; an error if every rank exits without a word."""
    while True:
        try:
            return results.get(timeout=5)
        except queue.Empty:
            if not any(proc.is_alive() for proc in procs):
                codes = [proc.exitcode for proc in procs]
                raise RuntimeError(f"benchmark ranks at world size {world} exited with codes {codes} and no result")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", nargs="+", choices=sorted(SCENARIOS) + ["checkpoint"], default=["adamw"],
                        help="one or more step scenarios, or checkpoint alone")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dim", type=int, default=256, help="model width d (matrices d x d and d x 4d)")
    parser.add_argument("--layers", type=int, default=4, help="blocks of 6 matrices")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per candidate")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them (after the first step)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores // W)")
    parser.add_argument("--only", nargs="+", help="run only the candidates whose names contain one of these")
    parser.add_argument("--json", help="where to write every figure (default: bench_results/bench-<scenario>-"
                                       "<time>.json, ignored by git)")
    parser.add_argument("--dion-path", default=os.environ.get("DISTOPT_DION_PATH"),
                        help="a microsoft/dion source tree (git clone https://github.com/microsoft/dion); "
                             "default: $DISTOPT_DION_PATH")
    parser.add_argument("--repeats", type=int, default=5, help="checkpoint scenario: saves and loads to time")
    parser.add_argument("--vocab", type=int, default=64, help="checkpoint scenario: the train.py model's vocabulary")
    args = parser.parse_args(argv)
    if "checkpoint" in args.scenario and len(args.scenario) > 1:
        parser.error("--scenario checkpoint runs alone")
    if min(args.world_sizes) < 1 or min(args.steps, args.dim, args.layers) < 1 or min(args.warmup, args.threads) < 0:
        parser.error("--world-sizes, --steps, --dim and --layers must be positive, --warmup and --threads not negative")
    for scenario in set(args.scenario) - {"checkpoint"}:
        try:
            candidates(scenario, args.dion_path, args.only)
        except ValueError as error:
            parser.error(str(error))
    if args.dion_path:
        args.dion_path = os.path.abspath(os.path.expanduser(args.dion_path))
    return args


def settings(args) -> dict:
    return {"scenarios": args.scenario, "world_sizes": args.world_sizes, "dim": args.dim, "layers": args.layers,
            "matrices": 6 * args.layers, "parameters": 12 * args.layers * args.dim ** 2, "steps": args.steps,
            "warmup": args.warmup, "dion_path": args.dion_path, "only": args.only,
            "threads_per_rank": args.threads or "cores // W (at least 1)",
            "setup": "FSDP2 (fully_shard per block and root) on gloo ranks of this CPU, float32 parameters"}


def run_scenario(scenario: str, args) -> dict:
    """{world size: {candidate: figures}} of one scenario; prints its tables."""
    table = {world: run_world(world, argparse.Namespace(**{**vars(args), "scenario": scenario}))
             for world in args.world_sizes}
    add_ratios(table)
    names = list(table[args.world_sizes[0]])
    ours = [c.name for c in candidates(scenario, args.dion_path, args.only) if c.ours]
    ratios = peer_ratio_table(scenario, table, names, ours)
    print(f"\n## {scenario}\n\n{summary_table(scenario, table, names)}\n\n" + (f"{ratios}\n\n" if ratios else "")
          + detail_table(table, names))
    return table


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.scenario == ["checkpoint"]:
        from launch.checkpoint_bench import run
        return run(args)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the memory step's profiler: no start/stop lines per step
    info, config = machine(), settings(args)
    print(f"{NOTE}\nsettings: scenarios {' '.join(args.scenario)}; {config['matrices']} matrices, d={args.dim}, "
          f"{config['parameters'] / 1e6:.2f}M parameters; {config['setup']}; world sizes "
          f"{' '.join(map(str, args.world_sizes))}; torch threads per rank: {config['threads_per_rank']}; "
          f"median over {args.steps} steps after {args.warmup} warm-up\n"
          f"machine: {machine_line(info)}")
    results = {scenario: run_scenario(scenario, args) for scenario in args.scenario}
    print(f"\n{BYTES_NOTE}\n{MEMORY_NOTE}")
    document = {"note": NOTE, "settings": config, "machine": info, "bytes_note": BYTES_NOTE,
                "memory_note": MEMORY_NOTE, "results": results}
    path = args.json or default_json_path(args.scenario)
    write_json(path, document)
    print(f"\nJSON: {path}")
    return document


if __name__ == "__main__":
    main()
