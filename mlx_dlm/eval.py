"""The measuring stick: how good is a model? Used by `mlx_dlm.eval` and by the benchmarks.

    mlx_dlm.eval --model runs/dlm --judge runs/ar --json eval.json

- `val_windows`: the held-out text (last --val-fraction of the corpus) cut into non-overlapping windows.
- `dlm_elbo`: a diffusion model's bound on nats/token over those windows, from K Monte Carlo draws of
  mask ratios and masks, with a 95% interval over the draws (Student t).
- `ar_nll`: an autoregressive model's exact next-token NLL over the same windows.
- judges (`Judge`, `load_judges`): what scores samples, neither contestant by default: a neural AR model
  directory (`shakespeare-judge`) and a character n-gram model with Kneser-Ney smoothing built from the
  training split (`ngram.py`); one whose weights equal a model under test is refused (`check_independent`)
  unless allowed, and is then reported as self-judged;
- `generative_perplexity`: samples scored by a judge (per character); `reference_texts`: held-out text cut
  like samples (the prompt's length, then the completion's), the real-text level every judge is read against;
- diversity beside it, so low temperature or repetition cannot buy quality: `char_entropy` (bits) and
  `distinct_ngrams` (the share of distinct 4-grams, counted over an equal number of 4-grams per source).
- `median_interval`: a median with a distribution-free interval (benchmarks' paired speed ratios).
- `infill_accuracy`: hide a span in the middle of held-out windows, fill it greedily, count the tokens
  recovered exactly.
- `evaluate`: all of the above for one model directory; `main`: the command.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from . import data
from .decoding import check_writes_alone
from .diffusion import ar_loss, block_loss, elbo_per_sequence, sample_t
from .errors import UserError, run_cli
from .fileio import atomic_write_text
from .io import load
from .model import memoize_on_model
from .ngram import DEFAULT_ORDER, NGramModel
from .options import MODEL_FIELDS, PACE, SamplerOptions, options_for, own_defaults
from .sample import fill, stream_generate, texts_of
from .speculative import acceptance_by_position, check_drafter, tokens_per_round

DEFAULT_DRAWS = 5
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 16
DEFAULT_INFILL_SPAN = 16
DEFAULT_INFILL_WINDOWS = 64
DEFAULT_SAMPLES = 8
DEFAULT_SAMPLE_TOKENS = 128
DEFAULT_SAMPLE_STEPS = 64  # for a model whose sampling.json does not set its own pace
DEFAULT_PROMPT = "ROMEO:"
NGRAM = "ngram"  # the judge name of the n-gram model
DEFAULT_JUDGES = ("shakespeare-judge", NGRAM)  # neither contestant: a stronger AR model and an n-gram model
DEFAULT_REFERENCE_WINDOWS = 64
DISTINCT_N = 4
# Two-sided 97.5% quantiles of Student's t by degrees of freedom (1-30); 1.96 beyond.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


@dataclass
class Estimate:
    """A mean with its 95% interval half-width (0 for exact values) and the number of draws behind it."""

    mean: float
    half_width: float
    draws: int

    def __str__(self) -> str:
        if not self.half_width:
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} +- {self.half_width:.4f} (95%, {self.draws} draws)"


def interval(values: list[float]) -> Estimate:
    """Mean and 95% Student-t interval of independent draws."""
    n = len(values)
    if n < 2:
        return Estimate(float(values[0]), 0.0, n)
    q = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return Estimate(statistics.fmean(values), q * statistics.stdev(values) / math.sqrt(n), n)


@dataclass
class MedianInterval:
    """A median with a distribution-free interval: order statistics low..high that hold the true median with
    probability `coverage` (exact, from the binomial; at least 95% from 6 values on)."""

    median: float
    low: float
    high: float
    coverage: float
    count: int


def median_interval(values: list[float], level: float = 0.95) -> MedianInterval:
    """The median of independent draws and the narrowest symmetric order-statistic interval [x_(j), x_(n+1-j)]
    whose coverage of the true median, 1 - 2 P(Binomial(n, 1/2) < j), is at least `level` ([min, max] when no
    interval reaches it: fewer than 6 draws at 95%)."""
    ordered, n = sorted(values), len(values)
    below, j = 0.5 ** n, 1  # below: P(Binomial(n, 1/2) < j)
    while j + 1 <= (n + 1) // 2 and 1 - 2 * (below + math.comb(n, j) * 0.5 ** n) >= level:
        below += math.comb(n, j) * 0.5 ** n
        j += 1
    return MedianInterval(statistics.median(ordered), ordered[j - 1], ordered[n - j], 1 - 2 * below, n)


def val_windows(tokens: np.ndarray, seq_len: int, val_fraction: float = data.DEFAULT_VAL_FRACTION,
                max_windows: int = 0) -> np.ndarray:
    """Non-overlapping windows (N, seq_len) covering the validation split (the first max_windows if set)."""
    _, val = data.split_tokens(tokens, val_fraction)
    data.check_window(val, seq_len, "validation")
    n = len(val) // seq_len
    if max_windows:
        n = min(n, max_windows)
    return val[: n * seq_len].reshape(n, seq_len)


def _batches(windows: np.ndarray, batch_size: int):
    for i in range(0, len(windows), batch_size):
        yield mx.array(windows[i:i + batch_size])


def _check_draws(draws: int) -> None:
    if draws < 1:
        raise UserError(f"--draws must be at least 1, got {draws}")


def dlm_elbo(model, windows: np.ndarray, mask_id: int, draws: int = DEFAULT_DRAWS,
             batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> Estimate:
    """The ELBO (nats/token) of a diffusion model over windows: each draw picks stratified mask ratios
    across the windows and independent masks; the estimate is the mean over draws, with its interval."""
    _check_draws(draws)
    totals = []
    for d in range(draws):
        t_key, mask_key = mx.random.split(mx.random.key(seed * 100_003 + d))
        t = sample_t(len(windows), "stratified", key=t_key)
        t = t[mx.random.permutation(len(windows), key=t_key)]  # strata spread over the text
        hidden = mx.random.uniform(shape=windows.shape, key=mask_key) < t[:, None]
        totals.append(float(elbo_with_masks(model, windows, t, hidden, mask_id, batch_size).mean()))
    return interval(totals)


def elbo_with_masks(model, windows: np.ndarray, t: mx.array, hidden: mx.array, mask_id: int,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Per-window ELBO (nats/token) for given mask ratios t (N,) and hidden positions (N, L)."""
    per_sequence = _compiled_elbo(model, mask_id)
    out = [per_sequence(batch, t[i:i + batch_size], hidden[i:i + batch_size])
           for i, batch in zip(range(0, len(windows), batch_size), _batches(windows, batch_size))]
    return np.array(mx.concatenate(out))


