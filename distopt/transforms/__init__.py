"""Transforms: the parts that algorithms and the seeds' flags are made of, and the runtime that runs them on
shards with reductions over the whole tensor. Custom chains: :mod:`distopt.transforms.chain`."""

from . import flags
from .base import OWNER, SHARD, Reducer, Transform, TensorStep, run

__all__ = ["flags", "OWNER", "SHARD", "Reducer", "Transform", "TensorStep", "run"]
