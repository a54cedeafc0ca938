"""Decode throughput: diffusion (parallel unmasking) against the matched autoregressive baseline.

    mlx_dlm.benchmark --preset tiny --trials 3 --out results.json          # random weights: speed only
    mlx_dlm.benchmark --dlm runs/dlm --ar runs/ar --out results.json --plot results.png

Each row generates --max-tokens after the prompt: the DLM over a sweep of steps and strategies,
AR with its KV cache, at every batch size. A warm-up run first (compilation), then the median of
--trials with min and max. Quality columns (trained models only): per-character perplexity of the
row's samples under the AR model, character entropy of the samples, and each model's validation loss.
"""

from __future__ import annotations

import argparse
import json
import statistics

import mlx.core as mx

from mlx_dlm import data
from mlx_dlm.errors import UserError
from mlx_dlm.eval import ar_nll, char_entropy, dlm_elbo, generative_perplexity, val_windows
from mlx_dlm.fileio import atomic_write_text
from mlx_dlm.io import load
from mlx_dlm.model import PRESETS, init_model, preset_args
from mlx_dlm.sample import STRATEGIES, stream_generate
from mlx_dlm.tokenizer import CharTokenizer

from .machine import backend, describe, machine_info, matmul_gflops

DEFAULT_STEPS = "8,16,32,64,128"
DEFAULT_BATCH_SIZES = "1,8"
DEFAULT_PROMPT = "ROMEO:"
VAL_WINDOWS, VAL_DRAWS = 64, 2  # validation beside speed: 64 held-out windows of 128 tokens (mlx_dlm.eval for more)
# For random-weight pairs: the 65 characters of Tiny Shakespeare (newline, space, punctuation, letters).
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


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
    p.add_argument("--ar", help="trained autoregressive model directory (also scores quality)")
    p.add_argument("--preset", help=f"random-weight matched pair instead ({', '.join(PRESETS)}); speed only")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per sample")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text every sample starts with")
    p.add_argument("--steps", type=_int_list, default=_int_list(DEFAULT_STEPS), help="DLM steps to sweep")
    p.add_argument("--strategies", type=_strategy_list, default=["confidence", "random"],
                   help=f"DLM strategies to sweep ({', '.join(STRATEGIES)})")
    p.add_argument("--thresholds", type=_float_list, default=[], help="also confidence-threshold rows, e.g. 0.9,0.7")
    p.add_argument("--block-lengths", type=_int_list, default=[],
                   help="also semi-autoregressive rows per block length, each without and with the prefix cache")
    p.add_argument("--remask", type=_float_list, default=[], help="also revision rows per fraction, e.g. 0.1")
    p.add_argument("--variant-steps", type=int, default=32, help="steps of the block and remask rows")
    p.add_argument("--batch-size", type=_int_list, default=_int_list(DEFAULT_BATCH_SIZES),
                   help="batch sizes (samples decoded together)")
    p.add_argument("--temp", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--trials", type=int, default=5, help="timed generations per row (the median is reported)")
    p.add_argument("--data", help="corpus for validation losses (default: Tiny Shakespeare)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first trial")
    p.add_argument("--out", help="write rows and machine info as JSON")
    p.add_argument("--plot", help="write tokens/s against steps (PNG; needs matplotlib)")
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


def _run(model, tokenizer, prompt, trials, **options) -> tuple[dict, list[str]]:
    """Warm-up, then `trials` timed generations; timing stats and the last trial's texts."""
    def once(seed):
        last = None
        for last in stream_generate(model, tokenizer, prompt, seed=seed, **options):
            pass
        return last

    once(0)  # warm-up: compilation
    runs = [once(1 + i) for i in range(trials)]
    decode = [r.decode_seconds for r in runs]
    rates = [r.tokens_per_sec for r in runs]
    last = runs[-1]
    n = options["max_tokens"]
    return {"forward_tokens": last.forward_tokens,
        "tokens_per_sec": statistics.median(rates), "tokens_per_sec_min": min(rates),
        "tokens_per_sec_max": max(rates), "nfe": last.nfe, "tokens_per_forward": n / last.nfe,
        "ms_per_forward": statistics.median(decode) / max(last.nfe - (1 if last.prompt_pass_tokens else 0), 1) * 1e3,
        "prompt_ms": statistics.median(r.prompt_seconds for r in runs) * 1e3,
        "decode_ms": statistics.median(decode) * 1e3,
    }, [tokenizer.decode(row) for row in last.tokens]


def run(args: argparse.Namespace) -> dict:
    """All rows and the machine description."""
    if args.max_tokens < 1 or args.trials < 1:
        raise UserError("--max-tokens and --trials must be at least 1")
    (dlm, dlm_tok), (ar, ar_tok), trained = _models(args)
    info = machine_info()
    info["matmul_gflops"] = matmul_gflops()
    print(f"Machine: {describe(info)}; fp32 matmul {info['matmul_gflops']:.1f} GFLOP/s")
    print(f"DLM {dlm.num_params() / 1e6:.2f}M params, AR {ar.num_params() / 1e6:.2f}M params, "
          f"{'trained' if trained else 'random weights'}; {args.max_tokens} tokens after {args.prompt!r}")
    quality = {}
    if trained:
        text = data.read_corpus(args.data)
        windows = [val_windows(tok.encode_array(text), min(128, m.args.max_seq_len), max_windows=VAL_WINDOWS)
                   for m, tok in ((dlm, dlm_tok), (ar, ar_tok))]
        quality = {"dlm_val_elbo": dlm_elbo(dlm, windows[0], dlm_tok.mask_id, draws=VAL_DRAWS).mean,
                   "ar_val_nll": ar_nll(ar, windows[1]).mean}
        print(f"Validation (nats/token): DLM ELBO {quality['dlm_val_elbo']:.3f}, AR NLL {quality['ar_val_nll']:.3f}")
    peak_ok = backend() != "cpu"
    rows = []
    common = dict(max_tokens=args.max_tokens, temp=args.temp)
    for kind, batch, options, variant in _plan(args):
        model, tok = (dlm, dlm_tok) if kind == "dlm" else (ar, ar_tok)
        if peak_ok:
            mx.reset_peak_memory()
        stats, texts = _run(model, tok, args.prompt, args.trials, **common, num_samples=batch, **options)
        row = {"model": kind, "strategy": options.get("strategy", "kv-cache"), "variant": variant,
               "steps": stats["nfe"] if kind == "dlm" else None, "batch_size": batch, "max_tokens": args.max_tokens,
               **options, **stats, "peak_memory_gb": mx.get_peak_memory() / 1e9 if peak_ok else None}
        if kind == "dlm":  # compute-bound: achieved FLOP/s against the measured matmul rate
            length = len(tok.encode(args.prompt)) + args.max_tokens
            flops = model.flops_per_token(length) * stats["forward_tokens"]
            row["gflops_per_sec"] = flops / (stats["decode_ms"] / 1e3) / 1e9
            row["roofline_fraction"] = row["gflops_per_sec"] / info["matmul_gflops"]
        else:
            row["ms_per_token"] = stats["ms_per_forward"]  # one token per sample per pass
        if trained:
            try:
                row["gen_ppl"] = generative_perplexity(ar, ar_tok, texts, args.prompt)
            except UserError as err:
                row["gen_ppl"] = None
                print(f"note: cannot score {kind} samples with the AR model ({err})")
            row["entropy_bits"] = char_entropy(texts, args.prompt)
        row["sample"] = texts[0][:80]
        rows.append(row)
        _print_row(row, header=len(rows) == 1)
    return {"machine": info, "quality": quality, "args": vars(args), "rows": rows}


def _plan(args: argparse.Namespace) -> list[tuple[str, int, dict, str]]:
    """(model, batch size, sampler options, variant label) of every row."""
    plan = []
    for b in args.batch_size:
        plan.append(("ar", b, {}, "-"))
        plan += [("dlm", b, dict(strategy=s, steps=k), "-") for s in args.strategies for k in args.steps]
        plan += [("dlm", b, dict(strategy="confidence", threshold=p), f"thr{p:g}") for p in args.thresholds]
        for n in args.block_lengths:
            for cache in (False, True):
                plan.append(("dlm", b, dict(strategy="confidence", steps=args.variant_steps, block_length=n,
                                            cache=cache), f"blk{n}" + ("+cache" if cache else "")))
        plan += [("dlm", b, dict(strategy="confidence", steps=args.variant_steps, remask=r), f"remask{r:g}")
                 for r in args.remask]
    return plan


# (row key, header, width, format spec)
COLUMNS = [("model", "model", 5, ""), ("strategy", "strategy", 10, ""), ("variant", "variant", 11, ""),
           ("steps", "steps", 5, ""),
           ("batch_size", "batch", 5, ""), ("tokens_per_sec", "tok/s", 9, ".1f"), ("tokens_per_sec_min", "min", 9, ".1f"),
           ("tokens_per_sec_max", "max", 9, ".1f"), ("nfe", "NFE", 5, ""), ("tokens_per_forward", "tok/fw", 6, ".2f"),
           ("ms_per_forward", "ms/fw", 8, ".2f"), ("prompt_ms", "prompt_ms", 9, ".2f"),
           ("roofline_fraction", "%peak", 6, ".1%"), ("gen_ppl", "genPPL", 7, ".2f"), ("entropy_bits", "H(bit)", 6, ".2f")]


def _print_row(row: dict, header: bool) -> None:
    if header:
        print(" ".join(h.rjust(w) for _, h, w, _ in COLUMNS))
    print(" ".join(("-" if row.get(k) is None else format(row[k], spec)).rjust(w) for k, _, w, spec in COLUMNS),
          flush=True)


def plot(results: dict, path: str) -> None:
    """tokens/s against DLM steps (one line per strategy and batch), AR as horizontal lines; gen PPL on a twin axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'mlx-dlm[plot]'") from None
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax2 = ax.twinx() if any(r.get("gen_ppl") for r in rows) else None
    for i, batch in enumerate(sorted({r["batch_size"] for r in rows})):
        color = f"C{i}"
        for j, strategy in enumerate(sorted({r["strategy"] for r in rows if r["model"] == "dlm"})):
            sel = sorted((r for r in rows if r["model"] == "dlm" and r["batch_size"] == batch
                          and r["strategy"] == strategy and r.get("variant", "-") == "-"), key=lambda r: r["steps"])
            style = ["-", "--", ":"][j % 3]
            ax.plot([r["steps"] for r in sel], [r["tokens_per_sec"] for r in sel], style, marker="o", color=color,
                    label=f"DLM {strategy}, batch {batch}")
            if ax2 is not None and all(r.get("gen_ppl") for r in sel):
                ax2.plot([r["steps"] for r in sel], [r["gen_ppl"] for r in sel], style, marker="x", color=color,
                         alpha=0.4)
        for r in rows:  # thresholds, blocks, cache, remasking: single points, labelled
            if r["model"] == "dlm" and r["batch_size"] == batch and r.get("variant", "-") != "-":
                ax.scatter([r["steps"]], [r["tokens_per_sec"]], marker="s", color=color, zorder=3)
                ax.annotate(r["variant"], (r["steps"], r["tokens_per_sec"]), fontsize=7, color=color,
                            xytext=(4, 2), textcoords="offset points")
        for r in rows:
            if r["model"] == "ar" and r["batch_size"] == batch:
                ax.axhline(r["tokens_per_sec"], color=color, linewidth=1, label=f"AR (KV cache), batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("DLM denoising steps (forward passes) for %d tokens" % rows[0]["max_tokens"])
    ax.set_ylabel("generated tokens / s")
    if ax2 is not None:
        ax2.set_ylabel("generative perplexity per char under the AR model (x markers)")
    machine = results["machine"]
    ax.set_title(f"mlx-dlm decode speed, {machine['backend']} backend, {machine['cores']} cores, mlx {machine['mlx']}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Run the sweep, print the table, write --out and --plot."""
    args = setup_arg_parser().parse_args(argv)
    results = run(args)
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
        print(f"Wrote {args.out}")
    if args.plot:
        plot(results, args.plot)
        print(f"Wrote {args.plot}")
