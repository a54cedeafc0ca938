"""simple_dlm's model, training step and training loop in PyTorch, for side-by-side benchmarks (needs torch).

The layer list follows simple_dlm's current revision; `fused=False` gives the older separate Q/K/V.
- `seconds_per_step`: the step (per-sequence mask ratios, AdamW, clipping) timed at a given size;
- `train_loop`: simple_dlm's own recipe (Adam 1e-4 constant, one mask ratio for the whole batch,
  masked-mean loss, no clipping) on given token windows, for a time budget, with a callback at
  checkpoints so the caller can measure the weights;
- `sample`: simple_dlm's sampler (mask id 0; the prompt, then masks to `length`; every step runs the model
  told t = 1 - step/steps, and each still-masked position is drawn from its softmax with probability
  1/(steps - step)), one position at a time as simple_dlm does, or with `vectorised=True` all positions of a
  step in tensor ops (the same algorithm without its Python loop).
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import numpy as np

import torch
from torch import nn


class SimpleDLM(nn.Module):
    """simple_dlm's Transformer with its state-dict layout."""

    def __init__(self, vocab: int, d: int = 256, layers: int = 10, max_len: int = 1024, fused: bool = True):
        super().__init__()
        self.fused = fused
        self.token_emb = nn.Parameter(torch.randn(vocab, d))
        self.pos_emb = nn.Parameter(torch.randn(max_len, d))
        self.mask_prob_emb = nn.Linear(1, d)
        attn = [nn.Linear(d, 3 * d)] if fused else [nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)]
        self.layers = nn.ModuleList([
            nn.ModuleList([nn.LayerNorm(d), *attn, nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.ReLU(),
                           nn.Linear(4 * d, d)])
            for _ in range(layers)])
        self.output = nn.Linear(d, vocab)

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


def seconds_per_step(vocab: int, d: int, layers: int, batch_size: int, seq_len: int, steps: int, warmup: int,
                     grad_clip: float = 1.0) -> list[float]:
    """Time simple_dlm's training step (mask at a random ratio per sequence, masked-mean loss, AdamW)."""
    torch.manual_seed(0)
    model = SimpleDLM(vocab, d, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    times = []
    for i in range(warmup + steps):
        batch = torch.randint(1, vocab, (batch_size, seq_len))
        tic = time.perf_counter()
        t = torch.rand(batch_size)
        hidden = torch.rand(batch_size, seq_len) < t[:, None]
        logits = model(torch.where(hidden, 0, batch), t)
        loss = nn.functional.cross_entropy(logits[hidden], batch[hidden])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return times


def train_loop(tokens: np.ndarray, vocab: int, batch_size: int, seq_len: int, seconds: float, eval_every: int,
               on_checkpoint: Callable[[int, float, dict], None], seed: int = 0, d: int = 256, layers: int = 10,
               lr: float = 1e-4) -> None:
    """simple_dlm's training loop: train for `seconds` of step time, calling on_checkpoint(step, seconds,
    state_dict as numpy) at step 0, every eval_every steps and at the end (checkpoint time is not counted)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SimpleDLM(vocab, d, layers)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def checkpoint(step: int, elapsed: float) -> None:
        on_checkpoint(step, elapsed, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()})

    checkpoint(0, 0.0)
    step, elapsed = 0, 0.0
    while elapsed < seconds:
        starts = rng.integers(0, len(tokens) - seq_len + 1, size=batch_size)
        batch = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len)].astype(np.int64))
        tic = time.perf_counter()
        t = float(rng.uniform())  # one mask ratio for the whole batch
        hidden = torch.rand(batch_size, seq_len) < t
        logits = model(torch.where(hidden, 0, batch), torch.full((batch_size,), t))
        loss = nn.functional.cross_entropy(logits[hidden], batch[hidden]) if hidden.any() else logits.sum() * 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elapsed += time.perf_counter() - tic
        step += 1
        if step % eval_every == 0 and elapsed < seconds:
            checkpoint(step, elapsed)
    checkpoint(step, elapsed)


@torch.no_grad()
def sample(model: SimpleDLM, prompt_ids: list[int], length: int, steps: int = 20, seed: int = 0,
           vectorised: bool = False) -> torch.Tensor:
    """simple_dlm's sampler (see the module docstring): a (length,) tensor of ids."""
    coin = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.zeros(length, dtype=torch.long)
    x[:len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    given = x != 0
    for step in range(steps):
        probs = torch.softmax(model(x[None], torch.tensor([1.0 - step / steps]))[0], dim=-1)
        hidden = (x == 0) & ~given
        if not hidden.any():
            break
        chance = 1.0 / (steps - step)
        if vectorised:
            pick = hidden & (torch.rand(length, generator=generator) < chance)
            if pick.any():
                x[pick] = torch.multinomial(probs[pick], 1, generator=generator)[:, 0]
            continue
        for position in hidden.nonzero()[:, 0].tolist():
            if coin.random() < chance:
                x[position] = torch.multinomial(probs[position], 1, generator=generator)[0]
    return x
