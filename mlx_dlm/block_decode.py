"""Block-diffusion decoding (model_type "block"): blocks of B positions left to right, each denoised in parallel.

The canvas is cut into blocks at multiples of B from position 0, as in training; a prompt that ends inside a
block is visible text of that block. Inside a block, every pass runs the sampler's one commit rule
(`decoding.commit_rule`: strategy, schedule or threshold, temperature, revision); `steps` is spread over the
blocks as for semi-autoregressive blocks.

The KV cache is exact: it holds the keys and values of clean, finished blocks, computed as in training (a clean
block attends to itself and the blocks before it). Passes:
- prefill: the prompt's whole blocks, once;
- a block's first pass also runs the block before it, now finished, as clean text (BD3-LM's fold): 2B rows,
  the clean half written to the cache and kept, the noisy half written and discarded;
- its later passes: the noisy block alone (B rows) over the cache.
With `logit_shift` a block's first position is predicted from the clean output at the position before it (kept
from the pass that produced it) and the others from the noisy output to their left (`diffusion.shifted_block_logits`).

`decode_blocks(..., exact_cache=False)` recomputes every pass from scratch over the whole canvas in the training
layout ([noisy; clean] under the block mask): the reference the cache is tested against.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from .decoding import all_stopped, commit_rule, commit_targets, numbers, numbers_key
from .diffusion import block_logits, shifted_block_logits
from .errors import UserError
from .model import KVCache, memoize_on_model
from .options import SamplerOptions


def block_defaults(args) -> dict:
    """The decoding defaults of a block model trained here (ModelArgs args; the trainer writes them to its
    sampling.json): one position a pass, and with a next-token head (logit_shift) left to right, the leftmost
    being the AR's own step: the setting that wrote best in the benchmark (docs/block-diffusion.md). As a
    drafter it drafts at most the rest of its block, so a longer draft_length only lengthens the verify pass. A
    feature drafter only drafts (its whole block)."""
    if args.feature_dim:
        return {"draft_length": args.block_size}
    return {"block_steps": args.block_size, **({"strategy": "left"} if args.logit_shift else {}),
            "draft_length": args.block_size}


def check_block_options(o: SamplerOptions, block_size: int) -> None:
    """A UserError for the options a block model cannot honour (it only sees the text before a block)."""
    if o.suffix or o.template is not None:
        raise UserError("a suffix or template needs a full-sequence diffusion model; a block model writes left to "
                        "right")
    if o.cfg_scale:
        raise UserError("--cfg-scale is not supported for block models")
    if o.block_length and o.block_length != block_size:
        raise UserError(f"this block model decodes in its own blocks of {block_size}; drop --block-length "
                        f"{o.block_length}")


def cached_pass(model, cache: KVCache, block_size: int, fold: bool):
    """Logits (noisy block, first-position logits) of one cached pass; fold: the finished block before it too.

    Called with the cache's offset at the first row's position; the offset moves on past the clean block.
    folded (B,) bool, fold passes of a per-row cache only: which rows fold; the others' window starts with their
    noisy block (what follows it is run and ignored), and their offset and first logits stay."""
    B = block_size
    reach = mx.array([B] * B + ([2 * B] * B if fold else []))  # each row sees the buffer up to offset + reach

    def run(window: mx.array, first: mx.array, folded: mx.array | None = None) -> tuple[mx.array, mx.array]:
        mask = cache.visible(cache.row_offset + reach)
        advance = (B if folded is None else folded.astype(mx.int32) * B) if fold else 0
        logits = model(window, cache=cache, attn_mask=mask, advance=advance)
        if fold and folded is None:
            first, logits = logits[:, B - 1], logits[:, B:]
        elif fold:
            first = mx.where(folded[:, None], logits[:, B - 1], first)
            rows = folded.astype(mx.int32)[:, None] * B + mx.arange(B)
            logits = mx.take_along_axis(logits, rows[..., None], axis=1)
        return logits, first

    return run


def _make_block_step(model, mask_id: int, strategy: str, top_k: int, n_valid: int | None, cache: KVCache | None,
                     fold: bool):
    """Compiled: (x, active, conf, target, remask_frac, key, start, first, nums) -> (x, conf, committed, remasked,
    first, key) for the block at `start` (an array: one compiled step serves every block); nums: `decoding.numbers`.
    The step places the cache's offset itself (at the block, or with fold at the block before it) and draws from
    the second half of mx.random.split(key), returning the first for the next step."""
    B = model.args.block_size
    commit = commit_rule(mask_id, strategy, top_k, n_valid)
    cached = cached_pass(model, cache, B, fold) if cache is not None else None

    def logits_of(x, start, first):
        if cached is None:  # the reference: the whole canvas in the training layout
            return mx.slice(block_logits(model, x, x), start[None], (1,), (x.shape[0], B, model.args.vocab_size)), first
        rows = 2 * B if fold else B
        cache.state["offset"] = start - (B if fold else 0)
        window = mx.slice(x, cache.state["offset"][None], (1,), (x.shape[0], rows))
        logits, first = cached(window, first)
        if model.args.logit_shift:
            logits = shifted_block_logits(logits, mx.broadcast_to(first[:, None], logits.shape), B)
        return logits, first

    def step(x, active, conf, target, remask_frac, key, start, first, nums):
        key, step_key = mx.random.split(key)
        logits, first = logits_of(x, start, first)
        xs, act, cs = (mx.slice(a, start[None], (1,), (x.shape[0], B)) for a in (x, active, conf))
        xs, cs, committed, remasked = commit(logits, xs, act, cs, target, remask_frac, step_key, nums)
        zeros = mx.zeros(x.shape, dtype=mx.bool_)
        return (mx.slice_update(x, xs, start[None], (1,)), mx.slice_update(conf, cs, start[None], (1,)),
                mx.slice_update(zeros, committed, start[None], (1,)),
                mx.slice_update(zeros, remasked, start[None], (1,)), first, key)

    state = [model.state] + ([cache.state] if cache is not None else [])
    return mx.compile(step, inputs=state, outputs=[cache.state] if cache is not None else [])


def prefill_blocks(model, cache: KVCache, x: mx.array, length: int) -> mx.array:
    """Write the clean blocks of x[:, :length] into the cache; the logits at its last position."""
    B = model.args.block_size
    block = mx.arange(cache.size) // B
    mask = block[None, :] <= block[:length, None]  # clean rows: their own block and the ones before
    cache.reset()
    return model(x[:, :length], cache=cache, attn_mask=mask)[:, -1]


def decode_blocks(model, mask_id: int, ids: np.ndarray, editable: np.ndarray, key: mx.array, o: SamplerOptions,
                  n_valid: int | None = None, stop_ids=(), exact_cache: bool = True):
    """Block-diffusion decoding of one canvas (prompt then editable positions), o.num_samples times; yields
    (canvas, committed, remasked, positions forwarded, prompt seconds) per pass (remasked None without revision)."""
    B, num_samples, tic = model.args.block_size, o.num_samples, time.perf_counter()
    L = len(ids)
    positions = np.flatnonzero(editable)
    P = int(positions[0])  # the prompt: everything before the first editable position
    padded = -(-L // B) * B
    if padded > model.args.max_seq_len:
        raise UserError(f"the canvas ({L} tokens: prompt + --max-tokens, {padded} in blocks of {B}) exceeds the "
                        f"model's context of {model.args.max_seq_len} tokens; shorten the prompt or lower --max-tokens")
    canvas = np.concatenate([ids, np.full(padded - L, mask_id, dtype=ids.dtype)])
    active_row = np.concatenate([editable, np.zeros(padded - L, dtype=bool)])
    x = mx.array(np.tile(canvas, (num_samples, 1)))
    active = mx.array(np.tile(active_row, (num_samples, 1)))
    conf = mx.full(x.shape, mx.inf)
    cache = memoize_on_model(model, ("block-cache", num_samples, padded),
                             lambda: KVCache(model.args, num_samples, padded)) if exact_cache else None

    nums = numbers(o)
    canvas_of = (lambda a: a) if padded == L else (lambda a: a[:, :L])  # the canvas without the last block's padding

    def step_fn(fold: bool):
        options = (mask_id, o.strategy, o.top_k, n_valid)
        return memoize_on_model(model, ("block", *options, numbers_key(nums), fold,
                                        (num_samples, padded) if exact_cache else None),
                                lambda: _make_block_step(model, *options, cache, fold))

    first_block, n_blocks = P // B, padded // B
    first = mx.zeros((num_samples, model.args.vocab_size))
    if cache is not None and first_block:  # (every step places the cache's offset itself)
        first = prefill_blocks(model, cache, x, first_block * B)
    mx.eval(first)
    prompt_seconds = time.perf_counter() - tic
    per_block = o.block_steps or max(1, o.steps // (n_blocks - first_block))
    for b in range(first_block, n_blocks):
        n_active = int(active_row[b * B:(b + 1) * B].sum())
        targets = commit_targets(n_active, per_block, o)
        for j, target in enumerate(targets):
            fold = exact_cache and j == 0 and b > first_block
            frac = o.remask if j < len(targets) - 1 else 0.0
            x, conf, committed, remasked, first, key = step_fn(fold)(
                x, active, conf, mx.array(target, dtype=mx.int32), mx.array(frac, dtype=mx.float32), key,
                mx.array(b * B, dtype=mx.int32), first, nums)
            rows = (2 if fold else 1) * B if exact_cache else 2 * padded
            yield (canvas_of(x), canvas_of(committed), canvas_of(remasked) if o.remask else None, num_samples * rows,
                   prompt_seconds)
            if o.threshold is not None and not mx.any(((x == mask_id) & active)[:, b * B:(b + 1) * B]).item():
                break
        if len(stop_ids) and all_stopped(x, stop_ids, positions[positions < (b + 1) * B]):
            return
