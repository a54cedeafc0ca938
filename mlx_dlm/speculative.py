"""Speculative decoding: a diffusion model drafts K tokens in one pass, the AR model verifies them in one cached pass,
and the output follows exactly the AR model's distribution (Leviathan et al. 2023; Chen et al. 2023).

Each round, with n tokens known:
- the drafter runs once over a fixed canvas (the text, then masks to the end) and samples the K positions after
  the text in parallel, each from its own filtered distribution q_i;
- the AR model runs the last known token and the K drafts through its KV cache in one pass: p_1 .. p_{K+1};
- `accept`: draft i is kept while u_i < p_i(d_i) / q_i(d_i); at the first rejection one token is drawn from
  normalise(max(0, p_i - q_i)) and the round ends; if all K are kept the AR adds one from p_{K+1};
- the AR cache rolls back to the kept length (its offset; later writes overwrite what was rejected).
Several samples (num_samples) run as rows of one batch, each at its own length: the caches keep one offset per row
(`KVCache(per_row=True)`), so a row that kept more drafts is not held back, and a finished row idles until the
last is done; a single sample's verifier cache keeps one offset, as the AR decoder's does (its writes are slices,
not scatters). Temperature, top-k and top-p filter p and q alike (`decoding.filter_logits`); at temperature 0 both
are one-hot at their argmax, and the output is the AR model's greedy text. One compiled function does a round on
the device, from one draw of uniforms: the rule's tests, and Gumbel noise for the verifier's and the drafter's
draws (`gumbel`).

Drafters:
- a full-sequence diffusion model has no exact cache (it attends both ways), so its pass covers the canvas;
- a block-diffusion model (model_type "block") drafts the rest of its current block (at most K tokens) in one pass
  of B positions over its own exact KV cache (`block_decode.cached_pass`); when the verified text has finished a
  block, that pass also writes the block to the drafter's cache as clean text (2B positions; in a batch, rows
  that finished no block run their noisy block first and ignore the rest). Draft positions past
  the block are not drafted: the rule treats them as rejected, and the AR's token there comes from p itself;
- a feature drafter (a block model with `feature_dim`, DFlash-style) keeps no context of its own: at the end of
  a round it reads the verifier's hidden states (its last layer's output, or the layers the drafter names:
  `ModelArgs.feature_layers`) at the row that produced the round's final token, and drafts
  the next round's K tokens in one pass of B rows, [that token, mask x (B-1)], inside the same compiled round.
  Its drafts and their q carry over to the next round. The prompt pass runs the whole prompt through the
  verifier, draws the first token there, as the AR decoder's prompt pass does, and drafts the first round. A
  chained feature drafter (`ModelArgs.draft_context`) draws its K drafts in turn, each from its row's logits
  plus a learned bias indexed by the tokens just before it (`Model.chain_bias`), so a draft's q depends on the
  drafts before it, as the verifier's p does.
The host never waits on a round before building the next while some row is surely unfinished (`_rounds`): it reads
a round's tokens while the device runs the next (`decoding.ahead`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np

from .block_decode import cached_pass, prefill_blocks
from .decoding import (GenerationStep, ahead, build_canvas, filter_logits, numbers, numbers_key, option_on,
                       sampling_numbers, without_mask)
from .diffusion import shifted_block_logits
from .errors import UserError
from .model import KVCache, memoize_on_model
from .options import SamplerOptions

TINY = float(np.finfo(np.float32).tiny)  # the least uniform draw (`uniform_noise`)


def check_drafter(model, draft_model, tokenizer, draft_tokenizer=None) -> None:
    """A one-line UserError unless draft_model can draft for model: an AR target, a diffusion drafter, one
    vocabulary."""
    if model.args.model_type != "ar":
        raise UserError("speculative decoding verifies with an autoregressive model: --model must be one "
                        f"(this one is {model.args.model_type})")
    if draft_model.args.model_type not in ("dlm", "block"):
        raise UserError(f"the drafter must be a diffusion model (this one is {draft_model.args.model_type})")
    layers = draft_model.args.feature_layers or (model.args.n_layers - 1,)
    if draft_model.args.feature_dim and (draft_model.args.feature_dim != model.args.dim * len(layers)
                                         or max(layers) >= model.args.n_layers):
        raise UserError(f"this feature drafter reads states of width {draft_model.args.feature_dim} from layers "
                        f"{', '.join(map(str, layers))}; the model has {model.args.n_layers} layers of width "
                        f"{model.args.dim}: it was trained for another AR model")
    if draft_model.args.vocab_size != model.args.vocab_size or (
            draft_tokenizer is not None and _vocabulary(draft_tokenizer) != _vocabulary(tokenizer)):
        raise UserError(f"the drafter's vocabulary ({draft_model.args.vocab_size} ids) is not the model's "
                        f"({model.args.vocab_size} ids): a drafter must share the verifier's tokenizer")


def _vocabulary(tokenizer) -> list[str]:
    return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size) if i != tokenizer.mask_id]


def probabilities(logits: mx.array, temp, top_k: int, top_p) -> mx.array:
    """The distribution a token is drawn from: softmax of the filtered logits / temp, one-hot at the argmax at 0.
    temp and top_p: numbers, or arrays (`decoding.numbers`: on)."""
    if not option_on(temp, 0.0):
        return (mx.arange(logits.shape[-1]) == mx.argmax(logits, axis=-1, keepdims=True)).astype(mx.float32)
    return mx.softmax(filter_logits(logits / temp, top_k, top_p), axis=-1)


def uniform_noise(shape: tuple[int, ...], key: mx.array) -> mx.array:
    """Uniform draws in (0, 1): never 0, so `gumbel` of them is finite."""
    return mx.random.uniform(low=TINY, high=1.0, shape=shape, key=key)


def gumbel(u: mx.array) -> mx.array:
    """Gumbel noise from uniforms in (0, 1): argmax(log w + gumbel(u)) is a draw from normalise(w) (Gumbel-max)."""
    return -mx.log(-mx.log(u))


def accept(p: mx.array, q: mx.array, drafts: mx.array, noise: mx.array, drafted: mx.array | None = None
           ) -> tuple[mx.array, mx.array]:
    """The speculative-sampling rule for rows of drafts (B, K) drawn from q (B, K, V), verified by p (B, K+1, V).

    Returns (kept, token): how many leading drafts each row keeps (B,), and the token that follows them (B,):
    from normalise(max(0, p - q)) at the first rejection, from p_{K+1} when all are kept. drafted (B, K): which
    positions hold a draft at all; the first that does not ends the round, its token drawn from p (its q is 0).
    noise (B, K + V): independent uniforms in (0, 1) (`uniform_noise`), K for the tests, V for the draw."""
    B, K = drafts.shape
    if drafted is not None:
        q = mx.where(drafted[..., None], q, 0.0)
    p_d = mx.take_along_axis(p[:, :K], drafts[..., None], axis=-1)[..., 0]
    q_d = mx.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    ok = noise[:, :K] * q_d < p_d  # u < p / q, with q(d) > 0
    if drafted is not None:
        ok = ok & drafted
    kept = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)
    residual = mx.maximum(p - mx.concatenate([q, mx.zeros((B, 1, q.shape[-1]))], axis=1), 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    residual = mx.where(mass > 0, residual / mx.where(mass > 0, mass, 1.0), p)
    chosen = mx.take_along_axis(residual, kept[:, None, None], axis=1)[:, 0]
    token = mx.argmax(mx.log(chosen) + gumbel(noise[:, K:]), axis=-1)
    return kept, token


def _dlm_drafter(draft_model, mask_id: int, K: int):
    """draft(x, n, first, folded) -> (logits of the K positions after each row's n (B, K, V), which of them are
    drafted (B, K), first) for a full-sequence diffusion drafter: one pass over the whole canvas (first and folded
    are unused). Drafters of this form run at the start of a round; a feature drafter runs at its end
    (`_feature_drafter`)."""
    positions = mx.arange(K)

    def draft(x, n, first, folded):
        t = (x == mask_id).sum(axis=1).astype(mx.float32) / x.shape[1]
        index = n[:, None] + positions
        return (mx.take_along_axis(draft_model(x, t), index[..., None], axis=1), mx.ones(index.shape, dtype=mx.bool_),
                first)

    return draft


def _block_drafter(draft_model, cache: KVCache, K: int, fold: bool):
    """draft(x, n, first, folded) for a block drafter: one pass over the block holding each row's position n (with
    fold, the block before it too for the rows in `folded`, whose verified text finished it: written to the cache as
    clean text); the positions after n in that block are drafted, at most K. first: the clean output before each
    row's block (a shifted model's first prediction)."""
    B = draft_model.args.block_size
    run = cached_pass(draft_model, cache, B, fold)
    shift = draft_model.args.logit_shift

    def draft(x, n, first, folded):
        start = (n // B) * B
        cache.state["offset"] = start - B * folded.astype(mx.int32) if fold else start
        window = mx.take_along_axis(x, cache.positions(2 * B if fold else B), axis=1)
        logits, first = run(window, first, folded if fold else None)
        if shift:
            logits = shifted_block_logits(logits, mx.broadcast_to(first[:, None], logits.shape), B)
        index = (n - start)[:, None] + mx.arange(K)
        return mx.take_along_axis(logits, mx.minimum(index, B - 1)[..., None], axis=1), index < B, first

    return draft


def _feature_drafter(draft_model, mask_id: int, K: int, n_valid: int | None, top_k: int):
    """draft(token (S,), state (S, D), noise (S, K, V), nums) -> (drafts (S, K), q (S, K, V)): a feature drafter's
    pass over its block [token, mask x (B-1)] conditioned on the verifier's state, and its K draws (`_draw`, or
    `_draw_chained` for a chained drafter)."""
    B = draft_model.args.block_size

    def draft(token, state, noise, nums):
        block = mx.concatenate([token[:, None], mx.full((token.shape[0], B - 1), mask_id, dtype=token.dtype)], axis=1)
        logits = draft_model(block, features=state)[:, :K]
        if draft_model.args.draft_context:
            return _draw_chained(draft_model, logits, token, noise, nums, mask_id, n_valid, top_k)
        return _draw(logits, noise, nums, mask_id, n_valid, top_k)

    return draft


def _draw_chained(draft_model, logits: mx.array, token: mx.array, noise: mx.array, nums: dict, mask_id: int,
                  n_valid: int | None, top_k: int) -> tuple[mx.array, mx.array]:
    """(drafts, q) of a chained feature drafter: its rows drawn in turn, each row's logits plus the table's bias for
    the tokens before it (`Model.chain_bias`: the round's drawn token, then the drafts). Each draw is `_draw`'s
    Gumbel-max, argmax((l + b) / T + g), taken as argmax(l + b + T g) unless top-k or top-p filter the row; q is
    `probabilities` of every row at once."""
    temp, top_p = sampling_numbers(nums)
    sampled, n = "temp" in nums, draft_model.args.draft_context
    filtering = sampled and (top_k > 0 or option_on(top_p, 1.0))
    logits = without_mask(logits, mask_id, n_valid)
    noise = gumbel(noise) if sampled else None
    drawn, rows = [token], []
    for k in range(logits.shape[1]):
        row = logits[:, k] + (draft_model.chain_bias(k, drawn[-n:]) if k else 0.0)
        rows.append(row)
        if filtering:
            row = mx.log(probabilities(row, temp, top_k, top_p)) + noise[:, k]
        elif sampled:
            row = row + temp * noise[:, k]
        drawn.append(mx.argmax(row, axis=-1))
    return mx.stack(drawn[1:], axis=1).astype(mx.int32), probabilities(mx.stack(rows, axis=1), temp, top_k, top_p)


def _feature_carry(draft, token: mx.array, state: mx.array, noise: mx.array, nums: dict
                   ) -> tuple[mx.array, mx.array, mx.array]:
    """A feature drafter's carry into the next round, (drafts, q, drafted): its K drafts after `token` (S,), drawn
    from the verifier's `state` (S, D) at the row that drew it."""
    drafts, q = draft(token, state, noise, nums)
    return drafts, q, mx.ones(drafts.shape, dtype=mx.bool_)


def _feature_prompt_pass(model, draft, reads, x: mx.array, P: int, key: mx.array, nums: dict, mask_id: int,
                         n_valid: int | None, top_k: int, K: int, cache: KVCache) -> tuple[mx.array, tuple]:
    """A feature drafter's prompt pass: the verifier runs the whole prompt into its cache and draws the first token
    from the last position, as the AR decoder's prompt pass does, and the drafter drafts the first round from that
    position's state and the token. Returns (x with the token at P, the carry)."""
    S, V = x.shape[0], model.args.vocab_size
    logits, state = model(x[:, :P], cache=cache, hidden=reads)
    noise = uniform_noise((S, V + K * V), key)
    token, _ = _draw(logits[:, -1], noise[:, :V], nums, mask_id, n_valid, top_k)
    token = token.astype(x.dtype)
    carry = _feature_carry(draft, token, state[:, -1], noise[:, V:].reshape(S, K, V), nums)
    return mx.where(mx.arange(x.shape[1]) == P, token[:, None], x), carry


def _draw(q_logits: mx.array, noise: mx.array, nums: dict, mask_id: int, n_valid: int | None, top_k: int
          ) -> tuple[mx.array, mx.array]:
    """(drafts, q): the drafter's filtered distribution at each drafted position and a draw from it; noise: uniforms
    in (0, 1) of q's shape."""
    temp, top_p = sampling_numbers(nums)
    q = probabilities(without_mask(q_logits, mask_id, n_valid), temp, top_k, top_p)
    drafts = mx.argmax(mx.log(q) + gumbel(noise), axis=-1) if "temp" in nums else mx.argmax(q, axis=-1)
    return drafts.astype(mx.int32), q


def _make_round(model, draft_model, draft, mask_id: int, n_valid: int | None, top_k: int, K: int, total: int,
                cache: KVCache, draft_cache: KVCache | None):
    """Compiled: (x (S, L), n (S,), key, nums, carry, folded (S,)) -> (x, n, kept (S,), carry). Row i holds its known
    tokens before n[i] and masks after; rows that reached `total` stay as they are (their pass reruns from the end,
    its result unused); nums: `decoding.numbers` (temperature, top_p); carry: the block drafter's first-position
    logits, or a feature drafter's next drafts (`first_carry`); folded: which rows fold a block (block drafter)."""
    features = bool(draft_model.args.feature_dim)
    reads = draft_model.args.verifier_hidden if features else True

    def round_(x, n, key, nums, carry, folded):
        temp, top_p = sampling_numbers(nums)
        S, L = x.shape
        V = model.args.vocab_size
        noise = uniform_noise((S, K + V + K * V), key)  # one draw a round: the tests, the verifier's draw, the drafts
        accept_noise, draft_noise = noise[:, :K + V], noise[:, K + V:].reshape(S, K, V)
        live = (n < total)[:, None]
        n = mx.minimum(n, total)  # a finished row reruns from the end: every pass stays inside the canvas
        if features:  # drafted at the end of the round before
            drafts, q, drafted = carry
        else:
            q_logits, drafted, carry = draft(x, n, carry, folded)
            drafts, q = _draw(q_logits, draft_noise, nums, mask_id, n_valid, top_k)
        drafts = drafts.astype(x.dtype)
        cache.state["offset"] = (n - 1).reshape(cache.offset.shape)  # roll back to the known text; the last known
        # token goes in first
        last = mx.take_along_axis(x, (n - 1)[:, None], axis=1)
        p_logits, state = model(mx.concatenate([last, drafts], axis=1), cache=cache, hidden=reads)
        p = probabilities(without_mask(p_logits, mask_id, n_valid), temp, top_k, top_p)
        kept, token = accept(p, q, drafts, accept_noise, drafted)
        token = token.astype(x.dtype)
        written = mx.arange(L)[None] - n[:, None]  # each canvas position's index in the round
        x = mx.where(live & (written >= 0) & (written < kept[:, None]),
                     mx.take_along_axis(drafts, mx.clip(written, 0, K - 1), axis=1), x)
        x = mx.where(live & (written == kept[:, None]), token[:, None], x)
        cache.state["offset"] = (n + kept).reshape(cache.offset.shape)  # cached now: every token before the new one
        if features:  # the state that drew `token` (row kept) and the token itself draft the next round
            state = mx.take_along_axis(state, kept[:, None, None], axis=1)[:, 0]
            carry = _feature_carry(draft, token, state, draft_noise, nums)
        return x, mx.where(live[:, 0], n + kept + 1, n), kept, carry

    states = [cache.state] + ([draft_cache.state] if draft_cache is not None else [])
    return mx.compile(round_, inputs=[model.state, draft_model.state, *states], outputs=states)


def speculative_generate(model, draft_model, tokenizer, prompt: str, o: SamplerOptions
                         ) -> Iterator[GenerationStep]:
    """Draft with draft_model, verify with model (AR), `o.draft_length` tokens a round; yields a state per round
    (with a feature drafter, first the prompt pass's, as the AR decoder does). o: checked options with a seed
    (`sample.stream_generate` picks one when none is given). With o.num_samples rows, each row keeps its own length
    (its own cache offsets); a round runs every row until the last is done.

    The state's `draft_kept` holds, for each row still decoding, how many of this round's drafts it kept (the round
    adds one more)."""
    if o.suffix or o.template is not None:
        raise UserError("a suffix or template needs diffusion decoding, not speculative decoding")
    K, mask_id, S = o.draft_length, tokenizer.mask_id, o.num_samples
    ids, editable = build_canvas(tokenizer, prompt or "\n", o.max_tokens)
    P, total = int((~editable).sum()), len(ids)
    features = bool(draft_model.args.feature_dim)
    if features and K > draft_model.args.block_size:
        raise UserError(f"this feature drafter drafts at most {draft_model.args.block_size} tokens a round (its "
                        f"block); got --draft-length {K}")
    block = draft_model.args.block_size if draft_model.args.model_type == "block" and not features else 0
    context = min(model.args.max_seq_len, draft_model.args.max_seq_len)
    reach = max(K, block * (2 if S > 1 else 1))  # positions a pass may touch past the text's end
    if total + reach > context:
        raise UserError(f"speculative decoding needs the prompt ({P} tokens) + --max-tokens + --draft-length "
                        f"({total + reach} in all) within both models' context of {context}")
    length = -(-(total + max(K, 2 * block)) // max(block, 1)) * max(block, 1)  # the canvas and both caches
    n_valid = min(tokenizer.vocab_size, model.args.vocab_size)
    nums = numbers(o)
    cache, draft_cache, memo = memoize_on_model(
        model, ("speculative", id(draft_model), mask_id, n_valid, numbers_key(nums), o.top_k, K, total, S),
        lambda: (KVCache(model.args, S, length, per_row=S > 1),
                 KVCache(draft_model.args, S, length, per_row=True) if block else None, {}))

    def drafter(fold: bool = False):
        return (_feature_drafter(draft_model, mask_id, K, n_valid, o.top_k) if features
                else _block_drafter(draft_model, draft_cache, K, fold) if block
                else _dlm_drafter(draft_model, mask_id, K))

    def round_fn(fold: bool):  # compiled once per model, options and pass kind
        if fold not in memo:
            memo[fold] = _make_round(model, draft_model, drafter(fold), mask_id, n_valid, o.top_k, K, total, cache,
                                     draft_cache)
        return memo[fold]

    x = mx.array(np.tile(np.concatenate([ids, np.full(length - total, mask_id, dtype=np.int32)]), (S, 1)))
    keys = mx.random.split(mx.random.key(o.seed), total - P + 1)  # a round adds at least one token to every row
    tic = time.perf_counter()
    cache.reset()
    first, prefilled = int(features), (P // block) * block if block else 0  # tokens from the prompt pass
    if features:
        x, carry = _feature_prompt_pass(model, drafter(), draft_model.args.verifier_hidden, x, P, keys[-1], nums,
                                        mask_id, n_valid, o.top_k, K, cache)
    else:
        if P > 1:
            model(x[:, :P - 1], cache=cache)  # prefill: every prompt token but the last, which opens the first round
        carry = (prefill_blocks(draft_model, draft_cache, x, prefilled) if prefilled  # the drafter's clean blocks
                 else mx.zeros((S, draft_model.args.vocab_size)))
    mx.eval(x, cache.state, carry)
    prompt_seconds = time.perf_counter() - tic
    forwarded = S * (P - 1 + first + prefilled + (draft_model.args.block_size if features else 0))
    position = np.arange(total)[None]

    def state(k: int, tokens: np.ndarray, before: np.ndarray, done: np.ndarray, kept: tuple) -> GenerationStep:
        committed = (position >= before[:, None]) & (position < np.minimum(done, total)[:, None])
        return GenerationStep(
            step=k, tokens=tokens[:, :total], editable=editable, committed=committed,
            remasked=np.zeros_like(committed), generated_tokens=int((np.minimum(done, total) - P).sum()),
            nfe=k, forward_tokens=forwarded, elapsed=time.perf_counter() - tic, prompt_seconds=prompt_seconds,
            prompt_pass_tokens=S * first, draft_kept=kept)

    done = np.full(S, P + first)
    if features:
        yield state(1, np.array(x), np.full(S, P), done, ())
    known = _Known(done)
    rounds = _rounds(round_fn, x, mx.full((S,), P + first, dtype=mx.int32), carry, keys[:-1], nums, known, total,
                     K, block, prefilled)
    for k, (x, n, kept, fold) in enumerate(ahead(rounds), 1):
        tokens, before, done, live = np.array(x), done, np.array(n), done < total
        if k > known.rounds:  # the rounds being built can start from here
            known.done, known.rounds = done, k
        drafter_rows = draft_model.args.block_size if features else block * (2 if fold else 1) if block else length
        forwarded += S * (drafter_rows + K + 1)  # the drafter's pass, the verifier's
        yield state(k + first, tokens, before, done, tuple(int(a) for a in np.array(kept)[live]))


@dataclass
class _Known:
    """Each row's length (tokens known) as last read on the host, and how many rounds had run then."""

    done: np.ndarray
    rounds: int = 0


def _rounds(round_fn, x, n, carry, keys, nums, known: _Known, total: int, K: int, block: int, prefilled: int
            ) -> Iterator[tuple]:
    """The rounds of `speculative_generate` until every row has `total` tokens: (x, n, kept, fold) each, lazy.

    A round adds 1 .. K + 1 tokens to a row, so while some row would still be short even if every round since
    `known` was read had kept all its drafts, the next round is built at once, without reading n (`decoding.ahead`
    then overlaps it with the host's work on the round before, whose reading updates `known`); only the last rounds
    wait for a read. A block drafter's pass depends on where the round before ended (whether it finished a block),
    so it reads n every round. keys: one a round, at least as many as there can be rounds."""
    S, cached, dispatched = len(known.done), np.full(len(known.done), prefilled), 0
    no_fold = mx.zeros((S,), dtype=mx.bool_)
    for key in keys:
        if block or not (known.done + (dispatched - known.rounds) * (K + 1) < total).any():
            known.done, known.rounds = np.array(n), dispatched
            if not (known.done < total).any():
                return
        done = known.done
        fold, folded = False, no_fold
        if block:
            ended = np.minimum(done, total)  # where each row's pass runs (a finished row: from the end)
            finished = (ended // block) * block > cached  # rows whose verified text finished a block
            cached, fold = (ended // block) * block, bool(finished.any())
            folded = mx.array(finished) if fold else no_fold
        x, n, kept, carry = round_fn(fold)(x, n, key, nums, carry, folded)
        dispatched += 1
        yield x, n, kept, fold


def tokens_per_round(kept: list[int]) -> float:
    """Tokens a round adds per row: its kept drafts and the verifier's own one; kept: one entry per row and round."""
    return (sum(kept) + len(kept)) / max(len(kept), 1)


def acceptance_by_position(kept: list[int], draft_length: int) -> list[float]:
    """P(draft i kept) for i = 1..K over rounds (of every row): the share of rounds that kept at least i drafts."""
    kept_arr = np.array(kept)
    return [float((kept_arr >= i).mean()) if len(kept_arr) else 0.0 for i in range(1, draft_length + 1)]


def draft_report(kept: list[int], draft_length: int) -> str:
    """One line: tokens per round (per row) and acceptance by draft position; kept: one entry per row and round."""
    by_position = ", ".join(f"{p:.2f}" for p in acceptance_by_position(kept, draft_length))
    return (f"Drafts: {tokens_per_round(kept):.2f} tokens per round ({sum(kept)} drafts kept of "
            f"{len(kept) * draft_length}); P(draft 1..{draft_length} kept): {by_position}")
