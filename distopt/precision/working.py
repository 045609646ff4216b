"""The working copies of one step: stored parameters and states opened as float32, stepped by the algorithm's own
maths, then closed back into their stored forms (compensated, stochastically rounded, error-corrected, quantized).

An algorithm never sees a stored form: it runs on float32 tensors, as HeavyBall's ``promote`` and torchao's kernels
do, so every algorithm takes every setting. :func:`plan_for` decides the stored form of each state of one
parameter from its group's settings and the parameter's whole shape; :func:`encode_fresh` stores a new state;
:func:`open_tensor` and :class:`Opened.close` run around a step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from functools import lru_cache

from . import settings
from .codecs import DynamicMap, ErrorCorrected, Factored, LinearSR, Plain, blocks
from .rounding import COMPILE_OPTIONS, element_bits, global_index, kahan_split, round_stochastic, stream_key

#: Graphs a precision kernel may compile (one per codec, shape and offset): torch's default of 8 is process-wide.
RECOMPILE_LIMIT = 64

KAHAN = "kahan_comp"
PARAM_ECC = "param::ecc"
ROUNDING_STEP = "rounding_step"
BOOKKEEPING = (KAHAN, PARAM_ECC, ROUNDING_STEP)
#: The owner's whole-matrix state is never opened here: its elementwise moments are opened on the owner
#: (:mod:`.owner_state`), its preconditioners keep the algorithm's dtype.
OWNER_PREFIX = "owner."
#: States that are never negative: quantized with the unsigned maps (torchao's and adv_optm's choice for Adam's v).
NONNEGATIVE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "exp_inf", "acc_delta", "sum",
                         "exp_avg_sq_slow", "grafting", "second_momentum_buffer", "normuon_v", "variance_neuron",
                         "row_var", "col_var", "variance"})
#: Copies of the weights (schedule-free's z, Prodigy's p0, the lookahead's slow weights): never quantized.
WEIGHT_LIKE = frozenset({"z", "p0", "la_param"})


@dataclass(frozen=True)
class Plan:
    """How one parameter is written and its states stored."""

    write: str | None  # "kahan", "stochastic", "ecc" or None
    state_mode: tuple  # the group's storage choice, for codec_for
    param_dtype: torch.dtype
    seed: int
    param_codec: Any = None
    codecs: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.write is not None or any(m is not None for m in self.state_mode[:3]) or self.state_mode[4]

    def codec_for(self, key: str, shape: tuple[int, ...]):
        """The codec of the state ``key`` of a parameter of whole shape ``shape``."""
        cached = self.codecs.get(key)
        if cached is None:
            cached = self.codecs[key] = _codec(key, shape, self.state_mode, self.param_dtype)
        return cached

    @property
    def random(self) -> bool:
        return self.write in ("stochastic", "ecc")


def plan_for(hp: Mapping[str, Any], param: Tensor) -> Plan:
    write = settings.param_write(hp, param.dtype)
    mode = normalized_mode(hp, param.dtype)
    return Plan(write, mode, param.dtype, settings.value(hp, "precision_seed"),
                ErrorCorrected(settings.value(hp, "param_ecc")) if write == "ecc" else None)


def normalized_mode(hp: Mapping[str, Any], dtype: torch.dtype) -> tuple:
    """``(storage_dtype, ecc, state_precision, state_block_size, factored_2nd)``, with the choices that store states
    as the algorithm keeps them anyway (the parameter's dtype) written as None."""
    storage, ecc, precision, block, factored_2nd = (settings.value(hp, key) for key in (
        "storage_dtype", "ecc", "state_precision", "state_block_size", "factored_2nd"))
    if storage is not None and (settings.STORAGE_DTYPES[storage] == dtype
                                or (storage == "float32" and dtype == torch.float64)):
        storage = None  # HeavyBall's default "float32" never narrows a float64 state
    if precision == "auto" or (precision == "fp32" and dtype == torch.float32):
        precision = None
    return storage, ecc, precision, block, bool(factored_2nd)


@lru_cache(maxsize=None)  # one object per kind: compiled kernels see the same codec every step
def _codec(key: str, shape: tuple[int, ...], mode: tuple, param_dtype: torch.dtype):
    storage, ecc, precision, block, factored_2nd = mode
    if factored_2nd and key in NONNEGATIVE and len(shape) >= 2:
        return Factored(tuple(shape), False)  # adv_optm's factored_2nd: second moments factored, the rest as set
    if storage is not None:
        dtype = settings.STORAGE_DTYPES[storage]
        return Plain(dtype, stochastic=dtype == torch.bfloat16)  # HeavyBall rounds bf16 stochastically, not fp16
    if ecc is not None:
        return ErrorCorrected(ecc)
    if precision in (None, "auto"):
        return Plain(param_dtype)
    if precision == "fp32":
        return Plain(torch.float32)
    if precision == "bf16_sr":
        return Plain(torch.bfloat16, stochastic=True)
    if precision == "fp16":
        return Plain(torch.float16)
    if precision == "factored":
        if key in WEIGHT_LIKE:
            return Plain(param_dtype)
        return Factored(tuple(shape), key not in NONNEGATIVE) if len(shape) >= 2 else Plain(torch.float32)
    length = blocks(shape, block or settings.DEFAULT_BLOCK[precision])
    if length is None or key in WEIGHT_LIKE or (precision == "int4" and length % 2):  # 4-bit codes go in pairs
        return Plain(param_dtype)
    signed = key not in NONNEGATIVE
    if precision == "int8_sr":
        return LinearSR(length, signed)
    return DynamicMap(8 if precision == "int8" else 4, length, signed)


def compactable(key: str, value: Tensor, local_shape: tuple[int, ...], scalar: bool) -> bool:
    """Whether a fresh state tensor is stored through a codec: floating, shaped like the parameter's local part."""
    return (not scalar and key not in BOOKKEEPING and "::" not in key and not key.startswith(OWNER_PREFIX)
            and value.is_floating_point()
            and tuple(value.shape) == tuple(local_shape))


def encode_fresh(plan: Plan, fresh: dict[str, Tensor], local: Tensor, whole_shape: tuple[int, ...],
                 scalar_keys) -> dict[str, tuple[Tensor, str, tuple[int, ...]]]:
    """A new state (the algorithm's, in float) in stored form: ``{key: (local tensor, kind, whole shape)}``, kind
    ``"like"`` (laid out like the parameter), ``"shaped"`` (like it but for the last dimension: block scales, sign
    bits), ``"whole"`` (replicated on every rank: factors) or ``"scalar"``."""
    out: dict[str, tuple[Tensor, str, tuple[int, ...]]] = {}
    local_shape = tuple(local.shape)
    for key, value in fresh.items():
        if not compactable(key, value, local_shape, key in scalar_keys):
            out[key] = (value, "scalar" if key in scalar_keys else "like", whole_shape)
            continue
        codec = plan.codec_for(key, whole_shape)
        whole_parts = codec.parts(whole_shape)
        parts = {suffix: torch.zeros(shape, dtype=dtype, device=local.device)
                 for suffix, (shape, dtype) in codec.parts(local_shape).items()}
        if getattr(codec, "reduces", False):
            if value.count_nonzero():
                raise NotImplementedError(f"state {key!r} starts nonzero, and factored states of a fresh nonzero "
                                          "state are not supported")
        else:
            codec.encode(value.float(), parts, nearest_bits(local.shape, local.device) if codec.random else None)
        for suffix, part in parts.items():
            whole = whole_parts[suffix][0]
            kind = ("whole" if getattr(codec, "replicated", lambda _: False)(suffix)
                    else "like" if whole == whole_shape else "shaped")
            out[key + suffix] = (part, kind, whole)
    if plan.write == "kahan":
        out[KAHAN] = (torch.zeros_like(local), "like", whole_shape)
    if plan.write == "ecc":
        out[PARAM_ECC] = (torch.zeros_like(local, dtype=plan.param_codec.wide), "like", whole_shape)
    if plan.random or any(getattr(c, "random", False) for c in plan.codecs.values()):
        out[ROUNDING_STEP] = (torch.zeros((), dtype=torch.int64), "scalar", ())
    return out


def nearest_bits(shape, device) -> Tensor:
    """Fixed "random" bits that make a stochastic encoding round to nearest (half a unit, in each codec's bits):
    used where an encoding must be repeatable, for a new state and for a conversion on load."""
    return torch.full(tuple(shape), 0x808000, dtype=torch.int64, device=device)


_COMPILED: dict = {}


def _kernel(fn):
    """Compiled when the optimizer compiles: static shapes (a parameter's shard and its codec never change between
    steps), so each (codec, shape, offset) compiles once, as a loop that vectorizes."""
    def run(compile: bool, *args):
        if not compile:
            return fn(*args)
        compiled = _COMPILED.get(fn)
        if compiled is None:
            compiled = _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True, options=COMPILE_OPTIONS)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args)
    run.eager = fn
    return run


