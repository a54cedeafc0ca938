"""Where does a training step's time go? An op-level profile at the step's own shapes.

    mlx_dlm.benchmark profile --preset simple_dlm --batch-size 64 --seq-len 128 --out profile.json

MLX has no per-op timer on the CPU, so each kind of op in the step is timed alone, compiled, at the exact
shapes the step uses, forward and backward (`mx.vjp`), and multiplied by how often the step runs it. The rows
are set beside the measured whole step (and its forward alone): their sum over the step says how much of the
step the table explains; the rest is what the ops cost together that they do not cost apart (scheduling,
copies between ops, memory traffic).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from mlx_dlm.diffusion import diffusion_loss
from mlx_dlm.errors import UserError
from mlx_dlm.model import PRESETS, init_model, preset_args
from mlx_dlm.train import make_optimizer, make_train_step, setup_arg_parser as train_parser

from .machine import describe, machine_info, write_results


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of `mlx_dlm.benchmark profile`."""
    p = argparse.ArgumentParser(prog="mlx_dlm.benchmark profile", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Op-level time profile of a training step.")
    p.add_argument("--preset", default="simple_dlm", help=f"model size: {', '.join(PRESETS)}")
    p.add_argument("--batch-size", type=int, default=64, help="windows per step")
    p.add_argument("--seq-len", type=int, default=128, help="window length")
    p.add_argument("--vocab-size", type=int, default=66, help="65 characters of Tiny Shakespeare + mask")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per op (the median is reported)")
    p.add_argument("--out", help="write results as JSON here")
    return p


def _time(fn, *args, repeats: int) -> float:
    """Median seconds of a compiled fn(*args), evaluated, after one warm-up call."""
    mx.eval(fn(*args))
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _fwd_bwd(op, *inputs, repeats: int) -> tuple[float, float]:
    """Seconds of op's forward, and of forward + backward (gradients of every input)."""
    fwd = mx.compile(op)
    cotangent = op(*inputs)
    both = mx.compile(lambda *xs: mx.vjp(op, list(xs), [mx.ones_like(cotangent)]))
    return _time(fwd, *inputs, repeats=repeats), _time(both, *inputs, repeats=repeats)


def op_rows(args, B: int, L: int, repeats: int) -> list[dict]:
    """(op, count per step, forward seconds, forward + backward seconds) for each kind of op in the step."""
    d, H, F, V = args.dim, args.n_heads, args.hidden_dim, args.vocab_size
    hd = d // H
    n = args.n_layers
    key = iter(mx.random.split(mx.random.key(0), 32))
    rnd = lambda *shape: mx.random.normal(shape, key=next(key))  # noqa: E731
    x, x2 = rnd(B * L, d), rnd(B, L, d)
    q, k, v = rnd(B, H, L, hd), rnd(B, H, L, hd), rnd(B, H, L, hd)
    scores = rnd(B, H, L, L)
    norm = nn.RMSNorm(d) if args.norm == "rmsnorm" else nn.LayerNorm(d, bias=args.bias)
    rows = []

    def add(name: str, count: int, op, *inputs):
        fwd, both = _fwd_bwd(op, *inputs, repeats=repeats)
        rows.append({"op": name, "count": count, "forward_s": fwd, "forward_backward_s": both,
                     "step_s": both * count})

    add(f"qkv projection ({B * L}x{d} @ {d}x{3 * d})", n, lambda a, w: a @ w, x, rnd(d, 3 * d))
    add(f"attention scores q @ k^T ({B}x{H}x{L}x{hd})", n, lambda a, b: a @ b.swapaxes(-1, -2), q, k)
    add(f"softmax ({B}x{H}x{L}x{L})", n, lambda s: mx.softmax(s, axis=-1), scores)
    add(f"attention x values ({B}x{H}x{L}x{L} @ {L}x{hd})", n, lambda p, b: p @ b, scores, v)
    add(f"fused scaled_dot_product_attention ({B}x{H}x{L}x{hd}), instead of the three above", 0,
        lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, scale=hd ** -0.5), q, k, v)
    add("head transposes (B,L,H,hd) <-> (B,H,L,hd), 4 per layer", 4 * n,
        lambda a: a.reshape(B, L, H, hd).transpose(0, 2, 1, 3).reshape(B, H, L * hd) * 1.0, x2)
    if args.attn_out_proj:
        add(f"attention output projection ({B * L}x{d} @ {d}x{d})", n, lambda a, w: a @ w, x, rnd(d, d))
    add(f"{args.norm} ({B}x{L}x{d})", 2 * n + int(args.final_norm), lambda a: norm(a), x2)
    add(f"MLP in ({B * L}x{d} @ {d}x{F})" + (" x2 (gate)" if args.mlp == "swiglu" else ""),
        n * (2 if args.mlp == "swiglu" else 1), lambda a, w: a @ w, x, rnd(d, F))
    act = {"relu": nn.relu, "gelu": nn.gelu, "swiglu": nn.silu}[args.mlp]
    add(f"{args.mlp} activation ({B * L}x{F})", n, lambda a: act(a), rnd(B * L, F))
    add(f"MLP out ({B * L}x{F} @ {F}x{d})", n, lambda a, w: a @ w, rnd(B * L, F), rnd(F, d))
    add(f"residual adds ({B}x{L}x{d})", 2 * n, lambda a, b: a + b, x2, rnd(B, L, d))
    targets = mx.random.randint(0, V, (B * L,), key=next(key))
    add(f"output layer + cross-entropy ({B * L}x{d} @ {d}x{V})", 1,
        lambda a, w: nn.losses.cross_entropy(a @ w, targets).mean(), x, rnd(d, V))
    return rows


