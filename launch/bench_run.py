"""One candidate inside one benchmark rank: its optimizer on its own FSDP2 model copy, its timed steps, its
measured step, and the figures reduced over the ranks.

Every method that talks to the other ranks is called by every rank in the same order, and a failure on any rank
is agreed on by all of them, so a peer that fails stops only itself.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

from launch.bench_candidates import Candidate, failure
from launch.bench_measure import CollectiveCounter, state_bytes, step_peak_bytes


def _any_failed(failed: bool) -> bool:
    flag = torch.tensor([int(failed)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _max(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _max_or_none(value, kind=float):
    """The largest rank's ``value``, or None unless every rank measured it. One collective on every rank, whether
    or not it has a figure: a rank that skipped it would leave the others waiting."""
    t = torch.tensor([float("-inf") if value is None else float(value), float(value is None)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the largest figure, and whether any rank lacks one
    return None if t[1].item() else kind(t[0].item())


class CandidateRun:
    """``params`` and ``grads`` are the candidate's own FSDP2 parameters and the gradients fed to them (sharded like
    the parameters, the same values for every candidate)."""

    def __init__(self, candidate: Candidate, params: list, grads: list, mesh):
        self.candidate, self.params, self.grads = candidate, params, grads
        self.opt, self.times, self.status, self.detail = None, [], "ok", ""
        self.measured: dict = {}
        self._guarded(lambda: self._build(mesh))  # the first step allocates state: fail fast here

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def _build(self, mesh) -> None:
        self.opt = self.candidate.build(self.params, mesh)
        self._step()

    def _attach(self) -> None:
        for p, g in zip(self.params, self.grads):  # some peers (heavyball 3) consume p.grad in step()
            p.grad = g

    def _step(self) -> None:
        self._attach()
        self.opt.step()

    def _guarded(self, fn, fatal: bool = True) -> str | None:
        """Run ``fn`` on every rank; if it raised on any rank, every rank learns why. A fatal failure marks this
        candidate failed; the reason is returned either way (None: it ran everywhere)."""
        error = None
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
            error = e
        if not _any_failed(error is not None):
            return None
        reasons: list = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, failure(self.candidate, error) if error is not None else None)
        status, detail = next(r for r in reasons if r is not None)
        if self.candidate.ours and error is not None and dist.get_rank() == 0:
            traceback.print_exception(error, file=sys.stderr)
        if fatal:
            self.status, self.detail = status, detail
        return detail

    def timed_step(self, record: bool) -> None:
        if not self.ok:
            return
        elapsed: list[float] = []

        def timed():
            start = time.perf_counter()
            self.opt.step()
            elapsed.append(time.perf_counter() - start)
        self._attach()
        dist.barrier()  # every rank starts together: a step's time is then the job's time for it
        self._guarded(timed)
        if record and self.ok:
            self.times.append(elapsed[0])

    def measure(self) -> None:
        """Two extra steps, not timed: one counting collectives, one recording allocations. A measurement that
        fails leaves its figures out (None) and the timings stand."""
        if not self.ok:
            return
        counter = CollectiveCounter()

        def counted():
            # torch.compile refuses to run under a dispatch mode: compiled code runs eagerly for this step, which
            # issues the same collectives.
            with torch.compiler.set_stance("force_eager"), counter:
                self._step()
        counted_error = self._guarded(counted, fatal=False)
        peak: list = [None]
        peak_error = self._guarded(lambda: peak.__setitem__(0, step_peak_bytes(self._step)), fatal=False)
        self.measured = {"calls": None if counted_error else counter.calls,
                         "sent": None if counted_error else counter.sent_bytes,
                         "peak": None if peak_error else peak[0]}

    def summary(self) -> dict:
        """This candidate's figures, reduced over the ranks (a collective): per step the slowest rank's time."""
        if not self.ok:
            return {"status": self.status, "detail": self.detail}
        per_step = torch.tensor(self.times, dtype=torch.float64)
        dist.all_reduce(per_step, op=dist.ReduceOp.MAX)
        steps = per_step.tolist()
        m = self.measured
        out = {"status": "ok", "median_s": statistics.median(steps), "min_s": min(steps), "max_s": max(steps),
               "steps_s": steps, "sent_bytes_per_rank": _max_or_none(m["sent"]),
               "collectives_per_step": _max_or_none(m["calls"], int),
               "state_bytes_per_rank": int(_max(state_bytes(self.opt))),
               "step_peak_bytes_per_rank": _max_or_none(m["peak"], int)}
        if out["step_peak_bytes_per_rank"] is not None:
            out["peak_bytes_per_rank"] = out["state_bytes_per_rank"] + out["step_peak_bytes_per_rank"]
        plan = getattr(self.opt, "plan", None) if self.candidate.ours else None
        if plan is not None:
            out["plan"] = {"sent_bytes_per_rank": max(plan.sent_bytes_per_rank),
                           "collectives_per_step": plan.collectives_per_step, "imbalance": plan.imbalance}
        elif self.candidate.ours:
            out["plan"] = {"sent_bytes_per_rank": 0, "collectives_per_step": 0, "imbalance": 1.0}
        return out
