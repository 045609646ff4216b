"""Parameter shapes of published models, by name: ``(fqn, shape)`` for every parameter, nothing allocated.

What the planner simulator (``launch/plan.py``) plans for. Every parameter is listed, embeddings, output head,
norms and biases included, so that the optimizer's own routing (:func:`distopt.routing.is_embedding_or_head`)
decides which matrices Muon gets, as it does at run time. Weights are laid out as ``nn.Linear`` stores them,
``(out, in)``.

* GPT-2 (Radford et al., 2019; the released configuration: ``n_embd``, ``n_layer``, vocabulary 50257, context
  1024), named as nanoGPT names it. ``c_attn`` is one ``(3d, d)`` matrix, as the released checkpoint stores it:
  Muon orthogonalizes q, k and v together. The output head is tied to ``wte`` and so is not a parameter of its own.
* Llama 3 (Grattafiori et al., "The Llama 3 Herd of Models", https://arxiv.org/abs/2407.21783; the released
  ``params.json``: ``dim``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ``ffn_dim_multiplier``, ``multiple_of``,
  vocabulary 128256), named as the reference implementation names it; head dimension ``dim / n_heads`` = 128;
  the feed-forward width follows the reference ``FeedForward``.
"""

from __future__ import annotations

import json
from pathlib import Path

Shapes = list[tuple[str, tuple[int, ...]]]


def gpt2(n_embd: int, n_layer: int, vocab: int = 50257, context: int = 1024) -> Shapes:
    d = n_embd
    shapes: Shapes = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (context, d))]
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        shapes += [(p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
                   (p + "attn.c_attn.weight", (3 * d, d)), (p + "attn.c_attn.bias", (3 * d,)),
                   (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,)),
                   (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
                   (p + "mlp.c_fc.weight", (4 * d, d)), (p + "mlp.c_fc.bias", (4 * d,)),
                   (p + "mlp.c_proj.weight", (d, 4 * d)), (p + "mlp.c_proj.bias", (d,))]
    return shapes + [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]


def llama_ffn_dim(dim: int, ffn_dim_multiplier: float, multiple_of: int) -> int:
    """The hidden width of Llama's SwiGLU feed-forward, as its reference ``FeedForward`` computes it."""
    hidden = int(ffn_dim_multiplier * int(2 * 4 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def llama3(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim_multiplier: float, multiple_of: int,
           vocab: int = 128256) -> Shapes:
    head_dim = dim // n_heads
    hidden = llama_ffn_dim(dim, ffn_dim_multiplier, multiple_of)
    shapes: Shapes = [("tok_embeddings.weight", (vocab, dim))]
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes += [(p + "attention.wq.weight", (n_heads * head_dim, dim)),
                   (p + "attention.wk.weight", (n_kv_heads * head_dim, dim)),
                   (p + "attention.wv.weight", (n_kv_heads * head_dim, dim)),
                   (p + "attention.wo.weight", (dim, n_heads * head_dim)),
                   (p + "feed_forward.w1.weight", (hidden, dim)),
                   (p + "feed_forward.w2.weight", (dim, hidden)),
                   (p + "feed_forward.w3.weight", (hidden, dim)),
                   (p + "attention_norm.weight", (dim,)), (p + "ffn_norm.weight", (dim,))]
    return shapes + [("norm.weight", (dim,)), ("output.weight", (vocab, dim))]


MODELS = {
    "gpt2-small": lambda: gpt2(n_embd=768, n_layer=12),
    "gpt2-xl": lambda: gpt2(n_embd=1600, n_layer=48),
    "llama3-8b": lambda: llama3(4096, 32, 32, 8, ffn_dim_multiplier=1.3, multiple_of=1024),
    "llama3-70b": lambda: llama3(8192, 80, 64, 8, ffn_dim_multiplier=1.3, multiple_of=4096),
    "llama3-405b": lambda: llama3(16384, 126, 128, 8, ffn_dim_multiplier=1.2, multiple_of=4096),
}


def model_shapes(name: str) -> Shapes:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]()


def shapes_from_json(path: str | Path) -> Shapes:
    """Shapes from a JSON file holding a list of ``{"fqn": "...", "shape": [rows, cols, ...]}``."""
    try:
        entries = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of {{\"fqn\": ..., \"shape\": [...]}} entries")
    shapes: Shapes = []
    for position, entry in enumerate(entries):
        where = f"{path}: entry {position}"
        if not isinstance(entry, dict) or set(entry) != {"fqn", "shape"}:
            raise ValueError(f"{where}: expected exactly the keys 'fqn' and 'shape', got {entry!r}")
        fqn, shape = entry["fqn"], entry["shape"]
        if not isinstance(fqn, str) or not fqn:
            raise ValueError(f"{where}: 'fqn' must be a non-empty string, got {fqn!r}")
        if (not isinstance(shape, list) or not shape
                or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape)):
            raise ValueError(f"{where} ({fqn}): 'shape' must be a non-empty list of positive ints, got {shape!r}")
        shapes.append((fqn, tuple(shape)))
    names = [fqn for fqn, _ in shapes]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{path}: fqn {duplicate!r} appears more than once")
    return shapes
