"""Dry-run the owner planner at world sizes far beyond this machine: no processes, no tensors.

    python launch/plan.py --model llama3-70b --world-sizes 256 1024
    python launch/plan.py --model llama3-405b --world-sizes 8192 --replicas 8      # HSDP: mesh (8, 1024)
    python launch/plan.py --json shapes.json --world-sizes 64 --show               # [{"fqn": ..., "shape": [...]}]

Models: gpt2-small, gpt2-xl, llama3-8b, llama3-70b, llama3-405b (``distopt/sharding/shapes.py``). The optimizer's
routing picks the matrices (embeddings and the output head go to AdamW), each gets the FSDP2 layout (``Shard(0)``
over W ranks, or ``(Replicate(), Shard(0))`` over an ``(R, W/R)`` mesh) and the algorithm's cost, and the planner
the optimizer runs (``make_plan``, then ``Plan.routes``) plans them, timed. Printed per world size, as markdown: the
busiest rank's cost against lower bounds (``distopt/sharding/balance.py``), the same for two reference schemes,
per-rank cost and bytes sent (min, median, max; every rank with ``--show``), and a PNG of the sorted per-rank costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.tensor import Replicate, Shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distopt import ALGORITHMS  # noqa: E402
from distopt.owner import DEFAULT_BUCKET_BYTES, matrix_spec  # noqa: E402
from distopt.routing import is_embedding_or_head  # noqa: E402
from distopt.sharding import balance  # noqa: E402
from distopt.sharding.layout import ParamMeta, box_at  # noqa: E402
from distopt.sharding.plan import MatrixSpec, make_plan  # noqa: E402
from distopt.sharding.shapes import MODELS, Shapes, model_shapes, shapes_from_json  # noqa: E402


def owner_matrices(shapes: Shapes) -> Shapes:
    """The parameters the optimizer's routing gives to the matrix algorithm (a meta tensor stands for each)."""
    return [(fqn, s) for fqn, s in shapes if not is_embedding_or_head(fqn, torch.empty(s, device="meta"))]


