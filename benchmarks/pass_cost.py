"""The cost of one pass at batch 1: a block model's pass over B (or 2B, folded) positions, and the AR model's
speculative verify pass over K + 1 positions, against the AR model's decode step, with a KV cache already holding
`context` positions.

    mlx_dlm.benchmark passes --ar shakespeare-ar --block shakespeare-block --contexts 64,256,512,960
    mlx_dlm.benchmark passes --ar shakespeare-ar --block shakespeare-block2 --rows 1,2,4,6,8   # cost against rows

Each pass is the model's forward alone, compiled, as the samplers run it (`block_decode`'s cached pass, the AR's
one-token step, `speculative`'s verify pass); --trials timed passes of each after a warm-up, taken in turns (`TURNS`)
with the row's other passes, the median reported. A block model beats the AR at equal tokens per pass only when its
pass costs less than (tokens committed per pass) x the AR's step; speculative decoding, even with a drafter that cost
nothing, only when a round's tokens exceed (verify pass / AR step).

--rows R1,R2,...: also the block model's cached pass over R positions (each sees the cache and all R), in the same
turns, and the straight line through them by least squares, ms = fixed + per_row x R: what a pass costs before its
rows and what each row adds. A decoder that commits c tokens a pass of R rows runs at c x AR step / (fixed +
per_row x R) of the AR's speed, before its sampling and loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from mlx_dlm.block_decode import cached_pass
from mlx_dlm.errors import UserError
from mlx_dlm.io import load
from mlx_dlm.model import KVCache

from .machine import add_blas_threads_flag, blas_threads, describe, machine_info, settle, write_results
from .throughput import _int_list


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_dlm.benchmark passes", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ar", required=True, help="autoregressive model (directory or shipped name)")
    p.add_argument("--block", required=True, help="block-diffusion model")
    p.add_argument("--contexts", type=_int_list, default=_int_list("64,256,512,960"),
                   help="positions already in the cache")
    p.add_argument("--draft-length", type=int, help="K of the verify pass (K + 1 positions; default: B)")
    p.add_argument("--rows", type=_int_list, default=[],
                   help="also time the block model's pass over this many positions, and fit ms = fixed + per_row x R")
    p.add_argument("--trials", type=int, default=200, help="timed passes per row")
    p.add_argument("--out", help="write the rows and machine info as JSON")
    add_blas_threads_flag(p)
    return p


TURNS = 10  # each row's timed passes are split into this many turns, taken in rotation with the other rows'


def _in_turns(passes: dict, trials: int) -> dict[str, float]:
    """Median ms of each pass, timed in turns: every pass runs trials / TURNS times, then the next, TURNS rounds, so
    a drift in this VM's speed falls on every pass of a row alike. passes: name -> (call, reset); 5 warm-up passes
    each (compilation)."""
    times = {name: [] for name in passes}
    for turn in range(-1, TURNS):
        for name, (call, reset) in passes.items():
            count = 5 if turn < 0 else -(-trials // TURNS)
            settle()
            for _ in range(count):
                reset()
                tic = time.perf_counter()
                mx.eval(call())
                if turn >= 0:
                    times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def ar_step(model, context: int, rows: int = 1) -> tuple:
    """(call, reset) of an AR pass over `rows` new positions: a decode step (1), a speculative verify pass (K + 1)."""
    cache = KVCache(model.args, 1, context + rows)
    step = mx.compile(lambda token: model(token, cache=cache, advance=0), inputs=[model.state, cache.state],
                      outputs=[cache.state])
    token = mx.zeros((1, rows), dtype=mx.int32)

    def reset():
        cache.state["offset"] = mx.array(context, dtype=mx.int32)

    return lambda: step(token), reset


def block_pass(model, context: int, fold: bool) -> tuple:
    """(call, reset) of a block model's cached pass over its block (with fold, the finished block before it too)."""
    B = model.args.block_size
    cache = KVCache(model.args, 1, context + 2 * B)
    run = mx.compile(cached_pass(model, cache, B, fold), inputs=[model.state, cache.state], outputs=[cache.state])
    window = mx.zeros((1, 2 * B if fold else B), dtype=mx.int32)
    first = mx.zeros((1, model.args.vocab_size))

    def reset():
        cache.state["offset"] = mx.array(context - (B if fold else 0), dtype=mx.int32)

    return lambda: run(window, first), reset