def _compiled_elbo(model, mask_id: int):
    """The compiled per-window ELBO, built once per model (weights are compiled inputs: later updates are seen)."""
    def per_sequence(batch: mx.array, t: mx.array, hidden: mx.array) -> mx.array:
        noisy = mx.where(hidden, mx.array(mask_id, dtype=batch.dtype), batch)
        return elbo_per_sequence(model(noisy, t), batch, hidden, t)

    return memoize_on_model(model, ("elbo", mask_id), lambda: mx.compile(per_sequence, inputs=[model.state]))


def block_nelbo(model, windows: np.ndarray, mask_id: int, draws: int = DEFAULT_DRAWS,
                batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> Estimate:
    """The block NELBO (nats/token) of a block-diffusion model over windows (`diffusion.block_loss`: mask
    ratios per block, stratified within each batch); the mean over draws, with its interval."""
    _check_draws(draws)
    loss = memoize_on_model(model, ("block-nelbo", mask_id), lambda: mx.compile(
        lambda batch, key: block_loss(model, batch, mask_id, key=key) * batch.shape[0], inputs=[model.state]))
    totals = []
    for d in range(draws):
        total = mx.array(0.0)
        for i, batch in enumerate(_batches(windows, batch_size)):
            total = total + loss(batch, mx.random.key((seed * 100_003 + d) * 100_003 + i))
        totals.append(total.item() / len(windows))
    return interval(totals)


def ar_nll(model, windows: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> Estimate:
    """Exact next-token NLL (nats/token) of an AR model over windows (every token but each window's first)."""
    total = mx.array(0.0)
    loss = mx.compile(lambda batch: ar_loss(model, batch) * batch.shape[0])
    for batch in _batches(windows, batch_size):
        total = total + loss(batch)
    return Estimate(total.item() / len(windows), 0.0, 1)  # every window predicts the same number of tokens


@dataclass
class Judge:
    """What scores text: completion_nll(texts, start) -> nats of each text's characters after its first `start`,
    given those before them. fingerprint: a hash of a neural judge's weights (a model with the same weights is
    the same judge)."""

    name: str
    completion_nll: Callable[[list[str], int], np.ndarray]
    fingerprint: str = ""
    self_judged: list[str] = field(default_factory=list)  # contestants with this judge's weights (when allowed)


def weights_fingerprint(model) -> str:
    """sha256 of a model's parameters (names, shapes and float32 values)."""
    from mlx.utils import tree_flatten

    digest = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(np.array(value.astype(mx.float32)).tobytes())
    return digest.hexdigest()


def model_judge(name: str, model, tokenizer, batch_size: int = DEFAULT_BATCH_SIZE) -> Judge:
    """An autoregressive model as a judge. A text with nothing before `start` is scored from a newline, as the
    AR models here sample from one."""
    if model.args.model_type != "ar":
        raise UserError(f"--judge {name} is a {model.args.model_type} model; the judge must be autoregressive "
                        "(model_type ar)")

    def completion_nll(texts: list[str], start: int) -> np.ndarray:
        rows = []
        for text in texts:
            prefix = tokenizer.encode(text[:start] or "\n")
            ids = prefix + tokenizer.encode(text[start:])
            if len(ids) > model.args.max_seq_len:
                raise UserError(f"a text of {len(ids)} tokens is longer than the judge's context "
                                f"of {model.args.max_seq_len}")
            rows.append((ids, len(prefix)))
        out = np.zeros(len(texts))
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, (ids, p) in enumerate(rows):
            by_shape.setdefault((len(ids), p), []).append(i)
        for (_, p), members in by_shape.items():
            for chunk in range(0, len(members), batch_size):
                part = members[chunk:chunk + batch_size]
                ids = mx.array([rows[i][0] for i in part])
                logits = model(ids[:, :-1]).astype(mx.float32)
                logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                nll = -mx.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
                out[part] = np.array(nll[:, p - 1:].sum(axis=1))
        return out

    return Judge(name, completion_nll, weights_fingerprint(model))


def load_judges(names: list[str], corpus: str, val_fraction: float = data.DEFAULT_VAL_FRACTION,
                ngram_order: int = DEFAULT_ORDER) -> list[Judge]:
    """Judges by name: `ngram` (built from the training split of corpus), or an AR model directory, shipped
    model or Hub repo id."""
    judges = []
    for name in names:
        if name == NGRAM:
            train_text, _ = data.split_tokens(corpus, val_fraction)
            model = NGramModel.fit(train_text, ngram_order)
            judges.append(Judge(f"{NGRAM}{ngram_order}", model.completion_nll))
        else:
            judges.append(model_judge(name, *load(name)))
    return judges


def check_independent(judges: list[Judge], contestants: dict[str, object], allow_self_judge: bool = False) -> None:
    """Refuse (UserError) a judge whose weights equal a contestant's, or with allow_self_judge record it in
    judge.self_judged: a model scores its own samples better than anyone else's (by KL(q || p))."""
    prints = {name: weights_fingerprint(model) for name, model in contestants.items()}
    for judge in judges:
        same = [name for name, fp in prints.items() if judge.fingerprint and fp == judge.fingerprint]
        if same and not allow_self_judge:
            raise UserError(f"the judge {judge.name} has the weights of {same[0]}, which it would judge: "
                            "pick an independent judge, or pass --allow-self-judge (reported as self-judged)")
        judge.self_judged = same


def generative_perplexity(judge: Judge, texts: list[str], prompt: str) -> float:
    """Per-character perplexity of the completions (text after the prompt) scored by a judge:
    exp(total NLL of the completion characters given everything before them / number of completion characters).
    """
    total_chars = sum(len(t) - len(prompt) for t in texts)
    return math.exp(float(judge.completion_nll(texts, len(prompt)).sum()) / max(total_chars, 1))


def reference_texts(corpus: str, prompt_chars: int, completion_chars: int, count: int = DEFAULT_REFERENCE_WINDOWS,
                    val_fraction: float = data.DEFAULT_VAL_FRACTION) -> list[str]:
    """`count` held-out windows of prompt_chars + completion_chars characters, spread evenly over the validation
    split: real text to score exactly as samples are (their first prompt_chars as the prompt)."""
    if count < 1:
        raise UserError(f"--reference-windows must be at least 1, got {count}")
    _, val = data.split_tokens(corpus, val_fraction)
    length = prompt_chars + completion_chars
    if len(val) < length * count:
        raise UserError(f"the validation text ({len(val)} characters) is too short for {count} reference windows "
                        f"of {length}")
    stride = len(val) // count
    return [val[i * stride:i * stride + length] for i in range(count)]


def distinct_ngrams(texts: list[str], start: int, n: int = DISTINCT_N, count: int | None = None) -> float:
    """The share of distinct n-grams among the completions' n-grams (within each text[start:], in order), over
    the first `count` of them when given: distinct-n falls as more are counted, so compare it at equal counts."""
    grams = [t[i:i + n] for t in texts for i in range(start, len(t) - n + 1)]
    if count is not None:
        if count > len(grams):
            raise UserError(f"distinct-{n} over {count} n-grams asked of texts that hold {len(grams)}")
        grams = grams[:count]
    return len(set(grams)) / len(grams) if grams else 0.0


def ngram_count(texts: list[str], start: int, n: int = DISTINCT_N) -> int:
    """How many n-grams distinct_ngrams would count in texts (for choosing an equal count)."""
    return sum(max(len(t) - start - n + 1, 0) for t in texts)


def char_entropy(texts: list[str], prompt: str) -> float:
    """Entropy (bits) of the character distribution of the completions: low values flag repetitive output."""
    chars = "".join(t[len(prompt):] for t in texts)
    _, counts = np.unique(np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def infill_accuracy(model, mask_id: int, windows: np.ndarray, span: int = DEFAULT_INFILL_SPAN,
                    steps: int | None = None, seed: int = 0) -> float:
    """Fraction of tokens recovered exactly when a span of `span` tokens in the middle of each window is
    hidden and filled greedily (confidence order, `steps` passes, default one per token)."""
    L = windows.shape[1]
    if not 1 <= span < L:
        raise UserError(f"--infill-span must be between 1 and the window length - 1 ({L - 1}), got {span}")
    editable = np.zeros(L, dtype=bool)
    editable[(L - span) // 2:(L - span) // 2 + span] = True
    filled = fill(model, mask_id, windows, editable, steps or span, seed=seed)
    return float((filled[:, editable] == windows[:, editable]).mean())


@dataclass
class Report:
    """Everything `evaluate` measured (None where not applicable or not asked for)."""

    model: str
    model_type: str
    params: int
    windows: int
    seq_len: int
    val_loss: Estimate  # ELBO (dlm), block NELBO (block) or exact NLL (ar), nats/token
    val_bpc: float
    infill_accuracy: float | None = None
    infill_span: int | None = None
    # per judge: {"gen_ppl": samples, "reference_gen_ppl": held-out text cut like them, "self_judged": [...]}
    judges: dict | None = None
    sample_entropy_bits: float | None = None
    reference_entropy_bits: float | None = None
    sample_distinct4: float | None = None
    reference_distinct4: float | None = None
    distinct4_count: int | None = None  # the 4-grams both distinct-4 figures were counted over
    samples: list[str] | None = None
    sample_options: dict | None = None  # how the samples were decoded (the model's defaults under eval's flags)
    draft: str | None = None  # the drafter the samples were decoded with (speculative decoding)
    tokens_per_round: float | None = None  # per sample: its kept drafts and the verifier's own token
    draft_acceptance: list[float] | None = None  # P(draft i kept) for i = 1..K, over rounds

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(model_path: str, data_path: str | None = None, judges: list[str] | tuple[str, ...] = DEFAULT_JUDGES,
             seq_len: int = DEFAULT_SEQ_LEN, draws: int = DEFAULT_DRAWS, max_windows: int = 0,
             batch_size: int = DEFAULT_BATCH_SIZE, infill_span: int = DEFAULT_INFILL_SPAN,
             infill_windows: int = DEFAULT_INFILL_WINDOWS, samples: int = DEFAULT_SAMPLES,
             sample_tokens: int = DEFAULT_SAMPLE_TOKENS, sample_steps: int | None = None,
             prompt: str = DEFAULT_PROMPT, seed: int = 0, val_fraction: float = data.DEFAULT_VAL_FRACTION,
             allow_self_judge: bool = False, reference_windows: int = DEFAULT_REFERENCE_WINDOWS,
             draft: str | None = None) -> Report:
    """Measure a model directory on the validation split of a corpus (Tiny Shakespeare by default); with judges
    and samples, its samples' genPPL under each judge beside held-out text cut and scored the same way. draft: a
    drafter for this (AR) model; the samples are decoded speculatively and its drafts' acceptance reported."""
    model, tokenizer = load(model_path)
    check_writes_alone(model)
    drafter = None
    if draft is not None:
        drafter, draft_tokenizer = load(draft)
        check_drafter(model, drafter, tokenizer, draft_tokenizer)
        if not samples:
            raise UserError("--draft is measured on the samples: --samples must be at least 1")
    text = data.read_corpus(data_path)
    judged = load_judges(list(judges), text, val_fraction) if judges and samples else []
    check_independent(judged, {str(model_path): model, **({str(draft): drafter} if drafter else {})},
                      allow_self_judge)
    tokens = tokenizer.encode_array(text)
    seq_len = min(seq_len, model.args.max_seq_len)
    windows = val_windows(tokens, seq_len, val_fraction, max_windows)
    is_dlm = model.args.model_type == "dlm"
    if model.args.model_type == "block":
        loss = block_nelbo(model, windows, tokenizer.mask_id, draws, batch_size, seed)
    else:
        loss = dlm_elbo(model, windows, tokenizer.mask_id, draws, batch_size, seed) if is_dlm else \
            ar_nll(model, windows, batch_size)
    chars_per_token = len(tokenizer.decode(windows.reshape(-1))) / windows.size
    report = Report(model=str(model_path), model_type=model.args.model_type, params=model.num_params(),
                    windows=len(windows), seq_len=seq_len, val_loss=loss,
                    val_bpc=loss.mean / math.log(2) / chars_per_token)
    if is_dlm and infill_span:
        report.infill_accuracy = infill_accuracy(model, tokenizer.mask_id, windows[:infill_windows], infill_span,
                                                 seed=seed)
        report.infill_span = infill_span
    if judged or drafter:
        options = _sample_options(model, sample_tokens, sample_steps, seed, samples, drafter)
        texts = _decode_samples(report, model, tokenizer, prompt, options, drafter, draft)
    if judged:
        completion = min(len(t) for t in texts) - len(prompt)
        reference = reference_texts(text, len(prompt), completion, reference_windows, val_fraction)
        _judge_report(report, judged, texts, reference, prompt)
    return report


def _decode_samples(report: Report, model, tokenizer, prompt: str, options: SamplerOptions, drafter=None,
                    draft: str | None = None) -> list[str]:
    """The samples eval judges, into report with their options; with a drafter (named draft) decoded
    speculatively, and how many of its drafts were kept."""
    kept, last = [], None
    for last in stream_generate(model, tokenizer, prompt, options, drafter):
        kept += last.draft_kept
    report.samples = texts_of(tokenizer, last)
    report.sample_options = {name: getattr(options, name) for name in MODEL_FIELDS}
    if drafter is not None:
        report.draft, report.tokens_per_round = str(draft), tokens_per_round(kept)
        report.draft_acceptance = acceptance_by_position(kept, options.draft_length)
    return report.samples


def _sample_options(model, tokens: int, steps: int | None, seed: int, samples: int, drafter=None) -> SamplerOptions:
    """The judged samples' options: the model's defaults, with eval's length, seed and count, and steps when given
    (else the model's own pace, or DEFAULT_SAMPLE_STEPS for a model without one); a drafter's draft_length."""
    pace = {"steps": steps} if steps is not None else (
        {} if set(own_defaults(model)) & set(PACE) else {"steps": DEFAULT_SAMPLE_STEPS})
    return options_for(model, dict(max_tokens=tokens, seed=seed, num_samples=samples, **pace), drafter)


def _judge_report(report: Report, judges: list[Judge], texts: list[str], reference: list[str], prompt: str) -> None:
    """genPPL under each judge, entropy and distinct-4 of samples and reference at an equal count, into report."""
    report.judges = {j.name: {"gen_ppl": generative_perplexity(j, texts, prompt),
                              "reference_gen_ppl": generative_perplexity(j, reference, prompt),
                              "self_judged": j.self_judged} for j in judges}
    count = min(ngram_count(texts, len(prompt)), ngram_count(reference, len(prompt)))
    report.sample_entropy_bits, report.reference_entropy_bits = char_entropy(texts, prompt), \
        char_entropy(reference, prompt)
    report.sample_distinct4 = distinct_ngrams(texts, len(prompt), count=count)
    report.reference_distinct4 = distinct_ngrams(reference, len(prompt), count=count)
    report.distinct4_count = count
    report.samples = texts


def format_report(r: Report) -> list[str]:
    """The lines `mlx_dlm.eval` prints."""
    kind = {"dlm": "ELBO", "block": "block NELBO"}.get(r.model_type, "NLL (exact)")
    lines = [f"Model: {r.model} ({r.model_type}, {r.params / 1e6:.2f}M parameters); "
             f"{r.windows} validation windows of {r.seq_len} tokens",
             f"Val {kind}: {r.val_loss} nats/token, {r.val_bpc:.4f} bits/char"]
    if r.infill_accuracy is not None:
        lines.append(f"Infill accuracy: {r.infill_accuracy:.4f} (a {r.infill_span}-token span in the middle of "
                     f"each window, filled greedily)")
    for name, j in (r.judges or {}).items():
        self_judged = f" (self-judged: {', '.join(j['self_judged'])})" if j["self_judged"] else ""
        lines.append(f"Generative perplexity under {name}: {j['gen_ppl']:.3f} per character; held-out text "
                     f"scored the same way: {j['reference_gen_ppl']:.3f}{self_judged}")
    if r.sample_options and r.model_type != "ar":
        o = SamplerOptions(**r.sample_options)
        pace = (f"threshold {o.threshold}" if o.threshold is not None else
                f"{o.block_steps} steps a block" if o.block_paced(r.model_type)
                else f"{o.steps} steps")
        lines.append(f"Samples decoded with: {pace}, strategy {o.strategy}, temperature {o.temp}")
    if r.draft is not None:
        by_position = ", ".join(f"{a:.3f}" for a in r.draft_acceptance)
        lines.append(f"Drafts by {r.draft} over the {len(r.samples)} samples: {r.tokens_per_round:.3f} tokens per "
                     f"round; P(draft 1..{len(r.draft_acceptance)} kept): {by_position}")
    if r.judges:
        lines.append(f"Diversity of {len(r.samples)} samples (held-out text): character entropy "
                     f"{r.sample_entropy_bits:.3f} ({r.reference_entropy_bits:.3f}) bits, distinct-4 "
                     f"{r.sample_distinct4:.3f} ({r.reference_distinct4:.3f}) over {r.distinct4_count} 4-grams each")
    return lines


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of mlx_dlm.eval."""
    p = argparse.ArgumentParser(prog="mlx_dlm.eval", description="Measure a model on held-out text.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (or Hub repo id)")
    p.add_argument("--data", help="corpus whose last --val-fraction is held out (default: Tiny Shakespeare)")
    p.add_argument("--judge", action="append", metavar="MODEL_OR_NGRAM",
                   help=f"what scores the samples (generative perplexity): an AR model directory, shipped model or "
                        f"Hub id, or `{NGRAM}` (Kneser-Ney over the training split); repeatable "
                        f"(default: {' and '.join(DEFAULT_JUDGES)})")
    p.add_argument("--allow-self-judge", action="store_true",
                   help="let a judge with the evaluated model's own weights score it (reported as self-judged)")
    p.add_argument("--reference-windows", type=int, default=DEFAULT_REFERENCE_WINDOWS,
                   help="held-out windows scored like samples (the real-text level)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="window length")
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help="Monte Carlo draws of masks (DLM ELBO)")
    p.add_argument("--max-windows", type=int, default=0, help="use at most this many windows (0: all)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="windows per forward pass")
    p.add_argument("--val-fraction", type=float, default=data.DEFAULT_VAL_FRACTION, help="held-out tail of the corpus")
    p.add_argument("--infill-span", type=int, default=DEFAULT_INFILL_SPAN, help="tokens hidden per window (0: skip)")
    p.add_argument("--infill-windows", type=int, default=DEFAULT_INFILL_WINDOWS, help="windows to infill")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="samples scored by the judge")
    p.add_argument("--sample-tokens", type=int, default=DEFAULT_SAMPLE_TOKENS, help="length of each judged sample")
    p.add_argument("--sample-steps", type=int,
                   help=f"denoising steps per judged sample (default: the model's sampling.json, else "
                        f"{DEFAULT_SAMPLE_STEPS}); the sampler's other options are the model's defaults")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of the judged samples")
    p.add_argument("--draft", metavar="DRAFTER", help="decode the samples speculatively with this drafter for "
                   "--model (an AR model) and report how many of its drafts are kept")
    p.add_argument("--seed", type=int, default=0, help="seed of masks and samples")
    return p


def _main(argv: list[str] | None) -> None:
    args = setup_arg_parser().parse_args(argv)
    for name in ("seq_len", "batch_size"):
        if getattr(args, name) < 2 - (name == "batch_size"):
            raise UserError(f"--{name.replace('_', '-')} is too small")
    for name in ("max_windows", "infill_span", "infill_windows", "samples", "sample_tokens", "sample_steps",
                 "reference_windows"):
        if (getattr(args, name) or 0) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    report = evaluate(args.model, args.data, args.judge or DEFAULT_JUDGES, args.seq_len, args.draws,
                      args.max_windows, args.batch_size, args.infill_span, args.infill_windows, args.samples,
                      args.sample_tokens, args.sample_steps, args.prompt, args.seed, args.val_fraction,
                      args.allow_self_judge, args.reference_windows, args.draft)
    for line in format_report(report):
        print(line, flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"Wrote {args.json}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
