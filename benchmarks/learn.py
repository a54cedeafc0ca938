"""How fast does a recipe learn? Several training configurations on the same data and budget, in one run.

    mlx_dlm.benchmark learn --steps 200 --out learn.json --plot learn.png
    mlx_dlm.benchmark learn --config "lr 3e-3=--learning-rate 3e-3" --config "no t=--arch time_cond=false" --no-defaults

Each configuration is a set of `mlx_dlm.train` flags run by `mlx_dlm.train` itself (into --work), on top of the
common flags (data, steps, batch, window, validation). Validation uses the same windows and masks for every
configuration: the ELBO for diffusion models, the exact NLL for AR models, both nats/token. The default set:
- the default recipe (no flags);
- simple_dlm's recipe in MLX: its layout and N(0, 1) tables, Adam 1e-4 constant, masked-mean loss, one mask
  ratio for the whole batch;
- the matched AR model (the default preset, causal);
- simple_dlm's own PyTorch loop on this CPU (torch installed), given as many seconds of training as the
  default recipe took, measured by the same evaluator after conversion.
The summary answers: at equal wall time, is the default recipe lower at every PyTorch checkpoint, and how many
times fewer FLOPs does each configuration need to reach the loss the PyTorch loop ends at?
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mlx_dlm import data, train
from mlx_dlm.errors import TORCH_CPU_HINT, UserError
from mlx_dlm.tokenizer import CharTokenizer

from .machine import describe, machine_info, write_results

SIMPLE_DLM_RECIPE = ("--preset simple_dlm --init simple_dlm --learning-rate 1e-4 --warmup 0 --min-lr-ratio 1 "
                     "--weight-decay 0 --grad-clip 0 --loss masked-mean --t-sampling batch")
DEFAULT_CONFIGS = {"default recipe": "", "simple_dlm recipe (MLX)": SIMPLE_DLM_RECIPE, "matched AR": "--objective ar"}
TORCH_NAME = "simple_dlm loop (PyTorch)"


def _config(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS, got {text!r}")
    return name.strip(), flags


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of `mlx_dlm.benchmark learn`."""
    p = argparse.ArgumentParser(prog="mlx_dlm.benchmark learn", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Validation loss against steps, FLOPs and time for several recipes.")
    p.add_argument("--data", help="training text (default: Tiny Shakespeare)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per configuration")
    p.add_argument("--eval-every", type=int, default=25, help="steps between validations")
    p.add_argument("--eval-batches", type=int, default=8, help="batches of fixed validation windows")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step")
    p.add_argument("--seq-len", type=int, default=128, help="window length")
    p.add_argument("--seed", type=int, default=0, help="seed of every configuration")
    p.add_argument("--config", type=_config, action="append", default=[], metavar="NAME=FLAGS",
                   help="a configuration: a name and mlx_dlm.train flags (repeatable)")
    p.add_argument("--no-defaults", action="store_true", help="run only the --config configurations")
    p.add_argument("--no-torch", action="store_true", help="skip simple_dlm's PyTorch loop")
    p.add_argument("--work", help="folder for the runs' model directories (default: a temporary folder); finished "
                                  "runs found there with the same settings are reused")
    p.add_argument("--out", help="write results as JSON here")
    p.add_argument("--plot", help="write the plot (PNG) here; needs matplotlib")
    return p


def _curve(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "val_loss", "train_seconds", "flops")} for r in rows if "val_loss" in r]


def _finished(out: Path, args: argparse.Namespace) -> bool:
    """Whether out holds a completed run of exactly these settings (so --work makes the benchmark resumable)."""
    try:
        state = json.loads((out / "state.json").read_text())
    except (OSError, ValueError):
        return False
    saved = {k: v for k, v in state.get("args", {}).items() if k not in ("out", "resume")}
    return state.get("step") == args.iters and saved == {k: v for k, v in vars(args).items() if k in saved}


