"""`mlx_dlm.generate`: sample text from a model directory by parallel unmasking.

    mlx_dlm.generate --model runs/tiny --prompt "ROMEO:" --max-tokens 128 --steps 16
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx

from .errors import UserError, given_flags, run_cli, warn
from .io import SHIPPED_MODELS, load
from .options import (DEFAULT_DRAFT_LENGTH, DEFAULT_MAX_TOKENS, DEFAULT_STEPS, DEFAULT_TEMP, SCHEDULES, STRATEGIES,
                      SamplerOptions, options_for, typed_fields)
from .speculative import check_drafter, draft_report
from .sample import completion, cut_at_stop, stream_generate
from .tokenizer import chat_prompt  # noqa: F401  (its home before tokenizer.py; importable from here as it was)
from .view import TerminalView, save_frames

DEFAULT_MODEL = "shakespeare-dlm"  # the reference DLM shipped in the package


def str2bool(value: str) -> bool:
    """argparse type for --verbose true/false."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of mlx_dlm.generate."""
    p = argparse.ArgumentParser(prog="mlx_dlm.generate", description="Generate text with a diffusion LM.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="A model directory's sampling.json replaces these defaults with the model's "
                                       "own (the shipped block models: left order, one character a pass); the "
                                       "flags you give override it.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model directory, shipped model ({', '.join(SHIPPED_MODELS)}) or Hugging Face repo "
                        "(user/name)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) with a repo id")
    p.add_argument("--prompt", default="", help="text the sample starts with (never changed)")
    p.add_argument("--chat", help="a user message, wrapped by the model's chat template (converted chat models); "
                                  "prints the reply, up to its end-of-turn token")
    p.add_argument("--system", help="with --chat: a system message")
    p.add_argument("--suffix", default="", help="text the sample ends with (never changed; diffusion models)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="positions to generate")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps (forward passes)")
    p.add_argument("--strategy", choices=STRATEGIES, default="confidence",
                   help="which masked positions to commit each step")
    p.add_argument("--schedule", choices=SCHEDULES, default="linear", help="how many to commit per step")
    p.add_argument("--threshold", type=float,
                   help="commit every proposal with probability >= P (at least one per step) instead of a schedule")
    p.add_argument("--block-length", type=int, default=0, help="semi-autoregressive blocks of this many positions")
    p.add_argument("--block-steps", type=int, default=0,
                   help="with blocks (a block model's, or --block-length): steps per block, in place of --steps "
                        "(0: --steps spread over the blocks)")
    p.add_argument("--cache", nargs="?", const="prefix", choices=("prefix", "dual"),
                   help="with --block-length: reuse keys/values of earlier blocks (prefix, the default of a bare "
                        "--cache), or of earlier and later ones, running the block alone (dual: Fast-dLLM)")
    p.add_argument("--cache-refresh", type=int, default=0,
                   help="with --cache, also recompute the cache every N steps (0: at block starts only)")
    p.add_argument("--remask", type=float, default=0.0,
                   help="re-mask up to this fraction of committed tokens per step, lowest confidence first")
    p.add_argument("--alg-temp", type=float, default=0.0,
                   help="draw the positions to commit from softmax(score / T) instead of best first (Dream)")
    p.add_argument("--cfg-scale", type=float, default=0.0,
                   help="classifier-free guidance against a pass with the prompt masked (LLaDA; 0: off)")
    p.add_argument("--draft", metavar="DLM_DIR",
                   help="speculative decoding: this diffusion model (full-sequence or block) drafts, --model "
                        "(autoregressive) verifies; the text follows --model's own distribution")
    p.add_argument("--draft-length", type=int, default=DEFAULT_DRAFT_LENGTH, help="tokens drafted per round")
    p.add_argument("--num-samples", type=int, default=1, help="decode this many canvases in one batch")
    p.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, help="random seed (same seed, same text)")
    p.add_argument("--verbose", type=str2bool, default=True, help="print statistics (true/false)")
    p.add_argument("--show", action="store_true", help="draw the denoising live (plain frames when not a terminal)")
    p.add_argument("--save-frames", help="write every step to FILE.html (or FILE.gif with Pillow)")
    return p


def peak_memory_line() -> str:
    """mlx-lm style peak memory line, or a plain statement when the backend cannot report it."""
    if mx.metal.is_available() or mx.cuda.is_available():
        return f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB"
    return "Peak memory: not reported by the MLX CPU backend"


