"""Compact owner state: the elementwise moments that a matrix algorithm keeps on the owner rank (SOAP's moments in
the eigenbasis, Shampoo's grafting moments, AdaMuon's and NorMuon's second moments, ...), stored in the group's
state form and opened as working copies around the owner's maths.

Which owner state may be stored compactly is the algorithm's to say (``elementwise_owner_state``): a moment that is
updated elementwise (in whatever basis it lives) takes a rounding or quantization error once per step, as a shard's
moment does, and a rotation into a new basis is a linear map of its decoded values. The preconditioners themselves
(SOAP's statistics ``GG`` and bases ``Q``, PSGD's and Shampoo's factors) stay in the algorithm's dtype: they enter
products, eigendecompositions and QR every step, where an 8-bit or bfloat16 error compounds (a bfloat16 basis is
no longer orthogonal); HeavyBall's ``ecc`` and ``storage_dtype`` leave them alone too.

The owner holds the whole tensor, so its codes are those of one process on any world size: the blocks lie along the
last dimension of the whole owner tensor and the random draws take the element's position in it. A checkpoint
saves the parts as it saves any owner tensor (row blocks over the ranks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .codecs import Plain
from .rounding import global_index, stream_key
from .working import OWNER_PREFIX, ROUNDING_STEP, _codec, _decode, _encode, nearest_bits, normalized_mode

Entries = dict[str, tuple[tuple[int, ...], torch.dtype]]


def codecs(algorithm: Any, shape: tuple[int, ...], hp: Mapping[str, Any], param_dtype: torch.dtype) -> dict[str, Any]:
    """``{owner key: codec}`` of the owner states of a matrix of (owner) shape ``shape`` that ``hp``'s settings
    store in another form than the algorithm keeps them."""
    allowed = getattr(algorithm, "elementwise_owner_state", frozenset())
    if not allowed:
        return {}
    out = {}
    for key, (logical, dtype) in algorithm.owner_state(shape, hp, param_dtype).items():
        bare = key[len(OWNER_PREFIX):]
        if bare not in allowed:
            continue
        mode = normalized_mode(hp, dtype)
        if all(m is None for m in mode[:3]) and not mode[4]:
            continue
        codec = _codec(bare, tuple(logical), mode, dtype)
        if isinstance(codec, Plain) and codec.dtype == dtype and not codec.random:
            continue  # stored as the algorithm keeps it (a tensor too small to quantize, ...)
        out[key] = codec
    return out


def stored_entries(algorithm: Any, shape: tuple[int, ...], hp: Mapping[str, Any], param_dtype: torch.dtype
                   ) -> Entries:
    """The owner state's stored tensors, ``{key: (shape, dtype)}``: each compact state as its codec's parts."""
    compact = codecs(algorithm, shape, hp, param_dtype)
    out: Entries = {}
    for key, (logical, dtype) in algorithm.owner_state(shape, hp, param_dtype).items():
        codec = compact.get(key)
        if codec is None:
            out[key] = (tuple(logical), dtype)
        else:
            out.update({key + suffix: (tuple(s), d) for suffix, (s, d) in codec.parts(tuple(logical)).items()})
    return out


def needs_draws(algorithm: Any, shape: tuple[int, ...], hp: Mapping[str, Any], param_dtype: torch.dtype) -> bool:
    """Whether a compact owner state rounds stochastically (it then draws from the shard state's counter)."""
    return any(codec.random for codec in codecs(algorithm, shape, hp, param_dtype).values())


def encode(codec: Any, value: Tensor, shape: tuple[int, ...]) -> dict[str, Tensor]:
    """``value`` (a whole owner tensor) in ``codec``'s parts, rounded to nearest (a fresh state, a conversion)."""
    parts = {suffix: torch.zeros(s, dtype=d, device=value.device) for suffix, (s, d) in codec.parts(shape).items()}
    x = value.float().reshape(shape)
    if getattr(codec, "reduces", False):  # factored: the owner holds all of it, no collective
        codec.encode_whole(x, parts)
    else:
        codec.encode(x, parts, nearest_bits(shape, value.device) if codec.random else None)
    return parts


def decode(codec: Any, stored: Mapping[str, Tensor], key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    parts = {suffix: stored[key + suffix] for suffix in codec.parts(shape)}
    device = next(iter(parts.values())).device
    index = global_index(shape, (0,) * len(shape), shape, device) if getattr(codec, "reduces", False) else None
    return codec.decode(parts, index).reshape(shape).to(dtype)


def fresh(algorithm: Any, shape: tuple[int, ...], hp: Mapping[str, Any], param_dtype: torch.dtype,
          device: torch.device) -> dict[str, Tensor]:
    """A new owner state in stored form."""
    init = algorithm.owner_init(shape, hp, param_dtype, device)
    entries = algorithm.owner_state(shape, hp, param_dtype)
    compact = codecs(algorithm, shape, hp, param_dtype)
    state = {}  # in the order of stored_entries, as every rank lists the keys
    for key, value in init.items():
        if key in compact:
            state.update({key + suffix: part for suffix, part in
                          encode(compact[key], value, tuple(entries[key][0])).items()})
        else:
            state[key] = value
    return state


def convert(algorithm: Any, shape: tuple[int, ...], saved_hp: Mapping[str, Any], hp: Mapping[str, Any],
            param_dtype: torch.dtype, saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """Whole owner tensors stored under ``saved_hp``'s settings, in ``hp``'s form (decoded exactly, encoded to
    nearest)."""
    old, new = codecs(algorithm, shape, saved_hp, param_dtype), codecs(algorithm, shape, hp, param_dtype)
    if old == new:
        return saved
    out = dict(saved)
    for key, (logical, dtype) in algorithm.owner_state(shape, hp, param_dtype).items():
        if old.get(key) == new.get(key):
            continue
        logical = tuple(logical)
        value = decode(old[key], saved, key, logical, dtype) if key in old else saved[key].to(dtype)
        for suffix in (old[key].parts(logical) if key in old else {"": None}):
            out.pop(key + suffix, None)
        if key in new:
            out.update({key + suffix: part for suffix, part in encode(new[key], value, logical).items()})
        else:
            out[key] = value
    return out


@dataclass
class OpenedOwner:
    """One matrix's owner state with its compact states as working copies (``work``, what the algorithm sees)."""

    stored: dict[str, Tensor]
    work: dict[str, Tensor]
    codecs: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    name: str
    seed: int
    compile: bool

    def close(self) -> None:
        """Store the stepped working copies; an entry the algorithm replaced is put back in the stored state."""
        step = self.stored.get(ROUNDING_STEP)  # the shard side counts the step when it closes, after this
        no_key = torch.zeros((), dtype=torch.int64)
        for key, codec in self.codecs.items():
            shape = self.shapes[key]
            parts = {suffix: self.stored[key + suffix] for suffix in codec.parts(shape)}
            value = self.work[key]
            if getattr(codec, "reduces", False):
                codec.encode_whole(value.reshape(shape).float(), parts)
                continue
            draw = (stream_key(self.seed, f"{self.name}/{key}", step).to(value.device) if codec.random
                    else no_key.to(value.device))
            _encode(self.compile, codec, value.reshape(shape), parts, draw, (0,) * len(shape), shape)
        for key, value in self.work.items():
            if key not in self.codecs and self.stored.get(key) is not value:
                self.stored[key] = value
        self.work = {}


def open_owner(algorithm: Any, shape: tuple[int, ...], hp: Mapping[str, Any], param_dtype: torch.dtype,
               stored: dict[str, Tensor], name: str, seed: int, compile: bool = False) -> OpenedOwner | None:
    """The owner state of one matrix as the algorithm sees it (None where nothing of it is compact)."""
    compact = codecs(algorithm, shape, hp, param_dtype)
    if not compact:
        return None
    entries = algorithm.owner_state(shape, hp, param_dtype)
    shapes = {key: tuple(entries[key][0]) for key in compact}
    parts = {key + suffix for key, codec in compact.items() for suffix in codec.parts(shapes[key])}
    work = {key: value for key, value in stored.items() if key not in parts}
    for key, codec in compact.items():
        pieces = {suffix: stored[key + suffix] for suffix in codec.parts(shapes[key])}
        device = next(iter(pieces.values())).device
        zero = (0,) * len(shapes[key])
        work[key] = _decode(compile, codec, pieces, shapes[key], zero, shapes[key], device).to(entries[key][1])
    return OpenedOwner(stored, work, compact, shapes, name, seed, compile)
