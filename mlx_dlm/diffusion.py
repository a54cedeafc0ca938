"""The masked-diffusion forward process and its losses.

Forward process: draw a mask ratio t per sequence, hide each token independently
with probability t (replace it by the mask id). The model sees the corrupted
tokens and t and predicts the hidden ones.

Losses (cross-entropy on masked positions only):
- "masked-mean": mean over masked tokens (simple_dlm's loss);
- "elbo": the MDLM continuous-time bound, each masked token weighted by 1/t and
  the sum normalised by B*L, so it estimates negative log-likelihood per token.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

LOSSES = ("elbo", "masked-mean")
T_SAMPLING = ("stratified", "uniform", "batch")
T_MIN = 1e-3  # keeps the 1/t weight of the ELBO bounded


def sample_t(batch_size: int, mode: str = "stratified", key: mx.array | None = None) -> mx.array:
    """Mask ratios in [T_MIN, 1), shape (B,).

    mode (see T_SAMPLING): "stratified", one draw in each of B equal bins (lower variance); "uniform",
    independent draws; "batch", one draw shared by the whole batch (simple_dlm)."""
    if mode == "batch":
        u = mx.broadcast_to(mx.random.uniform(shape=(1,), key=key), (batch_size,))
    else:
        u = mx.random.uniform(shape=(batch_size,), key=key)
    if mode == "stratified":
        u = (mx.arange(batch_size) + u) / batch_size
    elif mode not in T_SAMPLING:
        raise ValueError(f"unknown t sampling {mode!r} (choose from {', '.join(T_SAMPLING)})")
    return T_MIN + (1.0 - T_MIN) * u


def corrupt(tokens: mx.array, t: mx.array, mask_id: int, key: mx.array | None = None,
            shard: tuple[int, int] = (0, 1)) -> tuple[mx.array, mx.array]:
    """Hide each token with probability t of its row. Returns (noisy tokens, boolean mask of hidden positions).

    shard=(rank, size): the uniforms are drawn for size times as many rows and this rank's rows kept."""
    rank, size = shard
    B = tokens.shape[0]
    u = mx.random.uniform(shape=(B * size, tokens.shape[1]), key=key)[rank * B:(rank + 1) * B]
    hidden = u < t[:, None]
    return mx.where(hidden, mx.array(mask_id, dtype=tokens.dtype), tokens), hidden


def _hidden_ce(logits: mx.array, targets: mx.array, hidden: mx.array) -> mx.array:
    """Cross-entropy (B, L) in float32 at hidden positions, 0 elsewhere."""
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    return mx.where(hidden, ce, 0.0)  # not a product: a visible target may have probability 0 (SUBS), ce inf


def elbo_per_sequence(logits: mx.array, targets: mx.array, hidden: mx.array, t: mx.array) -> mx.array:
    """The MDLM bound of each sequence in nats/token (B,): hidden cross-entropy weighted by 1/t, over L."""
    return (_hidden_ce(logits, targets, hidden) / t[:, None]).sum(axis=1) / targets.shape[1]


def masked_loss(logits: mx.array, targets: mx.array, hidden: mx.array, t: mx.array, loss: str = "elbo") -> mx.array:
    """Cross-entropy over hidden positions, reduced as the chosen loss (see module docstring)."""
    if loss == "masked-mean":
        return _hidden_ce(logits, targets, hidden).sum() / mx.maximum(hidden.sum().astype(mx.float32), 1.0)
    if loss == "elbo":
        return elbo_per_sequence(logits, targets, hidden, t).mean()
    raise ValueError(f"unknown loss {loss!r} (choose from {', '.join(LOSSES)})")


def diffusion_loss(model, tokens: mx.array, mask_id: int, loss: str = "elbo", t_sampling: str = "stratified",
                   key: mx.array | None = None, shard: tuple[int, int] = (0, 1)) -> mx.array:
    """Draw t and masks, run the model on the corrupted tokens and return the loss.

    With key=None the global random state is used (the training step lists it as
    compiled state, so every call draws fresh masks); a fixed key gives a fixed draw.
    shard=(rank, size): tokens are rows rank*B..(rank+1)*B of a global batch of size*B; t and
    masks are drawn for the global batch and sliced, so N processes see exactly the draws of one.
    """
    rank, size = shard
    B = tokens.shape[0]
    t_key, mask_key = mx.random.split(key) if key is not None else (None, None)
    t = sample_t(B * size, t_sampling, key=t_key)[rank * B:(rank + 1) * B]
    noisy, hidden = corrupt(tokens, t, mask_id, key=mask_key, shard=shard)
    return masked_loss(model(noisy, t), tokens, hidden, t, loss)


def ar_loss(model, tokens: mx.array) -> mx.array:
    """Next-token cross-entropy (mean per predicted token) for a causal model."""
    logits = model(tokens[:, :-1])
    return nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:], reduction="mean")
