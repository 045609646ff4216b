"""Which parameters a matrix algorithm should not take, and the split of param groups that follows from it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

#: Module names that mark an output head when they sit at the top of the model (``lm_head.weight``,
#: ``output.weight``) or one level down (``model.lm_head.weight``).
HEAD_NAMES = frozenset({"lm_head", "head", "output", "classifier", "unembed", "unembedding"})
#: Module names of embedding tables, at any depth.
EMBEDDING_NAMES = frozenset({"wte", "wpe", "tok_embeddings", "embed_tokens", "embeddings", "embedding"})


def is_embedding_or_head(name: str | None, param: Tensor) -> bool:
    """The default predicate of :class:`distopt.Muon`: True for parameters that should go to AdamW.

    That is every parameter with fewer than two dimensions, every parameter under a module whose name contains
    ``embed`` (or is ``wte``/``wpe``), and the weight of an output head (``lm_head``, ``head``, ``output``,
    ``classifier``, ``unembed``) at most one module below the top. Without names only the first rule applies.
    """
    if param.ndim < 2:
        return True
    if not name:
        return False
    modules = name.lower().split(".")[:-1]
    if any("embed" in m or m in EMBEDDING_NAMES for m in modules):
        return True
    return bool(modules) and modules[-1] in HEAD_NAMES and len(modules) <= 2


def is_unsuitable_for_muon(name: str | None, param: Tensor, min_dim: int = 4, max_aspect_ratio: float = 128.0) -> bool:
    """The default predicate of :class:`distopt.AdaMuon`: adv_optm's rule for what goes to its auxiliary Adam.

    True for a parameter with fewer than two dimensions larger than one, a unit first or second dimension
    (position embeddings, depthwise convolutions), or an ``(out, rest)`` view whose short side is under
    ``min_dim`` or whose aspect ratio exceeds ``max_aspect_ratio``. Names are not read."""
    shape = tuple(param.shape)
    if len(shape) < 2 or sum(size > 1 for size in shape) < 2 or shape[0] == 1 or shape[1] == 1:
        return True
    short, long = sorted((shape[0], math.prod(shape[1:])))
    return short < min_dim or long / short > max_aspect_ratio


Predicate = Callable[[str | None, Tensor], bool]


def split_groups(params: Iterable[Any], predicate: Predicate, elementwise: dict[str, Any]) -> list[dict[str, Any]]:
    """Split each param group that names no algorithm into its matrix part and an ``adamw`` part.

    The matrix part keeps the group's settings; the ``adamw`` part gets ``elementwise`` (lr, betas, ...) and the
    group's other non-hyperparameter keys. Names come from ``(name, tensor)`` pairs or from the group's
    ``param_names`` (torch's convention, as torchtitan builds its groups). Groups that name an algorithm are kept as they are. The matrix part is
    kept even when empty, so that every rank builds the same groups whatever its model holds.
    """
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        if "algorithm" in group:
            out.append(group)
            continue
        entries = group["params"]
        entries = [entries] if isinstance(entries, Tensor) else list(entries)
        names = group.get("param_names")
        if names is not None:  # torch's convention (torchtitan's groups): names beside the tensors
            if len(names) != len(entries):
                raise ValueError(f"a param group has {len(entries)} params but {len(names)} param_names")
            entries = list(zip(names, entries))
            group = {k: v for k, v in group.items() if k != "param_names"}
        matrix, other = [], []
        for entry in entries:
            name, tensor = entry if isinstance(entry, tuple) else (None, entry)
            (other if predicate(name, tensor) else matrix).append(entry)
        out.append({**group, "params": matrix})
        if other:
            tags = {k: v for k, v in group.items() if k not in ("params", "lr", "weight_decay", "eps", "betas")}
            out.append({**tags, "params": other, "algorithm": "adamw", **elementwise})
    return out
