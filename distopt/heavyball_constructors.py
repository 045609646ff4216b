"""Constructors of HeavyBall 3.2.1's SOAP family (:mod:`distopt.algos.soap_family`) and PSGD family
(:mod:`distopt.algos.psgd_family`) under HeavyBall's names, keywords and defaults. Each is a
:class:`~distopt.DistributedOptimizer` with the family's maths on owner ranks.

HeavyBall's implementation switches that change nothing here (``multi_tensor``, ``compile_step``, ``orig_shapes``:
distopt batches same-shape matrices on their owner and sees FSDP2's shapes itself; PSGD's ``cached`` and
``store_triu_as_line``) are accepted and ignored; those that would change the maths and are not supported
(``split``, ``precond_grad_accum``, ``use_precond_schedule``, compact states, Hessian-vector products) are refused with
a message at construction."""

from __future__ import annotations

from .algos.psgd_family import FAMILY as PSGD_FAMILY
from .algos.psgd_family import IGNORED_SWITCHES as PSGD_IGNORED
from .algos.psgd_lra import PSGDLRA as _LowRank
from .algos.soap_family import FAMILY as SOAP_FAMILY
from .optimizer import DistributedOptimizer
from .owner import DEFAULT_BUCKET_BYTES

IGNORED = ("multi_tensor", "compile_step", "orig_shapes", *PSGD_IGNORED)


class _HeavyBallFamilyOptimizer(DistributedOptimizer):
    algorithm = ""

    def __init__(self, params, lr=None, *, process_group=None, bucket_bytes=DEFAULT_BUCKET_BYTES, compile=None,
                 **hyperparameters):
        if self.algorithm == _LowRank.name and hyperparameters.get("multi_tensor", True) is False:
            raise ValueError("psgdlra: multi_tensor=False (one low-rank preconditioner per parameter) is not offered "
                             "as a switch; give each parameter its own param group, which fits one per group")
        for key in IGNORED:
            hyperparameters.pop(key, None)
        if lr is not None:
            hyperparameters["lr"] = lr
        super().__init__(params, self.algorithm, process_group=process_group, bucket_bytes=bucket_bytes,
                         compile=compile, **hyperparameters)


def _constructor(cls) -> type:
    defaults = ", ".join(f"{k}={v!r}" for k, v in cls.hyperparameters.items())
    doc = (f"HeavyBall's {cls.__name__} on owner ranks ({cls.__doc__ or 'see ' + cls.__module__}). "
           f"Hyperparameters and defaults: {defaults}; and the seeds' flags.")
    return type(cls.__name__, (_HeavyBallFamilyOptimizer,), {"algorithm": cls.name, "__doc__": doc,
                                                         "__module__": __name__})


CONSTRUCTORS = {cls.__name__: _constructor(cls) for cls in (*SOAP_FAMILY, *PSGD_FAMILY, _LowRank)}
globals().update(CONSTRUCTORS)
__all__ = list(CONSTRUCTORS)
