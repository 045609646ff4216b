"""Each orthogonalization method on the bench model's matrices (``--dim``, one block's shapes, batched per shape as
the owners run them): time per call and the orthogonality reached, the range of the singular values of the result
(1 is exactly orthogonal), so that no speed is bought with a worse orthogonalization.

    python -m launch.bench_orthogonality --dim 256 [--dion-path DIR]

It also times the one product that is symmetric, the Gram matrix ``X Xᵀ``, whole against its 2 x 2 block form
(three block products instead of four, a quarter fewer flops; torch has no symmetric rank-k product), to decide
whether the owners should compute it as symmetric.

Inputs are Gaussian matrices and the momentum-like sums of a few of them (more spread-out spectra); one process.
"""

from __future__ import annotations

import argparse
import time

import torch

from distopt.algos.gram_newton_schulz import gram_newton_schulz
from distopt.algos.muon import NS_COEFFICIENTS, newton_schulz
from distopt.algos.polar_express import polar_express


def methods(dion_path: str | None):
    out = {"newton_schulz (torch.optim.Muon's)": lambda x: newton_schulz(x, NS_COEFFICIENTS, 5, 1e-7),
           "polar_express": lambda x: polar_express(x, 1e-7),
           "gram_newton_schulz": lambda x: gram_newton_schulz(x, 1e-7)}
    if dion_path:
        from launch.bench_candidates import import_dion

        dion_pe = import_dion(dion_path).polar_express.polar_express
        out["dion polar_express (compiled)"] = lambda x: dion_pe(x, 1e-8)
    return out


def inputs(dim: int, gen: torch.Generator) -> dict[tuple[int, int], torch.Tensor]:
    shapes = {(dim, dim): 4, (4 * dim, dim): 1, (dim, 4 * dim): 1}
    out = {}
    for shape, count in shapes.items():
        noise = torch.randn(count * 4, *shape, generator=gen)
        out[shape] = noise.reshape(count, 4, *shape).cumsum(1)[:, -1] + 0.1 * noise[:count]  # a momentum-like sum
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dion-path", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = inputs(args.dim, torch.Generator().manual_seed(0))
    labels = [f"{s[0]}x{s[1]}" for s in data]
    print(f"| method (bfloat16, compiled) | ms per block ({', '.join(labels)}) | "
          + " | ".join(f"singular values {label}" for label in labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for name, fn in methods(args.dion_path).items():
        for x in data.values():  # compile and warm up
            fn(x)
        start = time.perf_counter()
        for _ in range(args.repeats):
            results = [fn(x) for x in data.values()]
        elapsed = (time.perf_counter() - start) / args.repeats
        ranges = []
        for r in results:
            values = torch.linalg.svdvals(r.double())
            ranges.append(f"{values.min().item():.3f}-{values.max().item():.3f}")
        print(f"| {name} | {elapsed * 1e3:.2f} | " + " | ".join(ranges) + " |")
    symmetric_products(data, args.repeats)


def gram_by_blocks(x: torch.Tensor) -> torch.Tensor:
    """``x xᵀ`` from three of its four blocks: the off-diagonal block once, its transpose for the other."""
    half = x.shape[-2] // 2
    top, bottom = x[..., :half, :], x[..., half:, :]
    upper = top @ bottom.mT
    return torch.cat([torch.cat([top @ top.mT, upper], -1), torch.cat([upper.mT, bottom @ bottom.mT], -1)], -2)


def symmetric_products(data: dict, repeats: int) -> None:
    print("\n| X Xᵀ (bfloat16, eager) | whole ms | 2 x 2 blocks ms | blocks ÷ whole |")
    print("|---|---|---|---|")
    for shape, x in data.items():
        x = x.bfloat16()
        x = x if shape[0] <= shape[1] else x.mT.contiguous()
        times = []
        for fn in (lambda y: y @ y.mT, gram_by_blocks):
            fn(x)
            start = time.perf_counter()
            for _ in range(repeats):
                fn(x)
            times.append((time.perf_counter() - start) / repeats * 1e3)
        print(f"| {tuple(x.shape)} | {times[0]:.2f} | {times[1]:.2f} | {times[1] / times[0]:.2f} |")


if __name__ == "__main__":
    main()
