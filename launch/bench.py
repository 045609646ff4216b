"""Side-by-side optimizer-step benchmarks on FSDP2, at several world sizes, in one run.

    python launch/bench.py --scenario adamw --world-sizes 1 2 4

Each world size spawns W gloo ranks on this machine (CPU). Every candidate gets its own FSDP2 copy of the same
GPT-like model and the same gradients; steps are interleaved across candidates, so machine noise hits them alike.
The figure is the median step time over the timed steps, taken as the slowest rank's median. Peers that are not
installed, or that fail on DTensor parameters, are reported as such. Compare figures only within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
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
import distopt  # noqa: E402


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
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def _heavyball_adamw(params):
    import heavyball

    return heavyball.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)


def _optimi_adamw(params):
    import optimi

    return optimi.AdamW(params, lr=1e-3, weight_decay=0.01)


def _heavyball_muon(params):
    import heavyball

    return heavyball.Muon(params, lr=0.02, weight_decay=0.1)


def _heavyball_soap(params):
    import heavyball

    return heavyball.SOAP(params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, weight_decay=0.01,
                          precondition_frequency=10, use_precond_schedule=False, merge_dims=False)


def _heavyball_psgd(params):
    import heavyball

    return heavyball.PSGDKron(params, lr=3e-4, betas=(0.9, 0.999), preconditioner_update_probability=1.0,
                              max_size_triangular=8192)


def _distopt(algorithm, compile, **hp):
    return lambda ps: distopt.DistributedOptimizer(ps, algorithm=algorithm, compile=compile, **hp)


def state_bytes(opt) -> int:
    """Bytes of optimizer state held on this rank (local shards of DTensors, whole owner-held tensors)."""
    def walk(value):
        if isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            return local.numel() * local.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0
    return sum(walk(state) for state in opt.state.values())


SOAP_HP = {"lr": 3e-3, "precondition_frequency": 10}
PSGD_HP = {"lr": 3e-4, "preconditioner_update_probability": 1.0}

#: scenario -> candidate name -> factory(params) -> optimizer. The first candidate is the baseline of the ratios.
SCENARIOS = {
    "adamw": {
        "distopt.AdamW": lambda ps: distopt.AdamW(ps, lr=1e-3, weight_decay=0.01),
        "torch.optim.AdamW (for-loop)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=False),
        "torch.optim.AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True),
        "heavyball.AdamW": _heavyball_adamw,
        "optimi.AdamW": _optimi_adamw,
    },
    "muon": {
        "distopt.Muon": _distopt("muon", False, lr=0.02),
        "torch.optim.Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
        "heavyball.Muon": _heavyball_muon,
    },
    "soap": {
        "distopt.SOAP (eager)": _distopt("soap", False, **SOAP_HP),
        "distopt.SOAP (compiled)": _distopt("soap", True, **SOAP_HP),
        "heavyball.SOAP": _heavyball_soap,
    },
    "psgd": {
        "distopt.PSGDKron (eager)": _distopt("psgdkron", False, **PSGD_HP),
        "distopt.PSGDKron (compiled)": _distopt("psgdkron", True, **PSGD_HP),
        "heavyball.PSGDKron": _heavyball_psgd,
    },
}


def _attach(feed):
    for p, g in feed:
        p.grad = g


def _rank_main(rank, world, init_file, args, results):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with rank_process(rank, world, init_file, results):
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        template = GPTMatrices(args.dim, args.layers)
        grads = [torch.randn_like(p) * 1e-2 for p in template.parameters()]
        candidates, times, feeds = {}, {}, {}
        for name, factory in SCENARIOS[args.scenario].items():
            model = GPTMatrices(args.dim, args.layers)
            model.load_state_dict(template.state_dict())
            for block in model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            params = list(model.parameters())
            sharded = [distribute_tensor(g, mesh, p.placements, src_data_rank=None) for p, g in zip(params, grads)]
            feeds[name] = list(zip(params, sharded))
            _attach(feeds[name])
            try:
                candidates[name] = factory(params)
                candidates[name].step()  # first step: state allocation, fail fast here
                times[name] = []
            except Exception as error:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                times[name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
        for step in range(args.warmup + args.steps):
            for name, opt in candidates.items():
                if isinstance(times[name], str):
                    continue
                _attach(feeds[name])  # some peers (heavyball 3) consume p.grad in step()
                start = time.perf_counter()
                opt.step()
                elapsed = time.perf_counter() - start
                if step >= args.warmup:
                    times[name].append(elapsed)
        medians, memory = {}, {}
        for name, opt in candidates.items():
            plan = getattr(opt, "plan", None)
            if plan is not None and "plan" not in medians:
                medians["plan"] = (max(plan.sent_bytes_per_rank), plan.collectives_per_step, plan.imbalance)
            peak = torch.tensor([state_bytes(opt)], dtype=torch.float64)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            memory[name] = peak.item()
        medians["memory"] = memory
        for name, value in times.items():
            if isinstance(value, str):
                medians[name] = value
                continue
            slowest = torch.tensor([statistics.median(value)], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            medians[name] = slowest.item()
        if rank == 0:
            results.put(medians)


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
        out = results.get(timeout=3600)
        for proc in procs:
            proc.join()
    if isinstance(out, str):
        raise RuntimeError(f"benchmark failed at world size {world}:\n{out}")
    return out


def machine_line() -> str:
    a, b = torch.randn(512, 512), torch.randn(512, 512)

    def matmul_ms(dtype):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        start = time.perf_counter()
        for _ in range(5):
            x @ y
        return (time.perf_counter() - start) / 5 * 1e3

    return (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{os.cpu_count()} cores; 512x512 matmul: float32 {matmul_ms(torch.float32):.2f} ms, "
            f"bfloat16 {matmul_ms(torch.bfloat16):.2f} ms")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS) + ["checkpoint"], default="adamw")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="checkpoint scenario: saves and loads to time")
    parser.add_argument("--vocab", type=int, default=64, help="checkpoint scenario: the train.py model's vocabulary")
    args = parser.parse_args(argv)
    if args.scenario == "checkpoint":
        from launch.checkpoint_bench import run
        return run(args)

    params = args.layers * 12 * args.dim * args.dim
    print(f"scenario {args.scenario}: {args.layers * 6} matrices, d={args.dim}, {params / 1e6:.1f}M parameters, "
          f"FSDP2 on gloo; median step over {args.steps} steps after {args.warmup} warm-up")
    print(machine_line())
    table = {world: run_world(world, args) for world in args.world_sizes}
    names = list(SCENARIOS[args.scenario])
    baseline = names[0]
    header = "| candidate | " + " | ".join(f"W={w} ms (x {baseline})" for w in args.world_sizes) + " |"
    print(header)
    print("|" + "---|" * (len(args.world_sizes) + 1))
    for name in names:
        cells = []
        for world in args.world_sizes:
            value, base = table[world][name], table[world][baseline]
            cells.append(value if isinstance(value, str) else
                         f"{value * 1e3:.2f} ({value / base:.2f}x)" if isinstance(base, float) else f"{value * 1e3:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\noptimizer state per rank (MiB, the largest rank): " + "; ".join(
        f"W={w}: " + ", ".join(f"{n} {b / 2**20:.1f}" for n, b in table[w]["memory"].items())
        for w in args.world_sizes))
    if any("plan" in table[w] for w in args.world_sizes):
        print(f"\n{baseline} owner plan per world size: max bytes sent per rank per step, collectives per step, "
              "compute imbalance (max/mean)")
        for world in args.world_sizes:
            sent, collectives, imbalance = table[world]["plan"]
            print(f"  W={world}: {sent / 2**20:.2f} MiB, {collectives} collectives, imbalance {imbalance:.3f}")


if __name__ == "__main__":
    main()
