"""QK-clip (MuonClip): after each optimizer step, shrink the query and key weights of every attention head whose
largest logit went past a threshold. Kimi Team, "Kimi K2: Open Agentic Intelligence", https://arxiv.org/abs/2507.20534.

For head ``h`` with largest pre-softmax logit ``S_h`` (over the step's batch, every rank's), ``gamma_h = tau / S_h``
when ``S_h > tau``: the query rows of head ``h`` are multiplied by ``gamma_h ** alpha`` and the key rows by
``gamma_h ** (1 - alpha)``, so that head's logits on the same input scale by ``gamma_h`` (``alpha = 0.5``, the
report's choice for multi-head attention). With grouped-query attention a key head serves several query heads: it
takes the smallest ``gamma`` of its group, so every head's logits shrink by at least its own ``gamma``.

The model reports, in its forward pass, each attention layer's largest logit per head (the hook)::

    clip = distopt.QKClip(opt, threshold=100.0)
    clip.register("layers.0.attn", q_weight=attn.wq.weight, k_weight=attn.wk.weight, num_heads=8)
    # in the attention's forward, wherever the logits (or their per-head maxima) are at hand:
    clip.report("layers.0.attn", scores.amax(dim=(0, 2, 3)))   # shape (num_heads,), detached
    ...
    opt.step()   # the clip runs right after, on each rank's shards

Communication: one ``all_reduce(MAX)`` per step of every registered layer's maxima together (a layer that no rank
reported this step stays unclipped), so every rank applies the same factors. The scaling itself is elementwise on
each rank's rows of the weights (any row sharding: FSDP2, HSDP, plain tensors), with no other collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .sharding import exchange, layout


def clip_factors(max_logits: Tensor, threshold: float, alpha: float, group_size: int = 1) -> tuple[Tensor, Tensor]:
    """The paper's per-head factors: ``(query factor per query head, key factor per key head)`` for ``max_logits``
    of shape ``(num_heads,)``; ``group_size`` query heads share each key head."""
    gamma = torch.where(max_logits > threshold, threshold / max_logits, torch.ones_like(max_logits))
    key_gamma = gamma.view(-1, group_size).amin(dim=1)
    return gamma.pow(alpha), key_gamma.pow(1 - alpha)


@dataclass
class _Layer:
    q: Tensor
    k: Tensor
    heads: int
    kv_heads: int
    q_offset: int
    k_offset: int
    q_bias: Tensor | None
    k_bias: Tensor | None
    head_dim: int


class QKClip:
    """QK-clip on the query and key weights of the registered attention layers, after every ``opt.step()``.

    Args:
        optimizer: a :class:`~distopt.DistributedOptimizer` (its process group is the one the maxima are agreed on)
            or any ``torch.optim.Optimizer`` in one process.
        threshold: ``tau``, the largest logit allowed (the report uses 100).
        alpha: the share of the factor given to the queries (0.5).
    """

    def __init__(self, optimizer, threshold: float = 100.0, alpha: float = 0.5):
        if not (isinstance(threshold, (int, float)) and threshold > 0):
            raise ValueError(f"QKClip: invalid threshold={threshold!r} (must be a positive number)")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"QKClip: invalid alpha={alpha!r} (must be in [0, 1])")
        self.optimizer, self.threshold, self.alpha = optimizer, float(threshold), float(alpha)
        self._layers: dict[str, _Layer] = {}
        self._reported: dict[str, Tensor] = {}
        self._params = {p for group in optimizer.param_groups for p in group["params"]}
        self._handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply())
        #: The factors applied at the last step, by layer: ``(query factors, key factors)`` (for logging).
        self.last_factors: dict[str, tuple[Tensor, Tensor]] = {}

    def register(self, name: str, q_weight: Tensor, k_weight: Tensor, num_heads: int, num_kv_heads: int | None = None,
                 *, q_offset: int = 0, k_offset: int = 0, q_bias: Tensor | None = None,
                 k_bias: Tensor | None = None, head_dim: int | None = None) -> None:
        """Register one attention layer. ``q_offset``/``k_offset``: the first row of the query (key) block when
        ``q_weight``/``k_weight`` is a fused weight (the same tensor may be given for both)."""
        if name in self._layers:
            raise ValueError(f"QKClip: layer {name!r} is registered twice")
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or kv_heads <= 0 or num_heads % kv_heads:
            raise ValueError(f"QKClip: layer {name!r}: num_heads={num_heads} must be a positive multiple of "
                             f"num_kv_heads={kv_heads}")
        for what, weight in (("q_weight", q_weight), ("k_weight", k_weight)):
            if weight not in self._params:
                raise ValueError(f"QKClip: layer {name!r}: its {what} is not a parameter of the optimizer")
        if head_dim is None:
            if q_offset or q_weight is k_weight:
                raise ValueError(f"QKClip: layer {name!r}: give head_dim for a fused weight")
            if q_weight.shape[0] % num_heads:
                raise ValueError(f"QKClip: layer {name!r}: q_weight has {q_weight.shape[0]} rows, which "
                                 f"num_heads={num_heads} does not divide")
            head_dim = q_weight.shape[0] // num_heads
        for what, weight, offset, heads in (("q_weight", q_weight, q_offset, num_heads),
                                            ("k_weight", k_weight, k_offset, kv_heads)):
            if offset < 0 or offset + heads * head_dim > weight.shape[0]:
                raise ValueError(f"QKClip: layer {name!r}: {what} rows [{offset}, {offset + heads * head_dim}) "
                                 f"are outside its {weight.shape[0]} rows")
        self._layers[name] = _Layer(q_weight, k_weight, num_heads, kv_heads, q_offset, k_offset, q_bias, k_bias,
                                    head_dim)

    def report(self, name: str, max_logits: Tensor) -> None:
        """The largest pre-softmax logit per query head of layer ``name`` in this forward pass (``(num_heads,)``).
        Several reports in one step (micro-batches) keep the largest."""
        layer = self._layers.get(name)
        if layer is None:
            raise KeyError(f"QKClip: no layer {name!r} is registered (registered: {', '.join(self._layers)})")
        max_logits = max_logits.detach().reshape(-1).float()
        if max_logits.numel() != layer.heads:
            raise ValueError(f"QKClip: layer {name!r} has {layer.heads} heads, but {max_logits.numel()} maxima "
                             "were reported")
        seen = self._reported.get(name)
        self._reported[name] = max_logits if seen is None else torch.maximum(seen, max_logits)

    @torch.no_grad()
    def apply(self) -> None:
        """Agree on the maxima over the ranks and clip (run by the optimizer's step hook)."""
        if not self._layers:
            return
        names = list(self._layers)
        device = layout.local(self._layers[names[0]].q).device
        maxima = torch.cat([self._reported.get(n, torch.full((self._layers[n].heads,), -torch.inf))
                            .to(device) for n in names])
        self._reported.clear()
        group = getattr(self.optimizer, "_process_group", None)
        maxima = exchange.max_over_ranks(maxima, group)
        self.last_factors = {}
        offset = 0
        for name in names:
            layer = self._layers[name]
            q_factor, k_factor = clip_factors(maxima[offset:offset + layer.heads], self.threshold, self.alpha,
                                              layer.heads // layer.kv_heads)
            offset += layer.heads
            self.last_factors[name] = (q_factor, k_factor)
            _scale_rows(layer.q, layer.q_offset, layer.head_dim, q_factor)
            _scale_rows(layer.k, layer.k_offset, layer.head_dim, k_factor)
            if layer.q_bias is not None:
                _scale_rows(layer.q_bias, layer.q_offset, layer.head_dim, q_factor)
            if layer.k_bias is not None:
                _scale_rows(layer.k_bias, layer.k_offset, layer.head_dim, k_factor)

    def remove(self) -> None:
        """Stop clipping (removes the step hook)."""
        self._handle.remove()


def _scale_rows(weight: Tensor, first_row: int, head_dim: int, factors: Tensor) -> None:
    """Multiply rows ``first_row + h * head_dim + [0, head_dim)`` of ``weight`` by ``factors[h]``, on this rank's
    rows only."""
    local = layout.local(weight)
    if local.numel() == 0:
        return
    start = layout.global_offset(weight)[0]
    per_row = factors.to(local.dtype).repeat_interleave(head_dim)
    lo, hi = max(first_row, start), min(first_row + per_row.numel(), start + local.shape[0])
    if lo >= hi:
        return
    rows = local[lo - start:hi - start]
    rows.mul_(per_row[lo - first_row:hi - first_row].view(-1, *([1] * (rows.dim() - 1))))
