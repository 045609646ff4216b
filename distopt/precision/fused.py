"""One compiled graph for each tensor's whole step on its stored forms: decode its states, run the algorithm's
compiled kernel, encode the states and write the parameter, so that the compiler fuses them into one loop over
memory (as optimi's and HeavyBall's fused steps do) instead of a kernel launch per decode, step and encode, with
float32 working copies in memory between them.

A graph is compiled per kind of tensor (shape, offset, codecs), not per group: the layers of a model share their
shapes, so a model compiles a handful of graphs however many tensors it has (a graph over a whole group compiled
for seconds per tensor, measured: 61 s for the bench model's 24 matrices with stochastic rounding and int8_sr
states, against 13 s per kind).

The arithmetic is that of the separate kernels (the same decode, kernel and encode functions, traced together);
where a fused graph cannot be built (a factored state, whose encoding sums over ranks; a step the algorithm's
compiled pass does not cover), the working copies of :mod:`.working` run instead.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..algos.compiled import _is_compiler_error, _warn_once
from . import settings
from .rounding import COMPILE_OPTIONS, keyed, stream_base
from .working import ROUNDING_STEP, Plan, _encode, _write, managed_states, open_param, param_extra


@dataclass(frozen=True)
class _Param:
    """How one parameter opens and is written (static: part of the compiled graph). ``stream``: where its draws'
    key is among the tensor's keys (-1: it draws none)."""

    write: str | None
    param_codec: Any
    offset: tuple[int, ...]
    whole: tuple[int, ...]
    widen_grad: bool
    stream: int


@dataclass(frozen=True)
class _State:
    """How one state tensor opens and is stored (static)."""

    codec: Any
    suffixes: tuple[str, ...]
    local: tuple[int, ...]
    offset: tuple[int, ...]
    whole: tuple[int, ...]
    working: torch.dtype
    stream: int


class FusedStep:
    """The stored forms of a batch, for :func:`distopt.algos.compiled.run`: ``step(kernel)`` is called like the
    compiled kernel, with the stored tensors in the lists, and runs decode, kernel and encode as one graph per
    tensor.

    The keys of a tensor's random draws enter its graph as a tensor of stream bases and the stored counter: as
    constants they would make each tensor's graph its own code."""

    def __init__(self, plans: Sequence[Plan], params: Sequence[Tensor], states: Sequence[dict[str, Tensor]],
                 names: Sequence[str], offsets: Sequence[tuple[int, ...]], wholes: Sequence[tuple[int, ...]],
                 scalar_keys) -> None:
        self._params: dict[int, tuple] = {}
        self._states: dict[int, tuple] = {}
        for plan, param, stored, name, offset, whole in zip(plans, params, states, names, offsets, wholes):
            local = tuple(param.shape)
            working = torch.float64 if param.dtype == torch.float64 else torch.float32
            widen = plan.active and param.dtype in settings.LOW_PRECISION
            base = stream_base(plan.seed, f"{name}/param") if plan.random else None
            self._params[id(param)] = (plan.write, plan.param_codec, offset, whole, widen, base,
                                       param_extra(plan, stored), stored.get(ROUNDING_STEP))
            for key, codec in managed_states(plan, stored, local, whole, scalar_keys).items():
                suffixes = tuple(codec.parts(whole))
                base = stream_base(plan.seed, f"{name}/{key}") if codec.random else None
                self._states[id(stored[key])] = ((codec, suffixes, local, offset, whole, working), base,
                                                 [stored[key + suffix] for suffix in suffixes])

    @staticmethod
    def fusable(plans: Sequence[Plan]) -> bool:
        """Whether a batch's stored forms can be stepped in one graph (factored states sum over ranks first)."""
        return all(plan.state_mode[2] != "factored" and not plan.state_mode[4] for plan in plans)

    def __call__(self, kernel: Callable) -> Callable:
        return lambda params, grads, *rest: self._run(kernel, params, grads, rest[:-2], rest[-2], rest[-1])

    def _run(self, kernel, params, grads, lists, scalars, flags) -> None:
        calls = []
        for j, (param, grad) in enumerate(zip(params, grads)):
            write, param_codec, offset, whole, widen, base, extra, counter = self._params[id(param)]
            bases = [base] if base is not None else []
            param_spec = _Param(write, param_codec, offset, whole, widen, len(bases) - 1)
            state_specs, state_tensors = [], []
            for values in lists:
                if not values:  # a state this configuration does not keep (amsgrad's maximum)
                    state_specs.append(None)
                    state_tensors.append([])
                    continue
                entry = self._states.get(id(values[j]))
                if entry is None:  # kept as it is (a scalar, or a tensor no codec manages)
                    state_specs.append(None)
                    state_tensors.append([values[j]])
                    continue
                fields, base, parts = entry
                if base is not None:
                    bases.append(base)
                state_specs.append(_State(*fields, len(bases) - 1 if base is not None else -1))
                state_tensors.append(parts)
            spec = (param_spec, tuple(state_specs))
            calls.append((spec, (param, extra, grad, state_tensors, counter if bases else None,
                                 _bases(tuple(bases), param.device) if bases else None)))
        # Each tensor's counter counts once per step, then keys its draws (as the working copies count it).
        counters = list({id(c): c for (_, (*_, c, b)) in calls if c is not None}.values())
        if counters:
            torch._foreach_add_(counters, 1)
        for spec, tensors in calls:
            try:
                _graph(kernel, spec)(*tensors, scalars, flags)
            except Exception as error:
                if not _is_compiler_error(error):
                    raise
                # The graph failed to compile, so none of it ran: the same function runs eagerly.
                _warn_once(kernel.__name__, error)
                _fused_step(kernel, spec, *tensors, scalars, flags)


