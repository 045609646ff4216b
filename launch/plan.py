"""Simulate the owner plan of a model at world sizes far beyond this machine.

    python launch/plan.py --world-sizes 2 4 64 --dim 256 --layers 4
    python launch/plan.py --world-sizes 8 --show      # the whole plan: owner of each matrix

The planner is a pure function of metadata, so no process group is needed: the model is built on the meta device
(no memory), each parameter's FSDP2 layout (Shard(0) over W ranks, or HSDP with --replicas) is described for every
rank, and the plan is made exactly as the optimizer makes it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.distributed.tensor import Replicate, Shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distopt import ALGORITHMS  # noqa: E402
from distopt.owner import DEFAULT_BUCKET_BYTES  # noqa: E402
from distopt.routing import is_embedding_or_head  # noqa: E402
from distopt.sharding.layout import ParamMeta, box_at  # noqa: E402
from distopt.sharding.plan import MatrixSpec, make_plan  # noqa: E402
from launch.bench import GPTMatrices  # noqa: E402


def fsdp_meta(fqn: str, param: torch.Tensor, world: int, replicas: int) -> ParamMeta:
    mesh_shape = (replicas, world // replicas) if replicas > 1 else (world,)
    placements = (Replicate(), Shard(0)) if replicas > 1 else (Shard(0),)
    coordinates = [divmod(r, mesh_shape[-1]) if replicas > 1 else (r,) for r in range(world)]
    boxes = tuple(box_at(tuple(param.shape), mesh_shape, placements, c) for c in coordinates)
    return ParamMeta(fqn, tuple(param.shape), str(param.dtype), tuple(range(world)), mesh_shape,
                     tuple(str(p) for p in placements), boxes)


def simulate(model: torch.nn.Module, world: int, algorithm: str = "muon", replicas: int = 1,
             bucket_bytes: int = DEFAULT_BUCKET_BYTES):
    algo = ALGORITHMS[algorithm]()
    hp = dict(algo.hyperparameters)
    specs = [MatrixSpec(fsdp_meta(fqn, p, world, replicas), algo.cost(tuple(p.shape), hp), algo.wire_dtype(hp, p.dtype))
             for fqn, p in model.named_parameters() if not is_embedding_or_head(fqn, p)]
    return make_plan(specs, world, bucket_bytes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 64])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--algorithm", default="muon")
    parser.add_argument("--replicas", type=int, default=1, help="HSDP replica groups (1: plain FSDP)")
    parser.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_BYTES / 2**20)
    parser.add_argument("--show", action="store_true", help="print the whole plan")
    args = parser.parse_args(argv)
    with torch.device("meta"):
        model = GPTMatrices(args.dim, args.layers)
    print(f"GPT-like model: {args.layers * 6} matrices, d={args.dim}; {args.algorithm} owner plans")
    print("| W | matrices | ranks owning work | compute imbalance (max/mean) | max MiB sent per rank per step | "
          "collectives per step |")
    print("|---|---|---|---|---|---|")
    for world in args.world_sizes:
        plan = simulate(model, world, args.algorithm, args.replicas, int(args.bucket_mb * 2**20))
        busy = sum(1 for c in plan.cost_per_rank if c > 0)
        print(f"| {world} | {len(plan.matrices)} | {busy} | {plan.imbalance:.3f} | "
              f"{max(plan.sent_bytes_per_rank) / 2**20:.3f} | {plan.collectives_per_step} |")
        if args.show:
            print(plan)


if __name__ == "__main__":
    main()
