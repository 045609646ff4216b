"""The main job: train a small causal language model with FSDP2 and a distopt optimizer.

    torchrun --standalone --nproc-per-node 2 launch/train.py --steps 60

Runs on CPU with gloo (or on GPUs with NCCL when each rank has one). The data is a synthetic token stream from a
fixed random Markov chain, so the loss has somewhere to go: it starts near ln(vocab) and falls toward the chain's
entropy. Rank 0 prints the loss, averaged over ranks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distopt  # noqa: E402


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq_len = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(seq_len, device=tokens.device)
        x = self.embed(tokens) + self.pos[:seq_len]
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


class MarkovTokens:
    """Token sequences from a fixed random transition matrix (each token has a few likely successors)."""

    def __init__(self, vocab: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(vocab, vocab, generator=gen) * 3.0
        self.transitions = torch.softmax(logits, dim=-1)
        self.entropy = -(self.transitions * self.transitions.log()).sum(-1).mean().item()

    def batch(self, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
        tokens = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.transitions.shape[0], (batch_size,), generator=gen)
        for t in range(seq_len):
            tokens[:, t + 1] = torch.multinomial(self.transitions[tokens[:, t]], 1, generator=gen).squeeze(1)
        return tokens


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--algorithm", default="adamw", help=f"one of {', '.join(sorted(distopt.ALGORITHMS))}")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> float:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = TinyLM(args.vocab, args.dim, args.layers, args.heads, args.seq_len).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    hyperparameters = {"lr": args.lr}
    if "weight_decay" in distopt.ALGORITHMS[args.algorithm].hyperparameters:
        hyperparameters["weight_decay"] = args.weight_decay
    opt = distopt.DistributedOptimizer(model.named_parameters(), algorithm=args.algorithm, **hyperparameters)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))

    data = MarkovTokens(args.vocab, seed=1234)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank sees its own data
    if rank == 0:
        print(f"training TinyLM ({sum(p.numel() for p in model.parameters())} parameters) with distopt "
              f"{args.algorithm} on {world} {backend} rank(s), FSDP2; loss floor (chain entropy) "
              f"{data.entropy:.3f}, start ~ ln({args.vocab}) = {math.log(args.vocab):.3f}", flush=True)
    start, loss_value = time.perf_counter(), float("nan")
    for step in range(1, args.steps + 1):
        tokens = data.batch(args.batch_size, args.seq_len, gen).to(device)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            summed = loss.detach().clone()
            dist.all_reduce(summed)  # gloo has no AVG reduction
            loss_value = summed.item() / world
            if rank == 0:
                print(f"step {step:4d}  loss {loss_value:.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    dist.destroy_process_group()
    return loss_value


if __name__ == "__main__":
    main()