def warn_ignored_options(o: SamplerOptions, given: set[str], model: str, model_type: str) -> None:
    """One warning line for each option the user gave that would have no effect with this model and options o
    (the options that run: the model's defaults under the flags given)."""
    flags = lambda names: ", ".join("--" + n.replace("_", "-") for n in names)  # noqa: E731
    if model_type == "ar":
        ignored = [n for n in SamplerOptions.DIFFUSION_ONLY if n in given]
        if ignored:
            warn(f"{flags(ignored)} only appl{'ies' if len(ignored) == 1 else 'y'} to diffusion models; {model} is "
                 "autoregressive and decodes one token per forward pass")
        return
    if model_type == "block" and {"cache", "cache_refresh"} & given:
        warn(f"{flags(sorted({'cache', 'cache_refresh'} & given))} ignored: a block model always decodes with its "
             "exact KV cache")
        return
    if "cache_refresh" in given and not o.cache:
        warn("--cache-refresh has no effect without --cache")
    if "block_steps" in given and model_type != "block" and not o.block_length:
        warn("--block-steps has no effect without blocks (--block-length, or a block model)")
    if o.threshold is not None and {"steps", "schedule", "block_steps"} & given:
        warn(f"{flags(sorted({'steps', 'schedule', 'block_steps'} & given))} ignored: --threshold decides how many "
             "to commit per step")
    elif o.block_paced(model_type) and "steps" in given:
        warn("--steps ignored: --block-steps decides the steps of each block")
    elif "steps" in given and o.steps > o.max_tokens and not o.suffix and model_type != "block":
        # (a block model's steps are spread over its blocks, the prompt's partial block among them: more is right)
        warn(f"--steps {o.steps} is more than the {o.max_tokens} positions to fill: using {o.max_tokens} "
             "(at most one step per position)")


def _run(args: argparse.Namespace, options: SamplerOptions, model, tokenizer, view: TerminalView | None,
         frames: list, prompt: str, draft=None) -> tuple:
    """Generate, drawing and collecting frames as asked; returns the last step and every step's draft_kept."""
    kept = []
    for last in stream_generate(model, tokenizer, prompt, options, draft):
        kept.extend(last.draft_kept)
        if view is not None:
            view.draw(last)
        if args.save_frames:
            frames.append(last)
    return last, kept


def _main(argv: list[str] | None) -> None:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model, args.revision)
    draft = None
    if args.draft is not None:
        draft, draft_tokenizer = load(args.draft)
        check_drafter(model, draft, tokenizer, draft_tokenizer)
    given = given_flags(parser, argv)
    if args.draft is None and "draft_length" in given:
        raise UserError("--draft-length goes with --draft (a diffusion model that drafts)")
    options = options_for(model, typed_fields(args, given), draft)
    warn_ignored_options(options, given, args.model, model.args.model_type)
    prompt = args.prompt
    if args.chat is not None:
        if args.prompt:
            raise UserError("give --chat or --prompt, not both")
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = chat_prompt(tokenizer, [*system, {"role": "user", "content": args.chat}])
    elif args.system:
        raise UserError("--system goes with --chat")
    view = TerminalView(tokenizer) if args.show else None
    frames = []
    try:
        last, kept = _run(args, options, model, tokenizer, view, frames, prompt, draft)
    finally:
        if view is not None:
            view.close()
    if args.save_frames:
        save_frames(args.save_frames, frames, tokenizer)
        print(f"Saved {len(frames)} frames to {args.save_frames}", file=sys.stderr)
    stops = getattr(tokenizer, "stop_ids", ())
    for i, row in enumerate(last.tokens):
        if len(last.tokens) > 1:
            print(f"--- sample {i + 1}")
        print(completion(tokenizer, last, i)[0] if args.chat is not None else
              tokenizer.decode(cut_at_stop(row, last.editable, stops)))
    if args.verbose:
        print("=" * 10)
        prompt_rate = f", {last.prompt_tokens / last.prompt_seconds:.3f} tokens-per-sec" if last.prompt_seconds else ""
        print(f"Prompt: {last.prompt_tokens} tokens{prompt_rate}")
        if draft is None:
            print(f"Generation: {last.generated_tokens} tokens, {last.tokens_per_sec:.3f} "
                  f"tokens-per-sec, {last.nfe} steps ({last.nfe} forward passes)")
        else:
            rounds, after = last.decode_passes, " after the prompt pass's" if last.prompt_pass_tokens else ""
            print(f"Generation: {last.generated_tokens} tokens, {last.tokens_per_sec:.3f} tokens-per-sec, "
                  f"{rounds} rounds ({rounds} drafter + {rounds} verifier passes{after})")
            print(draft_report(kept, options.draft_length))
        print(peak_memory_line())


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