@_kernel
def _decode(codec, parts: dict[str, Tensor], local_shape: tuple[int, ...], offset: tuple[int, ...],
            whole_shape: tuple[int, ...], device: torch.device) -> Tensor:
    index = global_index(local_shape, offset, whole_shape, device) if getattr(codec, "reduces", False) else None
    return codec.decode(parts, index).reshape(local_shape)


@_kernel
def _encode(codec, x: Tensor, parts: dict[str, Tensor], key: Tensor, offset: tuple[int, ...],
            whole_shape: tuple[int, ...]) -> None:
    bits = (element_bits(key, tuple(x.shape), offset, whole_shape, x.device) if codec.random
            else None)
    codec.encode(x, parts, bits)


@_kernel
def _write(write: str, param: Tensor, work: Tensor, extra: Tensor | None, param_codec, key: Tensor,
           offset: tuple[int, ...], whole_shape: tuple[int, ...]) -> None:
    """The parameter's write from its working copy: compensated, stochastically rounded or error-corrected."""
    if write == "kahan":
        value, compensation = kahan_split(work, param.dtype)
        param.copy_(value)
        extra.copy_(compensation)
        return
    bits = element_bits(key, tuple(param.shape), offset, whole_shape, param.device)
    if write == "stochastic":
        param.copy_(round_stochastic(work, param.dtype, bits))
    else:
        param_codec.encode(work, {"": param, "::ecc": extra}, bits)


