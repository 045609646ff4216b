"""Custom optimizers: a :class:`Chain` of transforms is an algorithm that shards, checkpoints through DCP and
reshards like the built-in ones.

    adam_with_caution = Chain("my_adam", [ScaleByAdam(), Caution()])
    opt = distopt.DistributedOptimizer(model.named_parameters(), adam_with_caution, lr=3e-3, weight_decay=0.1)

Every chain ends in the same step as the built-in algorithms, ``p <- p (1 - lr wd) - lr u``, and takes the seeds'
flags where its parts allow. Transforms of kind ``"owner"`` (:class:`~distopt.transforms.cores.Orthogonalize`)
need the whole matrix: the runtime cuts the chain there, and the owner section is one round trip of the owner
exchange. HeavyBall's MuonLaProp, OrthoLaProp and LaPropOrtho are such chains (:data:`HEAVYBALL_CHAINS`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..algos.base import ELEMENTWISE, MATRIX, MatrixAlgorithm, check_nonnegative, new_step_counter
from . import flags
from .base import OWNER, Transform
from .cores import MatrixEMAOrAdam, Orthogonalize, ScaleByLaProp, ScaleByUnscaledAdam, SignGraft
from .parts import OrthoGraft, OrthoProject


def _flatten(transforms: Iterable[Any]) -> list[Transform]:
    out: list[Transform] = []
    for item in transforms:
        if isinstance(item, Transform):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out += _flatten(item)
        else:
            raise TypeError(f"a chain holds Transform objects, got {item!r}")
    return out


class Chain(MatrixAlgorithm):
    """An algorithm made of ``transforms`` (each a :class:`~distopt.transforms.base.Transform`), named ``name``.

    ``hyperparameters`` overrides the parts' defaults (and ``lr``, ``weight_decay``), and may add keys that the
    group should carry. At most one run of owner
    transforms: the owner route makes one round trip per step."""

    def __init__(self, name: str, transforms: Iterable[Any], hyperparameters: Mapping[str, Any] | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a chain needs a name, got {name!r}")
        self.name = name
        self.transforms = tuple(_flatten(transforms))
        if not self.transforms:
            raise ValueError(f"chain {name!r} has no transforms")
        kinds = [t.kind for t in self.transforms]
        owners = [i for i, kind in enumerate(kinds) if kind == OWNER]
        if owners and owners != list(range(owners[0], owners[-1] + 1)):
            raise ValueError(f"chain {name!r}: its owner transforms must be consecutive (one owner section per step)")
        self.before = self.transforms[:owners[0]] if owners else self.transforms
        self.owner = self.transforms[owners[0]:owners[-1] + 1] if owners else ()
        self.after = self.transforms[owners[-1] + 1:] if owners else ()
        self.kind = MATRIX if owners else ELEMENTWISE
        self.splits_groups = bool(owners)  # tensors the owner transforms skip stay on their shards
        defaults: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.0}
        keys: dict[str, str] = {}
        for transform in self.transforms:
            defaults.update(transform.hyperparameters)
            for key in transform.state_keys:
                if key in keys or key == "step":
                    raise ValueError(f"chain {name!r}: {transform.name} and {keys.get(key, 'the step counter')} "
                                     f"both keep state {key!r}")
                keys[key] = transform.name
        # Keys no part reads are kept too: a HeavyBall user's ``eps`` on MuonLaProp is accepted, as HeavyBall does.
        self.hyperparameters = {**defaults, **(hyperparameters or {})}
        self.scalar_state = ("step", *(k for t in self.transforms for k in t.scalar_state))
        scales = [t.decay_scale for t in self.transforms if getattr(t, "decay_scale", None) is not None]
        self.decay_scale = scales[0] if scales else None

    def signature(self) -> tuple:
        return (self.name, tuple(repr(t) for t in self.transforms), tuple(sorted(self.hyperparameters.items(),
                                                                               key=lambda kv: kv[0])))

    def __repr__(self) -> str:
        return f"Chain({self.name!r}, {list(self.transforms)!r})"

    # -- checks ---------------------------------------------------------------------------------------------------
    def check(self, hp: Mapping[str, Any]) -> None:
        check_nonnegative(self.name, hp, "lr")
        check_nonnegative(self.name, hp, "weight_decay")
        for transform in self.transforms:
            try:
                transform.check(hp)
            except ValueError as error:
                raise ValueError(f"{self.name}: {error}") from None

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        refused = {"atan2": "a chain has no eps division of its own for atan2 to replace"}
        if not any(getattr(t, "second_moment", False) for t in self.transforms):
            refused.update(palm=flags.NO_SECOND_MOMENT, kourkoutas_beta=flags.NO_SECOND_MOMENT)
        if self.owner:
            refused["grams"] = "its update is orthogonalized; sign(g)·|u| would undo the orthogonalization"
        return refused

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        if "betas" in hp:
            return float(hp["betas"][0])
        return float(hp.get("momentum", 0.0))

    def chained(self, hp: Mapping[str, Any]) -> bool:
        return True

    # -- state ----------------------------------------------------------------------------------------------------
    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        state = {"step": new_step_counter()}
        for transform in self.transforms:
            state.update(transform.init(param, hp))
        return state

    local_init = init

    # -- the owner section ----------------------------------------------------------------------------------------
    def on_owner(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> bool:
        return bool(self.owner) and all(getattr(t, "applies", lambda s: True)(shape) for t in self.owner)

    def check_param(self, shape: tuple[int, ...], name: str) -> None:
        pass

    def wire_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        return self.owner[0].wire_dtype(hp)

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        return sum(t.cost(shape, hp) for t in self.owner)

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        return grad.to(self.wire_dtype(hp, param.dtype))

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        out = [w.reshape(shape) for w in wholes]
        for transform in self.owner:
            out = transform.owner_update(out, hp, shape)
        return out

    def finish_direction(self, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                         shape: tuple[int, ...]) -> Tensor:
        return update

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        raise RuntimeError(f"chain {self.name!r} runs through the optimizer's chain runtime")


#: HeavyBall 3.2.1's optimizers that are chains of the same parts in other orders (defaults as HeavyBall's: lr
#: 0.0025, betas (0.9, 0.99), eps 1e-8 for OrthoGrad's projection). OrthoGrad here is HeavyBall's: the group's
#: eps in the projection and a 1e-6 floor on the rescaling norm.
HEAVYBALL_DEFAULTS = {"lr": 0.0025, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}


def heavyball_orthograd() -> list[Transform]:
    return [OrthoProject(eps=None), OrthoGraft(floor=1e-6)]


def muon_laprop() -> Chain:
    """HeavyBall's MuonLaProp: LaProp's momentum, then orthogonalized on the owner."""
    return Chain("muonlaprop", [ScaleByLaProp(), Orthogonalize()], HEAVYBALL_DEFAULTS)


def ortho_laprop() -> Chain:
    """HeavyBall's OrthoLaProp: OrthoGrad on the gradient, then LaProp."""
    return Chain("ortholaprop", [heavyball_orthograd(), ScaleByLaProp()], HEAVYBALL_DEFAULTS)


def laprop_ortho() -> Chain:
    """HeavyBall's LaPropOrtho: LaProp, then OrthoGrad on its update."""
    return Chain("laproportho", [ScaleByLaProp(), heavyball_orthograd()], HEAVYBALL_DEFAULTS)


def sign_laprop() -> Chain:
    """HeavyBall's SignLaProp: LaProp, then the sign of its update grafted to the update's norm."""
    return Chain("signlaprop", [ScaleByLaProp(), SignGraft()], HEAVYBALL_DEFAULTS)


def unscaled_adamw() -> Chain:
    """HeavyBall's UnscaledAdamW: LaProp's momentum of the normalized gradient, rescaled by the current
    denominator."""
    return Chain("unscaledadamw", [ScaleByUnscaledAdam()], HEAVYBALL_DEFAULTS)


def muon_adamw() -> Chain:
    """HeavyBall's MuonAdamW: Nesterov EMA then orthogonalization on owners for matrices, Adam for the rest."""
    return Chain("muonadamw", [MatrixEMAOrAdam(), Orthogonalize()], HEAVYBALL_DEFAULTS)