def run_config(name: str, flags: str, common: list[str], work: Path) -> dict:
    """Train one configuration with mlx_dlm.train and return its validation curve."""
    out = work / "".join(c if c.isalnum() else "_" for c in name)
    parser = train.setup_arg_parser()
    try:
        args = parser.parse_args([*common, *shlex.split(flags), "--out", str(out)])
    except SystemExit:
        raise UserError(f"configuration {name!r}: bad mlx_dlm.train flags {flags!r}") from None
    if _finished(out, args):
        print(f"== {name}: reusing the finished run in {out}", flush=True)
    else:
        print(f"== {name}: mlx_dlm.train {' '.join(shlex.split(flags))}", flush=True)
        if out.exists():
            shutil.rmtree(out)  # an unfinished or different run: start it over
        train.train(args)
        if not _finished(out, args):  # a signal stopped the run early (it saved a checkpoint): stop the benchmark
            raise UserError(f"interrupted during {name!r}; run the same command with the same --work to reuse the "
                            "finished configurations")
    from mlx_dlm.io import load

    model, _ = load(out)
    curve = _curve(out)
    return {"name": name, "flags": flags, "objective": model.args.model_type, "params": model.num_params(),
            "curve": curve, "final_val": curve[-1]["val_loss"], "train_seconds": curve[-1]["train_seconds"],
            "flops": curve[-1]["flops"]}


def run_torch(text: str, args: argparse.Namespace, seconds: float) -> dict | None:
    """simple_dlm's PyTorch loop for `seconds`, each checkpoint converted and validated like the MLX runs."""
    try:
        import torch  # noqa: F401

        from .torch_simple_dlm import train_loop
    except ImportError:
        print(f"torch not installed: no PyTorch loop (the CPU build: {TORCH_CPU_HINT})")
        return None
    import mlx.core as mx

    from mlx_dlm.convert.simple_dlm import convert
    from mlx_dlm.model import Model, preset_args

    tokenizer = CharTokenizer.from_text(text)
    tokens = tokenizer.encode_array(text)
    train_tokens, val_tokens = data.split_tokens(tokens)
    model = Model(preset_args("simple_dlm", vocab_size=tokenizer.vocab_size))
    windows = data.eval_windows(val_tokens, args.eval_batches * args.batch_size, args.seq_len)
    evaluate = train.make_evaluator(model, windows, tokenizer.mask_id, args.batch_size)
    flops_per_step = 3 * model.flops_per_token(args.seq_len) * args.batch_size * args.seq_len
    curve = []

    def on_checkpoint(step: int, elapsed: float, state: dict) -> None:
        _, weights = convert(state, tokenizer)
        model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
        curve.append({"step": step, "val_loss": evaluate(), "train_seconds": elapsed, "flops": step * flops_per_step})
        print(f"{TORCH_NAME}: step {step}, {elapsed:.1f}s, val ELBO {curve[-1]['val_loss']:.3f}", flush=True)

    print(f"== {TORCH_NAME}: {seconds:.0f} s of training", flush=True)
    train_loop(train_tokens, tokenizer.vocab_size, args.batch_size, args.seq_len, seconds, args.eval_every,
               on_checkpoint, seed=args.seed)
    return {"name": TORCH_NAME, "flags": "Adam 1e-4, one t per batch, masked-mean (simple_dlm's train.py)",
            "objective": "dlm", "params": model.num_params(), "curve": curve, "final_val": curve[-1]["val_loss"],
            "train_seconds": curve[-1]["train_seconds"], "flops": curve[-1]["flops"]}


def _interp(curve: list[dict], x_key: str, x: float) -> float | None:
    """Validation loss at x (linear between checkpoints); None outside the curve."""
    xs, ys = [c[x_key] for c in curve], [c["val_loss"] for c in curve]
    if x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def flops_to_reach(curve: list[dict], loss: float) -> float | None:
    """FLOPs at which the curve first reaches `loss` (linear between checkpoints); None if it never does."""
    for a, b in zip(curve, curve[1:]):
        if b["val_loss"] <= loss:
            if a["val_loss"] <= loss:
                return a["flops"]
            frac = (a["val_loss"] - loss) / (a["val_loss"] - b["val_loss"])
            return a["flops"] + frac * (b["flops"] - a["flops"])
    return None


def summarise(configs: list[dict], torch_row: dict | None) -> dict:
    """Equal-wall-time comparison with the PyTorch loop, and FLOPs ratios to reach its final loss."""
    if torch_row is None:
        return {}
    target, budget = torch_row["final_val"], torch_row["flops"]
    default = configs[0]
    at_checkpoints = [{"train_seconds": c["train_seconds"], "torch_val": c["val_loss"],
                       "default_val": _interp(default["curve"], "train_seconds", c["train_seconds"])}
                      for c in torch_row["curve"][1:]]
    compared = [c for c in at_checkpoints if c["default_val"] is not None]
    ratios = {}
    for c in configs:
        reach = flops_to_reach(c["curve"], target) if c["objective"] == "dlm" else None
        ratios[c["name"]] = budget / reach if reach else None
    return {"torch_final_val": target, "default_config": default["name"], "at_torch_checkpoints": at_checkpoints,
            "default_lower_at_every_checkpoint": bool(compared) and all(c["default_val"] < c["torch_val"]
                                                                        for c in compared),
            "flops_ratio_to_reach_torch_final": ratios}


