"""QK-clip against a loop written from the Kimi K2 report (arXiv 2507.20534, MuonClip), one process; sharded in
``tests/multigpu/test_qk_clip_sharded.py``."""

from __future__ import annotations

import math

import pytest
import torch

import distopt

HEADS, KV_HEADS, HEAD_DIM, DIM = 4, 2, 3, 8


def max_logits(x, wq, wk, heads, kv_heads, head_dim):
    """The largest ``q·k / sqrt(head_dim)`` per query head over the batch ``x`` ``(B, T, D)``."""
    q = (x @ wq.T).unflatten(-1, (heads, head_dim)).transpose(1, 2)          # (B, H, T, hd)
    k = (x @ wk.T).unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    return (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).amax(dim=(0, 2, 3))


def papers_loop(wq, wk, logits, tau, heads, kv_heads, head_dim):
    """Per query head h with S_h > tau: W_q^h *= sqrt(tau/S_h), W_k^h *= sqrt(tau/S_h); a shared key head takes
    its group's smallest factor."""
    wq, wk = wq.clone(), wk.clone()
    group = heads // kv_heads
    gammas = [tau / s if s > tau else 1.0 for s in logits.tolist()]
    for h in range(heads):
        wq[h * head_dim:(h + 1) * head_dim] *= math.sqrt(gammas[h])
    for g in range(kv_heads):
        wk[g * head_dim:(g + 1) * head_dim] *= math.sqrt(min(gammas[g * group:(g + 1) * group]))
    return wq, wk


def _weights(seed=0, scale=6.0):
    torch.manual_seed(seed)
    wq = torch.randn(HEADS * HEAD_DIM, DIM) * torch.tensor([scale, 1.0, scale, 0.5]).repeat_interleave(HEAD_DIM)[:, None]
    wk = torch.randn(KV_HEADS * HEAD_DIM, DIM) * 2
    return wq, wk, torch.randn(2, 5, DIM)


@pytest.mark.parametrize("kv_heads", [HEADS, KV_HEADS], ids=["mha", "gqa"])
def test_clip_equals_the_papers_loop_after_a_muon_step(kv_heads):
    wq0, _, x = _weights()
    torch.manual_seed(1)
    wk0 = torch.randn(kv_heads * HEAD_DIM, DIM) * 2
    grads = (torch.randn_like(wq0), torch.randn_like(wk0))
    ours = [torch.nn.Parameter(wq0.clone()), torch.nn.Parameter(wk0.clone())]
    opt = distopt.DistributedOptimizer(ours, "muon", lr=0.02)
    logits = max_logits(x, ours[0].detach(), ours[1].detach(), HEADS, kv_heads, HEAD_DIM)
    tau = logits.median().item()  # the lower middle: half the heads clip
    clip = distopt.QKClip(opt, threshold=tau)
    clip.register("attn", ours[0], ours[1], num_heads=HEADS, num_kv_heads=kv_heads)
    assert (logits > tau).any() and (logits <= tau).any()  # some heads clip, some do not
    clip.report("attn", logits)
    for p, g in zip(ours, grads):
        p.grad = g.clone()
    opt.step()
    theirs = [torch.nn.Parameter(wq0.clone()), torch.nn.Parameter(wk0.clone())]
    ref = torch.optim.Muon(theirs, lr=0.02)
    for p, g in zip(theirs, grads):
        p.grad = g.clone()
    ref.step()
    wq, wk = papers_loop(theirs[0].detach(), theirs[1].detach(), logits, tau, HEADS, kv_heads, HEAD_DIM)
    torch.testing.assert_close(ours[0].detach(), wq, rtol=2e-7, atol=0)  # sqrt in float64 vs pow in float32
    torch.testing.assert_close(ours[1].detach(), wk, rtol=2e-7, atol=0)


