"""Compact owner state: the elementwise moments a matrix algorithm keeps on its owner (SOAP's in the eigenbasis),
stored in the group's state form; the preconditioners keep their dtype.

Against HeavyBall 3.2.1's HeavySOAP with the same ``ecc``/``storage_dtype`` (it compacts the same moments, in the
eigenbasis, and leaves ``Q`` and ``GG`` in float32), float32, same gradients: the two libraries draw their rounding
from different streams, so the runs are compared through their errors against their own float32 runs. Measured
(12 steps, mean over parameters, in units of the mean distance moved): bf16+8 mine 1.1e-5, HeavyBall's 1.4e-5,
between them 1.8e-5; storage bfloat16 2.6e-3, 3.2e-3 and 4.1e-3; fp16+8 1.7e-6, 2.1e-6, 2.6e-6. Bound: the
difference between the libraries at most twice the sum of their errors plus the float32 difference (1e-6), and the
state bytes equal.
"""

from __future__ import annotations

import pytest
import torch

import distopt
from tests.same_grads import run_on_random_grads

SHAPES = ((32, 48), (48, 32))
STEPS = 12


def _mean(a, b) -> float:
    return sum((x - y).abs().mean().item() for x, y in zip(a, b)) / len(a)


def _bytes(state) -> int:
    """Bytes of the tensors (not 0-d counters) of an optimizer's state, nested containers included."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() if state.dim() > 0 else 0
    if isinstance(state, dict):
        return sum(_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_bytes(v) for v in state)
    return 0


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("settings", [{"ecc": "bf16+8"}, {"storage_dtype": "bfloat16"}, {"ecc": "fp16+8"}])
def test_heavysoap_compact_moments_against_heavyball(settings):
    heavyball = pytest.importorskip("heavyball", reason="the test extra heavyball==3.2.1 is required")
    heavyball.utils.compile_mode = None

    def run(make):
        return run_on_random_grads(make, SHAPES, STEPS, dtype=torch.float32)
    hp = dict(lr=3e-3)
    start, my_ref, _ = run(lambda ps: distopt.HeavySOAP(ps, compile=False, **hp))
    _, their_ref, _ = run(lambda ps: heavyball.HeavySOAP(ps, **hp))
    _, mine, opt = run(lambda ps: distopt.HeavySOAP(ps, compile=False, **hp, **settings))
    _, theirs, their_opt = run(lambda ps: heavyball.HeavySOAP(ps, **hp, **settings))
    moved = _mean(my_ref, start)
    baseline = _mean(my_ref, their_ref)
    mine_error, their_error = _mean(mine, my_ref), _mean(theirs, their_ref)
    assert baseline <= 1e-5 * moved
    assert mine_error > 0 and their_error > 0  # both compacted something: the comparison can fail
    assert _mean(mine, theirs) <= 2 * (mine_error + their_error) + baseline
    assert mine_error <= 2 * their_error
    assert _bytes(list(opt.state.values())) == _bytes(list(their_opt.state.values()))
    state = next(iter(opt.state.values()))
    assert state["owner.exp_avg_sq"].dtype == state["owner.exp_avg"].dtype != torch.float32
    assert state["owner.Q.0"].dtype == state["owner.GG.0"].dtype == torch.float32


#: SOAP (the authors' maths: exp_avg on the shards, exp_avg_sq on the owner), 30 steps on a (64, 512) matrix:
#: error against the float32 run, in units of the mean distance moved, measured / bound. int8_sr is ten times worse
#: than on AdamW (0.025 there): its linear uint8 codes of the eigenbasis second moment, whose values span the
#: products of two spectra along a row, round the small directions to zero (with its owner moment kept float32 the
#: same run is 0.019). int4's error is its 4-bit momentum's, on the shards (0.27 with its owner moment float32).
SOAP_MODES = [
    ({"storage_dtype": "bfloat16"}, 0.0043, 0.01),
    ({"ecc": "bf16+8"}, 1.8e-5, 1e-4),
    ({"ecc": "fp16+16"}, 1.2e-8, 1e-6),
    ({"state_precision": "int8"}, 0.020, 0.04),
    ({"state_precision": "int4"}, 0.27, 0.4),
    ({"state_precision": "int8_sr"}, 0.25, 0.4),
    ({"state_precision": "bf16_sr"}, 0.0043, 0.01),
]
START = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))


def _soap(**settings):
    p = torch.nn.Parameter(START.clone())
    opt = distopt.SOAP([p], compile=False, lr=3e-3, precondition_frequency=5, **settings)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        p.grad = torch.randn(START.shape, generator=gen) * 0.1
        opt.step()
    return p.detach(), opt.state[p]


@pytest.mark.parametrize("settings,measured,bound", SOAP_MODES, ids=[str(m[0]) for m in SOAP_MODES])
def test_soap_owner_moment_in_every_state_mode(settings, measured, bound):
    ref, ref_state = _soap()
    mine, state = _soap(**settings)
    error = ((mine - ref).abs().mean() / (ref - START).abs().mean()).item()
    assert measured / 3 <= error <= bound, error
    assert state["owner.exp_avg_sq"].dtype != torch.float32  # compact on the owner
    for key in ("owner.GG.0", "owner.Q.0", "owner.GG.1", "owner.Q.1"):
        assert state[key].dtype == torch.float32, key
    stored = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("owner.exp_avg_sq"))
    assert stored < ref_state["owner.exp_avg_sq"].numel() * 4 or settings.get("ecc", "").endswith("+16")


def test_owner_state_bytes_per_parameter_and_the_planner_counts_them():
    """SOAP on a (64, 512) matrix, float32: 4 B of exp_avg and 4 of exp_avg_sq per parameter, plus the statistics
    and bases (2 (64² + 512²) floats). bf16+8 stores 3 + 3; the planner's owner bytes count the stored form."""
    p = torch.nn.Parameter(torch.randn(64, 512))
    preconditioners = 2 * (64 * 64 + 512 * 512) * 4
    for settings, per_state in (({}, 4), ({"ecc": "bf16+8"}, 3), ({"state_precision": "int8"}, 1 + 4 / 256)):
        opt = distopt.SOAP([p], compile=False, **settings)
        p.grad = torch.randn_like(p)
        opt.step()
        state = opt.state[p]
        assert _bytes(state) == pytest.approx(2 * per_state * p.numel() + preconditioners)
        assert opt.plan.matrices[0].state_bytes == pytest.approx(per_state * p.numel() + preconditioners)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_owner_codecs_equal_eager_bitwise():
    """HeavySOAP's owner maths runs eagerly either way; its compact moments are decoded and encoded by compiled
    graphs with compilation on, which must round as eagerly (stochastic int8 codes, and ECC)."""
    for settings in ({"state_precision": "int8_sr"}, {"ecc": "bf16+8"}):
        _, eager, _ = run_on_random_grads(lambda ps: distopt.HeavySOAP(ps, compile=False, **settings), SHAPES, 4,
                                          dtype=torch.float32)
        _, compiled, _ = run_on_random_grads(lambda ps: distopt.HeavySOAP(ps, compile=True, **settings), SHAPES, 4,
                                             dtype=torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled)), settings




