"""Parallel unmasking: start from a masked canvas, commit a scheduled number of positions per step.

Each step runs the model once over the whole sequence, proposes a token for every
masked position, scores the proposals and commits the best-scored ones; the rest
stay masked for the next step. Scores: "confidence" (probability of the proposed
token: LLaDA's low-confidence remasking) or "random" (simple_dlm's random reveal).
One compiled function does a whole step on the device; nothing loops over positions.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np

from .errors import UserError

STRATEGIES = ("confidence", "random")
DEFAULT_MAX_TOKENS = 128
DEFAULT_STEPS = 32
DEFAULT_TEMP = 1.0


@dataclass
class GenerationStep:
    """The state after one denoising step."""

    step: int  # 1-based
    steps: int  # total steps of this run
    tokens: np.ndarray  # (num_samples, prompt + max_tokens) canvas ids, mask id where still hidden
    committed: np.ndarray  # bool, same shape: positions committed by this step
    prompt_tokens: int
    generated_tokens: int  # positions decided so far, over all samples
    nfe: int  # forward passes so far
    elapsed: float  # seconds since the first step started


def commit_schedule(n: int, steps: int) -> list[int]:
    """How many positions to commit at each step (linear): sums to n, each >= 1 when steps <= n."""
    remaining = [n - (n * k) // steps for k in range(steps + 1)]
    return [remaining[k] - remaining[k + 1] for k in range(steps)]


def _make_step(model, mask_id: int, strategy: str, temp: float):
    """Compiled step: (canvas, n_commit, key) -> (canvas, committed)."""

    def step(x: mx.array, n_commit: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        hidden = x == mask_id
        t = hidden.sum(axis=1).astype(mx.float32) / x.shape[1]
        logits = model(x, t).astype(mx.float32)
        vocab = mx.arange(logits.shape[-1])
        logits = mx.where(vocab == mask_id, -mx.inf, logits)  # never propose the mask itself
        sample_key, score_key = mx.random.split(key)
        if temp == 0:
            proposal = mx.argmax(logits, axis=-1)
        else:
            proposal = mx.random.categorical(logits / temp, key=sample_key)
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


def stream_generate(model, tokenizer, prompt: str = "", max_tokens: int = DEFAULT_MAX_TOKENS,
                    steps: int = DEFAULT_STEPS, strategy: str = "confidence", temp: float = DEFAULT_TEMP,
                    seed: int | None = None, num_samples: int = 1) -> Iterator[GenerationStep]:
    """Denoise a canvas of max_tokens positions after the prompt; yield the state after every step.

    steps is clamped to max_tokens (a step commits at least one position). The same
    seed gives the same output. The prompt positions are never changed.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if temp < 0:
        raise UserError(f"--temp must be >= 0, got {temp}")
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    if model.args.model_type != "dlm":
        raise UserError("this is an autoregressive model; the diffusion sampler needs a dlm model")
    ids = _encode_prompt(tokenizer, prompt, max_tokens, model.args.max_seq_len)
    steps = min(steps, max_tokens)
    mask_id = tokenizer.mask_id
    canvas = np.concatenate([np.asarray(ids, dtype=np.int32), np.full(max_tokens, mask_id, dtype=np.int32)])
    x = mx.array(np.tile(canvas, (num_samples, 1)))
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    keys = mx.random.split(mx.random.key(seed), steps)
    step_fn = _make_step(model, mask_id, strategy, temp)
    schedule = commit_schedule(max_tokens, steps)
    start = time.perf_counter()
    for k in range(steps):
        x, committed = step_fn(x, mx.array(schedule[k], dtype=mx.int32), keys[k])
        tokens, committed = np.array(x), np.array(committed)
        yield GenerationStep(step=k + 1, steps=steps, tokens=tokens, committed=committed, prompt_tokens=len(ids),
                             generated_tokens=num_samples * sum(schedule[:k + 1]), nfe=k + 1,
                             elapsed=time.perf_counter() - start)


def generate(model, tokenizer, prompt: str = "", **options) -> str:
    """Generate and return the text (prompt included) of the first sample. Options: see stream_generate."""
    last = None
    for last in stream_generate(model, tokenizer, prompt, **options):
        pass
    return tokenizer.decode(last.tokens[0])
