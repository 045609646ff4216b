"""The first-order catalogue under FSDP2 (W = 1 to 4, uneven and empty shards), HSDP and DDP-style plain tensors
equals the same optimizer in one process.

Elementwise maths gives the same bits. Adafactor, SinkSGD, SUDSAdamW and Scion run on owners, where the whole tensor is: the same bits
too. The algorithms with a reduction (StableAdamW's RMS, Lion-k's and HyperBall's norms over each whole tensor, Prodigy's
statistics over the whole group) add the shards' sums in another order: the tolerance is that of the flags'
reductions (``STEPS * LARGEST * eps`` of the distance moved; see ``test_flags_sharded``). The collectives counted are the chain runtime's all_reduces per step.
"""

from __future__ import annotations

import pytest

from .test_flags_sharded import check_sharded_equals_single

#: name -> (algorithm, hyperparameters, flags, all_reduce calls per step, bitwise)
CONFIGS = {
    "adafactor": ("adafactor", dict(lr=0.05, weight_decay=0.1), {}, 0, True),
    "adan": ("adan", dict(lr=0.01), {}, 0, True),
    "adan/caution+decouple_lr": ("adan", dict(lr=0.01, weight_decay=0.1), dict(caution=True, decouple_lr=True), 1,
                                 True),
    "ranger": ("ranger", dict(lr=0.01, weight_decay=0.1, k=2), {}, 0, True),
    "ranger/mars": ("ranger", dict(lr=0.01, k=3), dict(mars=True), 0, True),
    "stableadamw": ("stableadamw", dict(lr=0.01), {}, 1, False),
    "stableadamw/caution": ("stableadamw", dict(lr=0.01), dict(caution=True), 2, False),
    "prodigy": ("prodigy", dict(d0=1e-3, slice_p=3, weight_decay=0.1), {}, 1, False),
    "lion/kappa": ("lion", dict(lr=0.01, kappa_p=1.5), {}, 1, False),
    "lion/auto+caution": ("lion", dict(lr=0.01, auto_kappa_p=True), dict(caution=True), 2, False),
    "signsgd": ("signsgd", dict(lr=0.01, nesterov=True, weight_decay=0.1), {}, 0, True),
    "sinksgd": ("sinksgd", dict(lr=0.01, momentum=0.9, weight_decay=0.1), {}, 0, True),
    "sinksgd/mars": ("sinksgd", dict(lr=0.01, momentum=0.9), dict(mars=True), 0, True),
    "simplified_ademamix": ("simplified_ademamix", dict(lr=1e-3, weight_decay=0.1, beta1_warmup=3), {}, 0, True),
    "simplified_ademamix/caution": ("simplified_ademamix", dict(lr=1e-3), dict(caution=True), 1, True),
    "adamc": ("adamc", dict(weight_decay=0.5, max_lr=0.02), dict(warmup_steps=2), 0, True),
    "hyperballadamw": ("hyperballadamw", dict(lr=0.01, weight_decay=0.1), {}, 1, False),
    "sudsadamw": ("sudsadamw", dict(lr=0.01, weight_decay=0.1), {}, 0, True),
    "scion": ("scion", dict(lr=0.01, weight_decay=0.1), {}, 0, True),
    "sfadamw": ("sfadamw", dict(lr=0.01, weight_decay=0.1), dict(warmup_steps=2), 0, True),
}


@pytest.mark.parametrize("mesh_kind,world_size", [("fsdp", 1), ("fsdp", 2), ("fsdp", 3), ("fsdp", 4), ("hsdp", 4),
                                                  ("plain", 2)])
def test_catalogue_on_shards_equals_the_single_process_run(ranks, mesh_kind, world_size):
    check_sharded_equals_single(ranks, mesh_kind, world_size, CONFIGS)
