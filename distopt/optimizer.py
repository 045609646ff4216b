"""The facade: a ``torch.optim.Optimizer`` whose param groups each name an algorithm.

It orchestrates and does no maths: it resolves each group's algorithm, builds state in the parameter's layout
(DTensor state for DTensor parameters), and hands local views to the algorithm's pure update.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from . import algos, fresh_state, param_groups, precision, replaced_params
from .precision import owner_state
from .algos import compiled as compiled_pass
from .algos import MATRIX, Algorithm
from .compile import default_enabled
from .owner import DEFAULT_BUCKET_BYTES, DEFAULT_OWNER_BATCH_BYTES, MatrixEntry, OwnerRoute, group_layout
from .saved_state import SavedState
from .sharding import layout
from .sharding import exchange
from .sharding.plan import Plan
from .transforms import Reducer, flags
from .transforms.chain import flag_state_keys, is_scalar_state, run_elementwise
from .transforms.flags import FLAGS
from .transforms.global_clip import clip_grad_norm



class DistributedOptimizer(torch.optim.Optimizer):
    """One optimizer for plain tensors, FSDP2 (``fully_shard``) parameters and DTensor parameters.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs (as from ``model.named_parameters()``), or of
            param-group dicts. A group may set ``"algorithm"`` (a name such as ``"sgd"`` or an
            :class:`~distopt.algos.Algorithm` object) and any hyperparameter of that algorithm.
        algorithm: the default algorithm of groups that do not name one.
        process_group: the ranks that share the matrix algorithms' work (default: the whole job). Plain tensors in
            a multi-rank job are taken to be replicated over it (DDP-style).
        bucket_bytes: payload bound of one bucket of the owner exchange (whole matrices in the wire dtype).
        owner_batch_bytes: input bound of one batched owner call (same-shape matrices stacked, in the wire dtype;
            a larger matrix goes alone). It caps the owners' workspace, and so the step's peak memory; larger
            batches make fewer, bigger calls (the gain is on GPUs, for small matrices).
        compile: run the owners' maths, and each elementwise group's step (one fused pass over its local tensors,
            :mod:`distopt.algos.compiled`), under ``torch.compile``; None (default) reads the environment variable
            ``DISTOPT_COMPILE`` (on unless it is ``0``). Off, the elementwise steps are torch.optim's arithmetic to
            the bit; on, they differ from it by a few float32 units per step.
        max_grad_norm: clip the norm of all gradients together, over every parameter of every rank, before the
            step (``torch.nn.utils.clip_grad_norm_``'s maths; the gradients are scaled in place, and the norm before
            the clip is kept in :attr:`last_grad_norm`). One ``all_reduce`` of one number per step.
        **hyperparameters: defaults for every group whose algorithm has a hyperparameter of that name; the
            algorithm's own defaults fill in the rest. A name that no group's algorithm knows is a ``TypeError``.

    Elementwise algorithms update each rank's local shard in place and never communicate. Matrix algorithms (Muon)
    run each matrix on one owner rank chosen by :attr:`plan`; building the plan is a collective, so every rank
    constructs the optimizer (and calls ``add_param_group``) together, as with FSDP.
    """

    def __init__(self, params: Iterable[Any], algorithm: str | Algorithm = "adamw", *, process_group=None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, compile: bool | None = None,
                 max_grad_norm: float | None = None, owner_batch_bytes: int = DEFAULT_OWNER_BATCH_BYTES,
                 **hyperparameters: Any):
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                          or not max_grad_norm > 0):
            raise ValueError(f"invalid max_grad_norm={max_grad_norm!r} (must be None or a number > 0)")
        self.max_grad_norm = max_grad_norm
        #: The norm of all gradients before the clip, at the last step (``max_grad_norm`` only; a 0-d tensor).
        self.last_grad_norm: Tensor | None = None
        for key, value in (("bucket_bytes", bucket_bytes), ("owner_batch_bytes", owner_batch_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"invalid {key}={value!r} (must be a positive int)")
        self._process_group, self._bucket_bytes = process_group, bucket_bytes
        self._owner_batch_bytes = owner_batch_bytes
        self._compile = default_enabled() if compile is None else bool(compile)
        self._owner: OwnerRoute | None = None
        self._saved = SavedState(self)
        self._ready = False
        self._precision_seen: dict[int, tuple] = {}
        if isinstance(params, (set, frozenset)):
            raise TypeError("optimizer parameters must be an ordered collection; the order of a set changes "
                            "between runs. Use a list.")
        self._algorithms: dict[str, Algorithm] = {}
        self._default_algorithm = self._register(algos.resolve(algorithm))
        self._overrides = dict(hyperparameters)
        defaults = {**self._default_algorithm.hyperparameters, **self._overrides}
        unknown_to_default = (set(self._overrides) - set(self._default_algorithm.hyperparameters) - set(FLAGS)
                              - set(precision.PRECISION))
        if not unknown_to_default:
            self._default_algorithm.check(defaults)
        super().__init__(params, {**defaults, "algorithm": self._default_algorithm.name})
        known = (set(chain.from_iterable(a.hyperparameters for a in self._algorithms.values())) | set(FLAGS)
                 | set(precision.PRECISION))
        unknown = sorted(set(self._overrides) - known)
        if unknown:
            raise TypeError(f"unexpected hyperparameter(s) {', '.join(map(repr, unknown))}: no param group's "
                            f"algorithm ({', '.join(sorted(self._algorithms))}) has them")
        self._check_default_flags()
        self._ready = True
        self._build_owner_route()
        self._remember_params()

    # ------------------------------------------------------------------------------------------------------------
    # Copies: copy.deepcopy and pickle

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the owner route, which is rebuilt on the copy. Building it is a collective, so an
        optimizer whose matrix algorithms span several ranks cannot be copied by one rank: that is refused here,
        at copy time, rather than left to fail at the copy's first step."""
        if self._process_group is not None:
            raise TypeError(f"cannot copy or pickle a {type(self).__name__} built on an explicit process group "
                            "(a process group cannot be copied); build a new optimizer and load_state_dict")
        _, ranks, _ = group_layout(self._process_group)
        if self._owner is not None and len(ranks) > 1:
            raise TypeError(f"cannot copy or pickle a {type(self).__name__} whose matrix algorithms run on "
                            f"{len(ranks)} ranks: its owner plan is made together by every rank. Build a new "
                            "optimizer on every rank and load_state_dict into it instead")
        state = self.__dict__.copy()
        for key in ("_owner", "_saved", "_params_seen", "_process_group"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._process_group = None
        self._saved = SavedState(self)
        self._owner = None
        if any(self.algorithm_of(g).kind == MATRIX for g in self.param_groups):
            self._build_owner_route()
        self._remember_params()

    @property
    def plan(self) -> Plan | None:
        """Who owns which matrix (``print(opt.plan)`` shows owners, cost and bytes per rank, imbalance); None when
        no group runs a matrix algorithm."""
        return self._owner.plan if self._owner is not None else None

    def _build_owner_route(self) -> None:
        entries, index = [], 0
        has_matrix_group = False
        for group_index, group in enumerate(self.param_groups):
            algorithm = self.algorithm_of(group)
            names = group.get("param_names")
            for i, param in enumerate(group["params"]):
                if algorithm.kind == MATRIX and algorithm.on_owner(tuple(param.shape), group):
                    fqn = names[i] if names else f"params[{index}]"
                    entries.append(MatrixEntry(param, fqn, group_index, algorithm))
                index += 1
            has_matrix_group |= algorithm.kind == MATRIX
        self._owner = (OwnerRoute(entries, self.param_groups, self._process_group, self._bucket_bytes,
                                  self._compile, self._owner_batch_bytes) if has_matrix_group else None)

    # ------------------------------------------------------------------------------------------------------------
    # Param groups

    def _register(self, algorithm: Algorithm) -> Algorithm:
        known = self._algorithms.setdefault(algorithm.name, algorithm)
        signature = getattr(known, "signature", None)
        if type(known) is not type(algorithm) or (signature is not None and signature() != algorithm.signature()):
            raise ValueError(f"two different algorithms share the name {algorithm.name!r}: {known!r} and "
                             f"{algorithm!r}")
        return known

    def algorithm_of(self, group: dict[str, Any]) -> Algorithm:
        """The algorithm object that runs ``group``."""
        return self._algorithms[group["algorithm"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as ``torch.optim.Optimizer.add_param_group`` does, with its algorithm's defaults."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        if self._ready:
            self._follow_param_groups()
        group = param_group
        param_groups.split_names(group)
        algorithm = self._register(algos.resolve(group.get("algorithm", self._default_algorithm)))
        group["algorithm"] = algorithm.name
        for key, default in algorithm.hyperparameters.items():
            group.setdefault(key, self._overrides.get(key, default))
        refused = algorithm.refused_flags({**group, **self._overrides})
        for key in FLAGS:
            if key in self._overrides and not (key in refused and key not in group):
                group.setdefault(key, self._overrides[key])
        for key in precision.PRECISION:
            if key in self._overrides:
                group.setdefault(key, self._overrides[key])
        flags.fill(group)
        algorithm.check(group)
        self.check_flags(algorithm, group, len(self.param_groups))
        precision.check_unchanged(algorithm, group, len(self.param_groups), self._precision_seen, lambda: False)
        self._check_params(group, len(self.param_groups), algorithm)
        self.param_groups.append(group)
        if self._ready and algorithm.kind == MATRIX:
            # A new set of matrices: plan again (a collective, on every rank); owner state moves to new owners.
            self._saved.replan(self._build_owner_route)
        if self._ready:
            self._remember_params()

    def _check_default_flags(self) -> None:
        """A flag given to the optimizer must reach at least one group; where it reaches none, say why."""
        for key in flags.active(self._overrides):
            if self.param_groups and not any(key in group for group in self.param_groups):
                reasons = [f"param group {i} ({g['algorithm']}): "
                           f"{self.algorithm_of(g).refused_flags({**g, **self._overrides}).get(key, '')}"
                           for i, g in enumerate(self.param_groups)]
                raise ValueError(f"flag {key}={self._overrides[key]!r} cannot apply to any param group: "
                                 f"{'; '.join(reasons)}")

    @staticmethod
    def check_flags(algorithm: Algorithm, group: dict[str, Any], index: int) -> None:
        """Raise ``ValueError`` naming the group, the flag and its value if a flag is invalid or its maths cannot
        apply to the group's algorithm."""
        try:
            flags.check(algorithm.name, group, algorithm.refused_flags(group))
            for where in ("gradient_clipping", "update_clipping"):
                clip = flags.clip_name(flags.value(group, where))
                if clip and flags.CLIPS[clip] == "global" and getattr(algorithm, "splits_groups", False):
                    raise ValueError(f"{algorithm.name}: {where}={group[where]!r} cannot apply: this algorithm's "
                                     "parameters take two routes (whole matrices on owners, the others on their "
                                     "shards) whose norms would be pooled apart; use l2_clip or rmsnorm_clip")
        except ValueError as error:
            raise ValueError(f"param group {index}: {error}") from None

    def _remember_params(self) -> None:
        self._params_seen = [list(group["params"]) for group in self.param_groups]

    def _follow_param_groups(self) -> None:
        """Pick up parameters replaced in ``param_groups`` since the optimizer last looked (see
        :mod:`distopt.replaced_params`)."""
        if replaced_params.unchanged(self._params_seen, self.param_groups):
            return
        replaced_params.follow(self, self._params_seen)
        self._remember_params()

    def _check_params(self, group: dict[str, Any], index: int, algorithm: Algorithm,
                      others: list[dict[str, Any]] | None = None) -> None:
        param_groups.check_params(self.param_groups if others is None else others, group, index, algorithm)

    # ------------------------------------------------------------------------------------------------------------
    # Step

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; parameters whose ``grad`` is None are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._follow_param_groups()
        # Every gradient is checked before any parameter moves, so a bad one leaves nothing half-updated.
        for group_index, group in enumerate(self.param_groups):
            self._check_grads(group, group_index, self.algorithm_of(group))
            if flags.active(group):  # flags may have been set in param_groups since the last step
                flags.fill(group)
                self.check_flags(self.algorithm_of(group), group, group_index)
            precision.check_unchanged(self.algorithm_of(group), group, group_index, self._precision_seen,
                                      lambda: any(self.state.get(p) for p in group["params"]))
        if self.max_grad_norm is not None:
            self._clip_grad_norm()
        # Every tensor that runs on its own shard (elementwise groups, and the parameters of matrix groups whose
        # maths is elementwise for their shape); the owner route below runs the rest.
        batches = [self._local_batch(group, group_index) for group_index, group in enumerate(self.param_groups)]
        for group_index, batch in enumerate(batches):
            if batch[1]:
                precision.step_local(batch, group_index, self._step_local, is_scalar_state, self._reducer,
                                     self._compile, self._fused_run if self._compile else None)
        if self._owner is not None:
            self._owner.step(self.param_groups, self._matrix_state,
                             lambda matrices: self._reducer([self._owner.entries[m].param for m in matrices]),
                             self._open_matrix, self._open_owner, precision.finish_factors)
        return loss

    def _step_local(self, algorithm: Algorithm, params: list[Tensor], grads: list[Tensor],
                    states: list[dict[str, Tensor]], group: dict[str, Any], wholes: list[Tensor],
                    positions: list[int]) -> None:
        """One step of a group's tensors that run on their own shards (see :meth:`step`)."""
        if algorithm.chained(group):
            run_elementwise(algorithm, params, grads, states, group, [tuple(p.shape) for p in wholes],
                            self._reducer(wholes), [layout.global_offset(p) for p in wholes], positions)
        elif algorithm.kind == MATRIX:
            for param, grad, state in zip(params, grads, states):
                algorithm.local_update(param, grad, state, group)
        else:
            eager = compiled_pass.run(algorithm, params, grads, states, group) if self._compile else None
            if eager is not None and len(eager) < len(params):
                params, grads, states = ([xs[i] for i in eager] for xs in (params, grads, states))
            if params:
                algorithm.apply_many(params, grads, states, group)

    @staticmethod
    def _fused_run(algorithm: Algorithm, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                   group: dict[str, Any], call) -> list[int]:
        """The compiled pass over stored forms (see :func:`precision.step_local`); the indices it left."""
        if algorithm.chained(group) or algorithm.kind == MATRIX:
            return list(range(len(params)))
        return compiled_pass.run(algorithm, params, grads, states, group, call)

    def _clip_grad_norm(self) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p in params:
            # A gradient laid out otherwise (Partial) is put in the parameter's layout once, here, so that the
            # clip scales the gradient the step then reads.
            if isinstance(p.grad, DTensor) and isinstance(p, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        reducer = self._reducer(params)
        grads = [layout.local_grad(p, p.grad) for p in params]
        self.last_grad_norm = clip_grad_norm(grads, reducer.weights, float(self.max_grad_norm), reducer.all_reduce)

    def _reducer(self, params: list[Tensor]) -> Reducer:
        """Sums over the process group for the flags of a batch of parameters (see :class:`Reducer`)."""
        group, ranks, rank = group_layout(self._process_group)
        weights = [layout.counts_here(param, rank, len(ranks), self._name_of) for param in params]
        if len(ranks) == 1:
            return Reducer(weights)
        return Reducer(weights, lambda partials: exchange.sum_over_ranks(partials, group),
                       maximum=lambda values: exchange.max_over_ranks(values, group))

    def _name_of(self, param: Tensor) -> str:
        for group_index, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p is param:
                    return param_groups.describe(group, group_index, i)
        return f"of shape {tuple(param.shape)}"

    def _local_batch(self, group: dict[str, Any], group_index: int):
        """This rank's tensors of an elementwise group's parameters that have gradients, with local state views,
        each checked by the algorithm: ``(algorithm, params, grads, states, group, whole parameters, their
        positions in the group)``."""
        algorithm = self.algorithm_of(group)
        check, state_of, local_of = algorithm.check_local, self.state, layout.local  # hot loop: bound once
        flag_keys = flag_state_keys(algorithm, group)
        chained = algorithm.chained(group)
        params, grads, states, wholes, positions = [], [], [], [], []
        for i, param in enumerate(group["params"]):
            if param.grad is None or self._on_owner(param):
                continue
            state = state_of[param]
            if not state:
                state.update(self._init_state(algorithm, param, group))
            elif flag_keys and not flag_keys <= state.keys():
                state.update(self._flag_state(algorithm, param, group, state))
            local = local_of(param)
            try:
                grad = layout.local_grad(param, param.grad)
                check(local, grad, group)
                if chained and torch.is_complex(local):
                    raise TypeError("flags and chains do not take complex parameters (their sign and norm "
                                    "rules are defined for real numbers); use torch.view_as_real")
            except (TypeError, ValueError, RuntimeError) as error:
                raise type(error)(f"parameter {param_groups.describe(group, group_index, i)}: {error}") from None
            params.append(local)
            wholes.append(param)
            positions.append(i)
            grads.append(grad)
            # A plain tensor's state is already local: hand over the dict itself rather than a copy.
            states.append(state if local is param else {key: local_of(value) for key, value in state.items()})
        return algorithm, params, grads, states, group, wholes, positions

    def _check_grads(self, group: dict[str, Any], group_index: int, algorithm: Algorithm) -> None:
        for i, param in enumerate(group["params"]):
            if param.grad is not None and param.grad.is_sparse:
                raise RuntimeError(f"{algorithm.name} does not support sparse gradients, but "
                                   f"{param_groups.describe(group, group_index, i)} has one")

    def _open_matrix(self, entry: MatrixEntry, stored: dict[str, Tensor]):
        """Working copies of a matrix's parameter and shard-side state where its group's precision settings ask
        for them (None otherwise); the owner route closes them after ``finish``."""
        return precision.open_whole(self.param_groups[entry.group_index], entry.param, stored, entry.fqn,
                                    lambda key: is_scalar_state(entry.algorithm, key), self._compile)

    def _open_owner(self, entry: MatrixEntry, shape: tuple[int, ...], hp: dict[str, Any], stored: dict[str, Tensor]):
        """The owner state of a matrix with its compact states as working copies (None where none is compact)."""
        return owner_state.open_owner(entry.algorithm, shape, hp, entry.param.dtype, stored, entry.fqn,
                                      precision.settings.value(hp, "precision_seed"), self._compile)

    def _matrix_state(self, entry: MatrixEntry) -> dict[str, Tensor]:
        state = self.state[entry.param]
        group = self.param_groups[entry.group_index]
        if not state:
            state.update(self._init_state(entry.algorithm, entry.param, group))
        elif not flag_state_keys(entry.algorithm, group) <= state.keys():
            state.update(self._flag_state(entry.algorithm, entry.param, group, state))
        return state

    def _flag_state(self, algorithm: Algorithm, param: Tensor, group: dict[str, Any],
                    state: dict[str, Tensor]) -> dict[str, Tensor]:
        return fresh_state.missing_flags(algorithm, param, group, state)

    def _on_owner(self, param: Tensor) -> bool:
        """Whether ``param`` runs on the owner route (a matrix algorithm that needs the whole matrix)."""
        return self._owner is not None and param in self._owner.index

    def _init_state(self, algorithm: Algorithm, param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        owner = self._owner.owns(param) if self._on_owner(param) else None
        return fresh_state.initial(algorithm, param, group, owner)

    def _materialize_state(self) -> list[Tensor]:
        """Give every parameter without state its initial state (what its first step would create; no parameter
        changes); return those parameters."""
        filled = []
        for group in self.param_groups:
            algorithm = self.algorithm_of(group)
            for param in group["params"]:
                if not self.state.get(param):
                    self.state[param] = self._init_state(algorithm, param, group)
                    filled.append(param)
        return filled

    # ------------------------------------------------------------------------------------------------------------
    # State dict

    def train(self, mode: bool = True) -> DistributedOptimizer:
        """Schedule-free groups (SFAdamW): put the training point ``y`` (``mode=True``) or the average ``x``
        (``mode=False``) in the parameters, on each rank's shard; other groups are untouched."""
        for group in self.param_groups:
            algorithm = self.algorithm_of(group)
            if not getattr(algorithm, "schedule_free", False) or group["train_mode"] == mode:
                continue
            group["train_mode"] = mode
            group_index = self.param_groups.index(group)
            for position, param in enumerate(group["params"]):
                state = self.state.get(param)
                if state:  # through the working copies: a bfloat16 parameter's compensation takes part
                    precision.rewrite_param(group, group_index, position, param.detach(), state,
                                            lambda p, s: algorithm.swap(p, s, group, mode),
                                            lambda key: is_scalar_state(algorithm, key), f"swap/{mode}")
        return self

    def eval(self) -> DistributedOptimizer:
        """Schedule-free groups: the parameters hold the average ``x``, where to evaluate (see :meth:`train`)."""
        return self.train(False)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (state by parameter id, param groups), every tensor in the checkpoint layout: with
        torch.distributed initialized, a DTensor of the state's logical shape (owner state row-sharded over the
        ranks; see :mod:`distopt.saved_state`). Owner state makes this a collective: call it on every rank.

        Parameters without state yet appear with their initial state (the same keys on every rank, and a fresh
        optimizer is a complete DCP load target), but nothing is kept by asking: ``self.state`` is unchanged.
        Entries that torch.optim's namesake does not keep (SGD's and Muon's step counters) are left out, so that
        torch.optim can load the result. Post-hooks see the final dict, and what they add is kept."""
        self._follow_param_groups()
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()  # run below, on the checkpoint layout
        filled = self._materialize_state()
        try:
            out = self._saved.save(super().state_dict())
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
            for param in filled:  # reported, not kept: asking for a state dict changes nothing
                del self.state[param]
        for hook in post_hooks.values():
            result = hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict`'s form, saved on any number of ranks (via DCP), or with whole
        tensors. Every group, key and shape is checked first; on a mismatch nothing changes. A collective when
        the optimizer runs matrix algorithms (owner state moves to the current owners).

        A state dict of torch.optim's namesake (AdamW, Adam, SGD, NAdam, RMSprop, Muon) loads too: its groups
        name no algorithm, and the hyperparameters it lacks keep this optimizer's values."""
        self._follow_param_groups()
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, groups = self._saved.load(state_dict)
        self.state = defaultdict(dict, state)
        self.param_groups[:] = groups
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
