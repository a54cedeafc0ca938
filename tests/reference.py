"""Slow numpy references (float64) used as independent expectations."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten


def weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32), dtype=np.float64) for k, v in tree_flatten(model.parameters())}


def _layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    out = (x - mu) / np.sqrt(var + eps) * w
    return out + b if b is not None else out


def _rmsnorm(x, w, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def _rope(x, theta):
    """Non-interleaved RoPE over the last axis of (B, H, L, Dh): halves rotate together."""
    L, Dh = x.shape[-2], x.shape[-1]
    half = Dh // 2
    freqs = theta ** (-np.arange(half) / half)
    ang = np.arange(L)[:, None] * freqs[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def softmax(x):
    """Over the last axis (-inf entries get probability 0)."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def forward(model, tokens: np.ndarray, t: np.ndarray | None, record: list | None = None,
            stale: list | None = None, fresh: np.ndarray | None = None) -> np.ndarray:
    """Logits of the configurable Transformer, written out plainly.

    record: a list that receives each layer's input (B, L, dim). stale/fresh: with the layer inputs of an
    earlier pass (`record` of it) and a (L,) bool mask, positions not fresh enter every layer with their
    stale input, so their keys and values are those of the earlier pass (what a key/value cache holds);
    only the logits of fresh positions mean anything then."""
    a = model.args
    W = weights(model)
    get = lambda name: W.get(name)  # noqa: E731
    lin = lambda x, name: x @ W[name + ".weight"].T + (W[name + ".bias"] if name + ".bias" in W else 0)  # noqa: E731

    def norm(x, name):
        if a.norm == "rmsnorm":
            return _rmsnorm(x, W[name + ".weight"], a.norm_eps)
        return _layernorm(x, W[name + ".weight"], get(name + ".bias"), a.norm_eps)

    B, L = tokens.shape
    H, Dh = a.n_heads, a.dim // a.n_heads
    KV = a.n_kv_heads or H
    x = W["tok_emb.weight"][tokens]
    if a.pos_emb == "learned":
        x = x + W["pos_emb"][:L]
    if "t_proj.weight" in W:
        x = x + (t[:, None] @ W["t_proj.weight"].T + W["t_proj.bias"])[:, None, :]
    for i in range(a.n_layers):
        if stale is not None:
            x = np.where(fresh[None, :, None], x, stale[i])
        if record is not None:
            record.append(x.copy())
        p = f"layers.{i}."
        q, k, v = np.split(lin(norm(x, p + "attn_norm"), p + "attn.qkv"), [a.dim, a.dim + KV * Dh], axis=-1)
        q = q.reshape(B, L, H, Dh).transpose(0, 2, 1, 3)
        # grouped keys/values: query head h reads key/value head h // (H / KV)
        k, v = (np.repeat(z.reshape(B, L, KV, Dh).transpose(0, 2, 1, 3), H // KV, axis=1) for z in (k, v))
        if a.pos_emb == "rope":
            q, k = _rope(q, a.rope_theta), _rope(k, a.rope_theta)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(Dh)
        if a.model_type == "ar":
            s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
        o = (softmax(s) @ v).transpose(0, 2, 1, 3).reshape(B, L, a.dim)
        x = x + (lin(o, p + "attn.out_proj") if a.attn_out_proj else o)
        h = norm(x, p + "mlp_norm")
        if a.mlp == "swiglu":
            g = lin(h, p + "mlp.gate")
            h = g / (1 + np.exp(-g)) * lin(h, p + "mlp.fc1")
        elif a.mlp == "relu":
            h = np.maximum(lin(h, p + "mlp.fc1"), 0)
        else:
            from math import erf, sqrt
            z = lin(h, p + "mlp.fc1")
            h = 0.5 * z * (1 + np.vectorize(erf)(z / sqrt(2)))
        x = x + lin(h, p + "mlp.fc2")
    if a.final_norm:
        x = norm(x, "norm")
    logits = x @ W["tok_emb.weight"].T if a.tie_embeddings else lin(x, "lm_head")
    if getattr(a, "logit_shift", False):
        logits = np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    return logits


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def greedy_decode(model, ids: np.ndarray, editable: np.ndarray, mask_id: int, targets_per_block: list[list[int]],
                  block_length: int | None = None, cache: str | None = None, remask: float = 0.0) -> list[np.ndarray]:
    """The canvas after every step of greedy confidence decoding, for one sample, in float64.

    Blocks of block_length fillable positions, left to right; step j of block b commits positions (the highest
    probability of the greedy proposal first) until targets_per_block[b][j] of the block stay masked. cache "prefix": after a full pass at a
    block's start, later passes recompute positions from the block's start on, and earlier positions keep their
    keys/values from that full pass; "dual": only the block is recomputed. remask R: after each step but a
    block's last, the floor(R x n) lowest-confidence of the n tokens committed by earlier steps of the block
    are masked again (confidence: probability when committed)."""
    x = ids.copy()[None]
    conf = np.full(x.shape[1], np.inf)
    positions = np.flatnonzero(editable)
    size = block_length or len(positions)
    canvases = []
    for b, start_at in enumerate(range(0, len(positions), size)):
        block = positions[start_at:start_at + size]
        in_block = np.zeros(x.shape[1], bool)
        in_block[block] = True
        states = None
        targets = targets_per_block[b]
        for j, target in enumerate(targets):
            t = np.array([(x == mask_id).mean()])
            if cache is None or j == 0:
                states = []
                logits = forward(model, x, t, record=states)
            else:
                fresh = np.arange(x.shape[1]) >= block[0]
                if cache == "dual":
                    fresh &= np.arange(x.shape[1]) <= block[-1]
                logits = forward(model, x, t, stale=states, fresh=fresh)
            logits[..., mask_id] = -np.inf
            logp = log_softmax(logits[0])
            proposal = logp.argmax(-1)
            prob = np.exp(logp[np.arange(len(proposal)), proposal])
            hidden = (x[0] == mask_id) & in_block
            n_commit = int(hidden.sum()) - target
            order = np.argsort(-np.where(hidden, prob, -np.inf), kind="stable")
            committed = np.zeros_like(hidden)
            committed[order[:n_commit]] = True
            x[0, committed] = proposal[committed]
            conf[committed] = prob[committed]
            if j < len(targets) - 1 and remask > 0:
                earlier = in_block & (x[0] != mask_id) & ~committed
                n = int(np.floor(remask * earlier.sum()))
                lowest = np.argsort(np.where(earlier, conf, np.inf), kind="stable")[:n]
                x[0, lowest] = mask_id
            canvases.append(x[0].copy())
    return canvases
