"""The stored forms against the libraries' own encoders, bitwise, with the same random numbers fed to both:
torchao's 8-bit and 4-bit block-wise maps, HeavyBall's ECC and its bfloat16 stochastic rounding, adv_optm's int8
stochastic rounding. And the properties the libraries cannot give: draws that do not depend on the layout."""

from __future__ import annotations

import pytest
import torch

from distopt.precision.codecs import DynamicMap, ErrorCorrected, LinearSR, Plain, dynamic_map, uniform
from distopt.precision.rounding import global_index, kahan_split, random_bits, round_stochastic, stream_key


def _parts(codec, shape):
    return {suffix: torch.zeros(s, dtype=d) for suffix, (s, d) in codec.parts(shape).items()}


def _bits(shape, key=3):
    return random_bits(key, global_index(shape, (0,) * len(shape), shape, torch.device("cpu")))


@pytest.mark.parametrize("bits,block", [(8, 256), (4, 128)])
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_torchao(bits, block, signed):
    pytest.importorskip("torchao")
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit

    torch.manual_seed(0)
    x = torch.randn(48, 512) * torch.rand(48, 1) * 10.0 ** torch.randint(-6, 1, (48, 1))
    x = x if signed else x.abs()
    theirs = (OptimState8bit if bits == 8 else OptimState4bit).zeros(x.shape, signed=signed, block_size=block)
    theirs.copy_(x)
    codec = DynamicMap(bits, block, signed)
    parts = _parts(codec, tuple(x.shape))
    codec.encode(x, parts, None)
    assert torch.equal(codec.decode(parts), theirs.dequantize().view_as(x))
    assert torch.equal(parts["::scale"].flatten(), theirs.scale)


