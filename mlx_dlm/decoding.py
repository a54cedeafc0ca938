"""What every decoder shares: the canvas (`build_canvas`), the state after a step (`GenerationStep`), how a
token is drawn from logits (`filter_logits` for top-k/top-p, `sample_tokens`, `without_mask`), and the diffusion
step's commit (`commit_rule`: propose, score, commit, revise; `commit_schedule` and `commit_targets`: how many
per step), which full-sequence (`sample.py`) and block (`block_decode.py`) decoding both run; `ahead`: the
host reads a step while the device computes the next (AR and speculative decoding)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np

from .errors import UserError
from .options import DEFAULT_MAX_TOKENS, SCHEDULES, SamplerOptions
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
    nfe: int  # forward passes so far (the AR prefill counts as one; speculative decoding: rounds, and a feature
    # drafter's prompt pass as one)
    forward_tokens: int  # positions run through the model so far, over all samples (a FLOP count proxy)
    elapsed: float  # seconds since generation started (prefill included)
    prompt_seconds: float  # seconds spent on the prompt (AR prefill; 0 for diffusion)
    prompt_pass_tokens: int  # tokens produced by the prompt pass (AR: the first token per sample; 0 for diffusion)
    draft_kept: tuple[int, ...] = ()  # speculative decoding: per sample still decoding, drafts kept this round
    # (the verifier adds one more token)

    @property
    def prompt_tokens(self) -> int:
        """Given (not generated) positions."""
        return int((~self.editable).sum())

    @property
    def decode_passes(self) -> int:
        """Passes after the prompt pass (speculative decoding: rounds): those `decode_seconds` times."""
        return max(self.nfe - (1 if self.prompt_pass_tokens else 0), 0)

    @property
    def decode_seconds(self) -> float:
        """Seconds since the prompt pass."""
        return self.elapsed - self.prompt_seconds

    @property
    def tokens_per_sec(self) -> float:
        """Generation speed after the prompt pass (the AR prefill and the token it yields are left out)."""
        decoded = self.generated_tokens - self.prompt_pass_tokens
        return decoded / self.decode_seconds if decoded > 0 and self.decode_seconds > 0 else 0.0


NUMBERS = ("temp", "top_p", "threshold", "alg_temp", "cfg_scale")  # options that reach compiled steps as arrays
OFF = {"temp": 0.0, "top_p": 1.0, "threshold": None, "alg_temp": 0.0, "cfg_scale": 0.0}  # each one's "off" value


def numbers(o: SamplerOptions) -> dict[str, mx.array]:
    """The plain-number options that are on, as arrays: compiled steps take them as inputs, so a new temperature
    or threshold reuses the compiled step. Which of them are on (`numbers_key`) is part of a step's memo key:
    an option that is off (temperature 0: greedy; top_p 1; no threshold) changes what is computed."""
    return {name: mx.array(getattr(o, name), dtype=mx.float32) for name in NUMBERS
            if getattr(o, name) is not None and getattr(o, name) != OFF[name]}


def numbers_key(nums: dict) -> tuple[str, ...]:
    """Which plain-number options are on: the part of a compiled step's memo key that `numbers` decides."""
    return tuple(sorted(nums))


def sampling_numbers(nums: dict) -> tuple:
    """(temp, top_p) from `numbers`: arrays where on, their off values (0, 1) where not."""
    return nums.get("temp", OFF["temp"]), nums.get("top_p", OFF["top_p"])


def option_on(value, off) -> bool:
    """Whether an option (a Python number, or an array: on by construction of `numbers`) is on."""
    return isinstance(value, mx.array) or (value is not None and value != off)


def filter_logits(logits: mx.array, top_k: int = 0, top_p: float | mx.array = 1.0) -> mx.array:
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p; -inf elsewhere."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[..., -top_k, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if option_on(top_p, 1.0):
        order = mx.argsort(-logits, axis=-1)
        ranked = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(ranked, axis=-1)
        drop = (mx.cumsum(probs, axis=-1) - probs) >= top_p  # mass before this token already reaches top_p
        ranked = mx.where(drop, -mx.inf, ranked)
        logits = mx.take_along_axis(ranked, mx.argsort(order, axis=-1), axis=-1)
    return logits


def sample_tokens(logits: mx.array, key: mx.array, temp: float | mx.array, top_k: int = 0,
                  top_p: float | mx.array = 1.0) -> mx.array:
    """Draw one token per row of logits (..., V): greedy at temp 0, else categorical over filtered logits.
    temp and top_p: numbers, or arrays (`numbers`)."""
    if not option_on(temp, 0.0):
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


def check_writes_alone(model) -> None:
    """A one-line UserError for a feature drafter (`ModelArgs.feature_dim`): it reads an AR model's states, so it
    only drafts for that model and neither writes nor scores text alone."""
    if model.args.feature_dim:
        raise UserError("this is a feature drafter: it reads an AR model's hidden states and only drafts for it "
                        "(pass it as --draft to that model); it does not write or score text alone")


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