@dataclass
class Opened:
    """One parameter's working copies, and how to put them back."""

    plan: Plan
    param: Tensor  # the stored local parameter
    work_param: Tensor
    stored: dict[str, Tensor]
    work_state: dict[str, Tensor]
    managed: tuple[str, ...]
    name: str
    offset: tuple[int, ...]
    whole_shape: tuple[int, ...]
    compile: bool = False

    def reduced(self) -> list[str]:
        """The managed states whose encoding sums over the ranks (factored ones), in a fixed order."""
        return [key for key in self.managed if getattr(self.plan.codec_for(key, self.whole_shape), "reduces", False)]

    def partials(self, counts: bool) -> Tensor:
        """This rank's partial sums for :meth:`reduced`, concatenated (empty if none)."""
        keys = self.reduced()
        if not keys:
            return torch.zeros(0, device=self.param.device)
        return torch.cat([self.plan.codec_for(key, self.whole_shape).partials(self.work_state[key], self.offset, counts)
                          for key in keys])

    def _key(self, what: str, step: Tensor) -> Tensor:
        # A tensor computed from the stored counter, so that a compiled kernel takes each step's draws without
        # compiling again, and no counter is read back to the host on the step's path.
        return stream_key(self.plan.seed, f"{self.name}/{what}", step).to(self.param.device)

    def _parts(self, key: str, codec) -> dict[str, Tensor]:
        return {suffix: self.stored[key + suffix] for suffix in codec.parts(self.whole_shape)}

    def close(self) -> None:
        """Write the stepped working copies back into their stored forms and drop them; factored states keep
        their factors until :meth:`finish_factors` (take :meth:`partials` first)."""
        step = self.stored.get(ROUNDING_STEP)
        if step is not None:
            step.add_(1)
        no_key = torch.zeros((), dtype=torch.int64, device=self.param.device)
        for key in self.managed:
            codec = self.plan.codec_for(key, self.whole_shape)
            parts = self._parts(key, codec)
            if getattr(codec, "reduces", False):
                codec.finish_signs(self.work_state[key], parts)
                continue
            _encode(self.compile, codec, self.work_state[key], parts,
                 self._key(key, step) if codec.random else no_key, self.offset, self.whole_shape)
        for key, value in self.work_state.items():
            if key not in self.managed and self.stored.get(key) is not value:
                self.stored[key] = value  # an algorithm that replaced a state entry rather than updating it
        write = self.plan.write
        if write is not None:
            extra = self.stored[KAHAN] if write == "kahan" else self.stored.get(PARAM_ECC)
            _write(self.compile, write, self.param, self.work_param, extra, self.plan.param_codec,
                 self._key("param", step) if write != "kahan" else no_key, self.offset, self.whole_shape)
        self.work_state, self.work_param = {}, None  # a step's working copies live no longer than its chunk

    def write_param(self, what: str) -> None:
        """Write the working parameter back alone (the states untouched, the step counter not advanced); random
        draws from the stream ``what`` at the current count."""
        write = self.plan.write
        if write is not None:
            step = self.stored.get(ROUNDING_STEP)
            no_key = torch.zeros((), dtype=torch.int64, device=self.param.device)
            extra = self.stored[KAHAN] if write == "kahan" else self.stored.get(PARAM_ECC)
            _write(False, write, self.param, self.work_param, extra, self.plan.param_codec,
                   self._key(what, step) if write != "kahan" else no_key, self.offset, self.whole_shape)
        self.work_state, self.work_param = {}, None

    def finish_factors(self, totals: Tensor) -> None:
        """Store the factored states' factors from :meth:`partials` summed over the ranks."""
        at = 0
        for key in self.reduced():
            codec = self.plan.codec_for(key, self.whole_shape)
            size = sum(codec.view)
            codec.finish_factors(self._parts(key, codec), totals[at:at + size])
            at += size