@lru_cache(maxsize=None)
def _bases(bases: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(bases, dtype=torch.int64, device=device)


_GRAPHS: dict = {}


def _graph(kernel: Callable, spec: tuple) -> Callable:
    """The compiled graph of one kernel over one kind of tensor (static shapes, like the kernel's own), as its
    own code object: the compiler's recompilation limits count per code object, and each kind compiles once."""
    key = (kernel, spec)
    graph = _GRAPHS.get(key)
    if graph is None:
        def step(param, extra, grad, state_tensors, counter, bases, scalars, flags):
            _fused_step(kernel, spec, param, extra, grad, state_tensors, counter, bases, scalars, flags)
        step = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, None,
                                  step.__closure__)
        graph = _GRAPHS[key] = torch.compile(step, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS)
    return graph


def _fused_step(kernel, spec, param, extra, grad, state_tensors, counter, bases, scalars, flags) -> None:
    param_spec, state_specs = spec
    keys = keyed(bases, counter.to(param.device)) if bases is not None else None
    work_param = open_param(param_spec.write, param_spec.param_codec, param, extra)
    work_grad = grad.float() if param_spec.widen_grad else grad
    work_states = []
    for s, parts in zip(state_specs, state_tensors):
        if s is None:
            work_states.append(parts)
        else:
            decoded = s.codec.decode(dict(zip(s.suffixes, parts))).reshape(s.local).to(s.working)
            work_states.append([decoded])
    kernel([work_param], [work_grad], *work_states, scalars, flags)
    for s, parts, work in zip(state_specs, state_tensors, work_states):
        if s is not None:
            _encode.eager(s.codec, work[0], dict(zip(s.suffixes, parts)), keys[s.stream] if s.stream >= 0 else None,
                          s.offset, s.whole)
    if param_spec.write is not None:
        _write.eager(param_spec.write, param, work_param, extra, param_spec.param_codec,
                     keys[param_spec.stream] if param_spec.stream >= 0 else None, param_spec.offset,
                     param_spec.whole)
