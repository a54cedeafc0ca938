"""Training speed: compiled optimizer steps per second and tokens per second for a preset.

    mlx_dlm.benchmark train --preset simple_dlm --batch-size 64 --seq-len 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import mlx.core as mx
import numpy as np

from mlx_dlm.diffusion import LOSSES, diffusion_loss
from mlx_dlm.errors import TORCH_CPU_HINT, UserError
from mlx_dlm.model import PRESETS, init_model, preset_args
from mlx_dlm.step import default_cpu_streams, make_optimizer, make_train_step

from .machine import describe, machine_info, write_results


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of `mlx_dlm.benchmark train`."""
    p = argparse.ArgumentParser(prog="mlx_dlm.benchmark train", description="Measure training speed.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="simple_dlm", help=f"model size: {', '.join(PRESETS)}")
    p.add_argument("--batch-size", type=int, default=64, help="windows per step")
    p.add_argument("--seq-len", type=int, default=128, help="window length")
    p.add_argument("--vocab-size", type=int, default=66, help="65 characters of Tiny Shakespeare + mask")
    p.add_argument("--loss", choices=LOSSES, default="masked-mean", help="masked-mean is simple_dlm's step")
    p.add_argument("--cpu-streams", help="comma list of batch splits to time (mlx_dlm.train --cpu-streams; "
                                         "default: the trainer's default here)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side-by-side (run when torch imports)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per trial")
    p.add_argument("--trials", type=int, default=3, help="timed trials (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--out", help="write results as JSON here")
    return p


def measure(preset: str, batch_size: int, seq_len: int, vocab_size: int, loss: str, steps: int, trials: int,
            warmup: int, streams: int = 1) -> dict:
    """Median seconds per compiled training step (the trainer's, with `streams` CPU streams) over trials, with
    derived rates."""
    model = init_model(preset_args(preset, vocab_size=vocab_size), seed=0)
    if seq_len > model.args.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the {preset} context of {model.args.max_seq_len}")
    step = make_train_step(model, make_optimizer(iters=warmup + steps * trials), partial(diffusion_loss, mask_id=0, loss=loss), 1.0,
                           streams=streams)
    rng = np.random.default_rng(0)
    batch = lambda: mx.array(rng.integers(1, vocab_size, size=(batch_size, seq_len), dtype=np.int32))  # noqa: E731
    for _ in range(warmup):
        step(batch())
    per_step = []
    for _ in range(trials):
        batches = [batch() for _ in range(steps)]
        tic = time.perf_counter()
        for b in batches:
            step(b)  # evaluates state before returning
        per_step.append((time.perf_counter() - tic) / steps)
    sec = statistics.median(per_step)
    tokens = batch_size * seq_len
    flops = 3 * model.flops_per_token(seq_len) * tokens  # forward + backward ~ 3x forward
    return {"preset": preset, "params": model.num_params(), "batch_size": batch_size, "seq_len": seq_len,
            "cpu_streams": streams,
            "steps_per_sec": 1 / sec, "tokens_per_sec": tokens / sec, "ms_per_step": sec * 1e3,
            "ms_per_step_min": min(per_step) * 1e3, "ms_per_step_max": max(per_step) * 1e3,
            "gflops_per_sec": flops / sec / 1e9}


def measure_torch(args: argparse.Namespace, mlx_row: dict) -> dict | None:
    """simple_dlm's own PyTorch step at the same size, batch and length (None when torch or the layout is missing)."""
    try:
        import torch

        from .torch_simple_dlm import seconds_per_step
    except ImportError:
        print(f"torch not installed: no PyTorch side-by-side (the CPU build: {TORCH_CPU_HINT})")
        return None
    p = preset_args(args.preset, vocab_size=args.vocab_size)
    if (p.mlp, p.norm, p.pos_emb, p.n_heads, p.attn_out_proj) != ("relu", "layernorm", "learned", 1, False):
        print(f"no PyTorch side-by-side: the {args.preset} preset is not simple_dlm's layout")
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    times = seconds_per_step(args.vocab_size, p.dim, p.n_layers, args.batch_size, args.seq_len,
                             args.steps * args.trials, args.warmup)
    sec = statistics.median(times)
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps_per_sec": 1 / sec,
            "tokens_per_sec": args.batch_size * args.seq_len / sec, "ms_per_step": sec * 1e3,
            "mlx_over_torch": mlx_row["steps_per_sec"] * sec}


def main(argv: list[str] | None = None) -> None:
    """Run the training benchmark and print one result line."""
    args = setup_arg_parser().parse_args(argv)
    for name in ("batch_size", "seq_len", "steps", "trials"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    try:
        streams = [int(v) for v in args.cpu_streams.split(",")] if args.cpu_streams else \
            [default_cpu_streams(args.batch_size, args.seq_len)]
    except ValueError:
        raise UserError(f"--cpu-streams must be a comma list of integers, got {args.cpu_streams!r}") from None
    if any(n < 1 or args.batch_size % n for n in streams):
        raise UserError(f"each --cpu-streams value must be at least 1 and divide --batch-size {args.batch_size}")
    info = machine_info()
    print(f"Machine: {describe(info)}")
    rows = []
    for n in streams:
        r = measure(args.preset, args.batch_size, args.seq_len, args.vocab_size, args.loss, args.steps, args.trials,
                    args.warmup, n)
        rows.append(r)
        print(f"train {r['preset']} ({r['params'] / 1e6:.2f}M params), batch {r['batch_size']} x {r['seq_len']}, "
              f"{n} CPU stream{'s' if n > 1 else ''}: {r['steps_per_sec']:.2f} steps/s, "
              f"{r['tokens_per_sec']:,.0f} tokens/s, {r['ms_per_step']:.1f} ms/step (min {r['ms_per_step_min']:.1f}, "
              f"max {r['ms_per_step_max']:.1f}), ~{r['gflops_per_sec']:.1f} GFLOP/s", flush=True)
    default = default_cpu_streams(args.batch_size, args.seq_len)  # what mlx_dlm.train runs here is set against torch
    r = next((x for x in rows if x["cpu_streams"] == default), rows[-1])
    results = {"machine": info, "train": r, "train_rows": rows}
    torch_row = None if args.no_torch else measure_torch(args, r)
    if torch_row is not None:
        results["torch"] = torch_row
        for row in rows:
            row["mlx_over_torch"] = row["steps_per_sec"] * torch_row["ms_per_step"] / 1e3
        print(f"torch {torch_row['torch']} same step ({torch_row['threads']} threads): "
              f"{torch_row['steps_per_sec']:.2f} steps/s, {torch_row['tokens_per_sec']:,.0f} tokens/s, "
              f"{torch_row['ms_per_step']:.1f} ms/step; MLX ({r['cpu_streams']} CPU streams) / torch speed: "
              f"{torch_row['mlx_over_torch']:.2f}x")
    if args.out:
        write_results(args.out, results)