def rows_pass(model, context: int, rows: int) -> tuple:
    """(call, reset) of a block model's cached pass over `rows` new positions, each seeing the cache and all of them
    (a block is B rows, a folded pass 2B; any other layout of that many rows runs the same products)."""
    cache = KVCache(model.args, 1, context + rows)

    def forward(window):
        mask = cache.visible(cache.row_offset + mx.full((rows,), rows))
        return model(window, cache=cache, attn_mask=mask, advance=0)

    step = mx.compile(forward, inputs=[model.state, cache.state], outputs=[cache.state])
    window = mx.zeros((1, rows), dtype=mx.int32)

    def reset():
        cache.state["offset"] = mx.array(context, dtype=mx.int32)

    return lambda: step(window), reset


def line_fit(rows: list[int], ms: list[float]) -> tuple[float, float]:
    """(fixed, per_row): the least-squares line ms = fixed + per_row x rows (at least two distinct row counts)."""
    per_row, fixed = np.polyfit(np.array(rows, dtype=float), np.array(ms, dtype=float), 1)
    return float(fixed), float(per_row)


def _print_rows(rows: list[dict], counts: list[int]) -> None:
    print("\nBlock pass against its rows (ms), with the line ms = fixed + per_row x rows:")
    print(f"{'context':>8} {'AR ms/token':>12} " + " ".join(f"{f'{r} rows':>8}" for r in counts)
          + f" {'fixed':>7} {'per_row':>8}")
    for row in rows:
        print(f"{row['context']:>8} {row['ar_ms_per_token']:>12.3f} "
              + " ".join(f"{row['rows_ms'][str(r)]:>8.3f}" for r in counts)
              + f" {row['fixed_ms']:>7.3f} {row['ms_per_row']:>8.3f}")


def run(args: argparse.Namespace) -> dict:
    if args.trials < 1:
        raise UserError("--trials must be at least 1")
    if args.draft_length is not None and args.draft_length < 1:
        raise UserError("--draft-length must be at least 1")
    counts = sorted(set(args.rows))
    if len(counts) == 1:
        raise UserError("--rows needs at least two row counts to fit a line, e.g. --rows 1,2,4,8")
    ar, _ = load(args.ar)
    block, _ = load(args.block)
    if ar.args.model_type != "ar" or block.args.model_type != "block":
        raise UserError("--ar takes an autoregressive model and --block a block-diffusion model")
    reach = max([2 * block.args.block_size, *counts])  # positions a timed pass writes past the context
    too_long = [c for c in args.contexts if c + reach > min(ar.args.max_seq_len, block.args.max_seq_len)]
    if too_long:
        raise UserError(f"--contexts {too_long} do not fit the models' context")
    info = machine_info()
    B = block.args.block_size
    K = args.draft_length or B
    print(f"Machine: {describe(info)}; batch 1; block size {B}; verify pass of K + 1 = {K + 1}")
    print(f"{'context':>8} {'AR ms/token':>12} {'block ms/pass':>14} {'folded ms/pass':>15} {'pass / AR step':>15} "
          f"{'verify ms/pass':>15} {'verify / AR step':>17}")
    rows = []
    for context in args.contexts:
        times = _in_turns({
            "ar_ms_per_token": ar_step(ar, context), "block_ms_per_pass": block_pass(block, context, fold=False),
            "folded_ms_per_pass": block_pass(block, context, fold=True),
            "verify_ms_per_pass": ar_step(ar, context, rows=K + 1),
            **{f"rows {r}": rows_pass(block, context, r) for r in counts}}, args.trials)
        row = {"context": context, "block_size": B, "draft_length": K,
               **{name: ms for name, ms in times.items() if not name.startswith("rows ")}}
        if counts:
            row["rows_ms"] = {str(r): times[f"rows {r}"] for r in counts}
            row["fixed_ms"], row["ms_per_row"] = line_fit(counts, [times[f"rows {r}"] for r in counts])
        row["pass_over_ar_step"] = row["block_ms_per_pass"] / row["ar_ms_per_token"]
        row["verify_over_ar_step"] = row["verify_ms_per_pass"] / row["ar_ms_per_token"]
        rows.append(row)
        print(f"{context:>8} {row['ar_ms_per_token']:>12.3f} {row['block_ms_per_pass']:>14.3f} "
              f"{row['folded_ms_per_pass']:>15.3f} {row['pass_over_ar_step']:>15.2f} "
              f"{row['verify_ms_per_pass']:>15.3f} {row['verify_over_ar_step']:>17.2f}", flush=True)
    if counts:
        _print_rows(rows, counts)
    return {"machine": info, "args": vars(args), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    with blas_threads(args.blas_threads):
        results = run(args)
    if args.out:
        write_results(args.out, results)
