"""The demonstration model's architecture: a tiny CodeGen (MOSS's architecture), started with a copying circuit.

:func:`new_model` builds it for a tokenizer; :func:`forward` is CodeGen's forward pass with a shared prefix (the
long system text runs once per training batch); :func:`prime_copying` starts it with the induction heads that
copying names and numbers needs. Training is :mod:`moss_agent.demo.train`.
"""

from __future__ import annotations

import math
from typing import Any

from moss_agent.settings import CONTEXT_WINDOW

__all__ = ["SIZES", "forward", "new_model", "prime_copying"]

SIZES = {"n_layer": 2, "n_embd": 128, "n_head": 4, "rotary_dim": 16}
"""The model's shape. ``forward`` reads CodeGen's fused projection as 4 groups (``mp_num``), one head each."""


def new_model(tokenizer: Any, seed: int, sizes: dict[str, int] = SIZES) -> Any:
    """A freshly initialised ``CodeGenForCausalLM`` for ``tokenizer``, seeded, with the copying circuit primed."""
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    torch.manual_seed(seed)
    model = CodeGenForCausalLM(
        CodeGenConfig(
            vocab_size=-(-len(tokenizer) // 64) * 64,
            n_positions=CONTEXT_WINDOW,
            n_ctx=CONTEXT_WINDOW,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sizes,  # type: ignore[arg-type]
        )
    )
    prime_copying(model, seed)
    return model


def _rotary(positions: Any, rot: int) -> tuple[Any, Any]:
    import torch

    angles = positions.float()[:, None] / (10000 ** (torch.arange(0, rot, 2, dtype=torch.int64) / rot))
    return torch.sin(angles).repeat_interleave(2, -1)[:, None], torch.cos(angles).repeat_interleave(2, -1)[:, None]


def _rope(x: Any, sin: Any, cos: Any) -> Any:
    import torch

    return x * cos + torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2) * sin


def forward(model: Any, ids: Any, prefix: list[tuple[Any, Any]] | None = None) -> tuple[Any, list[tuple[Any, Any]]]:
    """CodeGen's forward pass up to ``lm_head``, continuing after a batch-1 ``prefix`` of keys and values.

    transformers' CodeGen computes the same (the tests check); this one shares the prefix across the batch, so
    the long system text costs one forward pass per batch, without gradient.
    """
    import torch
    import torch.nn.functional as F

    cfg, tr = model.config, model.transformer
    batch, length = ids.shape
    heads, dim, rot = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.rotary_dim
    past = 0 if prefix is None else prefix[0][0].shape[2]
    sin, cos = _rotary(torch.arange(past, past + length), rot)
    mask = torch.ones(length, past + length, dtype=torch.bool).tril(past) if past else None
    x, kv = tr.wte(ids), []
    for i, block in enumerate(tr.h):
        h = block.ln_1(x)
        # The fused projection holds 4 groups of [q | v | k] (CodeGen's mp_num): one head per group here.
        q, v, k = block.attn.qkv_proj(h).view(batch, length, 4, -1).split(cfg.n_embd // 4, dim=-1)
        q, k, v = (t.reshape(batch, length, heads, dim) for t in (q, k, v))
        q = torch.cat([_rope(q[..., :rot], sin, cos), q[..., rot:]], -1).transpose(1, 2)
        k = torch.cat([_rope(k[..., :rot], sin, cos), k[..., rot:]], -1).transpose(1, 2)
        v = v.transpose(1, 2)
        kv.append((k, v))
        if prefix is not None:
            k = torch.cat([prefix[i][0].expand(batch, -1, -1, -1), k], 2)
            v = torch.cat([prefix[i][1].expand(batch, -1, -1, -1), v], 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        x = x + block.attn.out_proj(a.transpose(1, 2).reshape(batch, length, -1)) + block.mlp(h)
    return tr.ln_f(x), kv


def prime_copying(model: Any, seed: int, scale: float = 8.0, beta: float = 0.5, gamma: float = 5.0) -> None:
    """Start the model with the induction circuit that copying names and numbers needs; training may undo it.

    In layer 0, one ``ln_1`` dimension becomes a constant 1, from which heads 0, 1 and 2 get fixed rotary
    query/key parts that peak at a distance of 1, 2 and 0 tokens. Heads 0 (previous token) and 2 (current token)
    write the same projection ``p`` of their token into two orthogonal subspaces ``u`` and ``v``; layer-1 heads 0
    and 1 compare ``v`` (this token) with ``u`` (the token before each earlier position), so they attend to what
    followed an earlier occurrence of the current token.
    """
    import torch

    cfg, (layer0, layer1) = model.config, model.transformer.h[:2]
    n, dim, rot = cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.rotary_dim  # one head per fused group (n_head 4)
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n - 1, 2 * dim, generator=gen))[0]  # the constant dimension left out
    u, v = (torch.cat([b, torch.zeros(1, dim)]) for b in basis.split(dim, dim=1))
    p = torch.randn(dim, n, generator=gen) / math.sqrt(n)
    p[:, -1] = 0.0
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.int64) / rot))
    w0, w1 = layer0.attn.qkv_proj.weight, layer1.attn.qkv_proj.weight
    with torch.no_grad():
        layer0.ln_1.weight[-1], layer0.ln_1.bias[-1] = 0.0, 1.0
        for head, distance in ((0, 1), (1, 2), (2, 0)):
            q, k = 3 * dim * head, 3 * dim * head + 2 * dim
            for i, angle in enumerate((distance * inv[:3]).tolist()):
                w0[q + 2 * i, -1], w0[q + 2 * i + 1, -1] = scale * math.cos(angle), -scale * math.sin(angle)
                w0[k + 2 * i, -1], w0[k + 2 * i + 1, -1] = scale, 0.0
        for head, space in ((0, u), (2, v)):
            w0[3 * dim * head + dim : 3 * dim * head + 2 * dim] = p  # values
            layer0.attn.out_proj.weight[:, head * dim : (head + 1) * dim] = beta * space
        for head in (0, 1):
            s = torch.randn(dim - rot, dim, generator=gen) / math.sqrt(dim)
            q, k = 3 * dim * head, 3 * dim * head + 2 * dim
            w1[q : q + rot], w1[k : k + rot] = 0.0, 0.0  # no preference for positions: a pure content match
            w1[q + rot : q + dim], w1[k + rot : k + dim] = gamma * s @ v.T, gamma * s @ u.T