def unigram_entropy(text: str) -> float:
    """Entropy (nats/char) of the character frequencies of the validation split: the plateau's level."""
    tok = CharTokenizer.from_text(text)
    _, val = data.split_tokens(tok.encode_array(text))
    p = np.bincount(val) / len(val)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def plot(results: dict, path: str) -> None:
    """Three panels, one x each (steps, FLOPs, seconds), validation loss on every y."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'mlx-dlm[plot]'") from None
    rows = results["configs"] + ([results["torch"]] if results.get("torch") else [])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, (key, label) in zip(axes, [("step", "optimizer steps"), ("flops", "training FLOPs"),
                                       ("train_seconds", "training wall time (s)")]):
        for r in rows:
            if key == "step" and r["name"] == TORCH_NAME:
                continue  # its steps run for a time budget; shown against FLOPs and time
            ax.plot([c[key] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], marker=".",
                    label=f"{r['name']} ({'NLL' if r['objective'] == 'ar' else 'ELBO'})")
        ax.axhline(results["unigram_entropy"], color="grey", linestyle=":", label="unigram entropy (plateau)")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/char)")
    axes[-1].legend(fontsize=8)  # the wall-time panel shows every row
    fig.suptitle(f"Learning speed on {results['data']}, batch {results['batch_size']} x {results['seq_len']} "
                 f"({results['machine']['processor']}, {results['machine']['backend']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    """Run every configuration, print a table, write JSON and a plot."""
    args = setup_arg_parser().parse_args(argv)
    for name in ("steps", "eval_every", "eval_batches", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    configs = ([] if args.no_defaults else list(DEFAULT_CONFIGS.items())) + args.config
    if not configs:
        raise UserError("no configuration to run: give --config NAME=FLAGS or drop --no-defaults")
    text = data.read_corpus(args.data)
    info = machine_info()
    print(f"Machine: {describe(info)}", flush=True)
    common = [*(["--data", args.data] if args.data else []), "--iters", str(args.steps), "--batch-size",
              str(args.batch_size), "--seq-len", str(args.seq_len), "--eval-every", str(args.eval_every),
              "--eval-batches", str(args.eval_batches), "--save-every", str(args.steps), "--sample-tokens", "0",
              "--report-every", str(args.steps), "--seed", str(args.seed)]
    with tempfile.TemporaryDirectory(prefix="mlx_dlm_learn_") as tmp:
        work = Path(args.work or tmp)
        rows = [run_config(name, flags, common, work) for name, flags in configs]
    torch_row = None
    if not args.no_torch and not args.no_defaults:
        torch_row = run_torch(text, args, rows[0]["train_seconds"])
    results = {"machine": info, "data": Path(args.data).name if args.data else "Tiny Shakespeare",
               "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "unigram_entropy": unigram_entropy(text), "configs": rows, "torch": torch_row,
               "summary": summarise(rows, torch_row)}
    print(f"\n{'configuration':<28} {'params':>8} {'val loss':>9} {'seconds':>8} {'TFLOP':>7}")
    for r in rows + ([torch_row] if torch_row else []):
        print(f"{r['name']:<28} {r['params'] / 1e6:>7.2f}M {r['final_val']:>9.3f} {r['train_seconds']:>8.1f} "
              f"{r['flops'] / 1e12:>7.2f}")
    s = results["summary"]
    if s:
        print(f"At equal wall time, {s['default_config']} lower than the PyTorch loop at every checkpoint: "
              f"{'yes' if s['default_lower_at_every_checkpoint'] else 'no'}")
        for name, ratio in s["flops_ratio_to_reach_torch_final"].items():
            reached = f"{ratio:.1f}x fewer FLOPs" if ratio is not None else "not reached (or not a DLM)"
            print(f"To reach the PyTorch loop's final {s['torch_final_val']:.3f}: {name}: {reached}")
    if args.out:
        write_results(args.out, results)
    if args.plot:
        plot(results, args.plot)
