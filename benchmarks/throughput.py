"""Decode throughput: diffusion (parallel unmasking) against the matched autoregressive baseline.

    mlx_dlm.benchmark --preset tiny --trials 3 --out results.json          # random weights: speed only
    mlx_dlm.benchmark --dlm shakespeare-dlm --ar shakespeare-ar --out results.json --plot results.png
    mlx_dlm.benchmark --dlm shakespeare-dlm --ar shakespeare-ar --block shakespeare-block --block-steps 1,2,4

- `_plan`: the rows. Each generates --max-tokens after the prompt, at every batch size: the DLM over
  steps x strategies, confidence thresholds, semi-autoregressive blocks without cache, with the prefix
  cache and with the dual cache, and remasking; AR with its KV cache over temperatures x top-k; with --block, a
  block-diffusion model over passes per block and thresholds; with --draft-lengths, speculative rows.
- `_time_in_turns`: a warm-up run of every row (compilation), then --trials rounds in which every row runs once, so a
  drift in the machine's speed falls on all rows alike, each after a short pause (`machine.settle`): median, min and
  max tokens/s.
- `_add_quality` (trained models only): every row of one sampler setting gets the quality of all the
  samples that setting produced (every trial, every batch size): per-character perplexity (genPPL) under each
  --judge (by default two independent ones, neither contestant: `shakespeare-judge` and a Kneser-Ney n-gram
  model), character entropy and distinct-4 (at one count for every setting); held-out text cut and scored like
  the samples is the reference (`eval.reference_texts`); beside them each model's validation loss and the DLM's
  infill accuracy.
- `equal_quality`: the headline. A DLM setting matches the AR at a temperature when, under every judge, its
  genPPL is at most (1 + --tolerance) x the AR's and its diversity is the AR's (distinct-4 >= 0.95x, entropy
  >= the AR's - 0.1 bits). Per batch size and AR setting: the fastest matching DLM setting, and the fastest
  matching block-diffusion setting. And the frontier
  ratio: the DLM's Pareto frontier (of settings as diverse as the AR's default) against the AR's, interpolated in
  log space at the AR default's genPPL, per judge (`frontier.py`).
- `plot`: tokens/s against genPPL (both frontiers, the real-text level as a line; one panel per judge and batch
  size); tokens/s against steps for random-weight pairs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx

from mlx_dlm import data
from mlx_dlm import model as model_module
from mlx_dlm.errors import UserError
from mlx_dlm.eval import (DEFAULT_JUDGES, DEFAULT_REFERENCE_WINDOWS, ar_nll, block_nelbo, char_entropy,
                          check_independent, distinct_ngrams, dlm_elbo, generative_perplexity, infill_accuracy,
                          load_judges, median_interval, ngram_count, reference_texts, val_windows)
from mlx_dlm.io import load
from mlx_dlm.model import PRESETS, init_model, preset_args
from mlx_dlm.options import model_defaults
from mlx_dlm.sample import STRATEGIES, stream_generate
from mlx_dlm.speculative import acceptance_by_position, check_drafter, tokens_per_round
from mlx_dlm.tokenizer import CharTokenizer

from .frontier import pareto, speed_at
from .machine import add_blas_threads_flag, backend, blas_threads, describe, machine_info, matmul_gflops, settle, write_results

MEMO_ENTRIES_WHILE_TIMING = 4096  # compiled steps a model keeps while rows are timed in turns (all of them)
DEFAULT_STEPS = "8,16,32,64,128"
DEFAULT_BATCH_SIZES = "1,8"
DEFAULT_PROMPT = "ROMEO:"
VAL_WINDOWS, VAL_DRAWS = 64, 2  # validation beside speed: 64 held-out windows of 128 tokens (mlx_dlm.eval for more)
BLOCK_CACHES = (False, "prefix", "dual")  # each block row is run without cache and with both caches
DEFAULT_TOLERANCE = 0.10  # "equal quality": genPPL within 10% of the AR's under every judge
DISTINCT_RATIO = 0.95  # ... and distinct-4 at least 0.95x the AR's
ENTROPY_MARGIN = 0.1  # ... and character entropy at least the AR's minus 0.1 bits
# For random-weight pairs: the 65 characters of Tiny Shakespeare (newline, space, punctuation, letters).
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _ints(minimum: int):
    """argparse type: comma-separated integers, each at least `minimum`."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
        return values
    return parse


