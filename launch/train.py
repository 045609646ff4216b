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
from distopt.checkpoint.directory import complete_checkpoints  # noqa: E402
from distopt.sharding.exchange import rank_zero_decides  # noqa: E402
from launch.data import VOCAB, ByteBatches, read_corpus  # noqa: E402
from launch.gpt import GPT, GPTConfig  # noqa: E402
from launch.optimizers import CHOICES, PRECISIONS, bf16_slowdown, make_optimizer  # noqa: E402
from launch.report import MetricsLog, compare_table, plot_losses, read_metrics  # noqa: E402
from launch.trainer import Trainer, warmup_cosine  # noqa: E402

BF16_SLOW = 4.0  # bfloat16 matmuls this many times slower than float32: owners compute in float32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="muon", choices=CHOICES)
    p.add_argument("--compare", default=None, help="comma-separated optimizers to train from the same start, each "
                   "optionally NAME@PRECISION (e.g. adamw,adamw@bf16-kahan,adamw@bf16)")
    p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                   help="parameters in bfloat16 (plain, with Kahan summation or stochastic rounding) or compact "
                   "optimizer states (bf16-states, ecc, int8, int4); the default for --compare entries without @")
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
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag checked before any process group or file is touched: a bad one names itself."""
    for flag in ("steps", "batch_size", "seq_len", "dim", "layers", "heads", "val_batches", "eval_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("ckpt_every", "warmup", "weight_decay"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    try:
        GPTConfig(vocab=VOCAB, dim=args.dim, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
    except ValueError as error:
        p.error(f"--dim {args.dim} --heads {args.heads}: {error}")
    if args.data is not None and not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    args.mesh_shape = None
    if args.mesh is not None:
        try:
            args.mesh_shape = tuple(int(x) for x in args.mesh.lower().split("x"))
        except ValueError:
            args.mesh_shape = ()
        if len(args.mesh_shape) != 2 or min(args.mesh_shape) < 1:
            p.error(f"--mesh {args.mesh!r}: expected REPLICASxSHARDS of positive counts, e.g. 2x2")
    if args.compare is not None:
        args.compare = [name.strip() for name in args.compare.split(",") if name.strip()]
        if not args.compare:
            p.error(f"--compare: no optimizer named; choose among {', '.join(CHOICES)}")
        unknown = [n for n in args.compare if n.partition("@")[0] not in CHOICES]
        if unknown:
            p.error(f"--compare: unknown optimizer(s) {unknown}; choose among {', '.join(CHOICES)}")
        bad = [n for n in args.compare if n.partition("@")[2] and n.partition("@")[2] not in PRECISIONS]
        if bad:
            p.error(f"--compare: unknown precision in {bad}; choose among {', '.join(PRECISIONS)}")
        repeated = sorted({n for n in args.compare if args.compare.count(n) > 1})
        if repeated:
            p.error(f"--compare: {', '.join(repeated)} named more than once")
        if args.resume:
            p.error("--compare starts every optimizer from the same initial weights; it does not take --resume")


def init_distributed() -> torch.device:
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `python launch/train.py`: one rank
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        use_cuda = gpus >= local_ranks
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if gpus and not use_cuda and dist.get_rank() == 0:
            print(f"{gpus} GPU(s) for {local_ranks} ranks on this node: training on CPU with gloo (NCCL needs one "
                  "GPU per rank: --nproc-per-node <= the GPU count)", flush=True)
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fail(message: str) -> None:
    """End every rank with one message (from rank 0) and exit status 2, as an argument error does."""
    if dist.get_rank() == 0:
        print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    dist.destroy_process_group()
    raise SystemExit(2)


def build_mesh(shape: tuple[int, int] | None, device: torch.device) -> DeviceMesh:
    world = dist.get_world_size()
    if shape is None:
        return init_device_mesh(device.type, (world,))
    replicas, shards = shape
    if replicas * shards != world:
        fail(f"--mesh {replicas}x{shards}: {replicas * shards} ranks, but the job has {world}")
    return init_device_mesh(device.type, (replicas, shards), mesh_dim_names=("replicate", "shard"))


def refuse_stale_checkpoints(ckpt_dirs: list[Path]) -> None:
    """A fresh run must not write into a folder holding another run's checkpoints: pruning would delete the new
    ones in favour of the old, and a later --resume would pick up whichever is newer."""
    found = [(d, complete_checkpoints(d)[-1][1].name) for d in ckpt_dirs if complete_checkpoints(d)]
    found = rank_zero_decides(found)
    if found:
        folder, latest = found[0]
        fail(f"{folder} holds checkpoints of an earlier run (latest: {latest}). Pass --resume to continue that "
             "run, or choose another --out or --ckpt-dir, or remove the folder to start over.")


def build_model(config: GPTConfig, mesh: DeviceMesh, device: torch.device, seed: int,
                dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(seed)  # the same initial weights on every rank, and for every optimizer of --compare
    model = GPT(config).to(device=device, dtype=dtype)
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
    optimizer, _, precision = name.partition("@")
    precision = precision or args.precision
    model = build_model(env["config"], env["mesh"], env["device"], args.seed, PRECISIONS[precision][0])
    opt = make_optimizer(optimizer, model, args.lr, args.weight_decay, env["owner_dtype"], args.compile, precision)
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


def checkpoint_dir(args: argparse.Namespace, out: Path, name: str) -> Path | None:
    if args.compare:  # several runs: checkpoints only where asked for, one folder per optimizer
        return Path(args.ckpt_dir) / name if args.ckpt_dir else None
    return Path(args.ckpt_dir) if args.ckpt_dir else out / "checkpoints"


def check_job_tools() -> None:
    """The job's progress bar and plots come from the ``job`` extra: without it, say how to install it (once, from
    the first rank) and stop, instead of a traceback per rank."""
    import importlib.util

    missing = [name for name in ("tqdm", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py needs {' and '.join(missing)} (the job extra): pip install 'tqdm>=4.60' "
                  "'matplotlib>=3.7', or pip install -e '.[job]', or run bash scripts/train.sh, which installs "
                  "them", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> list[dict]:
    check_job_tools()
    args = parse_args(argv)
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()

    def say(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    out = Path(args.out)
    names = args.compare or [args.optimizer]
    ckpt_dirs = {name: checkpoint_dir(args, out, name) for name in names}
    if not args.resume:  # before anything slow: a refused run should say so at once
        refuse_stale_checkpoints([d for d in ckpt_dirs.values() if d is not None])
    mesh = build_mesh(args.mesh_shape, device)
    corpus, source = read_corpus(args.data)
    config = GPTConfig(vocab=VOCAB, dim=args.dim, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
    try:
        batches = ByteBatches(corpus, args.seq_len, args.batch_size, args.seed)
    except ValueError as error:
        fail(f"--data {source}: {error}")
    owner_dtype = (pick_owner_dtype(args.owner_dtype, device, say)
                   if any(n.partition("@")[0] == "muon" for n in names) else "bfloat16")
    n_params = sum(p.numel() for p in GPT(config).parameters()) if rank == 0 else 0
    say(f"data: {source}, {len(corpus) / 2**20:.1f} MiB; model: GPT d={args.dim} x {args.layers} layers, "
        f"{n_params / 1e6:.2f}M parameters; {world} {dist.get_backend()} rank(s), "
        f"{'HSDP ' + args.mesh if args.mesh else 'FSDP2'}; {args.batch_size * args.seq_len * world} tokens per step")
    env = {"config": config, "mesh": mesh, "device": device, "batches": batches, "owner_dtype": owner_dtype,
           "say": say, "title": f"GPT {n_params / 1e6:.2f}M on {world} rank(s)"}
    summaries = []
    for name in names:
        run_out = out / name if args.compare else out
        ckpt_dir = ckpt_dirs[name]
        say(f"== {name} ==" if args.compare else f"optimizer: distopt {name}"
            + (f", precision {args.precision}" if args.precision != "fp32" else ""))
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
