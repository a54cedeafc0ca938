"""The masked-diffusion forward process and its losses.

Forward process: draw a mask ratio t per sequence, hide each token independently
with probability t (replace it by the mask id). The model sees the corrupted
tokens and t and predicts the hidden ones.

Losses (cross-entropy on masked positions only):
- "masked-mean": mean over masked tokens (simple_dlm's loss);
- "elbo": the MDLM continuous-time bound, each masked token weighted by 1/t and
  the sum normalised by B*L, so it estimates negative log-likelihood per token.

Block diffusion (BD3-LM; `block_loss`): the window is cut into blocks of B positions. The noised
window and the clean window are laid side by side (2L positions, both copies at the same positions)
and run in one forward under `block_attention_mask`: a noisy token sees its own noisy block and the
clean blocks before it; a clean token sees the clean blocks up to its own. The loss is the block
NELBO: the ELBO above within every block given the clean blocks before it, so it too estimates
nats/token, and it approaches the exact AR likelihood as B shrinks. The mask ratio is drawn per
block or per sequence (`T_PER`). With `logit_shift` (a model adapted from an AR one, whose head
predicts the next token) a position is predicted from the output one position to its left; a
block's first position from the clean copy's last position of the block before
(`shifted_block_logits`), and the window's first token is always given context.

Distillation (a drafter for speculative decoding; `teacher=`): the targets at hidden positions are an AR
teacher's next-token distributions given the true text (`teacher_targets`) instead of the text itself, so the
drafter learns what its verifier would say.

A feature drafter (`feature_draft_loss`; block model with `feature_dim`, DFlash-style) has no context of its own:
for every position j of a window it sees the teacher's hidden state at j (its last layer's output, what the
teacher's head reads to predict x_{j+1}, or the outputs of the layers the drafter names) and a block of K rows,
[x_{j+1}, mask, ..., mask], and learns the teacher's distributions of x_{j+2} .. x_{j+K+1} given the true text
(with the shift, row i's output predicts row i + 1). It is trained at the one mask it drafts with, every drafted
position hidden, and the loss is the cross-entropy against the teacher's distributions (nats/token, not a
likelihood bound). A chained drafter (`ModelArgs.draft_context`) adds to each row after the first a learned bias
indexed by the tokens before it, here the true ones (teacher forcing; when drafting, the drawn token and the drafts
drawn before it).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

LOSSES = ("elbo", "masked-mean")
T_SAMPLING = ("stratified", "uniform", "batch")
T_MIN = 1e-3  # keeps the 1/t weight of the ELBO bounded
T_PER = ("block", "sequence")  # block diffusion: one mask ratio per block, or one per window


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
    """Hide each token with probability t of its row (t: (B,)), or of its position (t: (B, L)).
    Returns (noisy tokens, boolean mask of hidden positions).

    shard=(rank, size): the uniforms are drawn for size times as many rows and this rank's rows kept."""
    rank, size = shard
    B = tokens.shape[0]
    u = mx.random.uniform(shape=(B * size, tokens.shape[1]), key=key)[rank * B:(rank + 1) * B]
    hidden = u < (t if t.ndim == 2 else t[:, None])
    return mx.where(hidden, mx.array(mask_id, dtype=tokens.dtype), tokens), hidden


def _hidden_ce(logits: mx.array, targets: mx.array, hidden: mx.array, soft: mx.array | None = None) -> mx.array:
    """Cross-entropy (B, L) in float32 at hidden positions, 0 elsewhere; against the distributions soft (B, L, V)
    instead of the target ids where given (distillation)."""
    if soft is None:
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    else:
        logp = nn.log_softmax(logits.astype(mx.float32), axis=-1)
        ce = -(soft * mx.where(soft > 0, logp, 0.0)).sum(axis=-1)
    return mx.where(hidden, ce, 0.0)  # not a product: a visible target may have probability 0 (SUBS), ce inf


def teacher_targets(teacher, tokens: mx.array) -> mx.array:
    """What a drafter distilled from an AR teacher learns at each position (B, L, V): the teacher's next-token
    distribution given the true text before it (no gradient); at position 0, which it cannot predict, the token
    itself (one-hot)."""
    probs = mx.softmax(mx.stop_gradient(teacher(tokens[:, :-1])).astype(mx.float32), axis=-1)
    first = (mx.arange(probs.shape[-1]) == tokens[:, :1, None]).astype(mx.float32)
    return mx.concatenate([first, probs], axis=1)


def elbo_per_sequence(logits: mx.array, targets: mx.array, hidden: mx.array, t: mx.array,
                      soft: mx.array | None = None) -> mx.array:
    """The MDLM bound of each sequence in nats/token (B,): hidden cross-entropy weighted by 1/t, over L."""
    return (_hidden_ce(logits, targets, hidden, soft) / t[:, None]).sum(axis=1) / targets.shape[1]