def commit_schedule(n: int, steps: int, kind: str = "linear") -> list[int]:
    """How many positions to commit at each step: sums to n, each >= 1 when steps <= n.

    linear: even shares; cosine (MaskGIT): few early, many late (masked fraction cos(pi/2 * k/steps))."""
    if kind not in SCHEDULES:
        raise UserError(f"unknown schedule {kind!r} (choose from {', '.join(SCHEDULES)})")
    if kind == "linear":
        remaining = [n - (n * k) // steps for k in range(steps + 1)]
    else:
        remaining = [math.floor(n * math.cos(math.pi / 2 * k / steps)) for k in range(steps + 1)]
        for k in range(1, steps + 1):  # at least one commit per step, and room for one in each step left
            remaining[k] = max(min(remaining[k], remaining[k - 1] - 1), steps - k)
    return [remaining[k] - remaining[k + 1] for k in range(steps)]


def _rank(score: mx.array) -> mx.array:
    """0 for the highest score of each row, 1 for the next, ..."""
    return mx.argsort(mx.argsort(-score, axis=-1), axis=-1)


def _scores(logits: mx.array, proposal: mx.array, strategy: str, key: mx.array) -> tuple[mx.array, mx.array]:
    """(score used to order commits, probability of the proposal) per position."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    prob = mx.exp(mx.take_along_axis(logp, proposal[..., None], axis=-1).squeeze(-1))
    if strategy == "confidence":
        return prob, prob
    if strategy == "margin":
        top2 = mx.topk(logp, 2, axis=-1)  # unsorted pair
        return mx.exp(top2.max(axis=-1)) - mx.exp(top2.min(axis=-1)), prob
    if strategy == "entropy":
        p = mx.exp(logp)
        return (p * mx.where(p > 0, logp, 0.0)).sum(axis=-1), prob  # -H: low entropy scores high
    if strategy == "left":  # the leftmost masked position first (with a shift, a block model's is the AR's step)
        return mx.broadcast_to(-mx.arange(proposal.shape[-1], dtype=mx.float32), proposal.shape), prob
    return mx.random.uniform(shape=proposal.shape, key=key), prob


def commit_rule(mask_id: int, strategy: str, top_k: int, n_valid: int | None):
    """The part of a step every diffusion decoder shares: from the logits over a window, propose, score and commit.

    commit(logits, xs, act, cs, target, remask_frac, key, nums) -> (xs, cs, committed, remasked) over the window.
    act marks the positions this step may fill; cs holds each committed token's confidence (for revision); nums:
    `numbers` (temperature, top_p, threshold, alg_temp; those absent are off). alg_temp: positions to commit are
    drawn from softmax(score / alg_temp) without replacement (Dream) instead of taken in score order."""

    def commit(logits, xs, act, cs, target, remask_frac, key, nums):
        threshold, alg_temp = nums.get("threshold"), nums.get("alg_temp")
        logits = without_mask(logits, mask_id, n_valid)
        sample_key, score_key, order_key = mx.random.split(key, 3)
        temp, top_p = sampling_numbers(nums)
        proposal = sample_tokens(logits, sample_key, temp, top_k, top_p)
        proposal = proposal.astype(xs.dtype)
        score, prob = _scores(logits, proposal, strategy, score_key)
        if alg_temp is not None:  # Gumbel-top-k: the top n of score / alg_temp + Gumbel noise, a draw without repeats
            score = score / alg_temp + mx.random.gumbel(shape=score.shape, key=order_key)
        hidden = (xs == mask_id) & act
        rank = _rank(mx.where(hidden, score, -mx.inf))
        if threshold is None:
            n_commit = hidden.sum(axis=1, keepdims=True) - target
            committed = hidden & (rank < n_commit)
        else:
            committed = hidden & ((prob >= threshold) | (rank == 0))
        xs = mx.where(committed, proposal, xs)
        cs = mx.where(committed, prob, cs)
        # Revision: hide again the lowest-confidence tokens committed by earlier steps.
        earlier = act & (xs != mask_id) & ~committed
        n_remask = mx.floor(remask_frac * earlier.sum(axis=1, keepdims=True))
        remasked = earlier & (_rank(mx.where(earlier, -cs, -mx.inf)) < n_remask)
        return mx.where(remasked, mask_id, xs), cs, committed, remasked

    return commit


def commit_targets(n: int, per_block: int, o: SamplerOptions) -> list[int]:
    """Masked positions left in a block of n after each of its steps (the schedule's), or, with a threshold,
    one entry per possible step (decoding stops early once the block is full)."""
    if o.threshold is not None:
        return [0] * n
    counts = commit_schedule(n, min(per_block, n), o.schedule)
    return [n - sum(counts[:j + 1]) for j in range(len(counts))]


def ahead(steps: Iterator[tuple]) -> Iterator[tuple]:
    """The items of `steps` (tuples holding a step's lazy arrays), each yielded once the next has been built and
    handed to the device (`mx.async_eval`): while the caller copies a step's tokens to the host and reports it,
    the device computes the next, and building the next step's graph overlaps the current one's work (as mlx-lm's
    generate does). Only for decoders whose next step needs none of the current one's results on the host."""
    previous = None
    for item in steps:
        mx.async_eval(*(a for a in item if isinstance(a, mx.array)))
        if previous is not None:
            yield previous
        previous = item
    if previous is not None:
        yield previous


def all_stopped(x: mx.array, stop_ids, positions: np.ndarray) -> bool:
    """Whether every row of the canvas holds a stop token at one of these positions."""
    decided = x[:, mx.array(positions)]
    return bool(mx.all(mx.any(mx.any(decided[..., None] == mx.array(list(stop_ids))[None, None], axis=-1),
                              axis=-1)).item())