def test_the_owner_draws_advance_when_the_shards_keep_their_form():
    """bfloat16 parameters written plainly, states in bfloat16: the shard side keeps its form (nothing opens there),
    but SOAP's owner moment is float32 (its wire dtype) stored as bfloat16, rounded stochastically: the counter its
    draws come from still advances once per step."""
    p = torch.nn.Parameter(torch.randn(16, 24).bfloat16())
    opt = distopt.SOAP([p], compile=False, kahan_sum=False, storage_dtype="bfloat16")
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    state = opt.state[p]
    assert state["owner.exp_avg_sq"].dtype == state["exp_avg"].dtype == torch.bfloat16
    assert int(state["rounding_step"]) == 3


def _factors_by_hand(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """adv_optm's factors of ``|x|`` for 64 x 256 elements: its 2-D view is (128, 128), the column factor divided by
    the total."""
    view = x.abs().reshape(128, 128)
    return view.sum(1), view.sum(0) / view.sum()


def _stepped(make, steps: int):
    torch.manual_seed(5)
    p = torch.nn.Parameter(torch.randn(64, 256))
    opt = make([p])
    gen = torch.Generator().manual_seed(6)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt.state[p]


@pytest.mark.parametrize("algorithm,steps,keys", [
    ("muon", 1, ("momentum_buffer",)),  # on the shards of a matrix that runs on its owner
    ("soap", 2, ("exp_avg", "owner.exp_avg_sq")),  # the owner's moment, whole on its owner
])
def test_factored_states_of_owner_matrices(algorithm, steps, keys):
    """Factored states where a matrix runs on an owner: while both runs' states are still equal (Muon after one
    step; SOAP after two, its first only building statistics), the factors are the row and column sums of the
    float32 run's state, computed here by hand, and the sign bits its signs."""
    from distopt.precision.codecs import pack_signs

    hp = {"owner_dtype": "float32"} if algorithm == "muon" else {}
    ref = _stepped(lambda ps: distopt.DistributedOptimizer(ps, algorithm, compile=False, **hp), steps)
    factored = _stepped(lambda ps: distopt.DistributedOptimizer(ps, algorithm, compile=False,
                                                                state_precision="factored", **hp), steps)
    for key in keys:
        x = ref[key]
        assert x.abs().sum() > 0, key
        row, col = _factors_by_hand(x)
        assert torch.allclose(factored[f"{key}::row"], row, rtol=1e-5), key
        assert torch.allclose(factored[f"{key}::col"], col, rtol=1e-5), key
        if f"{key}::sign" in factored:
            assert torch.equal(factored[f"{key}::sign"], pack_signs(x)), key
    assert ("owner.exp_avg_sq::sign" in factored) is False  # a second moment is non-negative: no sign bits