_int_list, _int_list0 = _ints(1), _ints(0)


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _strategy_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in STRATEGIES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown strategy {unknown or text!r} (choose from {', '.join(STRATEGIES)})")
    return values


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of `mlx_dlm.benchmark` (decode throughput)."""
    p = argparse.ArgumentParser(prog="mlx_dlm.benchmark",
                                description="Diffusion vs autoregressive decode speed, with quality beside it. "
                                            "`mlx_dlm.benchmark train --help` for training speed, "
                                            "`mlx_dlm.benchmark learn --help` for learning speed.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dlm", help="trained diffusion model directory")
    p.add_argument("--ar", help="trained autoregressive model directory")
    p.add_argument("--preset", help=f"random-weight matched pair instead ({', '.join(PRESETS)}); speed only")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per sample")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text every sample starts with")
    p.add_argument("--steps", type=_int_list, default=_int_list(DEFAULT_STEPS), help="DLM steps to sweep")
    p.add_argument("--strategies", type=_strategy_list, default=["confidence", "random"],
                   help=f"DLM strategies to sweep ({', '.join(STRATEGIES)})")
    p.add_argument("--thresholds", type=_float_list, default=[], help="also confidence-threshold rows, e.g. 0.9,0.7")
    p.add_argument("--block-lengths", type=_int_list, default=[],
                   help="also semi-autoregressive rows per block length: without cache, prefix cache, dual cache")
    p.add_argument("--remask", type=_float_list, default=[], help="also revision rows per fraction, e.g. 0.1")
    p.add_argument("--variant-steps", type=int, default=32, help="steps of the block and remask rows")
    p.add_argument("--draft-lengths", type=_int_list, default=[],
                   help="also speculative rows (each batch size and --ar-temps value): the DLM drafts this many "
                        "tokens a round, the AR verifies; the output is the AR's own distribution")
    p.add_argument("--draft", action="append", help="drafter of the speculative rows (default: --dlm); repeat it "
                   "for rows of each drafter, timed in turns with the others")
    p.add_argument("--block", help="also a block-diffusion model (model_type block) as a contestant")
    p.add_argument("--block-steps", type=_int_list, default=[1, 2, 4],
                   help="block rows: denoising passes per block (each --temp value)")
    p.add_argument("--block-strategies", type=_strategy_list,
                   help="block rows: the order positions are committed in inside a block, e.g. confidence,left "
                        "(default: the block model's own, from its sampling.json, else confidence)")
    p.add_argument("--block-thresholds", type=_float_list, default=[],
                   help="also block rows that commit every proposal at least this confident, e.g. 0.9,0.7")
    p.add_argument("--batch-size", type=_int_list, default=_int_list(DEFAULT_BATCH_SIZES),
                   help="batch sizes (samples decoded together)")
    p.add_argument("--temp", type=_float_list, default=[1.0],
                   help="DLM sampling temperatures: the first for every DLM row, the others for confidence-ordered rows")
    p.add_argument("--ar-temps", type=_float_list, default=[1.0],
                   help="AR temperatures to sweep (the first, with the first --ar-top-k, is the AR's default)")
    p.add_argument("--ar-top-k", type=_int_list0, default=[0], help="AR top-k values to sweep (0: off)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="equal quality: DLM genPPL at most (1 + tolerance) x the AR's, under every judge")
    p.add_argument("--judge", action="append", metavar="MODEL_OR_NGRAM",
                   help=f"what scores the samples: an AR model (directory, shipped name, Hub id) or `ngram`; "
                        f"repeatable (default: {' and '.join(DEFAULT_JUDGES)})")
    p.add_argument("--allow-self-judge", action="store_true",
                   help="let a judge with a contestant's weights score (reported as self-judged)")
    p.add_argument("--reference-windows", type=int, default=DEFAULT_REFERENCE_WINDOWS,
                   help="held-out windows scored like the samples (the real-text level)")
    p.add_argument("--trials", type=int, default=5, help="timed generations per row (the median is reported)")
    p.add_argument("--data", help="corpus for validation losses (default: Tiny Shakespeare)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first trial")
    p.add_argument("--out", help="write rows and machine info as JSON")
    p.add_argument("--plot", help="write tokens/s against steps (PNG; needs matplotlib)")
    add_blas_threads_flag(p)
    return p


def _models(args: argparse.Namespace):
    if args.preset:
        if args.dlm or args.ar:
            raise UserError("pass either --preset (random weights) or --dlm/--ar (trained models), not both")
        tokenizer = CharTokenizer(list(SHAKESPEARE_CHARS))
        dlm = init_model(preset_args(args.preset, vocab_size=tokenizer.vocab_size), seed=0)
        ar = init_model(preset_args(args.preset, vocab_size=tokenizer.vocab_size, model_type="ar"), seed=0)
        return (dlm, tokenizer), (ar, tokenizer), False
    if not args.dlm or not args.ar:
        raise UserError("pass --dlm DIR and --ar DIR (trained models), or --preset P for a random-weight pair")
    dlm, ar = load(args.dlm), load(args.ar)
    if dlm[0].args.model_type != "dlm":
        raise UserError(f"--dlm {args.dlm} is not a diffusion model")
    if ar[0].args.model_type != "ar":
        raise UserError(f"--ar {args.ar} is not an autoregressive model")
    return dlm, ar, True


def _block_contestant(args: argparse.Namespace, trained: bool):
    """(model, tokenizer) of --block, or None."""
    if not args.block:
        return None
    if not trained:
        raise UserError("--block is a trained contestant: pass it with --dlm and --ar, not --preset")
    block = load(args.block)
    if block[0].args.model_type != "block":
        raise UserError(f"--block {args.block} is not a block-diffusion model (model_type block)")
    return block


def block_strategies(given: list[str] | None, block) -> list[str]:
    """The block rows' commit orders: as given, else the block model's own (its sampling.json), else confidence."""
    if given is not None:
        return given
    return [model_defaults(block[0]).strategy if block else "confidence"]


def _blocks_to_decode(model, tokenizer, prompt: str, max_tokens: int) -> int:
    """Blocks a block model decodes for max_tokens after prompt (the one holding the prompt's end included)."""
    B, P = model.args.block_size, len(tokenizer.encode(prompt))
    return -(-(P + max_tokens) // B) - P // B


class _Setting:
    """One row's sampler setting: `once(seed)` generates and keeps the last state (with a drafter, also how many
    drafts each round kept); `stats()` sums up its timed runs. The warm-up run (timed=False) measures peak memory
    where MLX reports it (not on the CPU backend)."""

    def __init__(self, model, tokenizer, prompt: str, draft=None, **options):
        self.model, self.tokenizer, self.prompt, self.draft, self.options = model, tokenizer, prompt, draft, options
        self.runs, self.kept, self.peak_memory_gb = [], [], None

    def once(self, seed: int, timed: bool = True) -> None:
        peak = not timed and backend() != "cpu"
        if peak:
            mx.reset_peak_memory()
        last = None
        for last in stream_generate(self.model, self.tokenizer, self.prompt, seed=seed, draft_model=self.draft,
                                    **self.options):
            if timed:
                self.kept.extend(last.draft_kept)
        if timed:
            self.runs.append(last)
        if peak:
            self.peak_memory_gb = mx.get_peak_memory() / 1e9

    def stats(self) -> tuple[dict, list[str]]:
        """Timing stats and the texts of every timed run (with a drafter: also tokens per round and the share of
        rounds that kept each draft position)."""
        runs = self.runs
        decode = [r.decode_seconds for r in runs]
        rates = [r.tokens_per_sec for r in runs]
        nfes = [r.nfe for r in runs]  # the same in every run, except where decoding adapts (rounds, thresholds)
        n = self.options["max_tokens"]
        stats = {"forward_tokens": runs[-1].forward_tokens,
                 "tokens_per_sec": statistics.median(rates), "tokens_per_sec_min": min(rates),
                 "tokens_per_sec_max": max(rates), "tokens_per_sec_runs": rates, "nfe": statistics.median_low(nfes),
                 "nfe_runs": nfes, "tokens_per_forward": n / statistics.mean(nfes),
                 "ms_per_forward": statistics.median(r.decode_seconds / max(r.decode_passes, 1) for r in runs) * 1e3,
                 "prompt_ms": statistics.median(r.prompt_seconds for r in runs) * 1e3,
                 "decode_ms": statistics.median(decode) * 1e3}
        if self.draft is not None:
            stats |= _draft_stats(self.kept, self.options["draft_length"])
        return stats, [self.tokenizer.decode(row) for r in runs for row in r.tokens]


def _time_in_turns(settings: list[_Setting], trials: int) -> None:
    """A warm-up run of every setting (compilation), then `trials` rounds in which each setting runs once (seed
    1 + round), so a drift in this VM's speed falls on every row alike rather than on the rows that ran during it;
    each timed run starts after `machine.settle`, so the row before it does not slow it. Meanwhile the models keep
    every row's compiled steps (`model.MEMO_MAX_ENTRIES` raised), so no timed run compiles again."""
    bound = model_module.MEMO_MAX_ENTRIES
    model_module.MEMO_MAX_ENTRIES = max(bound, MEMO_ENTRIES_WHILE_TIMING)
    try:
        for setting in settings:
            setting.once(0, timed=False)
        for i in range(trials):
            print(f"Timed round {i + 1}/{trials} of {len(settings)} rows", file=sys.stderr, flush=True)
            for setting in settings:
                settle()
                setting.once(1 + i)
    finally:
        model_module.MEMO_MAX_ENTRIES = bound


def _draft_stats(kept: list[int], draft_length: int) -> dict:
    return {"tokens_per_round": tokens_per_round(kept),
            "acceptance_by_position": acceptance_by_position(kept, draft_length)}


def _model_quality(text: str, dlm, dlm_tok, ar, ar_tok, block=None) -> dict:
    """Validation loss of the models (nats/token) and the DLM's infill accuracy on held-out windows."""
    windows = [val_windows(tok.encode_array(text), min(128, m.args.max_seq_len), max_windows=VAL_WINDOWS)
               for m, tok in ((dlm, dlm_tok), (ar, ar_tok))]
    quality = {"dlm_val_elbo": dlm_elbo(dlm, windows[0], dlm_tok.mask_id, draws=VAL_DRAWS).mean,
               "ar_val_nll": ar_nll(ar, windows[1]).mean,
               "dlm_infill_accuracy": infill_accuracy(dlm, dlm_tok.mask_id, windows[0])}
    line = f"DLM ELBO {quality['dlm_val_elbo']:.3f}, AR NLL {quality['ar_val_nll']:.3f}"
    if block is not None:
        model, tok = block
        block_windows = val_windows(tok.encode_array(text), min(128, model.args.max_seq_len), max_windows=VAL_WINDOWS)
        quality["block_val_nelbo"] = block_nelbo(model, block_windows, tok.mask_id, draws=VAL_DRAWS).mean
        line += f", block NELBO {quality['block_val_nelbo']:.3f}"
    print(f"Validation on the first {VAL_WINDOWS} held-out windows (nats/token; mlx_dlm.eval covers the whole "
          f"split): {line}; DLM infill accuracy {quality['dlm_infill_accuracy']:.3f}")
    return quality


def run(args: argparse.Namespace) -> dict:
    """All rows, the models' quality, the equal-quality summary and the machine description."""
    if args.max_tokens < 1 or args.trials < 1:
        raise UserError("--max-tokens and --trials must be at least 1")
    (dlm, dlm_tok), (ar, ar_tok), trained = _models(args)
    block = _block_contestant(args, trained)
    args.block_strategies = block_strategies(args.block_strategies, block)  # recorded with the other arguments
    info = machine_info()
    info["matmul_gflops"] = matmul_gflops()
    print(f"Machine: {describe(info)}; fp32 matmul {info['matmul_gflops']:.1f} GFLOP/s")
    print(f"DLM {dlm.num_params() / 1e6:.2f}M params, AR {ar.num_params() / 1e6:.2f}M params, "
          f"{'trained' if trained else 'random weights'}; {args.max_tokens} tokens after {args.prompt!r}")
    corpus = data.read_corpus(args.data) if trained else None  # read once: validation, judges, reference
    judges = _judges(args, corpus, dlm, ar, block) if trained else []
    quality = _model_quality(corpus, dlm, dlm_tok, ar, ar_tok, block) if trained else {}
    rows, texts = [], []
    drafters = _drafters(args, dlm, ar, ar_tok) if args.draft_lengths else {}
    plan = _plan(args)
    settings = []
    for kind, batch, options, variant in plan:
        model, tok = {"dlm": (dlm, dlm_tok), "block": block}.get(kind, (ar, ar_tok))
        draft = drafters[options["drafter"]] if kind == "spec" else None
        settings.append(_Setting(model, tok, args.prompt, draft, max_tokens=args.max_tokens, num_samples=batch,
                                 **{k: v for k, v in options.items() if k != "drafter"}))
    _time_in_turns(settings, args.trials)
    for (kind, batch, options, variant), setting in zip(plan, settings):
        model, tok = setting.model, setting.tokenizer
        blocks = _blocks_to_decode(model, tok, args.prompt, args.max_tokens) if kind == "block" else None
        stats, row_texts = setting.stats()
        strategy = {"ar": "kv-cache", "spec": "speculative"}.get(kind, options.get("strategy", "confidence"))
        row = {"model": kind, "strategy": strategy, "variant": variant,
               "steps": stats["nfe"] if kind != "ar" else None, "batch_size": batch, "max_tokens": args.max_tokens,
               **options, **stats, "peak_memory_gb": setting.peak_memory_gb}
        if kind == "dlm":  # compute-bound: achieved FLOP/s against the measured matmul rate
            length = len(tok.encode(args.prompt)) + args.max_tokens
            flops = model.flops_per_token(length) * stats["forward_tokens"]
            row["gflops_per_sec"] = flops / (stats["decode_ms"] / 1e3) / 1e9
            row["roofline_fraction"] = row["gflops_per_sec"] / info["matmul_gflops"]
        elif kind == "ar":
            row["ms_per_token"] = stats["ms_per_forward"]  # one token per sample per pass
        elif kind == "block":
            row["block_size"] = model.args.block_size
            row["steps_per_block"] = statistics.mean(stats["nfe_runs"]) / blocks  # as run
        else:
            row["ms_per_round"] = stats["ms_per_forward"]  # one drafter and one verifier pass
            row["drafter_type"] = setting.draft.args.model_type  # row["drafter"]: its name
        row["sample"] = row_texts[0][:80]
        rows.append(row)
        texts.append((repr((kind, variant, sorted(options.items()))), row_texts))  # the setting, batch aside
        _print_row(row, header=len(rows) == 1)
    results = {"machine": info, "quality": quality, "args": vars(args), "rows": rows}
    if trained:
        reference = reference_texts(corpus, len(args.prompt), args.max_tokens, args.reference_windows)
        results["judges"] = {j.name: {"self_judged": j.self_judged} for j in judges}
        results["reference"] = _add_quality(rows, texts, judges, args.prompt, reference)
        results["equal_quality"] = equal_quality(rows, args.tolerance)
        _print_quality(rows, results["reference"], judges)
        _print_summary(results["equal_quality"], args.tolerance)
    return results


def _drafters(args: argparse.Namespace, dlm, ar, ar_tok) -> dict:
    """The speculative rows' drafters by name: each --draft, else the benchmark's diffusion model."""
    if not args.draft:
        check_drafter(ar, dlm, ar_tok)
        return {args.dlm: dlm}
    if len(set(args.draft)) < len(args.draft):
        raise UserError(f"--draft names a drafter twice ({', '.join(args.draft)})")
    drafters = {}
    for name in args.draft:
        draft, draft_tok = load(name)
        check_drafter(ar, draft, ar_tok, draft_tok)
        drafters[name] = draft
    return drafters


def _judges(args: argparse.Namespace, corpus: str, dlm, ar, block=None) -> list:
    """The judges that score every setting's samples, refused if one has a contestant's weights (unless allowed)."""
    judges = load_judges(args.judge or list(DEFAULT_JUDGES), corpus)
    contestants = {f"--dlm {args.dlm}": dlm, f"--ar {args.ar}": ar}
    if block is not None:
        contestants[f"--block {args.block}"] = block[0]
    check_independent(judges, contestants, args.allow_self_judge)
    for j in judges:
        print(f"Judge {j.name}" + (f" (self-judged: it has the weights of {', '.join(j.self_judged)})"
                                   if j.self_judged else ""))
    return judges


def _add_quality(rows: list[dict], texts: list[tuple[str, list[str]]], judges: list, prompt: str,
                 reference: list[str]) -> dict:
    """Quality of each setting's samples, pooled across its rows (batch sizes), written into the rows: genPPL
    under each judge ({judge: value}), character entropy, and distinct-4 over one count of 4-grams for every
    setting and the reference. Returns the same figures for the reference (held-out text cut like samples).

    texts: (setting, samples) of each row."""
    pooled: dict[str, list[str]] = {}
    for key, row_texts in texts:
        pooled.setdefault(key, []).extend(row_texts)
    count = min(ngram_count(t, len(prompt)) for t in [*pooled.values(), reference])

    def score(samples: list[str]) -> dict:
        ppl = {}
        for j in judges:
            try:
                ppl[j.name] = generative_perplexity(j, samples, prompt)
            except UserError as err:
                ppl[j.name] = None
                print(f"note: {j.name} cannot score these samples ({err})")
        return {"gen_ppl": ppl, "quality_samples": len(samples), "entropy_bits": char_entropy(samples, prompt),
                "distinct4": distinct_ngrams(samples, len(prompt), count=count), "distinct4_count": count}

    scores = {key: score(samples) for key, samples in pooled.items()}
    for row, (key, _) in zip(rows, texts):
        row.update(scores[key])
    return {**score(reference), "windows": len(reference)}


def matches(dlm: dict, ar: dict, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """Whether a DLM row is of the AR row's quality: genPPL at most (1 + tolerance)x under every judge, distinct-4
    at least DISTINCT_RATIO x and entropy at least the AR's minus ENTROPY_MARGIN."""
    ppl_ok = all(dlm["gen_ppl"].get(j) is not None and v is not None and dlm["gen_ppl"][j] <= v * (1 + tolerance)
                 for j, v in ar["gen_ppl"].items())
    return ppl_ok and _diverse(dlm, ar)


def _diverse(dlm: dict, ar: dict) -> bool:
    return dlm["distinct4"] >= DISTINCT_RATIO * ar["distinct4"] and \
        dlm["entropy_bits"] >= ar["entropy_bits"] - ENTROPY_MARGIN


def equal_quality(rows: list[dict], tolerance: float = DEFAULT_TOLERANCE) -> list[dict]:
    """Per batch size: for each AR setting (the first is its default), the fastest DLM setting and the fastest
    block-diffusion setting that match it (`matches`; None if none does) and their speed over the AR's; and per
    judge the frontier ratio: the DLM's frontier (settings as diverse as the AR's default) over the AR's, at the AR
    default's genPPL (the block model's beside it, under "block")."""
    summary = []
    for batch in sorted({r["batch_size"] for r in rows}):
        ars = [r for r in rows if r["model"] == "ar" and r["batch_size"] == batch]
        dlm = [r for r in rows if r["model"] == "dlm" and r["batch_size"] == batch]
        blocks = [r for r in rows if r["model"] == "block" and r["batch_size"] == batch]
        if not ars or not (dlm or blocks):
            continue
        default = ars[0]
        spec = [r for r in rows if r["model"] == "spec" and r["batch_size"] == batch]
        per_ar = []
        for ar in ars:
            same = [r for r in spec if r["temp"] == ar["temp"] and not ar.get("top_k")]  # the AR's distribution
            fastest_spec = max(same, key=lambda r: r["tokens_per_sec"], default=None)
            per_ar.append({"ar": _brief(ar, ar), "fastest_match": _brief(_fastest_match(dlm, ar, tolerance), ar),
                           "block_match": _brief(_fastest_match(blocks, ar, tolerance), ar),
                           "speculative": _brief(fastest_spec, ar)})
        frontier = {}
        for judge, ppl in default["gen_ppl"].items():
            ar_front = pareto([(r["gen_ppl"][judge], r["tokens_per_sec"]) for r in ars if r["gen_ppl"].get(judge)])
            frontier[judge] = {"ar_frontier": ar_front, "at_gen_ppl": ppl, **_frontier(dlm, default, judge, ppl),
                               "block": _frontier(blocks, default, judge, ppl) if blocks else None}
        ratios = [f["speed_ratio"] for f in frontier.values()]
        summary.append({"batch_size": batch, "ar_default": _brief(default, default), "per_ar_setting": per_ar,
                        "frontier": frontier,
                        "frontier_ratio": None if None in ratios or not ratios else min(ratios)})
    return summary


def _fastest_match(rows: list[dict], ar: dict, tolerance: float) -> dict | None:
    return max((r for r in rows if matches(r, ar, tolerance)), key=lambda r: r["tokens_per_sec"], default=None)


def _frontier(rows: list[dict], default: dict, judge: str, ppl: float | None) -> dict:
    """The Pareto frontier of rows as diverse as the AR's default, and its speed at the AR default's genPPL."""
    front = pareto([(r["gen_ppl"][judge], r["tokens_per_sec"]) for r in rows
                    if r["gen_ppl"].get(judge) and _diverse(r, default)])
    speed = speed_at(front, ppl) if ppl else None
    return {"dlm_frontier": front, "dlm_tokens_per_sec": speed,
            "speed_ratio": speed / default["tokens_per_sec"] if speed else None,
            "dlm_best_gen_ppl": front[0][0] if front else None}


BRIEF_SETTING = ("temp", "top_k", "draft_length", "drafter", "block_size", "threshold",
                 "steps_per_block")  # as rows have them


def _brief(r: dict | None, ar: dict) -> dict | None:
    """A row's setting (all that `_label` names), quality and speed over the AR row's, for the summary: the
    ratio of the medians, and the paired one (`paired_speedup`)."""
    return None if r is None else {
        "model": r["model"], "variant": r["variant"], "strategy": r["strategy"], "steps": r["steps"],
        **{k: r.get(k) for k in BRIEF_SETTING}, "gen_ppl": r["gen_ppl"], "entropy_bits": r["entropy_bits"],
        "distinct4": r["distinct4"], "tokens_per_sec": r["tokens_per_sec"],
        "speedup": r["tokens_per_sec"] / ar["tokens_per_sec"], "paired_speedup": paired_speedup(r, ar)}


def paired_speedup(row: dict, ar: dict) -> dict | None:
    """The row's speed over the AR's trial by trial (the two ran within one round of `_time_in_turns`, so a drift
    in the machine's speed falls on both): the median ratio and its distribution-free 95% interval
    (`eval.median_interval`). None for rows without per-trial rates (records written before they were kept)."""
    runs, base = row.get("tokens_per_sec_runs"), ar.get("tokens_per_sec_runs")
    if not runs or not base or len(runs) != len(base):
        return None
    return asdict(median_interval([a / b for a, b in zip(runs, base)]))


def _drafter_name(r: dict) -> str:
    """A speculative row's drafter, named where the run had several (its variant then numbers it), else ""."""
    several = r.get("drafter") and r["variant"] != f"spec{r['draft_length']}"  # records before --draft repeated
    return f" ({Path(str(r['drafter'])).name})" if several else ""


def _label(r: dict) -> str:
    if r["model"] == "spec":
        return f"spec K{r['draft_length']} T{r['temp']:g}" + _drafter_name(r)
    if r["model"] == "ar":
        return f"AR T{r['temp']:g}" + (f" k{r['top_k']}" if r.get("top_k") else "")
    if r["model"] == "block":
        how = f"thr{r['threshold']:g}" if r.get("threshold") else f"{r['steps_per_block']:.3g}/block"
        order = "" if r["strategy"] == "confidence" else f" {r['strategy']}"
        return f"BD{r['block_size']} {how}{order} T{r['temp']:g}"
    head = r["variant"] if r["variant"] != "-" else f"{r['strategy']} {r['steps']}"
    return f"DLM {head} T{r['temp']:g}"


def _print_quality(rows: list[dict], reference: dict, judges: list) -> None:
    names = [j.name for j in judges]
    print(f"\nQuality (pooled over every sample of a setting; distinct-4 over {reference['distinct4_count']} "
          "4-grams each):")
    width = max([34] + [len(_label(r)) for r in rows])  # every label whole: two drafters' may share a prefix
    print(f"{'setting':<{width}} {'batch':>5} {'tok/s':>9} " + " ".join(f"{n[:14]:>14}" for n in names)
          + f" {'H(bit)':>6} {'dist4':>6}")

    def line(label, batch, tps, q):
        ppl = " ".join(f"{q['gen_ppl'][n]:>14.2f}" if q["gen_ppl"].get(n) else f"{'-':>14}" for n in names)
        print(f"{label:<{width}} {batch:>5} {tps:>9} {ppl} {q['entropy_bits']:>6.2f} {q['distinct4']:>6.3f}")

    line(f"real text ({reference['windows']} windows)", "-", "-", reference)
    for r in rows:
        line(_label(r), r["batch_size"], f"{r['tokens_per_sec']:.1f}", r)


def _paired(brief: dict) -> str:
    pair = brief.get("paired_speedup")
    if not pair:
        return ""
    return (f" (paired by trial: median {pair['median']:.2f}x, {pair['coverage']:.0%} interval "
            f"{pair['low']:.2f}-{pair['high']:.2f}x over {pair['count']} trials)")


def _print_summary(summary: list[dict], tolerance: float) -> None:
    print(f"\nEqual quality (under every judge genPPL within {tolerance:.0%} of the AR's, distinct-4 >= "
          f"{DISTINCT_RATIO}x, entropy >= AR - {ENTROPY_MARGIN} bits):")
    for s in summary:
        for item in s["per_ar_setting"]:
            ar, m = item["ar"], item["fastest_match"]
            found = (f"fastest DLM match {_label(m)}: {m['tokens_per_sec']:.1f} tok/s = "
                     f"{m['speedup']:.2f}x{_paired(m)}" if m else "no DLM setting matches")
            blk = item["block_match"]
            if blk:
                found += (f"; fastest block match {_label(blk)}: {blk['tokens_per_sec']:.1f} tok/s = "
                          f"{blk['speedup']:.2f}x{_paired(blk)}")
            spec = item["speculative"]
            if spec:
                found += (f"; speculative {_label(spec)} (the AR's own distribution): "
                          f"{spec['tokens_per_sec']:.1f} tok/s = {spec['speedup']:.2f}x{_paired(spec)}")
            print(f"  batch {s['batch_size']}, {_label(ar)} ({ar['tokens_per_sec']:.1f} tok/s): {found}")
        for judge, f in s["frontier"].items():
            if f["speed_ratio"]:
                ratio = f"{f['speed_ratio']:.2f}x the AR's speed"
            elif f["dlm_best_gen_ppl"]:
                ratio = f"the frontiers do not overlap (the DLM's best genPPL is {f['dlm_best_gen_ppl']:.2f})"
            else:
                ratio = "no DLM setting is as diverse as the AR's default"
            print(f"  batch {s['batch_size']}, frontier under {judge} at the AR default's genPPL "
                  f"{f['at_gen_ppl']:.2f}: {ratio}")
            b = f.get("block")
            if b:
                best = f"{b['dlm_best_gen_ppl']:.2f}" if b["dlm_best_gen_ppl"] else "none as diverse as the AR"
                print("    block diffusion: " + (f"{b['speed_ratio']:.2f}x the AR's speed" if b["speed_ratio"] else
                                                 f"the frontiers do not overlap (its best genPPL: {best})"))


def _plan(args: argparse.Namespace) -> list[tuple[str, int, dict, str]]:
    """(model, batch size, sampler options, variant label) of every row; the first AR row is its default.

    The first DLM temperature runs every DLM row; further temperatures only the confidence-ordered ones (the
    settings that can reach the AR model's quality). Block rows run at --variant-steps without cache, with the
    prefix cache and with the dual cache, and with the dual cache at each --thresholds value (Fast-dLLM)."""
    plan = []
    for b in args.batch_size:
        for i, temp in enumerate(args.ar_temps):
            for j, k in enumerate(args.ar_top_k):
                label = "-" if i == j == 0 else f"T{temp:g}" + (f",k{k}" if k else "")
                plan.append(("ar", b, dict(temp=temp, top_k=k), label))
        if args.block:
            for s in args.block_strategies:
                name = "" if s == "confidence" else f"-{s}"
                plan += [("block", b, dict(block_steps=k, temp=temp, strategy=s), f"bd{k}{name}")
                         for temp in args.temp for k in args.block_steps]
                plan += [("block", b, dict(threshold=p, temp=temp, strategy=s), f"bd-thr{p:g}{name}")
                         for temp in args.temp for p in args.block_thresholds]
        drafters = args.draft or [args.dlm]
        plan += [("spec", b, dict(temp=temp, draft_length=k, drafter=name),
                  f"spec{k}" + (f"-{i + 1}" if len(drafters) > 1 else "")) for temp in args.ar_temps
                 for k in args.draft_lengths for i, name in enumerate(drafters)]
        for i, temp in enumerate(args.temp):
            strategies = args.strategies if i == 0 else [s for s in args.strategies if s == "confidence"]
            dlm = [(dict(strategy=s, steps=k), "-") for s in strategies for k in args.steps]
            dlm += [(dict(strategy="confidence", threshold=p), f"thr{p:g}") for p in args.thresholds]
            for n in args.block_lengths:
                dlm += [(dict(strategy="confidence", steps=args.variant_steps, block_length=n, cache=cache),
                         f"blk{n}" + (f"+{cache}" if cache else "")) for cache in BLOCK_CACHES]
                dlm += [(dict(strategy="confidence", threshold=p, block_length=n, cache="dual"), f"blk{n}+dual+thr{p:g}")
                        for p in args.thresholds]
            if i == 0:
                dlm += [(dict(strategy="confidence", steps=args.variant_steps, remask=r), f"remask{r:g}")
                        for r in args.remask]
            plan += [("dlm", b, {**options, "temp": temp}, label) for options, label in dlm]
    return plan


# (row key, header, width, format spec)
COLUMNS = [("model", "model", 5, ""), ("strategy", "strategy", 10, ""), ("variant", "variant", 17, ""),
           ("temp", "temp", 4, "g"), ("steps", "steps", 5, ""),
           ("batch_size", "batch", 5, ""), ("tokens_per_sec", "tok/s", 9, ".1f"), ("tokens_per_sec_min", "min", 9, ".1f"),
           ("tokens_per_sec_max", "max", 9, ".1f"), ("nfe", "NFE", 5, ""), ("tokens_per_forward", "tok/fw", 6, ".2f"),
           ("ms_per_forward", "ms/fw", 8, ".2f"), ("prompt_ms", "prompt_ms", 9, ".2f"),
           ("roofline_fraction", "%peak", 6, ".1%")]


def _print_row(row: dict, header: bool) -> None:
    if header:
        print(" ".join(h.rjust(w) for _, h, w, _ in COLUMNS))
    print(" ".join(("-" if row.get(k) is None else format(row[k], spec)).rjust(w) for k, _, w, spec in COLUMNS),
          flush=True)


def _family(row: dict) -> str:
    """Legend group of a row in the plots."""
    if row["model"] == "ar":
        return "AR, KV cache (temperature, top-k)"
    if row["model"] == "spec":
        drafter = "block model" if row.get("drafter_type") == "block" else "DLM"
        return f"speculative: {drafter} drafts K, AR verifies" + _drafter_name(row)
    if row["model"] == "block":
        return f"block diffusion B={row['block_size']} (passes per block, threshold)"
    v = row["variant"]
    if v == "-":
        return f"DLM {row['strategy']}, steps 8-128"
    return "DLM " + {"t": "confidence threshold", "b": "blocks (no cache / prefix / dual)", "r": "remasking"}[v[0]]


def plot(results: dict, path: str) -> None:
    """Trained pairs: tokens/s against genPPL, one panel per judge and batch size, with both Pareto frontiers and
    the real-text level. Random weights: tokens/s against DLM steps with the AR model as lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'mlx-dlm[plot]'") from None
    rows = results["rows"]
    batches = sorted({r["batch_size"] for r in rows})
    judges = list(results.get("judges", {})) or [None]
    fig, axes = plt.subplots(len(judges), len(batches), figsize=(6.5 * len(batches), 5.5 * len(judges)),
                             squeeze=False)
    families = sorted({_family(r) for r in rows})
    style = {f: (f"C{i}", "s" if f.startswith("AR") else "o^vD<>P*"[i % 8]) for i, f in enumerate(families)}
    for judge, panel_row in zip(judges, axes):
        for ax, batch in zip(panel_row, batches):
            sel = [r for r in rows if r["batch_size"] == batch]
            if judge is None:
                _speed_panel(ax, sel, families, style)
            else:
                _quality_panel(ax, results, judge, batch, sel, families, style)
            ax.set_yscale("log")
            ax.set_ylabel("generated tokens / s (higher is better)")
            ax.set_title(f"batch {batch}" + (f", quality judged by {judge}" if judge else ""), fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="best")
    machine = results["machine"]
    cpu = f"{machine['cpu']}, " if machine.get("cpu") else ""  # records from before it was kept have none
    fig.suptitle(f"mlx-dlm decode speed against quality: {machine['backend']} backend, {cpu}{machine['cores']} "
                 f"cores, mlx {machine['mlx']}, {rows[0]['max_tokens']} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _speed_panel(ax, sel: list[dict], families: list[str], style: dict) -> None:
    for family in families:
        pts = [r for r in sel if _family(r) == family and r["model"] == "dlm"]
        if pts:
            color, marker = style[family]
            ax.scatter([r["steps"] for r in pts], [r["tokens_per_sec"] for r in pts], color=color, marker=marker,
                       label=family, zorder=3)
    for r in sel:
        if r["model"] == "ar":
            ax.axhline(r["tokens_per_sec"], color="grey", linewidth=1, label="AR, KV cache")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("DLM denoising steps (forward passes) for %d tokens" % sel[0]["max_tokens"])


def _quality_panel(ax, results: dict, judge: str, batch: int, sel: list[dict], families: list[str],
                   style: dict) -> None:
    for family in families:
        pts = [r for r in sel if _family(r) == family and r["gen_ppl"].get(judge)]
        if pts:
            color, marker = style[family]
            ax.scatter([r["gen_ppl"][judge] for r in pts], [r["tokens_per_sec"] for r in pts], color=color,
                       marker=marker, label=family, zorder=3)
            for r in pts:
                ax.annotate(_label(r).removeprefix("DLM "), (r["gen_ppl"][judge], r["tokens_per_sec"]), fontsize=5,
                            xytext=(3, 2), textcoords="offset points")
    summary = next((s for s in results.get("equal_quality", []) if s["batch_size"] == batch), None)
    if summary and judge in summary["frontier"]:
        f = summary["frontier"][judge]
        block = (f.get("block") or {}).get("dlm_frontier")
        for points, color, label in ((f["ar_frontier"], "black", "AR frontier"),
                                     (f["dlm_frontier"], "C3", "DLM frontier (as diverse as AR T1)"),
                                     (block, "C2", "block frontier (as diverse as AR T1)")):
            if points:
                ax.plot(*zip(*points), color=color, linewidth=1.2, marker="+", markersize=9, label=label, zorder=2)
    real = results["reference"]["gen_ppl"].get(judge)
    if real:
        ax.axvline(real, color="green", linestyle="--", linewidth=1, label=f"real held-out text ({real:.2f})")
    ax.set_xlabel(f"genPPL per character under {judge} (lower is better)")
    ax.set_xscale("log")


def main(argv: list[str] | None = None) -> None:
    """Run the sweep, print the table, write --out and --plot."""
    args = setup_arg_parser().parse_args(argv)
    with blas_threads(args.blas_threads):
        results = run(args)
    if args.out:
        write_results(args.out, results)
    if args.plot:
        plot(results, args.plot)
        print(f"Wrote {args.plot}")