def masked_loss(logits: mx.array, targets: mx.array, hidden: mx.array, t: mx.array, loss: str = "elbo",
                soft: mx.array | None = None) -> mx.array:
    """Cross-entropy over hidden positions (against soft targets where given), reduced as the chosen loss (see
    module docstring)."""
    if loss == "masked-mean":
        return _hidden_ce(logits, targets, hidden, soft).sum() / mx.maximum(hidden.sum().astype(mx.float32), 1.0)
    if loss == "elbo":
        return elbo_per_sequence(logits, targets, hidden, t, soft).mean()
    raise ValueError(f"unknown loss {loss!r} (choose from {', '.join(LOSSES)})")


def diffusion_loss(model, tokens: mx.array, mask_id: int, loss: str = "elbo", t_sampling: str = "stratified",
                   key: mx.array | None = None, shard: tuple[int, int] = (0, 1), teacher=None) -> mx.array:
    """Draw t and masks, run the model on the corrupted tokens and return the loss.

    With key=None the global random state is used (the training step lists it as
    compiled state, so every call draws fresh masks); a fixed key gives a fixed draw.
    shard=(rank, size): tokens are rows rank*B..(rank+1)*B of a global batch of size*B; t and
    masks are drawn for the global batch and sliced, so N processes see exactly the draws of one.
    teacher: an AR model whose predictions replace the data as targets (`teacher_targets`: a drafter for it).
    """
    rank, size = shard
    B = tokens.shape[0]
    t_key, mask_key = mx.random.split(key) if key is not None else (None, None)
    t = sample_t(B * size, t_sampling, key=t_key)[rank * B:(rank + 1) * B]
    noisy, hidden = corrupt(tokens, t, mask_id, key=mask_key, shard=shard)
    if teacher is not None:
        hidden = hidden & (mx.arange(tokens.shape[1]) > 0)  # position 0 has no teacher prediction
    soft = teacher_targets(teacher, tokens) if teacher is not None else None
    return masked_loss(model(noisy, t), tokens, hidden, t, loss, soft)


def ar_loss(model, tokens: mx.array) -> mx.array:
    """Next-token cross-entropy (mean per predicted token) for a causal model."""
    logits = model(tokens[:, :-1])
    return nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:], reduction="mean")


def block_attention_mask(length: int, block_size: int) -> mx.array:
    """The (2L, 2L) boolean mask over [noisy; clean] (True: attend): noisy rows see their own noisy block and
    earlier clean blocks; clean rows see clean blocks up to their own."""
    block = mx.arange(length) // block_size
    same = block[:, None] == block[None, :]
    earlier = block[:, None] > block[None, :]
    top = mx.concatenate([same, earlier], axis=1)
    bottom = mx.concatenate([mx.zeros_like(same), same | earlier], axis=1)
    return mx.concatenate([top, bottom], axis=0)


def shifted_block_logits(noisy: mx.array, clean: mx.array, block_size: int, start: int = 0) -> mx.array:
    """Logits for each noisy position (B, L, V) of a shifted model: from the noisy output one position to the
    left, or at a block's first position from the clean output one to the left. `start`: the absolute position
    of column 0 (blocks are counted from position 0). Column 0, a block's start, takes clean[:, 0]: in training
    the window's first token, given and never predicted; in decoding the caller puts the previous block's last
    clean output there."""
    first = (start + mx.arange(noisy.shape[1])) % block_size == 0
    prev_noisy = mx.concatenate([noisy[:, :1], noisy[:, :-1]], axis=1)
    prev_clean = mx.concatenate([clean[:, :1], clean[:, :-1]], axis=1)
    return mx.where(first[None, :, None], prev_clean, prev_noisy)


def block_logits(model, noisy: mx.array, clean: mx.array) -> mx.array:
    """The block model's logits (B, L, V) for every noisy position, from one forward over [noisy; clean]."""
    L, size = noisy.shape[1], model.args.block_size
    logits = model(mx.concatenate([noisy, clean], axis=1), attn_mask=block_attention_mask(L, size), copies=2)
    noisy_out, clean_out = logits[:, :L], logits[:, L:]
    return shifted_block_logits(noisy_out, clean_out, size) if model.args.logit_shift else noisy_out


