"""The main job: train a small GPT with FSDP2 and a distopt optimizer, with sharded checkpoints.

    torchrun --standalone --nproc-per-node 2 launch/train.py                   # CPU, gloo, ~2 minutes
    torchrun --standalone --nproc-per-node 2 launch/train.py --resume          # continue from the last checkpoint
    torchrun --standalone --nproc-per-node 2 launch/train.py --compare adamw,muon,soap,psgd

The data is the Python standard library's source, as bytes (or ``--data FILE``). With one GPU per rank the job runs
on NCCL. Output in ``--out``: ``metrics.jsonl`` (one line per step), ``loss.png``, and checkpoints under
``checkpoints/``; ``--compare`` adds ``compare.png`` and ``compare.md``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distopt.checkpoint import CheckpointManager  # noqa: E402
from launch.data import VOCAB, ByteBatches, read_corpus  # noqa: E402
from launch.gpt import GPT, GPTConfig  # noqa: E402
from launch.optimizers import CHOICES, bf16_slowdown, make_optimizer  # noqa: E402
from launch.report import MetricsLog, compare_table, plot_losses, read_metrics  # noqa: E402
from launch.trainer import Trainer, warmup_cosine  # noqa: E402

BF16_SLOW = 4.0  # bfloat16 matmuls this many times slower than float32: owners compute in float32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="muon", choices=CHOICES)
    p.add_argument("--compare", default=None, help="comma-separated optimizers to train from the same start")
    p.add_argument("--steps", type=int, default=600, help="total steps (a resumed run continues up to this step)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per optimizer)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    p.add_argument("--owner-dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="Muon owners' maths dtype; auto: bfloat16 unless a probe finds it slow here")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank and step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--data", default=None, help="a text file to train on (default: the Python stdlib's sources)")
    p.add_argument("--mesh", default=None, help="HSDP mesh REPLICASxSHARDS, e.g. 2x2 (default: FSDP over all ranks)")
    p.add_argument("--out", default="runs/main", help="output folder (metrics, plots, checkpoints)")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default: OUT/checkpoints)")
    p.add_argument("--ckpt-every", type=int, default=200, help="save every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps (and at the end)")
    p.add_argument("--val-batches", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="compile the owners' maths (torch.compile)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.compare:
        args.compare = [name.strip() for name in args.compare.split(",") if name.strip()]
        unknown = [n for n in args.compare if n not in CHOICES]
        if unknown:
            p.error(f"--compare: unknown optimizer(s) {unknown}; choose among {', '.join(CHOICES)}")
        if args.resume:
            p.error("--compare starts every optimizer from the same initial weights; it does not take --resume")
    return args


def init_distributed() -> torch.device:
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `python launch/train.py`: one rank
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_mesh(spec: str | None, device: torch.device) -> DeviceMesh:
    world = dist.get_world_size()
    if spec is None:
        return init_device_mesh(device.type, (world,))
    try:
        replicas, shards = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--mesh {spec!r}: expected REPLICASxSHARDS, e.g. 2x2") from None
    if replicas * shards != world:
        raise SystemExit(f"--mesh {spec}: {replicas} x {shards} = {replicas * shards} ranks, but the job has {world}")
    return init_device_mesh(device.type, (replicas, shards), mesh_dim_names=("replicate", "shard"))


def build_model(config: GPTConfig, mesh: DeviceMesh, device: torch.device, seed: int) -> GPT:
    torch.manual_seed(seed)  # the same initial weights on every rank, and for every optimizer of --compare
    model = GPT(config).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def pick_owner_dtype(choice: str, device: torch.device, say) -> str:
    if choice != "auto":
        return choice
    slowdown = bf16_slowdown(device)
    flag = [slowdown]
    dist.broadcast_object_list(flag, src=0)  # every rank must run the same maths
    slowdown = flag[0]
    if slowdown > BF16_SLOW:
        say(f"bfloat16 matmuls are {slowdown:.0f}x slower than float32 on this CPU: Muon's owners compute in "
            "float32 (--owner-dtype bfloat16 to override)")
        return "float32"
    say("Muon's owners compute in bfloat16 (as torch.optim.Muon)")
    return "bfloat16"


def run_one(name: str, args: argparse.Namespace, env: dict, out: Path, ckpt_dir: Path | None,
            resume: bool) -> dict:
    """Train with optimizer ``name``; returns its summary (final losses, time, optimizer share)."""
    model = build_model(env["config"], env["mesh"], env["device"], args.seed)
    opt = make_optimizer(name, model, args.lr, args.weight_decay, env["owner_dtype"], args.compile)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, args.steps))
    manager = None
    if ckpt_dir is not None:
        manager = CheckpointManager(ckpt_dir, model, opt, schedule, every=args.ckpt_every or 0, keep=2)
    start = 0
    if resume and manager is not None:
        found = manager.resume()
        start = found or 0
        env["say"](f"resumed from {manager.latest()} at step {start}" if found is not None
                   else f"--resume: no complete checkpoint in {ckpt_dir}; starting at step 0")
    if start >= args.steps:
        env["say"](f"the checkpoint is at step {start}, already at --steps {args.steps}: nothing to train")
    if getattr(opt, "plan", None) is not None:
        env["say"](str(opt.plan).splitlines()[0])
    metrics = MetricsLog(out / "metrics.jsonl", start if resume else None) if dist.get_rank() == 0 else None
    trainer = Trainer(model, opt, schedule, env["batches"], env["device"], metrics, manager, name, args)
    summary = trainer.run(start, args.steps)
    if metrics is not None:
        metrics.close()
    if manager is not None:
        manager.close()
    if dist.get_rank() == 0:
        plot_losses({name: read_metrics(out / "metrics.jsonl")}, out / "loss.png", f"{name}: {env['title']}")
    return summary


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()

    def say(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    mesh = build_mesh(args.mesh, device)
    corpus, source = read_corpus(args.data)
    config = GPTConfig(vocab=VOCAB, dim=args.dim, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
    batches = ByteBatches(corpus, args.seq_len, args.batch_size, args.seed)
    names = args.compare or [args.optimizer]
    owner_dtype = pick_owner_dtype(args.owner_dtype, device, say) if "muon" in names else "bfloat16"
    n_params = sum(p.numel() for p in GPT(config).parameters()) if rank == 0 else 0
    say(f"data: {source}, {len(corpus) / 2**20:.1f} MiB; model: GPT d={args.dim} x {args.layers} layers, "
        f"{n_params / 1e6:.2f}M parameters; {world} {dist.get_backend()} rank(s), "
        f"{'HSDP ' + args.mesh if args.mesh else 'FSDP2'}; {args.batch_size * args.seq_len * world} tokens per step")
    env = {"config": config, "mesh": mesh, "device": device, "batches": batches, "owner_dtype": owner_dtype,
           "say": say, "title": f"GPT {n_params / 1e6:.2f}M on {world} rank(s)"}
    out = Path(args.out)
    summaries = []
    for name in names:
        run_out = out / name if args.compare else out
        if args.compare:
            ckpt_dir = Path(args.ckpt_dir) / name if args.ckpt_dir else None
        else:
            ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else out / "checkpoints"
        say(f"== {name} ==" if args.compare else f"optimizer: distopt {name}")
        try:
            summaries.append(run_one(name, args, env, run_out, ckpt_dir, args.resume))
        except KeyboardInterrupt:
            # torchrun passes Ctrl-C to every rank: one line instead of a traceback per rank.
            say("\ninterrupted: " + (f"the same command with --resume continues from the latest complete "
                                      f"checkpoint in {ckpt_dir}" if ckpt_dir else "no checkpoints were written "
                                      "(--compare saves them only with --ckpt-dir)"))
            raise SystemExit(130) from None
    if args.compare and rank == 0:
        plot_losses({s["optimizer"]: read_metrics(out / s["optimizer"] / "metrics.jsonl") for s in summaries},
                    out / "compare.png", env["title"])
        table = compare_table(summaries)
        (out / "compare.md").write_text(table + "\n")
        print(table)
    say(f"outputs in {out}/")
    dist.barrier()
    dist.destroy_process_group()
    return summaries


if __name__ == "__main__":
    main()
