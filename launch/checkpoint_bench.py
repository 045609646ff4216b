"""The checkpoint benchmark (``python launch/bench.py --scenario checkpoint``): time to save and load a checkpoint
of the launch/train.py model through distopt.checkpoint, synchronous against asynchronous, per optimizer."""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import distopt
from distopt.checkpoint import CheckpointManager

from launch.bench import rank_process, run_world
from launch.gpt import GPT, GPTConfig

OPTIMIZERS = {"adamw": lambda named: distopt.AdamW(named, lr=1e-3),
              "muon": lambda named: distopt.Muon(named, lr=0.02, adamw_lr=1e-3),
              "soap": lambda named: distopt.SOAP(named, lr=1e-3)}


def _config(args) -> GPTConfig:
    return GPTConfig(vocab=args.vocab, dim=args.dim, layers=args.layers, heads=4, seq_len=32)


def _rank_main(rank, world, init_file, args, results):
    root = os.path.dirname(init_file)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with rank_process(rank, world, init_file, results):
        out = {}
        for name, factory in OPTIMIZERS.items():
            torch.manual_seed(0)
            model = GPT(_config(args))
            mesh = init_device_mesh("cpu", (world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = factory(list(model.named_parameters()))
            model(torch.randint(args.vocab, (2, 32))).sum().backward()
            opt.step()
            timings = {"sync save": [], "async save (blocking)": [], "async save (until committed)": [], "load": []}
            for async_save in (False, True):
                manager = CheckpointManager(os.path.join(root, f"{name}-{int(async_save)}"), model, opt, keep=1,
                                            async_save=async_save)
                for step in range(1, args.repeats + 1):
                    dist.barrier()
                    start = time.perf_counter()
                    manager.save(step)
                    blocking = time.perf_counter() - start
                    manager.wait()
                    total = time.perf_counter() - start
                    if async_save:
                        timings["async save (blocking)"].append(blocking)
                        timings["async save (until committed)"].append(total)
                    else:
                        timings["sync save"].append(total)
                        dist.barrier()
                        start = time.perf_counter()
                        manager.load(manager.latest())
                        timings["load"].append(time.perf_counter() - start)
                manager.close()
            size = sum(f.stat().st_size for f in manager.latest().rglob("*") if f.is_file())
            out[name] = {k: statistics.median(v) for k, v in timings.items()} | {"bytes": size}
        if rank == 0:
            results.put(out)


def run(args) -> None:
    params = sum(p.numel() for p in GPT(_config(args)).parameters())
    print(f"checkpoint of the launch/train.py model (GPT d={args.dim}, {args.layers} layers, "
          f"{params / 1e6:.2f}M parameters), FSDP2 on gloo, median of {args.repeats} saves; files on local disk")
    for world in args.world_sizes:
        out = run_world(world, args, _rank_main)
        print(f"\nW={world}\n| optimizer | checkpoint MiB | sync save ms | async save: blocking ms | "
              "async save: until committed ms | load ms |\n|---|---|---|---|---|---|")
        for name, t in out.items():
            print(f"| {name} | {t['bytes'] / 2**20:.1f} | {t['sync save'] * 1e3:.0f} | "
                  f"{t['async save (blocking)'] * 1e3:.0f} ({t['async save (blocking)'] / t['sync save']:.2f}x) | "
                  f"{t['async save (until committed)'] * 1e3:.0f} | {t['load'] * 1e3:.0f} |")
