"""`mlx_dlm.generate`: sample text from a model directory by parallel unmasking.

    mlx_dlm.generate --model runs/tiny --prompt "ROMEO:" --max-tokens 128 --steps 16
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from .errors import run_cli
from .io import load
from .sample import DEFAULT_MAX_TOKENS, DEFAULT_STEPS, DEFAULT_TEMP, STRATEGIES, stream_generate

DEFAULT_MODEL = "checkpoints"


def str2bool(value: str) -> bool:
    """argparse type for --verbose true/false."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of mlx_dlm.generate."""
    p = argparse.ArgumentParser(prog="mlx_dlm.generate", description="Generate text with a diffusion LM.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model directory")
    p.add_argument("--prompt", default="", help="text the sample starts with (never changed)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="positions to generate")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps (forward passes)")
    p.add_argument("--strategy", choices=STRATEGIES, default="confidence",
                   help="which masked positions to commit each step")
    p.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, help="random seed (same seed, same text)")
    p.add_argument("--verbose", type=str2bool, default=True, help="print statistics (true/false)")
    return p


def peak_memory_line() -> str:
    """mlx-lm style peak memory line, or a plain statement when the backend cannot report it."""
    if mx.metal.is_available() or mx.cuda.is_available():
        return f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB"
    return "Peak memory: not reported by the MLX CPU backend"


def _main(argv: list[str] | None) -> None:
    args = setup_arg_parser().parse_args(argv)
    model, tokenizer = load(args.model)
    last = None
    for last in stream_generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens, steps=args.steps,
                                strategy=args.strategy, temp=args.temp, top_k=args.top_k, top_p=args.top_p,
                                seed=args.seed):
        pass
    print(tokenizer.decode(last.tokens[0]))
    if args.verbose:
        print("=" * 10)
        prompt_rate = f", {last.prompt_tokens / last.prompt_seconds:.3f} tokens-per-sec" if last.prompt_seconds else ""
        print(f"Prompt: {last.prompt_tokens} tokens{prompt_rate}")
        print(f"Generation: {last.generated_tokens} tokens, {last.tokens_per_sec:.3f} "
              f"tokens-per-sec, {last.steps} steps")
        print(peak_memory_line())


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
