"""The contract every algorithm follows: pure maths on the tensors it is given.

An algorithm is a stateless object with two functions, in the spirit of optax's ``(init, update)`` pair:

* ``init(param, hp)`` returns the per-parameter state as a dict of tensors;
* ``update(param, grad, state, hp)`` updates ``param`` and ``state`` in place.

The optimizer hands a param group's tensors to ``apply_many`` in one call, so that an algorithm with a batched
kernel (torch's fused AdamW) can run it once over all of them; by default it applies ``update`` to each.

The tensors are whatever the caller hands in: a whole parameter in one process, or one rank's local shard of a
DTensor. Elementwise algorithms cannot tell the difference, which is why they never communicate. ``hp`` is the
live param-group dict, so schedulers that edit ``group["lr"]`` take effect at the next step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from ..transforms import flags
from ..transforms.flags import SWITCHES as FLAG_SWITCHES

ELEMENTWISE = "elementwise"


class Algorithm:
    """Base class of all algorithms. Subclasses set ``name``, ``hyperparameters`` and implement the maths."""

    name: ClassVar[str]
    #: Hyperparameter names and their defaults. Every group of this algorithm holds all of these keys.
    hyperparameters: ClassVar[dict[str, Any]]
    #: ``"elementwise"`` algorithms run on local shards with no communication.
    kind: ClassVar[str] = ELEMENTWISE
    #: State entries that are per-parameter scalars (counters), not tensors shaped like the parameter.
    scalar_state: ClassVar[tuple[str, ...]] = ("step",)
    #: State entries kept in memory but not saved, because torch.optim's namesake keeps no such entry: a state dict
    #: stays loadable by torch.optim and a torch.optim one by distopt. :meth:`restore_unsaved` rebuilds them on load;
    #: a state dict that holds them anyway (an older distopt checkpoint) is accepted.
    unsaved_state: ClassVar[tuple[str, ...]] = ()
    #: Whether its step sums over the shards of a tensor (HyperBall's norms): such an algorithm runs on the shards
    #: but is not elementwise, and communicates (one all_reduce per group and step).
    reduces: ClassVar[bool] = False
    #: Whether the chain form's decay is proximal, ``p <- (p - lr u) / (1 + lr wd)`` (Adan's), not multiplicative.
    proximal_decay: ClassVar[bool] = False
    #: A factor of the chain form's decay, ``decay_scale(hp, lr)`` at the step's lr (AdamC's ``lr / max_lr``).
    decay_scale: Any = None

    def check(self, hp: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the first invalid hyperparameter."""
        check_nonnegative(self.name, hp, "lr")

    def init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def apply(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        """Run :meth:`update`; complex tensors are updated through their real views, as torch.optim does."""
        if torch.is_complex(param):
            param = torch.view_as_real(param)
            grad = torch.view_as_real(grad)
            state = {k: (torch.view_as_real(v) if torch.is_complex(v) else v) for k, v in state.items()}
        self.update(param, grad, state, hp)

    # --------------------------------------------------------------------------------------------------------
    # The chain form (see :mod:`distopt.transforms`): what the seeds' flags need of an algorithm.

    def refused_flags(self, hp: Mapping[str, Any]) -> dict[str, str]:
        """Flags whose maths cannot apply to this algorithm (with ``hp``), each with the reason. An algorithm
        without :meth:`direction` takes none."""
        return {name: f"{self.name} has no chain form" for name in FLAG_SWITCHES}

    def direction(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                  t: Any) -> Tensor | None:
        """The update direction ``u`` of one step, state updated, such that the step is
        ``param <- param (1 - lr wd) - lr u`` (the decay only if :meth:`decoupled_decay`; L2 decay, if any, is
        inside ``u``). ``grad`` is already negated under ``maximize``. ``t`` (a
        :class:`~distopt.transforms.base.TensorStep`) may replace the second moment's decay and bias correction.
        None means that this step makes no update (ADOPT's first)."""
        raise NotImplementedError(f"{self.name} has no chain form")

    def chained(self, hp: Mapping[str, Any]) -> bool:
        """Whether this group runs through the chain runtime (:mod:`distopt.transforms.chain`): when a flag is on
        (custom chains always do); otherwise the algorithm's own step runs."""
        return bool(flags.active(hp))

    def decoupled_decay(self, hp: Mapping[str, Any]) -> bool:
        """Whether ``weight_decay`` is applied to the parameter (decoupled) rather than added to the gradient."""
        return True

    def decays(self, hp: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
        """Whether the chain's last step decays a parameter of this global shape (PSGD decays matrices only)."""
        return self.decoupled_decay(hp)

    def momentum_beta(self, hp: Mapping[str, Any]) -> float:
        """The first moment's decay (MARS's ``β1``)."""
        return float(hp["betas"][0])

    def position_state(self, index: int) -> dict[str, Tensor]:
        """State that depends on the parameter's position in its group (Scion seeds its initialization with it, as
        HeavyBall does); none by default. Scalars only (listed in :attr:`scalar_state`)."""
        return {}

    def core_transforms(self, hp: Mapping[str, Any]) -> tuple:
        """Transforms that finish the core's direction in the chain runtime, where the maths needs a number of the
        whole tensor (Lion-k's norm): :meth:`chained` must be True wherever these are not empty."""
        return ()

    def after_step(self, param: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        """The chain form's last word on a parameter after its step (Ranger's lookahead); nothing by default."""

    def check_torch_group(self, saved: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if a param group saved by a torch.optim optimizer (no ``"algorithm"`` key) holds a
        setting that this algorithm would silently run otherwise."""

    def unsaved_keys(self, hp: Mapping[str, Any]) -> tuple[str, ...]:
        """The :attr:`unsaved_state` entries left out of this group's state dicts: all of them, but the step
        counter where a flag's schedule reads it (``warmup_steps``), so that a resumed run continues the schedule."""
        if flags.reads_step(hp):
            return tuple(key for key in self.unsaved_state if key != "step")
        return self.unsaved_state

    def restore_unsaved(self, state: dict[str, Tensor]) -> None:
        """Rebuild the :attr:`unsaved_state` entries of a state just loaded (the others are in place)."""

    def check_local(self, param: Tensor, grad: Tensor, hp: Mapping[str, Any]) -> None:
        """Raise (``TypeError``, ``ValueError`` or ``RuntimeError``) if this local tensor and gradient cannot run
        with ``hp``. The optimizer calls it for every tensor of a step before any update, and names the parameter."""

    def apply_many(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                   hp: Mapping[str, Any]) -> None:
        """One step of a param group's tensors (those with gradients), as :meth:`apply` on each.

        Algorithms with a kernel that runs many tensors in one pass override this; results must not depend on how
        the tensors are batched, because each rank batches its own shards.
        """
        for param, grad, state in zip(params, grads, states):
            self.apply(param, grad, state, hp)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def second_moment_decay(t: Any, beta2: float) -> tuple[float, float]:
    """The second moment's decay and bias correction at ``t.step``: ``beta2`` and ``1 - beta2^t``, unless a flag
    (PaLM, Kourkoutas-β) set them for this step."""
    decay = beta2 if t.beta2 is None else t.beta2
    bias_correction2 = 1 - beta2**t.step if t.bias_correction2 is None else t.bias_correction2
    return decay, bias_correction2


def as_scalar(value: Any) -> Any:
    """A 0-d tensor as a Python number (torch.optim's ``_to_scalar``), anything else as it is."""
    return value.item() if isinstance(value, Tensor) else value


def new_step_counter() -> Tensor:
    """A float32 scalar on the CPU, as torch.optim keeps ``state["step"]`` (no device sync to read it)."""
    return torch.tensor(0.0, dtype=torch.float32)


def zeros_like(param: Tensor) -> Tensor:
    return torch.zeros_like(param, memory_format=torch.preserve_format)


#: Device types that have torch's fused optimizer kernels.
FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())


def check_fusable(algo: str, param: Tensor, grad: Tensor) -> None:
    """Raise ``RuntimeError`` unless torch's fused kernels can take ``param`` and ``grad``: floating point, a device
    that has them, and the gradient in the parameter's dtype and device (the kernels take one of each per call)."""
    device = param.device
    if not (param.is_floating_point() and device.type in FUSED_DEVICES):
        raise RuntimeError(f"{algo}: fused=True needs floating-point tensors on a device of {sorted(FUSED_DEVICES)}, "
                           f"got {param.dtype} on {device}")
    if grad.dtype != param.dtype or grad.device != device:
        raise RuntimeError(f"{algo}: fused=True needs the gradient in the parameter's dtype and device "
                           f"({param.dtype} on {device}), got {grad.dtype} on {grad.device}")


def group_by_device_and_dtype(tensors: list[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in first-seen order: torch's fused kernels take one
    device and one dtype per call."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers: every message names the algorithm, the hyperparameter and the offending value.


def _as_number(algo: str, key: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{algo}: {key} must be a number or a 1-element tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{algo}: {key} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{algo}: invalid {key}={value!r} (NaN)")
    return float(value)


def check_nonnegative(algo: str, hp: Mapping[str, Any], key: str) -> None:
    if _as_number(algo, key, hp[key]) < 0.0:
        raise ValueError(f"{algo}: invalid {key}={hp[key]!r} (must be >= 0)")


def check_unit_interval(algo: str, hp: Mapping[str, Any], key: str, *, closed: bool = False) -> None:
    """``0 <= hp[key] < 1`` (or ``<= 1`` when ``closed``)."""
    value = _as_number(algo, key, hp[key])
    upper_ok = value <= 1.0 if closed else value < 1.0
    if not (0.0 <= value and upper_ok):
        bound = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{algo}: invalid {key}={hp[key]!r} (must be in {bound})")


def check_betas(algo: str, hp: Mapping[str, Any], count: int = 2, key: str = "betas") -> None:
    betas = hp[key]
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"{algo}: {key} must be a tuple of {count} numbers, got {betas!r}")
    for i, beta in enumerate(betas):
        value = _as_number(algo, f"{key}[{i}]", beta)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{algo}: invalid {key}[{i}]={beta!r} (must be in [0, 1))")


def require_matrix(algo: str, shape: tuple[int, ...], name: str, hint: str = "") -> None:
    """Raise naming the parameter if it has fewer than 2 dimensions (``hint``: where it should go instead)."""
    if len(shape) < 2:
        raise ValueError(f"{algo} needs parameters with at least 2 dimensions, but {name} has {len(shape)}{hint}")


def check_bool(algo: str, hp: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        if not isinstance(hp[key], bool):
            raise ValueError(f"{algo}: {key} must be a bool, got {hp[key]!r}")


def check_optional_bool(algo: str, hp: Mapping[str, Any], key: str) -> None:
    if hp[key] is not None and not isinstance(hp[key], bool):
        raise ValueError(f"{algo}: {key} must be None or a bool, got {hp[key]!r}")


def check_optional_positive_int(algo: str, hp: Mapping[str, Any], key: str) -> None:
    value = hp[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{algo}: invalid {key}={value!r} (must be None or a positive int)")


MATRIX = "matrix"


#: Prefix of the state entries that live whole on a matrix's owner (and as empty placeholders elsewhere).
OWNER_PREFIX = "owner."


def split_batch(keys: list, wholes: list[Tensor], states: list[dict[str, Tensor]], fqns: list[str],
                run) -> list[Tensor] | None:
    """An owner batch whose matrices are not all at one point (``keys``: a step count, a refresh decision; a matrix
    whose gradients started later is behind the others): ``run(wholes, states, fqns)`` on each subset that shares a
    key, results in the batch's order. None where every key is the same (the caller runs the batch itself)."""
    if len(set(keys)) <= 1:
        return None
    out: list[Tensor | None] = [None] * len(states)
    for key in dict.fromkeys(keys):
        picked = [i for i, k in enumerate(keys) if k == key]
        results = run([wholes[i] for i in picked], [states[i] for i in picked], [fqns[i] for i in picked])
        for i, result in zip(picked, results):
            out[i] = result
    return out


def stack_owner_state(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The owner entries of a batch's matrices stacked on a new first dimension; a batch of one works on its own
    state through a view (no stacked copy to write back). :func:`write_back_owner_state` returns them."""
    return {key: (states[0][key].unsqueeze(0) if len(states) == 1 else torch.stack([s[key] for s in states]))
            for key in states[0] if key.startswith(OWNER_PREFIX)}


def write_back_owner_state(stacks: dict[str, Tensor], states: list[dict[str, Tensor]]) -> None:
    """Copy stacked owner entries (possibly replaced by new tensors) back into each matrix's state."""
    for key, stack in stacks.items():
        for s, value in zip(states, stack.unbind(0)):
            if value.data_ptr() != s[key].data_ptr():
                s[key].copy_(value)


class MatrixAlgorithm(Algorithm):
    """An algorithm whose update needs whole matrices; the optimizer runs its middle part on one owner rank.

    A step is three pure functions: :meth:`prepare` on each rank's local shard (elementwise, e.g. momentum),
    :meth:`owner_update` on whole matrices (on the owner only, with the state only the owner holds), and
    :meth:`finish` on the local shard of the owner's result (elementwise, e.g. learning rate and weight decay).
    ``prepare`` returns :meth:`channels` tensors per shard stacked on a new leading dimension (Muon sends one,
    SOAP two), and the owner returns one result per matrix.
    """

    kind = MATRIX

    def channels(self, hp: Mapping[str, Any]) -> int:
        """How many tensors per shard travel to the owner."""
        return 1

    def check_param(self, shape: tuple[int, ...], name: str) -> None:
        """Raise ``ValueError`` if a parameter of this shape cannot run this algorithm."""

    def check_param_in_group(self, shape: tuple[int, ...], name: str, hp: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if a parameter of this shape cannot run with this group's hyperparameters."""

    #: Whether :meth:`finish` and :meth:`finish_direction` take ``row_offset``, where the rank's rows start in the
    #: whole weight (for maths that differs by row block, such as per-part step sizes).
    takes_row_offset: ClassVar[bool] = False

    #: Whether the planner may give the parts of a split weight (``split_sizes``) to different owners: the maths
    #: must treat each part alone, shard sections included, with no owner state (which would then be split too).
    spreads_parts: ClassVar[bool] = False

    #: Owner state (names without the ``owner.`` prefix) whose maths is elementwise: moments updated element by
    #: element in whatever basis they live (a change of basis is a linear map of their values). The group's state
    #: settings (``storage_dtype``, ``ecc``, ``state_precision``) store these compactly on the owner too; the rest
    #: (statistics, bases, factors, which enter products and decompositions) keep the algorithm's dtype.
    elementwise_owner_state: ClassVar[frozenset[str]] = frozenset()

    def wire_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        return param_dtype

    def return_dtype(self, hp: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
        """The dtype the owner's result travels back in (the wire dtype unless the result needs more bits than
        what the owner reads: a normalized update after a bfloat16 orthogonalization)."""
        return self.wire_dtype(hp, param_dtype)

    #: Whether :meth:`owner_update` may change the whole matrices it receives in place (then, in one process, the
    #: exchange hands it a copy of the local piece, which may be the algorithm's own state).
    owner_mutates_input: ClassVar[bool] = True

    #: Whether a group of this algorithm may hold parameters on both routes (owner and shard), so that a norm over
    #: the whole group (HeavyBall's global clips) would be pooled in two parts.
    splits_groups: ClassVar[bool] = False

    #: Keys that state of the local route had under an earlier layout (old name -> current), accepted on load.
    renamed_local_state: ClassVar[dict[str, str]] = {}

    def on_owner(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> bool:
        """Whether a parameter of this global shape needs the owner route. Where this is False the maths is
        elementwise for that parameter: :meth:`local_init` and :meth:`local_update` run on each rank's shard and
        nothing is exchanged."""
        return True

    def local_init(self, param: Tensor, hp: Mapping[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError(f"{self.name} has no local route")

    def local_update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        raise NotImplementedError(f"{self.name} has no local route")

    def cost(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def owner_state(self, shape: tuple[int, ...], hp: Mapping[str, Any],
                    param_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Logical shape and dtype of each entry (named with :data:`OWNER_PREFIX`) the owner holds whole, the same on
        every rank: checkpoints save these entries row-sharded at exactly this shape, whoever owns the matrix."""
        return {}

    def owner_init(self, shape: tuple[int, ...], hp: Mapping[str, Any], param_dtype: torch.dtype,
                   device: torch.device) -> dict[str, Tensor]:
        """The owner state before the first step, whole (zeros unless an algorithm says otherwise)."""
        return {key: torch.zeros(s, dtype=dtype, device=device)
                for key, (s, dtype) in self.owner_state(shape, hp, param_dtype).items()}

    def owner_state_keys(self, shape: tuple[int, ...], hp: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(self.owner_state(shape, hp, torch.float32))

    def owner_state_bytes(self, shape: tuple[int, ...], hp: Mapping[str, Any], param_dtype: torch.dtype) -> int:
        return sum(math.prod(s) * dtype.itemsize for s, dtype in self.owner_state(shape, hp, param_dtype).values())

    def prepare(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> Tensor:
        raise NotImplementedError

    def owner_update(self, wholes: list[Tensor], states: list[dict[str, Tensor]], hp: Mapping[str, Any],
                     shape: tuple[int, ...], fqns: list[str]) -> list[Tensor]:
        """Whole matrices of one shape and group, ``(channels, *shape)`` each, to their results (``shape``).
        ``fqns`` name the matrices (algorithms that draw random numbers seed them with it)."""
        raise NotImplementedError

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...]) -> None:
        raise NotImplementedError

    def finish_direction(self, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
                         shape: tuple[int, ...]) -> Tensor | None:
        """The chain form of :meth:`finish`: the owner's result (in the parameter's dtype) as the direction ``u`` of
        the step ``p (1 - lr wd) - lr u``; None for a step that makes no update."""
        raise NotImplementedError(f"{self.name} has no chain form")

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        """The whole step on one whole parameter: the definition of the maths, and the single-process path."""
        shape = tuple(param.shape)
        for key, value in self.owner_init(shape, hp, param.dtype, param.device).items():
            state.setdefault(key, value)
        piece = self.prepare(param, grad, state, hp).reshape(self.channels(hp), *shape)
        result = self.owner_update([piece], [state], hp, shape, [""])[0]
        self.finish(param, result, state, hp, shape)


class ChainedMatrixAlgorithm(MatrixAlgorithm):
    """A matrix algorithm whose shard step is always the chain runtime's (``p (1 - lr wd) - lr u`` with the flags,
    HeavyBall's warm-up included): it defines :meth:`finish_direction`, never :meth:`finish`."""

    def chained(self, hp: Mapping[str, Any]) -> bool:
        return True

    def finish(self, param: Tensor, update: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any],
               shape: tuple[int, ...]) -> None:
        raise RuntimeError(f"{self.name} runs through the optimizer's chain runtime")

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], hp: Mapping[str, Any]) -> None:
        raise RuntimeError(f"{self.name} runs through the optimizer's chain runtime")