def test_the_largest_logit_comes_back_to_the_threshold():
    """With a zero step, the clipped heads' largest logit on the same input becomes tau; the others keep theirs
    (and their weights, bitwise)."""
    wq0, wk0, x = _weights()
    wq, wk = torch.nn.Parameter(wq0.clone()), torch.nn.Parameter(wk0.clone())
    opt = distopt.DistributedOptimizer([wq, wk], "sgd", lr=0.0)
    clip = distopt.QKClip(opt, threshold=5.0)
    clip.register("attn", wq, wk, num_heads=HEADS, num_kv_heads=HEADS // 2)
    before = max_logits(x, wq.detach(), wk.detach(), HEADS, KV_HEADS, HEAD_DIM)
    clip.report("attn", before[:2].new_zeros(HEADS))  # a micro-batch with small logits ...
    clip.report("attn", before)                       # ... and one with the real ones: the largest count
    wq.grad, wk.grad = torch.zeros_like(wq), torch.zeros_like(wk)
    opt.step()
    after = max_logits(x, wq.detach(), wk.detach(), HEADS, KV_HEADS, HEAD_DIM)
    for h in range(HEADS):
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        if before[h] > 5.0:
            assert after[h].item() <= 5.0 * (1 + 1e-5)
        else:
            assert torch.equal(wq.detach()[rows], wq0[rows])
    assert (after <= 5.0 * (1 + 1e-5)).all()
    assert torch.equal(clip.last_factors["attn"][0] < 1, before > 5.0)


def test_fused_qkv_and_biases():
    """One fused weight: query rows from 0, key rows after them; biases scale with their rows."""
    torch.manual_seed(3)
    qkv = torch.nn.Parameter(torch.randn(3 * HEADS * HEAD_DIM, DIM))
    bias = torch.nn.Parameter(torch.randn(3 * HEADS * HEAD_DIM))
    start = qkv.detach().clone(), bias.detach().clone()
    opt = distopt.DistributedOptimizer([qkv, bias], "sgd", lr=0.0)
    clip = distopt.QKClip(opt, threshold=1.0)
    clip.register("attn", qkv, qkv, HEADS, q_offset=0, k_offset=HEADS * HEAD_DIM, head_dim=HEAD_DIM,
                  q_bias=bias, k_bias=bias)
    clip.report("attn", torch.tensor([4.0, 0.5, 9.0, 1.0]))
    qkv.grad, bias.grad = torch.zeros_like(qkv), torch.zeros_like(bias)
    opt.step()
    factors = torch.tensor([0.5, 1.0, 1 / 3, 1.0]).repeat_interleave(HEAD_DIM)
    per_row = torch.cat([factors, factors, torch.ones(HEADS * HEAD_DIM)])
    torch.testing.assert_close(qkv.detach(), start[0] * per_row[:, None], rtol=2e-7, atol=0)
    torch.testing.assert_close(bias.detach(), start[1] * per_row, rtol=2e-7, atol=0)


def test_no_report_no_clip():
    wq0, wk0, _ = _weights()
    wq, wk = torch.nn.Parameter(wq0.clone()), torch.nn.Parameter(wk0.clone())
    opt = distopt.DistributedOptimizer([wq, wk], "sgd", lr=0.0)
    distopt.QKClip(opt, threshold=1e-3).register("attn", wq, wk, HEADS, KV_HEADS)
    wq.grad, wk.grad = torch.zeros_like(wq), torch.zeros_like(wk)
    opt.step()
    assert torch.equal(wq.detach(), wq0) and torch.equal(wk.detach(), wk0)


def test_bad_input_is_named():
    wq, wk = torch.nn.Parameter(torch.zeros(12, 8)), torch.nn.Parameter(torch.zeros(6, 8))
    opt = distopt.DistributedOptimizer([wq, wk], "sgd", lr=0.0)
    with pytest.raises(ValueError, match="threshold"):
        distopt.QKClip(opt, threshold=0)
    clip = distopt.QKClip(opt)
    with pytest.raises(ValueError, match="not a parameter of the optimizer"):
        clip.register("a", wq, torch.nn.Parameter(torch.zeros(6, 8)), 4, 2)
    with pytest.raises(ValueError, match="num_heads=5 does not divide"):
        clip.register("a", wq, wk, 5, 5)
    with pytest.raises(ValueError, match=r"k_weight rows \[0, 12\) are outside its 6 rows"):
        clip.register("a", wq, wk, 4, 4)
    clip.register("a", wq, wk, 4, 2)
    with pytest.raises(ValueError, match="'a' has 4 heads, but 3 maxima"):
        clip.report("a", torch.zeros(3))
    with pytest.raises(KeyError, match="no layer 'b'"):
        clip.report("b", torch.zeros(4))
