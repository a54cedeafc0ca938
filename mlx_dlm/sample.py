"""Sampling: parallel unmasking for diffusion models, left-to-right decoding for AR models.

Diffusion: start from a masked canvas; each step runs the model once over the whole
sequence, proposes a token for every masked position, scores the proposals and
commits the best-scored ones; the rest stay masked for the next step. Scores:
"confidence" (probability of the proposed token: LLaDA's low-confidence remasking)
or "random" (simple_dlm's random reveal). One compiled function does a whole step
on the device; nothing loops over positions.

AR: prefill the prompt into a preallocated KV cache, then one compiled decode step
per token.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np

from .errors import UserError
from .model import KVCache

STRATEGIES = ("confidence", "random")
DEFAULT_MAX_TOKENS = 128
DEFAULT_STEPS = 32
DEFAULT_TEMP = 1.0


@dataclass
class GenerationStep:
    """The state after one step (a denoising round, or one AR token)."""

    step: int  # 1-based
    steps: int  # total steps of this run
    tokens: np.ndarray  # (num_samples, prompt + max_tokens) ids, mask id where still undecided
    committed: np.ndarray  # bool, same shape: positions decided by this step
    prompt_tokens: int
    generated_tokens: int  # positions decided so far, over all samples
    nfe: int  # forward passes so far (the AR prefill counts as one)
    elapsed: float  # seconds since generation started (prefill included)
    prompt_seconds: float  # seconds spent on the prompt (AR prefill; 0 for diffusion)
    prompt_pass_tokens: int  # tokens produced by the prompt pass (AR: the first token per sample; 0 for diffusion)

    @property
    def decode_seconds(self) -> float:
        """Seconds since the prompt pass."""
        return self.elapsed - self.prompt_seconds

    @property
    def tokens_per_sec(self) -> float:
        """Generation speed after the prompt pass (the AR prefill and the token it yields are left out)."""
        decoded = self.generated_tokens - self.prompt_pass_tokens
        return decoded / self.decode_seconds if decoded > 0 and self.decode_seconds > 0 else 0.0


def commit_schedule(n: int, steps: int) -> list[int]:
    """How many positions to commit at each step (linear): sums to n, each >= 1 when steps <= n."""
    remaining = [n - (n * k) // steps for k in range(steps + 1)]
    return [remaining[k] - remaining[k + 1] for k in range(steps)]


def filter_logits(logits: mx.array, top_k: int = 0, top_p: float = 1.0) -> mx.array:
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p; -inf elsewhere."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[..., -top_k, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        ranked = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(ranked, axis=-1)
        drop = (mx.cumsum(probs, axis=-1) - probs) >= top_p  # mass before this token already reaches top_p
        ranked = mx.where(drop, -mx.inf, ranked)
        logits = mx.take_along_axis(ranked, mx.argsort(order, axis=-1), axis=-1)
    return logits


def sample_tokens(logits: mx.array, key: mx.array, temp: float, top_k: int = 0, top_p: float = 1.0) -> mx.array:
    """Draw one token per row of logits (..., V): greedy at temp 0, else categorical over filtered logits."""
    if temp == 0:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(filter_logits(logits / temp, top_k, top_p), key=key)


def _without_mask(logits: mx.array, mask_id: int) -> mx.array:
    """float32 logits in which the mask token can never be drawn."""
    return mx.where(mx.arange(logits.shape[-1]) == mask_id, -mx.inf, logits.astype(mx.float32))


def _memo(model, key: tuple, build):
    """Build compiled sampling functions (and AR caches) once per model and options; reuse them after.

    They take the model's weights as compiled inputs, so later weight updates are seen."""
    store = model.__dict__.setdefault("_mlx_dlm_sampling", {})
    if key not in store:
        store[key] = build()
    return store[key]


