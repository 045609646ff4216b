"""Param groups as given by users and frameworks: normalised (``(name, tensor)`` pairs to ``param_names``), checked,
and described by name in error messages."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .algos import MATRIX, Algorithm


def check_params(groups: list[dict[str, Any]], group: dict[str, Any], index: int, algorithm: Algorithm) -> None:
    """Raise naming the parameter if ``group`` (to sit at ``index`` beside ``groups``) holds something that is not a
    leaf tensor, a tensor that another place already holds, a shape its algorithm cannot take, or names that do
    not match the other groups'."""
    seen: dict[Tensor, str] = {}
    for other_index, other in enumerate(groups):
        # An empty group (say, a matrix group on a model without matrices) has no names to disagree on.
        if group["params"] and other["params"] and ("param_names" in other) != ("param_names" in group):
            raise ValueError("all param groups must be given with names or all without: group "
                             f"{index} {'has' if 'param_names' in group else 'lacks'} names, group "
                             f"{other_index} does not agree")
        for i, p in enumerate(other["params"]):
            seen[p] = describe(other, other_index, i)
    for i, p in enumerate(group["params"]):
        name = describe(group, index, i)
        if not isinstance(p, Tensor):
            raise TypeError(f"optimizer can only optimize Tensors, but {name} is a {torch.typename(p)}")
        if not (p.is_leaf or p.retains_grad):
            raise ValueError(f"can't optimize a non-leaf Tensor: {name} is the output of an operation; pass "
                             "the leaf parameter (or a .detach().requires_grad_() copy)")
        if p in seen:
            raise ValueError(f"the same tensor is given twice: {name} is also {seen[p]}")
        if algorithm.kind == MATRIX:
            algorithm.check_param(tuple(p.shape), name)
            algorithm.check_param_in_group(tuple(p.shape), name, group)
        seen[p] = name


def split_names(group: dict[str, Any]) -> None:
    """Normalise ``group["params"]`` to a list of tensors, moving ``(name, tensor)`` names to ``param_names``."""
    params = group["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError("optimizer parameters must be an ordered collection; the order of a set changes between "
                        "runs. Use a list.")
    params = list(params)
    named = [isinstance(p, tuple) for p in params]
    if any(named) and not all(named):
        raise ValueError("either all or none of a group's params must be (name, tensor) pairs")
    if params and all(named):
        for entry in params:
            if len(entry) != 2 or not isinstance(entry[0], str):
                raise ValueError(f"a named parameter must be a (str, Tensor) pair, got {entry!r:.80}")
        group["param_names"] = [name for name, _ in params]
        params = [tensor for _, tensor in params]
    group["params"] = params


def describe(group: dict[str, Any], group_index: int, index: int) -> str:
    names = group.get("param_names")
    if names is not None:
        return repr(names[index])
    p = group["params"][index]
    shape = tuple(p.shape) if isinstance(p, Tensor) else "?"
    return f"param_groups[{group_index}]['params'][{index}] (shape {shape})"
