"""Sampling: parallel unmasking for diffusion models, left-to-right decoding for AR models.

Diffusion. The canvas is the given text with masked positions to fill (after a prompt, before a
suffix, or wherever a template puts `[MASK]`). Each step runs the model once, proposes a token for
every masked position, scores the proposals and commits some of them:
- scores (`strategy`): "confidence" (probability of the proposal: LLaDA's low-confidence remasking),
  "margin" (top-1 minus top-2 probability), "entropy" (lowest entropy first), "random" (simple_dlm);
- commit rule: a schedule of how many per step over `steps` (`schedule` linear or cosine), or
  `threshold` P: every proposal with probability >= P, at least one per step (Fast-dLLM);
- `block_length`: semi-autoregressive blocks, left to right, steps split across blocks (or `block_steps`
  each); with `cache`
  "prefix" (or True), keys/values of everything before the current block are computed once at the
  block's start and reused while it is denoised (Fast-dLLM's prefix cache), refreshed when a block
  completes; with "dual", the keys/values after the block are reused too and only the block is run;
- `alg_temp` > 0: positions to commit drawn from softmax(score / alg_temp) (Dream); `cfg_scale` > 0:
  classifier-free guidance against a pass with the given text masked (LLaDA);
- stop tokens (eos/eot of converted chat models): once every sample holds one after a block, decoding
  ends and `generate` cuts the text there;
- `remask` R: after each step but a block's last, re-mask up to a fraction R of the block's already
  committed tokens, those committed with the lowest confidence (ReMDM-style revision).
One compiled function does a step on the device; nothing loops over positions or samples.

AR: prefill the prompt into a preallocated KV cache, then one compiled decode step per token; past the
model's context, a compiled forward over the last max_seq_len tokens per token (nanoGPT's sliding window).
Each token is read on the host while the device computes the next (`decoding.ahead`).

Block diffusion (model_type "block": blocks of B left to right, an exact KV cache): `block_decode.py`, with
the same commit rule. Speculative (an AR model with a diffusion drafter): `speculative.py`. What every decoder
shares (the canvas, the step state, drawing tokens, the commit rule): `decoding.py`; the options and their
checks: `options.py`.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import mlx.core as mx
import numpy as np

from .block_decode import check_block_options, decode_blocks
from .decoding import (GenerationStep, ahead, all_stopped, build_canvas, check_writes_alone, commit_rule,  # noqa: F401
                       commit_schedule, commit_targets, filter_logits, numbers, numbers_key, sample_tokens,
                       sampling_numbers, without_mask)
from .errors import UserError
from .model import KVCache, memoize_on_model
from .options import (DEFAULT_MAX_TOKENS, DEFAULT_STEPS, DEFAULT_TEMP, SCHEDULES, STRATEGIES,  # noqa: F401
                      SamplerOptions, options_for)
from .speculative import check_drafter, speculative_generate


def _make_unmask_step(model, mask_id: int, strategy: str, top_k: int, n_valid: int | None, start: int,
                      cache: KVCache | None, end: int | None = None):
    """Compiled step over the window x[:, start:end] (a strict part of the canvas only with a cache: the
    prefix cache forwards from the block's start to the end, the dual cache the block alone).

    (x, given, active, conf, target, remask_frac, key, nums) -> (x, conf, committed, remasked). given marks the
    text the sampler never changes; active the positions this step may fill; conf holds each committed
    token's confidence (for revision); nums: `decoding.numbers`; the commit itself: `commit_rule`. cfg_scale
    (in nums): classifier-free guidance against a pass with the given text masked (LLaDA),
    uncond + (cfg_scale + 1)(cond - uncond).
    """
    commit = commit_rule(mask_id, strategy, top_k, n_valid)

    def forward(x, xs):
        t = (x == mask_id).sum(axis=1).astype(mx.float32) / x.shape[1]
        return model(xs, t, cache=cache) if cache is not None else model(x, t)

    def step(x, given, active, conf, target, remask_frac, key, nums):
        stop = x.shape[1] if end is None else end
        xs, act, cs = x[:, start:stop], active[:, start:stop], conf[:, start:stop]
        logits = forward(x, xs)
        if "cfg_scale" in nums:  # never with a cache (checked): both passes see the whole canvas
            uncond = mx.where(given, mx.array(mask_id, dtype=x.dtype), x)
            logits_u = forward(uncond, uncond)
            logits = logits_u + (nums["cfg_scale"] + 1) * (logits - logits_u)
        xs, cs, committed, remasked = commit(logits, xs, act, cs, target, remask_frac, key, nums)
        before = mx.zeros((x.shape[0], start), dtype=mx.bool_)
        after = mx.zeros((x.shape[0], x.shape[1] - stop), dtype=mx.bool_)
        return (mx.concatenate([x[:, :start], xs, x[:, stop:]], axis=1),
                mx.concatenate([conf[:, :start], cs, conf[:, stop:]], axis=1),
                mx.concatenate([before, committed, after], axis=1), mx.concatenate([before, remasked, after], axis=1))

    state = [model.state] + ([cache.state] if cache is not None else [])
    return mx.compile(step, inputs=state, outputs=[cache.state] if cache is not None else [])


def _unmask(model, mask_id: int, ids: np.ndarray, editable: np.ndarray, key: mx.array, o: SamplerOptions,
            n_valid: int | None = None, stop_ids=()):
    """Diffusion decoding; yields (canvas, committed, remasked, positions forwarded) per step.

    ids: one canvas (L,) decoded o.num_samples times, or o.num_samples canvases (num_samples, L) of one layout.
    stop_ids: once every sample holds one of these (eos/eot) after a block completes, decoding ends.
    o: checked options; steps beyond one per position are not run."""
    L, num_samples, threshold, remask = ids.shape[-1], o.num_samples, o.threshold, o.remask
    positions = np.flatnonzero(editable)
    steps = min(o.steps, len(positions))
    use_cache = o.cache_mode
    size = o.block_length or len(positions)
    blocks = [positions[i:i + size] for i in range(0, len(positions), size)]
    kv_cache = memoize_on_model(model, ("dlm-cache", num_samples, L), lambda: KVCache(model.args, num_samples, L)) \
        if use_cache else None

    nums = numbers(o)

    def step_fn(start, end):
        options = (mask_id, o.strategy, o.top_k, n_valid)
        return memoize_on_model(model, ("unmask", *options, numbers_key(nums), start, end,
                                        (num_samples, L) if use_cache else None),
                                lambda: _make_unmask_step(model, *options, start, kv_cache, end))

    x = mx.array(ids if ids.ndim == 2 else np.tile(ids, (num_samples, 1)))
    given = mx.array(np.tile(~editable, (num_samples, 1)))
    conf = mx.full(x.shape, mx.inf)  # given text is never revised
    per_block = o.block_steps if o.block_paced("dlm") else max(1, steps // len(blocks))
    for block in blocks:
        active = np.zeros(L, dtype=bool)
        active[block] = True
        active = mx.array(np.tile(active, (num_samples, 1)))
        targets = commit_targets(len(block), per_block, o)
        for j, target in enumerate(targets):
            refresh = kv_cache is None or j == 0 or (o.cache_refresh and j % o.cache_refresh == 0)
            start = 0 if refresh else int(block[0])
            end = int(block[-1]) + 1 if use_cache == "dual" and not refresh else None
            if kv_cache is not None:
                kv_cache.state["offset"] = mx.array(start, dtype=mx.int32)
            key, step_key = mx.random.split(key)
            frac = remask if j < len(targets) - 1 else 0.0
            x, conf, committed, remasked = step_fn(start, end)(
                x, given, active, conf, mx.array(target, dtype=mx.int32), mx.array(frac, dtype=mx.float32), step_key,
                nums)
            yield x, committed, remasked, num_samples * ((end or L) - start) * (2 if o.cfg_scale else 1)
            if threshold is not None and not mx.any(x[:, mx.array(block)] == mask_id).item():
                break
        if len(stop_ids) and all_stopped(x, stop_ids, positions[positions <= block[-1]]):
            return


def _make_ar_decoder(model, mask_id: int, batch: int, cache_size: int, length: int, top_k: int,
                     n_valid: int | None = None):
    """A KV cache for `cache_size` positions, the decode function (prefill, eager) and its compiled form (per
    token), writing into a canvas of `length` positions. decode(tokens, x, key, nums): nums, `decoding.numbers`."""
    cache = KVCache(model.args, batch, cache_size)
    positions = mx.arange(length)

    def decode(tokens: mx.array, x: mx.array, key: mx.array, nums: dict) -> tuple[mx.array, mx.array, mx.array]:
        at = cache.offset + tokens.shape[1]  # canvas position the next token goes to
        temp, top_p = sampling_numbers(nums)
        token = sample_tokens(without_mask(model(tokens, cache=cache)[:, -1], mask_id, n_valid), key, temp, top_k,
                              top_p)
        committed = mx.broadcast_to(positions == at, x.shape)
        return mx.where(committed, token[:, None].astype(x.dtype), x), token[:, None].astype(x.dtype), committed

    return cache, decode, mx.compile(decode, inputs=[model.state, cache.state], outputs=[cache.state])


def _make_window_step(model, mask_id: int, top_k: int, n_valid: int | None = None):
    """Compiled: the next token from a full forward over a window (B, max_seq_len) of the latest tokens."""
    def step(window: mx.array, key: mx.array, nums: dict) -> mx.array:
        temp, top_p = sampling_numbers(nums)
        return sample_tokens(without_mask(model(window)[:, -1], mask_id, n_valid), key, temp, top_k, top_p)

    return mx.compile(step, inputs=[model.state])


def _autoregress(model, mask_id, ids, max_tokens, nums, top_k, keys, num_samples, n_valid=None):
    """Left-to-right decoding; yields (canvas, committed, prompt seconds, positions forwarded per sample) per token.

    While the sequence fits the model's context, a KV cache; past it, as nanoGPT's sample.py does, each token
    comes from a forward over the last max_seq_len tokens (learned absolute positions rule out rolling a cache)."""
    P, total, context = len(ids), len(ids) + max_tokens, model.args.max_seq_len
    x = mx.array(np.tile(np.concatenate([ids, np.full(max_tokens, mask_id)]).astype(np.int32), (num_samples, 1)))
    positions = mx.arange(total)
    tic, prompt_seconds, n = time.perf_counter(), None, P  # n: tokens known so far
    if P <= context:
        cached = min(total, context)  # cache positions 0..cached-1 feed the tokens of positions P..cached
        cache, decode, step = memoize_on_model(
            model, ("ar", mask_id, num_samples, cached, total, numbers_key(nums), top_k, n_valid),
            lambda: _make_ar_decoder(model, mask_id, num_samples, cached, total, top_k, n_valid))
        cache.reset()
        x, token, committed = decode(x[:, :P], x, keys[0], nums)  # prefill: the whole prompt in one pass
        mx.eval(x)
        prompt_seconds = time.perf_counter() - tic
        yield x, committed, prompt_seconds, P
        for n in range(P + 1, min(cached + 1, total)):
            x, token, committed = step(token, x, keys[n - P], nums)
            yield x, committed, prompt_seconds, 1
        n += 1
    window_step = memoize_on_model(model, ("ar-window", mask_id, numbers_key(nums), top_k, n_valid),
                                   lambda: _make_window_step(model, mask_id, top_k, n_valid))
    for n in range(n, total):
        token = window_step(x[:, n - context:n], keys[n - P], nums)
        committed = mx.broadcast_to(positions == n, x.shape)
        x = mx.where(committed, token[:, None].astype(x.dtype), x)
        if prompt_seconds is None:  # a prompt longer than the context: its first window is the prompt pass
            mx.eval(x)
            prompt_seconds = time.perf_counter() - tic
        yield x, committed, prompt_seconds, context


def fill(model, mask_id: int, canvases: np.ndarray, editable: np.ndarray, steps: int, strategy: str = "confidence",
         temp: float = 0.0, seed: int = 0, schedule: str = "linear") -> np.ndarray:
    """Fill the editable positions of many canvases (N, L) that share one layout, in one batch.

    Returns the filled canvases; given positions are unchanged. Greedy at temp 0 (infill evaluation)."""
    options = SamplerOptions(steps=steps, temp=temp, num_samples=len(canvases), strategy=strategy,
                             schedule=schedule).check()
    canvases = np.where(editable, mask_id, canvases).astype(np.int32)
    if not editable.any():  # nothing to fill (and no block to split the positions into)
        return canvases
    x = mx.array(canvases)
    for x, *_ in _unmask(model, mask_id, canvases, editable, mx.random.key(seed), options):
        pass
    return np.array(x)


def stream_generate(model, tokenizer, prompt: str = "", options: SamplerOptions | None = None,
                    draft_model=None, **fields) -> Iterator[GenerationStep]:
    """Generate and yield the state after every step.

    draft_model: a diffusion model that drafts `draft_length` tokens a round for model (autoregressive) to
    verify: speculative decoding, whose output follows exactly model's distribution (`speculative.py`).

    options: a `SamplerOptions`, used as given; without one, the model's own defaults (SamplerOptions' defaults
    changed by its directory's sampling.json). Keyword fields (max_tokens=, steps=, temp=, ...: the fields of
    SamplerOptions) change either, so `stream_generate(model, tok, "ROMEO:", steps=16)` works as well; over a
    model's defaults a keyword of the pace (steps, block_steps, threshold) replaces all three, and a drafter
    brings its own draft_length unless given (`options.options_for`). Diffusion models fill max_tokens positions
    between prompt and suffix (or a template's `[MASK]` placeholders) in `steps` rounds (at most one round per
    position; with blocks, `block_steps` a block), or by `threshold`. AR models: one step per token after the
    prompt (no suffix or template). The same seed gives the same output; given text is never changed.
    """
    check_writes_alone(model)
    o = (options.replace(**fields) if options is not None else options_for(model, fields, draft_model)).check()
    if o.seed is None:
        o = o.replace(seed=int.from_bytes(os.urandom(4), "little"))
    if draft_model is not None:
        check_drafter(model, draft_model, tokenizer)
        yield from speculative_generate(model, draft_model, tokenizer, prompt, o)
        return
    max_tokens, num_samples, top_k = o.max_tokens, o.num_samples, o.top_k
    seed, suffix, template = o.seed, o.suffix, o.template
    mask_id = tokenizer.mask_id
    n_valid = min(tokenizer.vocab_size, model.args.vocab_size)  # never propose ids the tokenizer does not have
    kind = model.args.model_type
    is_ar = kind == "ar"
    if is_ar and (suffix or template is not None):
        raise UserError("a suffix or template needs a diffusion model; this one is autoregressive")
    if kind == "block":
        check_block_options(o, model.args.block_size)
    if not prompt and (is_ar or (kind == "block" and model.args.logit_shift)):
        prompt = "\n"  # a next-token head needs context to start from; nanoGPT's sample.py starts from a newline
    ids, editable = build_canvas(tokenizer, prompt, max_tokens, suffix, template)
    if len(ids) > model.args.max_seq_len and kind == "dlm":  # AR models slide a window over longer text
        raise UserError(f"the canvas ({len(ids)} tokens: given text + --max-tokens) exceeds the model's context "
                        f"of {model.args.max_seq_len} tokens; shorten the text or lower --max-tokens")
    start = time.perf_counter()
    if is_ar:
        P = int((~editable).sum())
        keys = mx.random.split(mx.random.key(seed), max_tokens)
        steps_iter = ((x, c, None, num_samples * n, ps) for x, c, ps, n in ahead(
            _autoregress(model, mask_id, ids[:P], max_tokens, numbers(o), top_k, keys, num_samples, n_valid)))
    elif kind == "block":
        steps_iter = decode_blocks(model, mask_id, ids, editable, mx.random.key(seed), o, n_valid,
                                   getattr(tokenizer, "stop_ids", ()))
    else:
        steps_iter = ((x, c, r, n, 0.0) for x, c, r, n in _unmask(
            model, mask_id, ids, editable, mx.random.key(seed), o, n_valid, getattr(tokenizer, "stop_ids", ())))
    forwarded = 0
    for k, (x, committed, remasked, n_forward, prompt_seconds) in enumerate(steps_iter):
        tokens, committed = np.array(x), np.array(committed)
        forwarded += n_forward
        yield GenerationStep(
            step=k + 1, tokens=tokens, editable=editable, committed=committed,
            remasked=np.array(remasked) if remasked is not None else np.zeros_like(committed),
            generated_tokens=int((editable & (tokens != mask_id)).sum()), nfe=k + 1, forward_tokens=forwarded,
            elapsed=time.perf_counter() - start, prompt_seconds=prompt_seconds,
            prompt_pass_tokens=num_samples if is_ar else 0)


def cut_at_stop(tokens: np.ndarray, editable: np.ndarray, stop_ids) -> np.ndarray:
    """One canvas row up to (not including) its first stop token among the generated positions."""
    if not len(stop_ids):
        return tokens
    hits = np.flatnonzero(editable & np.isin(tokens, list(stop_ids)))
    return tokens[:hits[0]] if len(hits) else tokens


def completion(tokenizer, step: GenerationStep, sample: int = 0) -> tuple[str, str]:
    """(the generated text of one sample, given text left out and cut at its first eos/eot token,
    OpenAI's finish_reason: "stop" when a stop token ended it, else "length")."""
    row = step.tokens[sample]
    cut = cut_at_stop(row, step.editable, getattr(tokenizer, "stop_ids", ()))
    return tokenizer.decode(cut[step.editable[:len(cut)]]), "stop" if len(cut) < len(row) else "length"


def generate(model, tokenizer, prompt: str = "", options: SamplerOptions | None = None, draft_model=None,
             **fields) -> str | list[str]:
    """Generate and return the whole text (given text included), cut at the first eos/eot token for
    tokenizers that have them; a list when num_samples > 1.

    Options: see stream_generate."""
    last = None
    for last in stream_generate(model, tokenizer, prompt, options, draft_model, **fields):
        pass
    texts = texts_of(tokenizer, last)
    return texts[0] if len(texts) == 1 else texts


def texts_of(tokenizer, step: GenerationStep) -> list[str]:
    """Every sample's whole text after a step (given text included), cut at its first eos/eot token."""
    stops = getattr(tokenizer, "stop_ids", ())
    return [tokenizer.decode(cut_at_stop(row, step.editable, stops)) for row in step.tokens]