def _make_unmask_step(model, mask_id: int, strategy: str, temp: float, top_k: int, top_p: float):
    """Compiled diffusion step: (canvas, n_commit, key) -> (canvas, committed)."""

    def step(x: mx.array, n_commit: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        hidden = x == mask_id
        t = hidden.sum(axis=1).astype(mx.float32) / x.shape[1]
        logits = _without_mask(model(x, t), mask_id)
        sample_key, score_key = mx.random.split(key)
        proposal = sample_tokens(logits, sample_key, temp, top_k, top_p)
        if strategy == "random":
            score = mx.random.uniform(shape=x.shape, key=score_key)
        else:
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            score = mx.take_along_axis(logp, proposal[..., None], axis=-1).squeeze(-1)
        score = mx.where(hidden, score, -mx.inf)
        rank = mx.argsort(mx.argsort(-score, axis=-1), axis=-1)
        committed = hidden & (rank < n_commit)
        return mx.where(committed, proposal.astype(x.dtype), x), committed

    return mx.compile(step, inputs=model.state)


def _encode_prompt(tokenizer, prompt: str, max_tokens: int, context: int) -> list[int]:
    ids = tokenizer.encode(prompt)
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    if len(ids) + max_tokens > context:
        raise UserError(f"prompt ({len(ids)} tokens) + --max-tokens {max_tokens} exceeds the model's context "
                        f"of {context} tokens; shorten the prompt or lower --max-tokens")
    return ids


def _unmask(model, mask_id, ids, max_tokens, steps, strategy, temp, top_k, top_p, keys, num_samples):
    """Diffusion decoding; yields (canvas, committed, prompt seconds) per step."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    step_fn = _memo(model, ("unmask", mask_id, strategy, temp, top_k, top_p),
                    lambda: _make_unmask_step(model, mask_id, strategy, temp, top_k, top_p))
    canvas = np.concatenate([np.asarray(ids, dtype=np.int32), np.full(max_tokens, mask_id, dtype=np.int32)])
    x = mx.array(np.tile(canvas, (num_samples, 1)))
    for k, n_commit in enumerate(commit_schedule(max_tokens, steps)):
        x, committed = step_fn(x, mx.array(n_commit, dtype=mx.int32), keys[k])
        yield x, committed, 0.0


def _make_ar_decoder(model, mask_id: int, batch: int, total: int, temp: float, top_k: int, top_p: float):
    """A KV cache for `total` positions, the decode function (prefill, eager) and its compiled form (per token)."""
    cache = KVCache(model.args, batch, total)
    positions = mx.arange(total)

    def decode(tokens: mx.array, x: mx.array, key: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        at = cache.offset + tokens.shape[1]  # canvas position the next token goes to
        token = sample_tokens(_without_mask(model(tokens, cache=cache)[:, -1], mask_id), key, temp, top_k, top_p)
        committed = mx.broadcast_to(positions == at, x.shape)
        return mx.where(committed, token[:, None].astype(x.dtype), x), token[:, None].astype(x.dtype), committed

    return cache, decode, mx.compile(decode, inputs=[model.state, cache.state], outputs=[cache.state])


def _autoregress(model, mask_id, ids, max_tokens, temp, top_k, top_p, keys, num_samples):
    """Left-to-right decoding with a KV cache; yields (canvas, committed, prompt seconds) per token."""
    P, total = len(ids), len(ids) + max_tokens
    cache, decode, step = _memo(model, ("ar", mask_id, num_samples, total, temp, top_k, top_p),
                                lambda: _make_ar_decoder(model, mask_id, num_samples, total, temp, top_k, top_p))
    cache.reset()
    x = mx.array(np.tile(np.concatenate([ids, np.full(max_tokens, mask_id)]).astype(np.int32), (num_samples, 1)))
    tic = time.perf_counter()
    x, token, committed = decode(x[:, :P], x, keys[0])  # prefill: the whole prompt in one pass
    mx.eval(x)
    prompt_seconds = time.perf_counter() - tic
    yield x, committed, prompt_seconds
    for k in range(1, max_tokens):
        x, token, committed = step(token, x, keys[k])
        yield x, committed, prompt_seconds


def stream_generate(model, tokenizer, prompt: str = "", max_tokens: int = DEFAULT_MAX_TOKENS,
                    steps: int = DEFAULT_STEPS, strategy: str = "confidence", temp: float = DEFAULT_TEMP,
                    top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                    num_samples: int = 1) -> Iterator[GenerationStep]:
    """Generate max_tokens after the prompt and yield the state after every step.

    Diffusion models: `steps` denoising rounds (clamped to max_tokens: a round commits at least
    one position). AR models: one step per token (`steps` and `strategy` do not apply).
    The same seed gives the same output; the prompt positions are never changed.
    """
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if temp < 0:
        raise UserError(f"--temp must be >= 0, got {temp}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise UserError("--top-k must be >= 0 and --top-p in (0, 1]")
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    if model.args.model_type == "ar" and not prompt:
        prompt = "\n"  # an AR model needs context to start from; nanoGPT's sample.py starts from a newline
    ids = _encode_prompt(tokenizer, prompt, max_tokens, model.args.max_seq_len)
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    mask_id = tokenizer.mask_id
    if model.args.model_type == "ar":
        steps = max_tokens
        keys = mx.random.split(mx.random.key(seed), steps)
        decoder = _autoregress(model, mask_id, ids, max_tokens, temp, top_k, top_p, keys, num_samples)
        per_step = [1] * steps
    else:
        steps = min(steps, max_tokens)
        keys = mx.random.split(mx.random.key(seed), steps)
        decoder = _unmask(model, mask_id, ids, max_tokens, steps, strategy, temp, top_k, top_p, keys, num_samples)
        per_step = commit_schedule(max_tokens, steps)
    start = time.perf_counter()
    done = 0
    for k, (x, committed, prompt_seconds) in enumerate(decoder):
        tokens, committed = np.array(x), np.array(committed)
        done += per_step[k]
        yield GenerationStep(step=k + 1, steps=steps, tokens=tokens, committed=committed, prompt_tokens=len(ids),
                             generated_tokens=num_samples * done, nfe=k + 1, elapsed=time.perf_counter() - start,
                             prompt_seconds=prompt_seconds,
                             prompt_pass_tokens=num_samples if model.args.model_type == "ar" else 0)


def generate(model, tokenizer, prompt: str = "", **options) -> str:
    """Generate and return the text (prompt included) of the first sample. Options: see stream_generate."""
    last = None
    for last in stream_generate(model, tokenizer, prompt, **options):
        pass
    return tokenizer.decode(last.tokens[0])