def block_t(batch_size: int, length: int, block_size: int, per: str = "block", mode: str = "stratified",
            key: mx.array | None = None) -> mx.array:
    """Mask ratios per position (batch_size, length): one per block of block_size, or one per window."""
    if per not in T_PER:
        raise ValueError(f"unknown mask-ratio unit {per!r} (choose from {', '.join(T_PER)})")
    if per == "sequence":
        return mx.broadcast_to(sample_t(batch_size, mode, key=key)[:, None], (batch_size, length))
    n_blocks = -(-length // block_size)
    t = sample_t(batch_size * n_blocks, mode, key=key).reshape(batch_size, n_blocks)
    return mx.repeat(t, block_size, axis=1)[:, :length]


def block_loss(model, tokens: mx.array, mask_id: int, t_per: str = "block", t_sampling: str = "stratified",
               key: mx.array | None = None, shard: tuple[int, int] = (0, 1), teacher=None,
               t_range: tuple[float, float] = (0.0, 1.0), complementary: bool = False) -> mx.array:
    """The block NELBO in nats/token (see module docstring): mask ratios per block (or window), masks, one
    forward over [noisy; clean], hidden cross-entropy weighted by 1/t over the predicted positions
    (all L, or L - 1 with logit_shift: the first token is given). shard: as for `diffusion_loss`.
    teacher: an AR model whose predictions replace the data as targets (`teacher_targets`: a drafter for it).
    t_range (lo, hi): mask ratios drawn in [lo, hi] only (BD3-LM's clipped schedule; (0, 1): the NELBO).
    complementary: each window is also trained with the complement of its mask at ratio 1 - t (Fast-dLLM v2),
    the two losses averaged: every token is a target once per window."""
    rank, size = shard
    B, L = tokens.shape
    t_key, mask_key = mx.random.split(key) if key is not None else (None, None)
    t = block_t(B * size, L, model.args.block_size, t_per, t_sampling, key=t_key)[rank * B:(rank + 1) * B]
    t = t_range[0] + (t_range[1] - t_range[0]) * t
    shift = model.args.logit_shift
    given = mx.arange(L)[None, :] == 0 if shift else mx.zeros((1, L), dtype=mx.bool_)  # never hidden
    t = mx.where(given, 0.0, t)
    noisy, hidden = corrupt(tokens, t, mask_id, key=mask_key, shard=shard)
    if complementary:
        hidden = mx.concatenate([hidden, ~hidden & ~given], axis=0)
        t = mx.concatenate([t, mx.where(given, 0.0, 1.0 - t)], axis=0)
        tokens = mx.concatenate([tokens, tokens], axis=0)
        noisy = mx.where(hidden, mx.array(mask_id, dtype=tokens.dtype), tokens)
    soft = teacher_targets(teacher, tokens) if teacher is not None else None
    weighted = _hidden_ce(block_logits(model, noisy, tokens), tokens, hidden, soft) / mx.maximum(t, T_MIN)
    return (weighted.sum(axis=1) / (L - int(shift))).mean()


def feature_draft_loss(model, tokens: mx.array, mask_id: int, teacher, key: mx.array | None = None,
                       shard: tuple[int, int] = (0, 1)) -> mx.array:
    """A feature drafter's distillation loss in nats/token (see module docstring): every position j < L - K of
    each window is one example, its block [x_{j+1}, mask x (K-1)] conditioned on the teacher's hidden state at
    j, its targets the teacher's next-token distributions at j+1 .. j+K. key and shard: unused (no draws)."""
    K = model.args.block_size
    logits, state = teacher(tokens, hidden=model.args.verifier_hidden)
    logits, state = mx.stop_gradient(logits).astype(mx.float32), mx.stop_gradient(state)
    B, L = tokens.shape
    J = L - K
    first = tokens[:, 1:J + 1].reshape(-1, 1)
    block = mx.concatenate([first, mx.full((B * J, K - 1), mask_id, dtype=tokens.dtype)], axis=1)
    targets = mx.stack([mx.softmax(logits[:, k:J + k], axis=-1) for k in range(1, K + 1)], axis=2)
    logits = model(block, features=state[:, :J].reshape(B * J, -1)).astype(mx.float32).reshape(B, J, K, -1)
    logp = nn.log_softmax(_chained(model, logits, tokens), axis=-1)
    return -(targets * logp).sum(axis=-1).mean()


def _chained(model, logits: mx.array, tokens: mx.array) -> mx.array:
    """A chained feature drafter's logits (B, J, K, V) with each row's bias from the true tokens before it (the
    teacher forcing of `Model.chain_bias`): row k of position j's block follows x_{j+1} .. x_{j+1+k}."""
    n, (_, J, K, _) = model.args.draft_context, logits.shape
    if not n:
        return logits
    rows = [logits[:, :, 0]]
    for k in range(1, K):
        before = [tokens[:, 2 + k - n + i:2 + k - n + i + J] for i in range(n)]
        rows.append(logits[:, :, k] + model.chain_bias(k, before))
    return mx.stack(rows, axis=2)
