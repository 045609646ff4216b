"""The parts a chain is made of: a :class:`Transform` is a pure step on one tensor's running update, with its own
small state, in the spirit of optax's ``(init, update)`` pairs.

A transform sees one tensor at a time through a :class:`TensorStep` (the local shard of a parameter, its gradient,
its state, the running update ``u``). Some need a number of the *whole* tensor (a norm, a count): they declare
:meth:`Transform.partials`, local sums of this rank's shard; the runtime (:func:`run`) sums them over every rank
that holds a part of the tensor, once for all the tensors of a param group, and hands the totals to
:meth:`Transform.update`. So the maths is written once and is right on any sharding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

SHARD = "shard"
OWNER = "owner"


@dataclass(slots=True)
class TensorStep:
    """One tensor's step through a chain: what a transform may read and change.

    ``grad`` is the gradient as the chain took it in (negated under ``maximize``, float32 under ``promote``, and
    MARS-corrected when MARS is on, as HeavyBall's caution sees it); ``u`` is the running update; ``numel`` and
    ``shape`` are the whole parameter's, whatever this rank holds; ``step`` is the step being taken (1 at the first).
    ``beta2`` and ``bias_correction2``, when set by a transform before the core (PaLM, Kourkoutas-β), replace the
    core's second-moment decay and its bias correction for this step.
    """

    param: Tensor
    grad: Tensor
    u: Tensor | None
    state: dict[str, Tensor]
    hp: Mapping[str, Any]
    numel: int
    shape: tuple[int, ...]
    step: int
    beta2: float | None = None
    bias_correction2: float | None = None
    #: Set by the core when this step makes no update (ADOPT's and SOAP's first step): later transforms skip it.
    skip: bool = False
    #: A factor of this step's learning rate, for the update and the decay alike (StableAdamW's clip).
    lr_scale: Any = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


class Transform:
    """A step of a chain. Subclasses set ``name`` and override what they need.

    * ``hyperparameters``: the keys this transform reads from the param group, with defaults;
    * :meth:`check`: raise ``ValueError`` naming a bad value;
    * :meth:`init`: its state for one local tensor (keys must not collide with the other parts of a chain);
    * :meth:`partials` (optional): a 1-D tensor of local sums over this rank's shard, for a reduction;
    * :meth:`update`: the new running update (or ``None`` for one changed in place).
    """

    name: ClassVar[str] = "transform"
    kind: ClassVar[str] = SHARD
    hyperparameters: ClassVar[dict[str, Any]] = {}
    #: How many numbers :meth:`partials` returns per tensor (0: no reduction).
    reductions: ClassVar[int] = 0
    #: Whether the totals are pooled over every tensor of the reduction (a global norm) rather than per tensor.
    pooled: ClassVar[bool] = False
    #: How partials combine over ranks: ``"sum"``, or ``"max"`` (the key of an argmax over every rank).
    reduce_op: ClassVar[str] = "sum"
    #: The dtype partials travel in where it must be exact (float64 keys and counts); None: the update's (at
    #: least float32).
    reduce_dtype: ClassVar[torch.dtype | None] = None
    #: The keys :meth:`init` returns.
    state_keys: ClassVar[tuple[str, ...]] = ()
    #: State entries that are scalars (not shaped like the parameter).
    scalar_state: ClassVar[tuple[str, ...]] = ()

    def check(self, hp: Mapping[str, Any]) -> None:
        pass

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        return {}

    def partials(self, t: TensorStep) -> Tensor:
        raise NotImplementedError

    def pool(self, totals: Tensor, steps: list[TensorStep]) -> Tensor:
        """Combine per-tensor totals ``(n, k)`` across tensors (a global norm sums them all); default: none."""
        if self.pooled:
            return totals.sum(0, keepdim=True).expand(len(steps), -1)
        return totals

    def update(self, t: TensorStep, totals: Tensor | None) -> Tensor | None:
        raise NotImplementedError

    def active(self, steps: list[TensorStep]) -> bool:
        """Whether this transform runs at this step of the batch (neither its reduction nor its update otherwise).
        Every rank must decide alike, from what every rank holds (step counters, the group's settings)."""
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(slots=True)
class Reducer:
    """Sums partials over the ranks of the optimizer's process group, for the tensors of one batch.

    ``weights[i]`` is 1 where this rank's copy of tensor ``i`` counts and 0 on replicas (HSDP's other replica
    groups, plain tensors on ranks other than the first), so that no part of a tensor is counted twice.
    ``all_reduce`` is None in a single process: nothing is issued.
    """

    weights: Sequence[bool]
    all_reduce: Callable[[Tensor], Tensor] | None = None
    #: Collectives issued so far (tests and the closing note count them).
    issued: int = 0
    #: The elementwise maximum over the ranks, for transforms whose ``reduce_op`` is ``"max"``.
    maximum: Callable[[Tensor], Tensor] | None = None

    def totals(self, transform: Transform, steps: list[TensorStep]) -> Tensor:
        """``(len(steps), transform.reductions)`` totals over every rank, pooled if the transform pools."""
        reference = steps[0].u if steps[0].u is not None else steps[0].grad
        dtype = transform.reduce_dtype or torch.promote_types(reference.dtype, torch.float32)
        rows = []
        for t, counts in zip(steps, self.weights):
            if counts and not t.skip:
                rows.append(transform.partials(t).to(dtype))
            else:
                rows.append(torch.zeros(transform.reductions, dtype=dtype, device=reference.device))
        local = torch.stack(rows)
        combine = self.maximum if transform.reduce_op == "max" else self.all_reduce
        if combine is not None:
            local = combine(local)
            self.issued += 1
        return transform.pool(local, steps)


def run(transforms: Sequence[Transform], steps: list[TensorStep], reducer: Reducer) -> None:
    """Run ``transforms`` in order over every tensor of a batch; each reduction is one collective for the batch.

    Every rank holds the same batch (the parameters with gradients, which FSDP2 and DDP give every rank alike), so
    every rank issues the same collectives in the same order."""
    for transform in transforms:
        if steps and not transform.active(steps):
            continue
        totals = reducer.totals(transform, steps) if transform.reductions and steps else None
        for i, t in enumerate(steps):
            if t.skip:
                continue
            out = transform.update(t, None if totals is None else totals[i])
            if out is not None:
                t.u = out
