"""Training text as bytes: by default the Python standard library's own source files, which every machine with
Python has (no download), or any text file given by path.

A batch depends only on (seed, step, rank, split), never on what came before: a resumed run sees exactly the
batches of an uninterrupted one, and no data-loader state needs saving.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

VOCAB = 256  # bytes
VAL_FRACTION = 0.05


def stdlib_sources() -> list[Path]:
    """Every ``.py`` file of the standard library (site-packages and tests excluded), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1])]
    if not files:
        raise FileNotFoundError(f"no Python sources found under {root}; pass --data FILE")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_corpus(path: str | None) -> tuple[torch.Tensor, str]:
    """The corpus as a uint8 tensor, and a description of where it came from."""
    if path is None:
        files = stdlib_sources()
        data = b"\n".join(f.read_bytes() for f in files)
        source = f"{len(files)} Python standard library source files ({files[0].parents[0]})"
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"--data {path}: no such file")
        data = file.read_bytes()
        source = str(file)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), source


class ByteBatches:
    """Random windows of ``seq_len + 1`` bytes: the last ``VAL_FRACTION`` of the corpus is held out."""

    def __init__(self, corpus: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        split = int(len(corpus) * (1 - VAL_FRACTION))
        self.splits = {"train": corpus[:split], "val": corpus[split:]}
        for name, part in self.splits.items():
            if len(part) <= seq_len + 1:
                raise ValueError(f"the {name} split has {len(part)} bytes, fewer than --seq-len + 2 = {seq_len + 2}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def batch(self, step: int, rank: int, split: str = "train") -> torch.Tensor:
        """``(batch_size, seq_len + 1)`` int64 tokens for this step and rank."""
        part = self.splits[split]
        salt = 0 if split == "train" else 1
        gen = torch.Generator().manual_seed(hash((self.seed, salt, step, rank)) & (2**63 - 1))
        starts = torch.randint(len(part) - self.seq_len - 1, (self.batch_size,), generator=gen)
        offsets = torch.arange(self.seq_len + 1)
        return part[starts[:, None] + offsets].long()
