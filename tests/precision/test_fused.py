"""The fused step (compilation on, the default): decode, the algorithm's kernel, encode and the parameter's write in
one compiled graph per group, against the eager working copies (``compile=False``: each state decoded, the
algorithm's own eager maths, each state encoded).

Measured over 30 steps of AdamW: with bfloat16/float16 parameters, a few elements in 10^4 of the parameters and
states (two of 2048 at most) differ by one unit of their narrow dtype, where the compiled float32 arithmetic rounds
otherwise (as in ``tests/test_compiled.py``; bound 5e-3). With float32 parameters and compact states, block scales
differ by float32 roundings (2.2e-7 relative, bound 1e-6), and the same roundings move a few parameters by up to
one code of a state: mean difference measured up to 1.8e-6 of the distance moved (bound 1e-4), the largest 2% of
it (bound 5%)"""

from __future__ import annotations

import pytest
import torch

import distopt
from distopt.precision import fused

START = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
STARTS = (START, START[:8, :256], START.flip(0))  # two shapes: the two (64, 512) share one compiled graph
MODES = {
    "kahan": (torch.bfloat16, {}),
    "kahan float16": (torch.float16, {"lr": 1e-4}),
    "stochastic_rounding": (torch.bfloat16, {"stochastic_rounding": True}),
    "param_ecc": (torch.bfloat16, {"param_ecc": "bf16+8"}),
    "bf16 plain, int8 states": (torch.bfloat16, {"kahan_sum": False, "state_precision": "int8"}),
    "int8": (torch.float32, {"state_precision": "int8"}),
    "int4": (torch.float32, {"state_precision": "int4"}),
    "int8_sr": (torch.float32, {"state_precision": "int8_sr"}),
    "ecc": (torch.float32, {"ecc": "bf16+8"}),
}
NARROW = (torch.bfloat16, torch.float16)


def _run(make, dtype, steps=30):
    """Three parameters of two shapes (one group); the same gradients every run."""
    params = [torch.nn.Parameter(x.clone().to(dtype)) for x in STARTS]
    opt = make(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(dtype)
        opt.step()
    return params, opt


@pytest.fixture
def no_working_copies(monkeypatch):
    """Fail if a step opens float32 working copies (the path the fused step replaces)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the step opened working copies instead of running the fused graph")
    monkeypatch.setattr("distopt.precision.open_tensor", refuse)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_fused_step_against_eager_working_copies(mode, no_working_copies, monkeypatch):
    dtype, settings = MODES[mode]
    monkeypatch.setattr(fused, "_GRAPHS", {})
    hp = {"lr": 1e-3, "weight_decay": 0.01, **settings}
    mine, opt = _run(lambda ps: distopt.AdamW(ps, compile=True, **hp), dtype)
    assert len(fused._GRAPHS) == 2  # one graph per kind of tensor: the two of one shape share one
    monkeypatch.undo()
    eager, eager_opt = _run(lambda ps: distopt.AdamW(ps, compile=False, **hp), dtype)
    for p, q, start in zip(mine, eager, STARTS):
        moved = (q.float() - start).abs().mean()
        if dtype in NARROW:
            assert (p != q).float().mean() <= 5e-3, mode
            assert (p.float() - q.float()).abs().max() <= 2 ** -7 * q.float().abs().max(), mode  # one ulp
            for key, value in eager_opt.state[q].items():
                got = opt.state[p][key]
                if value.dtype == torch.float32:  # block scales: float32 roundings (measured 2.2e-7)
                    assert torch.allclose(got, value, rtol=1e-6, atol=0), (mode, key)
                else:
                    assert (got != value).float().mean() <= 5e-3, (mode, key)
        else:
            assert (p - q).abs().mean() <= 1e-4 * moved, mode
            assert (p - q).abs().max() <= 5e-2 * moved, mode


@pytest.mark.parametrize("settings", [{"stochastic_rounding": True}, {}], ids=["stochastic", "kahan"])
def test_first_step_on_working_copies_then_fused(settings):
    """SGD's first step seeds its buffer eagerly, on working copies; the later steps run fused. The draws follow
    one counter across both paths: the run equals the eager one bitwise."""
    hp = {"lr": 1e-2, "momentum": 0.9, **settings}
    mine, _ = _run(lambda ps: distopt.SGD(ps, compile=True, **hp), torch.bfloat16, steps=6)
    eager, _ = _run(lambda ps: distopt.SGD(ps, compile=False, **hp), torch.bfloat16, steps=6)
    for p, q, start in zip(mine, eager, STARTS):
        assert torch.equal(p, q)
        assert not torch.equal(p, start.bfloat16())


def test_factored_states_step_on_working_copies():
    """A factored state sums over the ranks before it is encoded: no fused graph, the working copies run."""
    hp = {"lr": 1e-3, "state_precision": "factored"}
    graphs = len(fused._GRAPHS)
    mine, _ = _run(lambda ps: distopt.AdamW(ps, compile=True, **hp), torch.float32, steps=5)
    eager, _ = _run(lambda ps: distopt.AdamW(ps, compile=False, **hp), torch.float32, steps=5)
    assert len(fused._GRAPHS) == graphs
    for p, q in zip(mine, eager):
        assert (p - q).abs().max() <= 1e-5 * q.abs().max()


def test_fused_step_keeps_no_working_copies():
    """The fused graph reads each stored form and writes it back in the same loop: the step's peak memory stays
    below one float32 copy of a parameter, where the working copies hold four (parameter, gradient, two states)."""
    bench_measure = pytest.importorskip("launch.bench_measure")
    peaks = {}
    for compile in (True, False):
        params = [torch.nn.Parameter(torch.zeros(1024, 1024, dtype=torch.bfloat16)) for _ in range(3)]
        opt = distopt.AdamW(params, lr=1e-3, compile=compile)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        peaks[compile] = bench_measure.step_peak_bytes(opt.step)
    if peaks[True] is None:
        pytest.skip("this torch's profiler does not expose its allocation events")
    one_copy = 4 * params[0].numel()
    assert peaks[True] < one_copy <= peaks[False] / 3, peaks
