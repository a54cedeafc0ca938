"""Sampling speed against simple_dlm's own PyTorch sampler: same weights, same steps, same length, same CPU.

    mlx_dlm.benchmark simple-dlm-sampler                                   # simple_dlm's size, seeded weights
    mlx_dlm.benchmark simple-dlm-sampler --checkpoint model.pt --text input.txt --out sampler.json

- `_weights`: a simple_dlm state dict (a checkpoint of its trainer, or simple_dlm's model freshly seeded at its
  full size) and its character vocabulary; `_models` loads it into simple_dlm's PyTorch model and, through
  `mlx_dlm.convert`'s simple_dlm converter, into mlx-dlm, and checks that both give the same logits.
- `_time`: a warm-up, then --trials timed samples (median, min, max) of --max-tokens after --prompt.
- Rows: simple_dlm's sampler as it is written (a Python loop over positions), the same algorithm vectorised
  in PyTorch, and mlx-dlm's sampler with the random strategy (simple_dlm's order) and with confidence, all
  at --steps forward passes. The ratio is mlx-dlm's tokens/s over simple_dlm's sampler's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from mlx_dlm import data
from mlx_dlm.errors import TORCH_CPU_HINT, UserError
from mlx_dlm.model import Model
from mlx_dlm.sample import stream_generate
from mlx_dlm.tokenizer import CharTokenizer

from .machine import describe, machine_info, write_results

PARITY_TOLERANCE = 1e-3  # max |logit difference| between the two frameworks on the same weights


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_dlm.benchmark simple-dlm-sampler",
                                description="mlx-dlm's sampler against simple_dlm's PyTorch sampler on the same "
                                            "weights (needs torch).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="a simple_dlm checkpoint (.pt); default: simple_dlm's model at its full "
                                        "size with seeded random weights (the speed does not depend on them)")
    p.add_argument("--text", help="the training text, whose characters are the vocabulary (default: Tiny Shakespeare)")
    p.add_argument("--steps", type=int, default=20, help="forward passes per sample (simple_dlm uses 20)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated after the prompt")
    p.add_argument("--prompt", default="ROMEO:", help="text every sample starts with")
    p.add_argument("--trials", type=int, default=5, help="timed samples per row (the median is reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the first trial")
    p.add_argument("--out", help="write the rows and machine info as JSON")
    return p


def _weights(args: argparse.Namespace, tokenizer: CharTokenizer) -> dict[str, np.ndarray]:
    from mlx_dlm.convert.checkpoint import load_torch, to_numpy

    from .torch_simple_dlm import SimpleDLM

    if args.checkpoint:
        obj = load_torch(args.checkpoint)
        return to_numpy(obj.get("model", obj))
    import torch

    torch.manual_seed(args.seed)
    return to_numpy(SimpleDLM(tokenizer.vocab_size).state_dict())


def _models(args: argparse.Namespace):
    """(simple_dlm's PyTorch model, the converted mlx-dlm model, tokenizer), checked to agree."""
    try:
        import torch
    except ImportError:
        raise UserError(f"this benchmark runs simple_dlm's PyTorch sampler and needs torch: {TORCH_CPU_HINT}") from None
    from mlx_dlm.convert import simple_dlm

    from .torch_simple_dlm import SimpleDLM

    tokenizer = CharTokenizer.from_text(data.read_corpus(args.text))
    state = _weights(args, tokenizer)
    model_args, weights = simple_dlm.convert(state, tokenizer)
    mlx_model = Model(model_args)
    mlx_model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    mx.eval(mlx_model.parameters())
    fused = state["layers.0.1.weight"].shape[0] == 3 * model_args.dim
    torch_model = SimpleDLM(model_args.vocab_size, model_args.dim, model_args.n_layers, model_args.max_seq_len,
                            fused=fused)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    torch_model.eval()

    ids = np.random.default_rng(args.seed).integers(0, model_args.vocab_size, (1, 64))
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(ids), torch.tensor([0.5])).numpy()
    got = np.array(mlx_model(mx.array(ids), mx.array([0.5])))
    if np.abs(got - expected).max() > PARITY_TOLERANCE:
        raise UserError(f"the converted model disagrees with simple_dlm's by {np.abs(got - expected).max():.2e}")
    return torch_model, mlx_model, tokenizer


def _time(run, trials: int, tokens: int) -> dict:
    """Warm-up, then `trials` timed calls of run(seed) -> text; tokens/s stats and the last text."""
    run(0)
    seconds, text = [], ""
    for i in range(trials):
        tic = time.perf_counter()
        text = run(1 + i)
        seconds.append(time.perf_counter() - tic)
    rates = [tokens / s for s in seconds]
    return {"tokens_per_sec": statistics.median(rates), "tokens_per_sec_min": min(rates),
            "tokens_per_sec_max": max(rates), "ms_per_sample": statistics.median(seconds) * 1e3, "sample": text[:80]}


def run(args: argparse.Namespace) -> dict:
    if args.steps < 1 or args.max_tokens < 1 or args.trials < 1:
        raise UserError("--steps, --max-tokens and --trials must be at least 1")
    import torch

    from .torch_simple_dlm import sample

    torch_model, mlx_model, tokenizer = _models(args)
    prompt_ids = tokenizer.encode(args.prompt)
    length = len(prompt_ids) + args.max_tokens
    if length > mlx_model.args.max_seq_len:
        raise UserError(f"prompt + --max-tokens = {length} is longer than the model's context "
                        f"{mlx_model.args.max_seq_len}")
    info = machine_info()
    info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    print(f"Machine: {describe(info)}; torch {info['torch']} ({info['torch_threads']} threads)")
    print(f"simple_dlm model: {mlx_model.num_params() / 1e6:.2f}M params, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'seeded random weights'}; "
          f"{args.max_tokens} tokens after {args.prompt!r} in {args.steps} steps")

    def torch_row(vectorised):
        return lambda seed: tokenizer.decode(sample(torch_model, prompt_ids, length, args.steps, seed, vectorised))

    def mlx_row(strategy):
        def once(seed):
            last = None
            for last in stream_generate(mlx_model, tokenizer, args.prompt, max_tokens=args.max_tokens,
                                        steps=args.steps, strategy=strategy, seed=seed):
                pass
            return tokenizer.decode(last.tokens[0])
        return once

    plan = [("simple_dlm (PyTorch, its loop over positions)", torch_row(False)),
            ("simple_dlm's algorithm, vectorised (PyTorch)", torch_row(True)),
            ("mlx-dlm, random order (simple_dlm's)", mlx_row("random")),
            ("mlx-dlm, confidence", mlx_row("confidence"))]
    rows = []
    for name, fn in plan:
        rows.append({"sampler": name, "steps": args.steps, "max_tokens": args.max_tokens,
                     **_time(fn, args.trials, args.max_tokens)})
        print(f"{name:48s} {rows[-1]['tokens_per_sec']:9.1f} tok/s  ({rows[-1]['ms_per_sample']:.1f} ms per sample)",
              flush=True)
    base = rows[0]["tokens_per_sec"]
    for row in rows:
        row["speedup_vs_simple_dlm"] = row["tokens_per_sec"] / base
    print(f"mlx-dlm (random order) / simple_dlm's sampler: {rows[2]['speedup_vs_simple_dlm']:.2f}x; "
          f"against the vectorised PyTorch sampler: {rows[2]['tokens_per_sec'] / rows[1]['tokens_per_sec']:.2f}x")
    return {"machine": info, "args": vars(args), "params": mlx_model.num_params(), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    results = run(args)
    if args.out:
        write_results(args.out, results)