def test_dynamic_maps_are_torchaos():
    pytest.importorskip("torchao")
    from torchao.optim.quant_utils import create_dynamic_map
    from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

    for signed in (True, False):
        assert list(dynamic_map(signed, 8)) == create_dynamic_map(signed, 7, 8)
    assert list(dynamic_map(True, 4)) == list(get_qmap_signed())
    assert list(dynamic_map(False, 4)) == list(get_qmap_unsigned())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_ulp_equals_the_exponent_bits_on_every_value(dtype):
    """The ECC codec reads each narrow value's exponent through ``log2`` (a loop that vectorizes); on all 65536
    bit patterns, inf and NaN included, it equals the exponent field's definition."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    mantissa, bias = (7, 127) if dtype == torch.bfloat16 else (10, 15)
    field = (values.view(torch.int16).to(torch.int32) & 0x7FFF) >> mantissa
    log_ulp = torch.where(field == 0, 1 - bias - mantissa, field - (bias + mantissa))
    codec = ErrorCorrected("bf16+8" if dtype == torch.bfloat16 else "fp16+8")
    assert torch.equal(codec._half_ulp(values), torch.exp2((log_ulp - 1).to(torch.float32)))


@pytest.mark.parametrize("mode", ["bf16+8", "bf16+16", "fp16+8", "fp16+16"])
def test_ecc_equals_heavyball_with_the_same_draws(mode, monkeypatch):
    utils = pytest.importorskip("heavyball.utils")
    torch.manual_seed(1)
    x = torch.randn(33, 70) * 10.0 ** torch.randint(-5, 3, (33, 1)).float()
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-30, 3.0e5])
    codec = ErrorCorrected(mode)
    bits = _bits(tuple(x.shape))
    monkeypatch.setattr(torch, "rand_like", lambda t, **kw: uniform(bits))
    correction = torch.zeros(x.shape, dtype=codec.wide)
    narrow = torch.zeros(x.shape, dtype=codec.narrow)
    state = utils._ULPState(correction, codec.smax)
    state.encode(x, narrow)
    parts = _parts(codec, tuple(x.shape))
    codec.encode(x, parts, bits)
    assert torch.equal(parts[""], narrow) and torch.equal(parts["::ecc"], correction)
    assert torch.equal(codec.decode(parts), state.decode(narrow))


def test_bf16_stochastic_rounding_equals_heavyball_with_the_same_draws(monkeypatch):
    utils = pytest.importorskip("heavyball.utils")
    torch.manual_seed(2)
    x = torch.randn(50, 30)
    bits = _bits(tuple(x.shape))
    monkeypatch.setattr(torch, "randint_like", lambda t, low=0, high=None, **kw: (bits & 0xFFFF).to(t.dtype))
    theirs = utils.stochastic_round_.__wrapped__(torch.zeros(x.shape, dtype=torch.bfloat16), x) \
        if hasattr(utils.stochastic_round_, "__wrapped__") else utils.stochastic_round_(
            torch.zeros(x.shape, dtype=torch.bfloat16), x)
    assert torch.equal(round_stochastic(x, torch.bfloat16, bits), theirs)


def test_int8_sr_equals_adv_optm_with_the_same_draws():
    """adv_optm's blocks are 2048 elements of the flattened tensor: equal to distopt's row blocks where rows are
    2048 long (on other shapes distopt keeps one block per row, so that no block spans two ranks)."""
    state_util = pytest.importorskip("adv_optm.util.state_util")
    torch.manual_seed(3)
    for signed in (True, False):
        x = torch.randn(6, 2048) * torch.rand(6, 1)
        x = x if signed else x.square()
        noise = (_bits(tuple(x.shape)) >> 8) & 0xFFFF  # 16 random bits per element, as adv_optm draws them
        key = "exp_avg" if signed else "exp_avg_sq"
        state: dict = {}
        state_util.init_state_tensor(state, key, tuple(x.shape), "int8_sr", x.device, torch.float32,
                                     non_neg=not signed)
        state_util.set_state(state, key, x.clone(), "int8_sr", noise.flatten().to(torch.int32), non_neg=not signed)
        codec = LinearSR(2048, signed)
        parts = _parts(codec, tuple(x.shape))
        codec.encode(x, parts, noise << 8)
        assert torch.equal(parts[""].flatten(), state[key].flatten())
        assert torch.equal(codec.decode(parts), state_util.get_state(state, key, "int8_sr").view_as(x))


def test_stochastic_rounding_is_unbiased_and_independent_of_the_layout():
    x = torch.full((4096,), 1.0 + 2**-10)
    for dtype in (torch.bfloat16, torch.float16):
        means = [round_stochastic(x, dtype, random_bits(stream_key(0, "w", step), torch.arange(4096))).float().mean()
                 for step in range(30)]
        spacing = 2**-7 if dtype == torch.bfloat16 else 2**-10
        assert abs(torch.stack(means).mean().item() - x[0].item()) < 0.05 * spacing
    whole_shape = (9, 14)
    w = torch.randn(whole_shape)
    whole = round_stochastic(w, torch.bfloat16, random_bits(5, global_index(whole_shape, (0, 0), whole_shape, w.device)))
    for offset, size in (((2, 3), (4, 6)), ((0, 7), (9, 7)), ((8, 0), (1, 14))):
        index = global_index(size, offset, whole_shape, w.device)
        box = tuple(slice(o, o + s) for o, s in zip(offset, size))
        assert torch.equal(round_stochastic(w[box], torch.bfloat16, random_bits(5, index)), whole[box])


def test_float16_stochastic_rounding_keeps_range_and_specials():
    x = torch.tensor([float("inf"), -float("inf"), 0.0, 65504.0, -1e-8, 70000.0])
    out = round_stochastic(x, torch.float16, torch.full(x.shape, (1 << 24) - 1))
    assert out[0] == float("inf") and out[1] == -float("inf") and out[2] == 0 and out[3] == 65504
    assert out[4] <= 0 and torch.isnan(round_stochastic(torch.tensor([float("nan")]), torch.float16,
                                                         torch.zeros(1, dtype=torch.int64))).all()


def test_kahan_split_carries_the_rounding_error():
    x = torch.randn(1000) * 3
    value, compensation = kahan_split(x, torch.bfloat16)
    assert (value.float() + compensation.float() - x).abs().max() <= x.abs().max() * 2**-16
    assert (value.float() - x).abs().max() > x.abs().max() * 2**-10


def test_plain_codec_rounds_bf16_storage_stochastically_only_when_asked():
    x = torch.full((64, 64), 1.0 + 2**-9)
    parts = _parts(Plain(torch.bfloat16), (64, 64))
    Plain(torch.bfloat16).encode(x, parts, None)
    assert parts[""].unique().numel() == 1
    Plain(torch.bfloat16, stochastic=True).encode(x, parts, _bits((64, 64)))
    assert parts[""].unique().numel() == 2
