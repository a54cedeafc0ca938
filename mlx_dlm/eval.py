"""The measuring stick: how good is a model? Used by `mlx_dlm.eval` and by the benchmarks.

    mlx_dlm.eval --model runs/dlm --judge runs/ar --json eval.json

- `val_windows`: the held-out text (last --val-fraction of the corpus) cut into non-overlapping windows.
- `dlm_elbo`: a diffusion model's bound on nats/token over those windows, from K Monte Carlo draws of
  mask ratios and masks, with a 95% interval over the draws (Student t).
- `ar_nll`: an autoregressive model's exact next-token NLL over the same windows.
- `generative_perplexity`: samples scored by a judge AR model (per character); `char_entropy`: how varied
  the samples' characters are (a collapse into repetition shows as low entropy).
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
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from . import data
from .diffusion import ar_loss, elbo_per_sequence, sample_t
from .errors import UserError, run_cli
from .fileio import atomic_write_text
from .io import load
from .model import memoize_on_model
from .sample import fill, generate

DEFAULT_DRAWS = 5
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 16
DEFAULT_INFILL_SPAN = 16
DEFAULT_INFILL_WINDOWS = 64
DEFAULT_SAMPLES = 8
DEFAULT_SAMPLE_TOKENS = 128
DEFAULT_SAMPLE_STEPS = 64
DEFAULT_PROMPT = "ROMEO:"
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


def dlm_elbo(model, windows: np.ndarray, mask_id: int, draws: int = DEFAULT_DRAWS,
             batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> Estimate:
    """The ELBO (nats/token) of a diffusion model over windows: each draw picks stratified mask ratios
    across the windows and independent masks; the estimate is the mean over draws, with its interval."""
    if draws < 1:
        raise UserError(f"--draws must be at least 1, got {draws}")
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


def ar_nll(model, windows: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> Estimate:
    """Exact next-token NLL (nats/token) of an AR model over windows (every token but each window's first)."""
    total = mx.array(0.0)
    loss = mx.compile(lambda batch: ar_loss(model, batch) * batch.shape[0])
    for batch in _batches(windows, batch_size):
        total = total + loss(batch)
    return Estimate(total.item() / len(windows), 0.0, 1)  # every window predicts the same number of tokens


def generative_perplexity(judge, judge_tokenizer, texts: list[str], prompt: str) -> float:
    """Per-character perplexity of the completions (text after the prompt) scored by an AR judge.

    exp(total NLL of the completion tokens given everything before them / number of completion characters).
    """
    if judge.args.model_type != "ar":
        raise UserError("the judge must be an autoregressive model (model_type ar)")
    total_nll, total_chars = 0.0, 0
    p = len(judge_tokenizer.encode(prompt))
    for text in texts:
        ids = judge_tokenizer.encode(text)
        if p == 0:  # score the first token from a newline, as the AR model samples from one
            ids, p_eff = judge_tokenizer.encode("\n") + ids, 1
        else:
            p_eff = p
        if len(ids) > judge.args.max_seq_len:
            raise UserError(f"a sample of {len(ids)} tokens is longer than the judge's context "
                            f"of {judge.args.max_seq_len}")
        logits = judge(mx.array([ids[:-1]])).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = -np.array(mx.take_along_axis(logp, mx.array([ids[1:]])[..., None], axis=-1))[0, :, 0]
        total_nll += float(nll[p_eff - 1:].sum())
        total_chars += len(text) - len(prompt)
    return math.exp(total_nll / max(total_chars, 1))


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
    val_loss: Estimate  # ELBO (dlm) or exact NLL (ar), nats/token
    val_bpc: float
    infill_accuracy: float | None = None
    infill_span: int | None = None
    gen_ppl: float | None = None
    sample_entropy_bits: float | None = None
    samples: list[str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(model_path: str, data_path: str | None = None, judge_path: str | None = None,
             seq_len: int = DEFAULT_SEQ_LEN, draws: int = DEFAULT_DRAWS, max_windows: int = 0,
             batch_size: int = DEFAULT_BATCH_SIZE, infill_span: int = DEFAULT_INFILL_SPAN,
             infill_windows: int = DEFAULT_INFILL_WINDOWS, samples: int = DEFAULT_SAMPLES,
             sample_tokens: int = DEFAULT_SAMPLE_TOKENS, sample_steps: int = DEFAULT_SAMPLE_STEPS,
             prompt: str = DEFAULT_PROMPT, seed: int = 0, val_fraction: float = data.DEFAULT_VAL_FRACTION) -> Report:
    """Measure a model directory on the validation split of a corpus (Tiny Shakespeare by default)."""
    model, tokenizer = load(model_path)
    judge = judge_tok = None
    if judge_path is not None:
        judge, judge_tok = load(judge_path)
        if judge.args.model_type != "ar":
            raise UserError(f"--judge {judge_path} is a {judge.args.model_type} model; the judge must be "
                            "autoregressive (model_type ar)")
    text = data.read_corpus(data_path)
    tokens = tokenizer.encode_array(text)
    seq_len = min(seq_len, model.args.max_seq_len)
    windows = val_windows(tokens, seq_len, val_fraction, max_windows)
    is_dlm = model.args.model_type == "dlm"
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
    if judge is not None and samples:
        texts = generate(model, tokenizer, prompt, max_tokens=sample_tokens, steps=sample_steps, seed=seed,
                         num_samples=samples)
        texts = texts if isinstance(texts, list) else [texts]
        report.gen_ppl = generative_perplexity(judge, judge_tok, texts, prompt)
        report.sample_entropy_bits = char_entropy(texts, prompt)
        report.samples = texts
    return report


def format_report(r: Report) -> list[str]:
    """The lines `mlx_dlm.eval` prints."""
    kind = "ELBO" if r.model_type == "dlm" else "NLL (exact)"
    lines = [f"Model: {r.model} ({r.model_type}, {r.params / 1e6:.2f}M parameters); "
             f"{r.windows} validation windows of {r.seq_len} tokens",
             f"Val {kind}: {r.val_loss} nats/token, {r.val_bpc:.4f} bits/char"]
    if r.infill_accuracy is not None:
        lines.append(f"Infill accuracy: {r.infill_accuracy:.4f} (a {r.infill_span}-token span in the middle of "
                     f"each window, filled greedily)")
    if r.gen_ppl is not None:
        lines.append(f"Generative perplexity under the judge: {r.gen_ppl:.3f} per character; sample entropy "
                     f"{r.sample_entropy_bits:.3f} bits ({len(r.samples)} samples)")
    return lines


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of mlx_dlm.eval."""
    p = argparse.ArgumentParser(prog="mlx_dlm.eval", description="Measure a model on held-out text.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (or Hub repo id)")
    p.add_argument("--data", help="corpus whose last --val-fraction is held out (default: Tiny Shakespeare)")
    p.add_argument("--judge", help="AR model directory that scores samples (generative perplexity)")
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
    p.add_argument("--sample-steps", type=int, default=DEFAULT_SAMPLE_STEPS, help="denoising steps per judged sample")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of the judged samples")
    p.add_argument("--seed", type=int, default=0, help="seed of masks and samples")
    return p


def _main(argv: list[str] | None) -> None:
    args = setup_arg_parser().parse_args(argv)
    for name in ("seq_len", "batch_size"):
        if getattr(args, name) < 2 - (name == "batch_size"):
            raise UserError(f"--{name.replace('_', '-')} is too small")
    for name in ("max_windows", "infill_span", "infill_windows", "samples", "sample_tokens", "sample_steps"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    report = evaluate(args.model, args.data, args.judge, args.seq_len, args.draws, args.max_windows,
                      args.batch_size, args.infill_span, args.infill_windows, args.samples, args.sample_tokens,
                      args.sample_steps, args.prompt, args.seed, args.val_fraction)
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
