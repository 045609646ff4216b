"""The main job's parts on their own: corpus and batches, the GPT model, the LR schedule, the metrics log."""

from __future__ import annotations

import json
import math

import pytest
import torch

from launch.data import ByteBatches, read_corpus, stdlib_sources
from launch.gpt import GPT, GPTConfig, apply_rope, rope_tables
from launch.report import MetricsLog, compare_table
from launch.trainer import warmup_cosine


def test_stdlib_corpus_is_real_python_in_a_fixed_order():
    files = stdlib_sources()
    assert len(files) > 100 and files == stdlib_sources()
    assert not any("site-packages" in f.parts for f in files)
    corpus, source = read_corpus(None)
    assert corpus.dtype == torch.uint8 and len(corpus) > 2**20 and "standard library" in source
    assert b"def " in bytes(corpus[:200_000].tolist())


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_corpus(str(tmp_path / "nope.txt"))


def test_batches_depend_only_on_step_rank_and_split():
    corpus = torch.arange(10_000) % 251
    data = ByteBatches(corpus.to(torch.uint8), seq_len=16, batch_size=3, seed=5)
    a = data.batch(7, 1)
    assert a.shape == (3, 17) and a.dtype == torch.int64
    data.batch(3, 0)  # other draws in between change nothing
    assert torch.equal(data.batch(7, 1), a)
    assert not torch.equal(data.batch(7, 0), a) and not torch.equal(data.batch(8, 1), a)
    # Windows are contiguous bytes, and validation windows come from the held-out tail only.
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(3, 16, dtype=torch.long).masked_fill(a[:, :-1] == 250, -250))
    val = data.batch(0, 0, "val")
    assert all(int(row[0]) in set(corpus[9500:].tolist()) for row in val)


def test_rope_matches_complex_rotation():
    """RoPE as rotation of complex pairs (x_i + i x_{i+d/2}) by e^{i t theta_i}, written independently."""
    seq, dim = 5, 8
    x = torch.randn(1, 1, seq, dim)
    cos, sin = rope_tables(seq, dim, 10000.0)
    theta = 10000.0 ** (-torch.arange(0, dim, 2).double() / dim)
    angle = torch.arange(seq).double()[:, None] * theta[None]
    z = torch.complex(x[..., : dim // 2].double(), x[..., dim // 2:].double()) * torch.polar(torch.ones_like(angle),
                                                                                             angle)
    expected = torch.cat((z.real, z.imag), dim=-1).float()
    torch.testing.assert_close(apply_rope(x, cos, sin), expected)


def test_gpt_is_causal_untied_and_starts_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=256, dim=32, layers=2, heads=2, seq_len=16))
    tokens = torch.randint(256, (2, 16))
    logits = model(tokens)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])
    assert model.head.weight.data_ptr() != model.embed.weight.data_ptr()
    assert abs(model.loss(torch.randint(256, (4, 17))).item() - math.log(256)) < 0.2
    names = {n for n, _ in model.named_parameters()}
    assert {"embed.weight", "head.weight", "blocks.0.attn.q.weight", "blocks.1.mlp_norm.weight"} <= names


def test_warmup_cosine():
    f = warmup_cosine(warmup=4, total=14, floor=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_metrics_log_appends_on_resume_and_drops_steps_past_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path, resume_step=None)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    log = MetricsLog(path, resume_step=3)  # the run was killed after step 5; its last checkpoint was step 3
    log.write({"step": 4, "loss": 0.0})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    MetricsLog(path, resume_step=None).close()  # a fresh run starts a fresh file
    assert path.read_text() == ""


def test_compare_table():
    table = compare_table([{"optimizer": "muon", "train_loss": 1.23456, "val_loss": 1.5, "seconds": 61.04,
                            "optimizer_share": 0.123}])
    assert "| muon | 1.2346 | 1.5000 | 61.0 | 12% |" in table