def measure(p: argparse.Namespace) -> dict:
    """The whole step, its forward, and the op rows."""
    model = init_model(preset_args(p.preset, vocab_size=p.vocab_size), seed=0)
    a = model.args
    if p.seq_len > a.max_seq_len:
        raise UserError(f"--seq-len {p.seq_len} exceeds the {p.preset} context of {a.max_seq_len}")
    batch = mx.random.randint(1, p.vocab_size, (p.batch_size, p.seq_len), key=mx.random.key(1))
    t = mx.full((p.batch_size,), 0.5)
    forward = mx.compile(lambda b: model(b, t))
    forward_s = _time(forward, batch, repeats=p.repeats)
    opt = make_optimizer(train_parser().parse_args(["--iters", "1000"]))
    step = make_train_step(model, opt, partial(diffusion_loss, mask_id=0, loss="masked-mean"), 1.0)
    step_s = _time(step, batch, repeats=p.repeats)
    rows = op_rows(a, p.batch_size, p.seq_len, p.repeats)
    explained = sum(r["step_s"] for r in rows)
    matmul = sum(r["step_s"] for r in rows if "@" in r["op"])
    forward_matmul = sum(r["forward_s"] * r["count"] for r in rows if "@" in r["op"])
    return {"preset": p.preset, "batch_size": p.batch_size, "seq_len": p.seq_len, "step_s": step_s,
            "forward_s": forward_s, "rows": rows, "explained_s": explained, "explained_fraction": explained / step_s,
            "matmul_fraction_of_step": matmul / step_s, "matmul_fraction_of_forward": forward_matmul / forward_s}


def main(argv: list[str] | None = None) -> None:
    """Profile and print the table."""
    p = setup_arg_parser().parse_args(argv)
    for name in ("batch_size", "seq_len", "repeats"):
        if getattr(p, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    info = machine_info()
    print(f"Machine: {describe(info)}")
    r = measure(p)
    print(f"{p.preset}, batch {p.batch_size} x {p.seq_len}: step {r['step_s'] * 1e3:.1f} ms, forward "
          f"{r['forward_s'] * 1e3:.1f} ms")
    print(f"{'op':<72} {'count':>5} {'fwd ms':>8} {'fwd+bwd':>8} {'per step':>9} {'share':>6}")
    for row in sorted(r["rows"], key=lambda x: -x["step_s"]):
        print(f"{row['op'][:72]:<72} {row['count']:>5} {row['forward_s'] * 1e3:>8.2f} "
              f"{row['forward_backward_s'] * 1e3:>8.2f} {row['step_s'] * 1e3:>9.1f} "
              f"{row['step_s'] / r['step_s']:>6.1%}")
    print(f"Explained: {r['explained_fraction']:.0%} of the step; matmuls {r['matmul_fraction_of_step']:.0%} of the "
          f"step and {r['matmul_fraction_of_forward']:.0%} of the forward")
    if p.out:
        write_results(p.out, {"machine": info, **r})
