"""The owner exchange is pipelined: bucket k+1's pieces are on the wire while the owners compute bucket k, at most
two buckets are out at once, and every rank issues the same collectives in the same order (with the results still
torch.optim.Muon's, in ``test_muon_owner``)."""

from __future__ import annotations

import torch

import distopt
from distopt.owner import IN_FLIGHT, OwnerRoute
from distopt.sharding import exchange as exchange_module

from .sharded_models import mesh_for
from .test_muon_owner import _sharded


def _events():
    model, _ = _sharded(mesh_for("fsdp"))
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    opt = distopt.DistributedOptimizer(matrices, "muon", lr=0.02, bucket_bytes=2048, owner_dtype="float32")
    log = []
    ex = opt._owner.exchange
    first = lambda flight: flight.route.matrices[0]  # noqa: E731 - a bucket's name in the log
    original = {name: getattr(exchange_module.Exchange, name) for name in
                ("start_to_owners", "finish_to_owners", "start_to_holders", "finish_to_holders")}

    def wrap(name):
        def call(self, *args, **kwargs):
            out = original[name](self, *args, **kwargs)
            flight = out if name.startswith("start") else args[0]
            log.append((name, first(flight)))
            return out
        return call

    compute = OwnerRoute._owner_compute

    def logged_compute(self, owned, wholes, groups, states):
        log.append(("compute", None))
        return compute(self, owned, wholes, groups, states)

    for name in original:
        setattr(exchange_module.Exchange, name, wrap(name))
    OwnerRoute._owner_compute = logged_compute
    try:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    finally:
        for name, fn in original.items():
            setattr(exchange_module.Exchange, name, fn)
        OwnerRoute._owner_compute = compute
    return log, len(ex.routes(frozenset(range(len(matrices)))))


def test_exchange_overlaps_compute_in_the_same_order_on_every_rank(ranks):
    results = ranks(3, _events)
    logs = [[e for e in log if e[0] != "compute"] for log, _ in results]
    assert all(log == logs[0] for log in logs)  # the same collectives in the same order
    log, buckets = results[0]
    assert buckets >= 4
    starts = [b for name, b in log if name == "start_to_owners"]
    assert len(starts) == buckets
    out = 0
    for i, (name, bucket) in enumerate(log):
        out += {"start_to_owners": 1, "finish_to_owners": -1}.get(name, 0)
        assert out <= IN_FLIGHT
        if name == "finish_to_owners" and starts.index(bucket) + 1 < buckets:
            # the next bucket left before this one's owner compute (the compute follows this wait)
            nxt = starts[starts.index(bucket) + 1]
            assert ("start_to_owners", nxt) in log[:i], (bucket, log)
            assert log[i + 1] == ("compute", None)
