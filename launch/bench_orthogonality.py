"""Each orthogonalization method on the bench model's matrices (``--dim``, one block's shapes, batched per shape as
the owners run them): time per call and the orthogonality reached, the range of the singular values of the result
(1 is exactly orthogonal), so that no speed is bought with a worse orthogonalization.

    python -m launch.bench_orthogonality --dim 256 [--dion-path DIR]

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


if __name__ == "__main__":
    main()
