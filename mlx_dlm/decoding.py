"""What every decoder shares: the canvas (`build_canvas`), the state after a step (`GenerationStep`), and how a
token is drawn from logits (`filter_logits` for top-k/top-p, `sample_tokens`, `without_mask`)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import UserError
from .options import DEFAULT_MAX_TOKENS
from .tokenizer import MASK_TOKEN


@dataclass
class GenerationStep:
    """The state after one step (a denoising round, or one AR token)."""

    step: int  # 1-based
    tokens: np.ndarray  # (num_samples, length) ids, the mask id where still undecided
    editable: np.ndarray  # (length,) bool: positions the sampler fills (the rest is given text)
    committed: np.ndarray  # (num_samples, length) bool: positions decided by this step
    remasked: np.ndarray  # (num_samples, length) bool: positions this step hid again for revision
    generated_tokens: int  # fillable positions decided so far, over all samples
    nfe: int  # forward passes so far (the AR prefill counts as one; speculative decoding: rounds)
    forward_tokens: int  # positions run through the model so far, over all samples (a FLOP count proxy)
    elapsed: float  # seconds since generation started (prefill included)
    prompt_seconds: float  # seconds spent on the prompt (AR prefill; 0 for diffusion)
    prompt_pass_tokens: int  # tokens produced by the prompt pass (AR: the first token per sample; 0 for diffusion)
    draft_kept: int | None = None  # speculative decoding: drafts the verifier kept this round (it adds one more)

    @property
    def prompt_tokens(self) -> int:
        """Given (not generated) positions."""
        return int((~self.editable).sum())

    @property
    def decode_seconds(self) -> float:
        """Seconds since the prompt pass."""
        return self.elapsed - self.prompt_seconds

    @property
    def tokens_per_sec(self) -> float:
        """Generation speed after the prompt pass (the AR prefill and the token it yields are left out)."""
        decoded = self.generated_tokens - self.prompt_pass_tokens
        return decoded / self.decode_seconds if decoded > 0 and self.decode_seconds > 0 else 0.0


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


def without_mask(logits: mx.array, mask_id: int, n_valid: int | None = None) -> mx.array:
    """float32 logits in which the mask token, and ids past the tokenizer's n_valid (padding rows of an
    embedding table), can never be drawn."""
    ids = mx.arange(logits.shape[-1])
    banned = ids == mask_id
    if n_valid is not None and n_valid < logits.shape[-1]:
        banned = banned | (ids >= n_valid)
    return mx.where(banned, -mx.inf, logits.astype(mx.float32))


def build_canvas(tokenizer, prompt: str = "", max_tokens: int = DEFAULT_MAX_TOKENS, suffix: str = "",
                 template: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, editable) of the canvas: prompt + max_tokens masks + suffix, or a template whose
    `[MASK]` placeholders are the positions to fill (one token each)."""
    mask_id = tokenizer.mask_id
    if template is not None:
        if prompt or suffix:
            raise UserError("pass either a template or a prompt/suffix, not both")
        parts = [tokenizer.encode(part) for part in template.split(MASK_TOKEN)]
    else:
        if max_tokens < 1:
            raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
        parts = [tokenizer.encode(prompt)] + [[] for _ in range(max_tokens - 1)] + [tokenizer.encode(suffix)]
    ids, editable = list(parts[0]), [False] * len(parts[0])
    for part in parts[1:]:
        ids += [mask_id] + list(part)
        editable += [True] + [False] * len(part)
    if not any(editable):
        raise UserError(f"the template has no {MASK_TOKEN} placeholder to fill")
    return np.asarray(ids, dtype=np.int32), np.asarray(editable)