def managed_states(plan: Plan, stored: dict[str, Tensor], local_shape: tuple[int, ...],
                   whole_shape: tuple[int, ...], scalar_keys) -> dict[str, Any]:
    """``{key: codec}`` of the stored states that open as working copies (the rest pass through as they are)."""
    managed = {}
    for key in dict.fromkeys(k.split("::")[0] for k in stored if k not in BOOKKEEPING):
        if key.startswith(OWNER_PREFIX) or key in scalar_keys:
            continue
        codec = plan.codec_for(key, whole_shape)
        value = stored.get(key)
        if len(codec.parts(whole_shape)) > 1 or (value.is_floating_point() and tuple(value.shape) == local_shape):
            managed[key] = codec
    return managed


def open_param(write: str | None, param_codec, param: Tensor, extra: Tensor | None) -> Tensor:
    """The working copy of a stored parameter written as ``write`` (``extra``: its compensation or correction,
    where it has one)."""
    if write == "kahan":
        return param.float() + extra.float()
    if write == "ecc":
        return param_codec.decode({"": param, "::ecc": extra})
    if write == "stochastic":
        return param.float()
    return param


def param_extra(plan: Plan, stored: dict[str, Tensor]) -> Tensor | None:
    """The stored compensation (Kahan) or correction (ECC) of a parameter's write, if it has one."""
    return stored[KAHAN] if plan.write == "kahan" else stored.get(PARAM_ECC) if plan.write == "ecc" else None


def open_tensor(plan: Plan, param: Tensor, stored: dict[str, Tensor], name: str, offset: tuple[int, ...],
                whole_shape: tuple[int, ...], scalar_keys, compile: bool = False) -> Opened:
    """Float32 working copies of a stored local parameter and its state."""
    local_shape = tuple(param.shape)
    working = torch.float64 if param.dtype == torch.float64 else torch.float32
    managed = managed_states(plan, stored, local_shape, whole_shape, scalar_keys)
    work_state = {}
    for key in dict.fromkeys(k.split("::")[0] for k in stored if k not in BOOKKEEPING):
        codec = managed.get(key)
        if codec is None:
            work_state[key] = stored.get(key)
            continue
        parts = {suffix: stored[key + suffix] for suffix in codec.parts(whole_shape)}
        work_state[key] = _decode(compile, codec, parts, local_shape, offset, whole_shape, param.device).to(working)
    return Opened(plan, param, open_param(plan.write, plan.param_codec, param, param_extra(plan, stored)), stored, work_state,
                  tuple(managed), name, offset, whole_shape, compile)
