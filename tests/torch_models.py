"""PyTorch models with the exact state-dict layouts of simple_dlm (both revisions) and nanoGPT.

Written from the layouts the converter documents, independent of the MLX code, so parity
tests compare two implementations. simple_dlm's lives in the benchmarks (its training step is
timed there); here its LayerNorms get random affine parameters so every tensor's mapping is checked.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mlx_dlm.benchmark.torch_simple_dlm import SimpleDLM as _SimpleDLM


def SimpleDLM(vocab: int, d: int = 32, layers: int = 2, max_len: int = 64, fused: bool = True) -> nn.Module:
    """simple_dlm's Transformer (small by default) with random LayerNorm affine parameters."""
    model = _SimpleDLM(vocab, d, layers, max_len, fused)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


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
