"""`mlx_dlm.chat`: talk to a converted chat model (LLaDA or Dream Instruct) turn by turn.

    mlx_dlm.chat --model models/llada-8b-instruct-4bit --block-length 32 --cache --threshold 0.9

Takes every sampling option of `mlx_dlm.generate`. Each turn the whole conversation goes through the model's chat
template; the reply ends at the model's end-of-turn token. An empty line or Ctrl-D ends the chat.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError, given_flags, run_cli
from .generate import setup_arg_parser as generate_parser
from .io import load
from .options import SamplerOptions, options_for, typed_fields
from .sample import completion, stream_generate
from .tokenizer import chat_prompt

DEFAULT_CHAT_TOKENS = 256


def setup_arg_parser() -> argparse.ArgumentParser:
    """mlx_dlm.generate's flags, for a conversation."""
    p = generate_parser()
    p.prog, p.description = "mlx_dlm.chat", "Chat with a converted instruct model."
    p.set_defaults(max_tokens=DEFAULT_CHAT_TOKENS, model=None)
    return p


def chat_options(model, args: argparse.Namespace, given: set[str]) -> SamplerOptions:
    """The model's defaults under the flags given; chat's reply length (its --max-tokens default) counts as given.
    A reply is one sample with no suffix: those flags of mlx_dlm.generate are not used here."""
    return options_for(model, typed_fields(args, {*given, "max_tokens"})).replace(num_samples=1, suffix="")


def reply(model, tokenizer, messages: list[dict], options: SamplerOptions) -> str:
    """The assistant's next turn."""
    last = None
    for last in stream_generate(model, tokenizer, chat_prompt(tokenizer, messages), options):
        pass
    return completion(tokenizer, last)[0]


def _main(argv: list[str] | None) -> None:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.model is None:
        raise UserError("--model is required: a converted chat model (mlx_dlm.convert hf ...)")
    model, tokenizer = load(args.model, args.revision)
    options = chat_options(model, args, given_flags(parser, argv))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    chat_prompt(tokenizer, messages + [{"role": "user", "content": ""}])  # no template: say so before the first turn
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {args.model}; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input(">> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        answer = reply(model, tokenizer, messages, options)
        print(answer, flush=True)
        messages.append({"role": "assistant", "content": answer})


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