def fsdp_meta(fqn: str, shape: tuple[int, ...], world: int, replicas: int, dtype: str, cache: dict) -> ParamMeta:
    """FSDP2 metadata: ``Shard(0)`` over ``world`` ranks, or HSDP ``(Replicate(), Shard(0))`` on ``(replicas,
    world / replicas)``. The boxes depend on the shape only, so matrices of one shape share one tuple of them."""
    mesh_shape = (replicas, world // replicas) if replicas > 1 else (world,)
    placements = (Replicate(), Shard(0)) if replicas > 1 else (Shard(0),)
    if mesh_shape not in cache:
        cache[mesh_shape] = tuple(range(world))
    if (shape, mesh_shape) not in cache:
        coordinates = [divmod(r, mesh_shape[-1]) if replicas > 1 else (r,) for r in range(world)]
        cache[shape, mesh_shape] = tuple(box_at(shape, mesh_shape, placements, c) for c in coordinates)
    return ParamMeta(fqn, shape, dtype, cache[mesh_shape], mesh_shape, tuple(str(p) for p in placements),
                     cache[shape, mesh_shape])


def matrix_specs(matrices: Shapes, world: int, algorithm: str = "muon", replicas: int = 1,
                 param_dtype: torch.dtype = torch.float32) -> list[MatrixSpec]:
    """Specs as the optimizer builds them (``distopt/owner.py``), for the FSDP2 layout."""
    if world < 1 or replicas < 1 or world % replicas:
        raise ValueError(f"--replicas {replicas} must be positive and divide the world size {world}")
    algo = ALGORITHMS[algorithm]()
    hp = dict(algo.hyperparameters)
    cache: dict = {}
    return [matrix_spec(fsdp_meta(fqn, s, world, replicas, str(param_dtype), cache), algo, hp, param_dtype)
            for fqn, s in matrices]


def _numel(sizes) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


@dataclass
class Simulation:
    world: int
    replicas: int
    specs: list[MatrixSpec]
    owners: list[int]
    cost: list[float]
    state: list[int]
    sent: list[int]
    buckets: int
    bounds: dict[str, float]
    schemes: dict[str, list[float]] = field(default_factory=dict)
    shard_bytes: float = 0.0   # mean parameter bytes per rank (the matrices' shards, in the parameter dtype)
    plan_seconds: float = 0.0  # make_plan: what every rank computes once, at the first step
    route_seconds: float = 0.0  # the busiest rank's routes: the only per-rank part of the plan

    @property
    def tight(self) -> float:
        return max(self.bounds.values())


def simulate(matrices: Shapes, world: int, algorithm: str = "muon", replicas: int = 1,
             bucket_bytes: int = DEFAULT_BUCKET_BYTES, param_dtype: torch.dtype = torch.float32) -> Simulation:
    """The runtime planner (``make_plan``, then one rank's ``Plan.routes``) on the FSDP2 layout, timed, with the
    bounds and the reference schemes beside it."""
    specs = matrix_specs(matrices, world, algorithm, replicas, param_dtype)
    start = time.perf_counter()
    plan = make_plan(specs, world, bucket_bytes)
    plan_seconds = time.perf_counter() - start
    cost = plan.cost_per_rank
    busiest = max(range(world), key=lambda r: (cost[r], -r))
    start = time.perf_counter()
    plan.routes(busiest, frozenset(range(len(specs))))
    route_seconds = time.perf_counter() - start
    costs = [s.cost for s in specs]
    bounds = {"simple": balance.simple_bound(costs, world), "L2": balance.l2_bound(costs, world, cost[busiest]),
              "configuration LP": balance.configuration_bound(costs, world, cost[busiest])}
    shapes = [s.meta.shape for s in specs]
    schemes = {"planner (LPT + pair refinement)": cost,
               "round robin, sorted by shape (Muon reference)": balance.round_robin_loads(shapes, costs, world),
               "shape groups padded to W (dion)": balance.padding_loads(shapes, costs, world)}
    held = sum(s.numel for s in specs) * replicas  # every element is held by one rank of each replica group
    return Simulation(world, replicas, specs, list(plan.owners), cost, plan.state_bytes_per_rank,
                      plan.sent_bytes_per_rank, len(plan.buckets), bounds, schemes,
                      held * param_dtype.itemsize / world, plan_seconds, route_seconds)


# ---- report ----------------------------------------------------------------------------------------------------
def _unit(value: float) -> tuple[float, str]:
    for scale, name in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if value >= scale:
            return scale, name
    return 1.0, "FLOP"


def _yes(ratio: float) -> str:
    return f"{'yes' if ratio <= 1.03 else 'no'} ({ratio:.3f})"


def report(name: str, sim: Simulation, algorithm: str, show: bool = False) -> str:
    W, tight = sim.world, sim.tight
    scale, unit = _unit(max(sim.cost))
    layout = f"HSDP ({sim.replicas}, {W // sim.replicas})" if sim.replicas > 1 else "FSDP Shard(0)"
    lines = [f"### {name}: {len(sim.specs)} {algorithm} matrices on {W} ranks ({layout})", "",
             f"| scheme | busiest rank ({unit}) | ÷ simple bound | ÷ tight bound | max/mean | ranks with work |",
             "|---|---|---|---|---|---|"]
    for scheme, loads in sim.schemes.items():
        mean = sum(loads) / W
        lines.append(f"| {scheme} | {max(loads) / scale:.4g} | {max(loads) / sim.bounds['simple']:.3f} | "
                     f"{max(loads) / tight:.3f} | {max(loads) / mean if mean else 1.0:.3f} | "
                     f"{sum(1 for x in loads if x > 0)} |")
    busiest = max(sim.cost)
    lines += ["", "Lower bounds on the busiest rank: " + ", ".join(
        f"{k} {v / scale:.4g}" for k, v in sim.bounds.items()) + f" {unit}; tight = the largest. Planner within "
        f"1.03x of the simple bound: {_yes(busiest / sim.bounds['simple'])}; of the tight bound: "
        f"{_yes(busiest / tight)}.", "",
        "| per rank (planner) | min | median | max |", "|---|---|---|---|"]
    rows = [(f"compute ({unit})", [c / scale for c in sim.cost]),
            ("sent per step (MiB)", [b / 2**20 for b in sim.sent])]
    if any(sim.state):
        rows.append(("owner state (MiB)", [b / 2**20 for b in sim.state]))
    for label, values in rows:
        lines.append(f"| {label} | {min(values):.4g} | {statistics.median(values):.4g} | {max(values):.4g} |")
    shard = sim.shard_bytes
    lines += ["", f"Communication per step: {2 * sim.buckets if W > 1 else 0} all_to_all ({sim.buckets} bucket(s)); "
              f"parameter shard per rank (these matrices, {sim.specs[0].meta.dtype.removeprefix('torch.')}) {shard / 2**20:.4g} MiB; sent "
              f"per rank: median {statistics.median(sim.sent) / 2**20:.4g} MiB "
              f"({statistics.median(sim.sent) / shard:.2f}x the shard), busiest {max(sim.sent) / 2**20:.4g} MiB "
              f"({max(sim.sent) / shard:.2f}x). Planned in {sim.plan_seconds * 1e3:.0f} ms (make_plan, on every rank), the "
              f"busiest rank's routes in {sim.route_seconds * 1e3:.0f} ms."]
    if show:
        lines += ["", f"| rank | compute ({unit}) | sent (MiB) | owner state (MiB) | matrices |", "|---|---|---|---|---|"]
        owned = defaultdict(list)
        for spec, owner in zip(sim.specs, sim.owners):
            owned[owner].append(spec.meta.fqn)
        for r in range(W):
            lines.append(f"| {r} | {sim.cost[r] / scale:.4g} | {sim.sent[r] / 2**20:.4g} | "
                         f"{sim.state[r] / 2**20:.4g} | {', '.join(owned[r])} |")
    return "\n".join(lines)


def summary(sims: list[Simulation]) -> str:
    names = list(sims[0].schemes)
    lines = ["| W | busiest ÷ simple | busiest ÷ tight | ≤ 1.03x simple | ≤ 1.03x tight | round robin ÷ tight | "
             "padding ÷ tight | max MiB sent per rank | plan ms | route ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for sim in sims:
        busiest = max(sim.cost)
        simple, tight = busiest / sim.bounds["simple"], busiest / sim.tight
        lines.append(f"| {sim.world} | {simple:.3f} | {tight:.3f} | {'yes' if simple <= 1.03 else 'no'} | "
                     f"{'yes' if tight <= 1.03 else 'no'} | {max(sim.schemes[names[1]]) / sim.tight:.3f} | "
                     f"{max(sim.schemes[names[2]]) / sim.tight:.3f} | {max(sim.sent) / 2**20:.4g} | "
                     f"{sim.plan_seconds * 1e3:.0f} | {sim.route_seconds * 1e3:.0f} |")
    return "\n".join(lines)


def plot(name: str, sims: list[Simulation], path: Path) -> None:
    """Sorted per-rank cost of each scheme, one panel per world size, with the bounds as horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(sims))
    rows = -(-len(sims) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for ax, sim in zip(axes.flat, sims):
        scale, unit = _unit(max(sim.cost))
        for (scheme, loads), style in zip(sim.schemes.items(), ("-", "--", ":")):
            ax.plot(sorted((x / scale for x in loads), reverse=True), style, label=scheme, drawstyle="steps-post")
        ax.axhline(sim.bounds["simple"] / scale, color="gray", lw=0.8, label="simple bound")
        ax.axhline(sim.tight / scale, color="black", lw=0.8, ls="-.", label="tight bound")
        ax.set(title=f"{name}, W = {sim.world}", xlabel="ranks, busiest first", ylabel=f"owner compute ({unit})")
    for ax in list(axes.flat)[len(sims):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[Simulation]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=sorted(MODELS), default="gpt2-small")
    source.add_argument("--json", help='a file listing shapes: [{"fqn": "...", "shape": [rows, cols]}, ...]')
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--replicas", type=int, default=1, help="HSDP replica groups (1: plain FSDP)")
    parser.add_argument("--algorithm", default="muon", choices=[n for n, a in ALGORITHMS.items() if a.kind == "matrix"])
    parser.add_argument("--param-dtype", default="float32", help="dtype of the sharded parameters")
    parser.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_BYTES / 2**20)
    parser.add_argument("--png", help="per-rank load plot (default runs/plan/<model>.png; 'none' for no plot)")
    parser.add_argument("--show", action="store_true", help="every rank's cost, bytes and matrices")
    args = parser.parse_args(argv)
    bad_worlds = [w for w in args.world_sizes if w < 1]
    if bad_worlds:
        parser.error(f"--world-sizes must be positive, got {bad_worlds[0]}")
    if args.replicas < 1:
        parser.error(f"--replicas must be >= 1, got {args.replicas}")
    if not args.bucket_mb > 0:
        parser.error(f"--bucket-mb must be > 0, got {args.bucket_mb}")
    name = Path(args.json).stem if args.json else args.model
    try:
        shapes = shapes_from_json(args.json) if args.json else model_shapes(args.model)
    except OSError as error:
        parser.error(f"--json {args.json}: {error.strerror or error}")
    except ValueError as error:
        parser.error(f"--json {error}")
    matrices = owner_matrices(shapes)
    if not matrices:
        parser.error(f"{name}: no parameter is a matrix for {args.algorithm} (all are embeddings, heads or 1-D)")
    dtype = getattr(torch, args.param_dtype, None)
    if not isinstance(dtype, torch.dtype):
        parser.error(f"--param-dtype {args.param_dtype!r} is not a torch dtype")
    print(f"## {name}: {len(shapes)} parameters, {len(matrices)} matrices for {args.algorithm}, "
          f"{sum(_numel(s) for _, s in matrices) / 1e9:.4g}B of their elements\n")
    sims = []
    for world in args.world_sizes:
        try:
            sims.append(simulate(matrices, world, args.algorithm, args.replicas, int(args.bucket_mb * 2**20), dtype))
        except ValueError as error:
            parser.error(str(error))
        print(report(name, sims[-1], args.algorithm, args.show) + "\n")
    if len(sims) > 1:
        print(summary(sims) + "\n")
    if (args.png or "").lower() != "none":
        path = Path(args.png or f"runs/plan/{name}.png")
        plot(name, sims, path)
        print(f"per-rank load plot: {path}")
    return sims


if __name__ == "__main__":
    main()
