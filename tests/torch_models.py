"""PyTorch models with the exact state-dict layouts of simple_dlm (both revisions) and nanoGPT.

Written from the layouts the converter documents, so parity tests compare against an
independent implementation. Random init; scaled so activations stay well conditioned.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class SimpleDLM(nn.Module):
    """simple_dlm's Transformer: fused (current) or separate (older) Q/K/V."""

    def __init__(self, vocab: int, d: int = 32, layers: int = 2, max_len: int = 64, fused: bool = True):
        super().__init__()
        self.fused = fused
        self.token_emb = nn.Parameter(torch.randn(vocab, d))
        self.pos_emb = nn.Parameter(torch.randn(max_len, d))
        self.mask_prob_emb = nn.Linear(1, d)
        attn = [nn.Linear(d, 3 * d)] if fused else [nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)]
        self.layers = nn.ModuleList([
            nn.ModuleList([nn.LayerNorm(d), *attn, nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d)])
            for _ in range(layers)])
        self.output = nn.Linear(d, vocab)
        with torch.no_grad():  # random LayerNorm affine too, so the mapping of every tensor is checked
            for layer in self.layers:
                for m in layer:
                    if isinstance(m, nn.LayerNorm):
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.normal_(0, 0.1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.token_emb[x] + self.pos_emb[: x.shape[-1]] + self.mask_prob_emb(t.view(-1, 1, 1))
        for layer in self.layers:
            if self.fused:
                ln1, qkv, ln2, fc1, act, fc2 = layer
                q, k, v = qkv(ln1(h)).chunk(3, dim=-1)
            else:
                ln1, wq, wk, wv, ln2, fc1, act, fc2 = layer
                q, k, v = wq(ln1(h)), wk(ln1(h)), wv(ln1(h))
            h = h + torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1]), dim=-1) @ v
            h = h + fc2(act(fc1(ln2(h))))
        return self.output(h)


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm with an optional bias."""

    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d).uniform_(0.5, 1.5))
        self.bias = nn.Parameter(torch.zeros(d).normal_(0, 0.1)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.ln_1 = LayerNorm(d, bias)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.attn.c_proj = nn.Linear(d, d, bias=bias)
        self.ln_2 = LayerNorm(d, bias)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, 4 * d, bias=bias)
        self.mlp.c_proj = nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.heads, C // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.attn.c_proj(y)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: wte/wpe, blocks, ln_f, lm_head tied to wte."""

    def __init__(self, vocab: int, d: int = 32, layers: int = 2, heads: int = 4, block_size: int = 64,
                 bias: bool = True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block_size, d),
            h=nn.ModuleList([Block(d, heads, bias) for _ in range(layers)]), ln_f=LayerNorm(d, bias)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))
