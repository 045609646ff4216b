"""The bench's reduction of per-rank figures: a rank without a figure still joins the collective (else the others
would wait forever), and the figure is then None on every rank."""

from __future__ import annotations

import torch.distributed as dist

from launch.bench_run import _max_or_none


def _reduce(figures: list):
    return _max_or_none(figures[dist.get_rank()], int), _max_or_none(float(dist.get_rank() + 1))


def test_a_missing_figure_on_one_rank_is_none_everywhere(ranks):
    assert ranks(2, _reduce, [7, 5]) == [(7, 2.0), (7, 2.0)]
    assert ranks(2, _reduce, [7, None]) == [(None, 2.0), (None, 2.0)]
    assert ranks(2, _reduce, [None, None]) == [(None, 2.0), (None, 2.0)]
