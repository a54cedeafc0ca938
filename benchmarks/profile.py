"""Where does a training step's time go, and what cuts it? An op-level profile at the step's own shapes.

    mlx_dlm.benchmark profile --preset simple_dlm --batch-size 64 --seq-len 128 --out profile.json

- `measure_parts`: the whole compiled step (AdamW, clipping, masked-mean loss, as `mlx_dlm.benchmark train`),
  its loss and gradients alone, and the forward alone; on one CPU stream, as the op rows are timed.
- `op_rows`: MLX has no per-op timer on the CPU, so each kind of op in the step is timed alone, compiled, at
  the exact shapes the step uses, forward and backward (`mx.vjp`), and multiplied by how often the step runs
  it. Their sum over the step says how much of the step the table explains; the rest is what the ops cost
  together that they do not cost apart (scheduling, copies between ops, memory traffic).
- `VARIANTS`: the same step with one implementation choice changed (CPU streams, attention, normalisation,
  compilation, dtype), each timed beside the code as shipped (the trainer's default CPU streams), so a change is
  kept or dropped on its figure.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time
from functools import partial
from typing import Callable
from unittest import mock

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_dlm.diffusion import corrupt, diffusion_loss, sample_t
from mlx_dlm.errors import UserError
from mlx_dlm.model import PRESETS, init_model, preset_args
from mlx_dlm.step import default_cpu_streams, make_optimizer, make_train_step

from .machine import describe, machine_info, write_results


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of `mlx_dlm.benchmark profile`."""
    p = argparse.ArgumentParser(prog="mlx_dlm.benchmark profile", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Op-level time profile of a training step, and what each "
                                            "implementation choice costs.")
    p.add_argument("--preset", default="simple_dlm", help=f"model size: {', '.join(PRESETS)}")
    p.add_argument("--batch-size", type=int, default=64, help="windows per step")
    p.add_argument("--seq-len", type=int, default=128, help="window length")
    p.add_argument("--vocab-size", type=int, default=66, help="65 characters of Tiny Shakespeare + mask")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per op or step (the median is reported)")
    p.add_argument("--variants", default=",".join(VARIANTS_ORDER),
                   help="implementation variants to time against the shipped code ('' for none)")
    p.add_argument("--out", help="write results as JSON here")
    return p


def _time(fn, *args, repeats: int) -> float:
    """Median seconds of fn(*args), evaluated, after one warm-up call."""
    return _time_host(lambda: mx.eval(fn(*args)), repeats)


def _fwd_bwd(op, *inputs, repeats: int) -> tuple[float, float]:
    """Seconds of op's forward, and of forward + backward (gradients of every input)."""
    fwd = mx.compile(op)
    cotangent = op(*inputs)
    both = mx.compile(lambda *xs: mx.vjp(op, list(xs), [mx.ones_like(cotangent)]))
    return _time(fwd, *inputs, repeats=repeats), _time(both, *inputs, repeats=repeats)


def _is_matmul(name: str) -> bool:
    return "@" in name


def op_rows(model: nn.Module, B: int, L: int, repeats: int) -> list[dict]:
    """(op, count per step, forward seconds, forward + backward seconds) for each kind of op in the step.

    Rows without a backward (drawing masks, clipping, the optimizer) count their one pass for both."""
    args = model.args
    d, H, F, V = args.dim, args.n_heads, args.hidden_dim, args.vocab_size
    hd = d // H
    n = args.n_layers
    seeds = itertools.count()
    key = lambda: mx.random.key(next(seeds))  # noqa: E731
    rnd = lambda *shape: mx.random.normal(shape, key=key())  # noqa: E731
    x, x2 = rnd(B * L, d), rnd(B, L, d)
    q, k, v = rnd(B, H, L, hd), rnd(B, H, L, hd), rnd(B, H, L, hd)
    scores = rnd(B, H, L, L)
    norm = nn.RMSNorm(d) if args.norm == "rmsnorm" else nn.LayerNorm(d, bias=args.bias)
    tokens = mx.random.randint(0, V, (B, L), key=key())
    params = model.trainable_parameters()
    grads = tree_map(lambda a: mx.random.normal(a.shape, key=key()) * 1e-3, params)
    n_params = sum(a.size for _, a in tree_flatten(params))
    rows = []

    def add(name: str, count: int, op, *inputs, backward: bool = True, state=None):
        if backward:
            fwd, both = _fwd_bwd(op, *inputs, repeats=repeats)
        else:  # state: what the op updates in place (compiled as its inputs and outputs)
            compiled = mx.compile(op, inputs=state, outputs=state) if state is not None else mx.compile(op)
            fwd = both = _time(compiled, *inputs, repeats=repeats)
        rows.append({"op": name, "count": count, "forward_s": fwd, "forward_backward_s": both,
                     "step_s": both * count, "matmul": _is_matmul(name)})

    add(f"draw t and masks ({B}x{L})", 1,
        lambda toks: corrupt(toks, sample_t(B, key=mx.random.key(1)), 0, key=mx.random.key(2))[0], tokens,
        backward=False)
    table = rnd(V, d)
    add(f"token embedding + position/time adds ({B}x{L}x{d})", 1,
        lambda tab, pos: tab[tokens] + pos[None] + pos[0], table, rnd(L, d))
    add(f"qkv projection ({B * L}x{d} @ {d}x{3 * d} + bias)", n, lambda a, w, b: mx.addmm(b, a, w), x,
        rnd(d, 3 * d), rnd(3 * d))
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
    add(f"MLP in ({B * L}x{d} @ {d}x{F} + bias)" + (" x2 (gate)" if args.mlp == "swiglu" else ""),
        n * (2 if args.mlp == "swiglu" else 1), lambda a, w, b: mx.addmm(b, a, w), x, rnd(d, F), rnd(F))
    act = {"relu": nn.relu, "gelu": nn.gelu, "swiglu": nn.silu}[args.mlp]
    add(f"{args.mlp} activation ({B * L}x{F})", n, lambda a: act(a), rnd(B * L, F))
    add(f"MLP out ({B * L}x{F} @ {F}x{d} + bias)", n, lambda a, w, b: mx.addmm(b, a, w), rnd(B * L, F),
        rnd(F, d), rnd(d))
    add(f"residual adds ({B}x{L}x{d})", 2 * n, lambda a, b: a + b, x2, rnd(B, L, d))
    targets = tokens.reshape(-1)
    add(f"output layer ({B * L}x{d} @ {d}x{V} + bias)", 1, lambda a, w, b: mx.addmm(b, a, w), x, rnd(d, V), rnd(V))
    add(f"masked cross-entropy ({B * L}x{V})", 1,
        lambda lg: (nn.losses.cross_entropy(lg, targets, reduction="none") * (targets > V // 2)).sum(),
        rnd(B * L, V))
    add(f"gradient norm and clipping ({n_params / 1e6:.2f}M parameters)", 1,
        lambda g: optim.clip_grad_norm(g, 1.0), grads, backward=False)
    opt = make_optimizer(iters=1000)
    opt.init(params)
    add(f"AdamW update ({n_params / 1e6:.2f}M parameters)", 1,
        lambda g, w: opt.apply_gradients(g, w), grads, params, backward=False, state=opt.state)
    return rows


def kernel_rows(repeats: int, n: int = 64 * 128 * 1024) -> list[dict]:
    """Nanoseconds per element of exp, add and a 128-wide softmax over n float32 elements, in MLX, numpy and
    (when installed) torch at 1 and 2 threads: the micro-benchmark behind the upstream write-up."""
    x = mx.random.normal((n,), key=mx.random.key(0))
    s = x.reshape(-1, 128)
    mx.eval(x, s)
    per = lambda fn: _time_host(fn, repeats) / n * 1e9  # noqa: E731
    rows = [{"kernel": "exp", "library": "mlx", "ns_per_element": per(lambda: mx.eval(mx.exp(x)))},
            {"kernel": "add", "library": "mlx", "ns_per_element": per(lambda: mx.eval(x + x))},
            {"kernel": "softmax", "library": "mlx", "ns_per_element": per(lambda: mx.eval(mx.softmax(s, axis=-1)))}]
    xn = np.array(x)
    rows += [{"kernel": "exp", "library": "numpy", "ns_per_element": per(lambda: np.exp(xn))},
             {"kernel": "add", "library": "numpy", "ns_per_element": per(lambda: xn + xn)}]
    try:
        import torch
    except ImportError:
        return rows
    xt, before = torch.from_numpy(xn.copy()), torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        lib = f"torch, {threads} thread{'s' if threads > 1 else ''}"
        rows += [{"kernel": "exp", "library": lib, "ns_per_element": per(lambda: torch.exp(xt))},
                 {"kernel": "add", "library": lib, "ns_per_element": per(lambda: xt + xt)},
                 {"kernel": "softmax", "library": lib,
                  "ns_per_element": per(lambda: torch.softmax(xt.view(-1, 128), dim=-1))}]
    torch.set_num_threads(before)
    return rows


def _time_host(fn, repeats: int) -> float:
    """Median seconds of fn() (which finishes its own work) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def measure_parts(model: nn.Module, B: int, L: int, vocab_size: int, repeats: int, streams: int | None = None) -> dict:
    """Seconds of the whole compiled training step (with the trainer's CPU streams unless given), of its loss +
    gradients on one stream, and of the forward."""
    batch = mx.random.randint(1, vocab_size, (B, L), key=mx.random.key(1))
    t = mx.full((B,), 0.5)
    loss_fn = partial(diffusion_loss, mask_id=0, loss="masked-mean")
    forward_s = _time(mx.compile(lambda b: model(b, t)), batch, repeats=repeats)
    grad_fn = nn.value_and_grad(model, loss_fn)
    loss_grad_s = _time(mx.compile(lambda b: grad_fn(model, b, key=mx.random.key(0)), inputs=model.state,
                                   outputs=model.state), batch,
                        repeats=repeats)
    opt = make_optimizer(iters=1000)
    streams = default_cpu_streams(B, L) if streams is None else streams
    step = make_train_step(model, opt, loss_fn, 1.0, streams=streams)
    step_s = _time(step, batch, repeats=repeats)
    return {"step_s": step_s, "loss_and_gradients_s": loss_grad_s, "forward_s": forward_s, "cpu_streams": streams}


# Implementation variants, each a context manager that changes one choice while the step is built and run.

def _explicit_attention(q, k, v, scale, mask=None, softmax=partial(mx.softmax, axis=-1)):
    """q @ k^T, softmax, @ v as separate ops (what the fused call falls back to on a CPU, written out)."""
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if isinstance(mask, str):
        L, S = scores.shape[-2:]
        mask = mx.arange(S)[None, :] <= mx.arange(L)[:, None] + (S - L)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    return softmax(scores) @ v


def _composed_softmax(s):
    """Softmax from exp, max and sum: inside mx.compile the element-wise part fuses into one kernel."""
    e = mx.exp(s - mx.stop_gradient(s.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


def _composed_layer_norm(self, x):
    """LayerNorm from mean and variance: fused by mx.compile instead of the mx.fast kernel."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    y = xc * mx.rsqrt((xc * xc).mean(axis=-1, keepdims=True) + self.eps)
    if "weight" in self:
        y = y * self.weight
    return y + self.bias if "bias" in self else y


@contextlib.contextmanager
def _no_compile():
    mx.disable_compile()
    try:
        yield
    finally:
        mx.enable_compile()


VARIANTS = {
    "shipped": lambda: contextlib.nullcontext(),
    "one-stream": lambda: contextlib.nullcontext(),  # the stream count is passed to the step (see measure_variant)
    "explicit-attention": lambda: mock.patch.object(mx.fast, "scaled_dot_product_attention", _explicit_attention),
    "composed-softmax": lambda: mock.patch.object(
        mx.fast, "scaled_dot_product_attention", partial(_explicit_attention, softmax=_composed_softmax)),
    "composed-layernorm": lambda: mock.patch.object(nn.LayerNorm, "__call__", _composed_layer_norm),
    "not-compiled": _no_compile,
    "bfloat16": lambda: contextlib.nullcontext(),  # the dtype is set on the model (see measure_variant)
}
VARIANTS_ORDER = tuple(VARIANTS)
VARIANT_NOTES = {
    "shipped": "as shipped: mx.fast attention and norms, compiled step, float32, the trainer's CPU streams",
    "one-stream": "the whole batch on one CPU stream, BLAS on every core (before --cpu-streams)",
    "explicit-attention": "attention as q @ k^T, mx.softmax, @ v",
    "composed-softmax": "attention with a softmax from exp / max / sum (fused by compile)",
    "composed-layernorm": "LayerNorm from mean / variance ops (fused by compile)",
    "not-compiled": "the step without mx.compile",
    "bfloat16": "parameters and activations in bfloat16",
}


def _variant_runners(name: str, preset: str, vocab_size: int, B: int, L: int) -> tuple[Callable, Callable]:
    """(forward, step) of a fresh model (same seed) built under the variant, each evaluating its result."""
    with VARIANTS[name]():
        model = init_model(preset_args(preset, vocab_size=vocab_size), seed=0)
        if name == "bfloat16":
            model.set_dtype(mx.bfloat16)
        batch = mx.random.randint(1, vocab_size, (B, L), key=mx.random.key(1))
        t = mx.full((B,), 0.5)
        forward = mx.compile(lambda: model(batch, t))
        opt = make_optimizer(iters=1000)
        streams = 1 if name == "one-stream" else default_cpu_streams(B, L)
        step = make_train_step(model, opt, partial(diffusion_loss, mask_id=0, loss="masked-mean"), 1.0,
                               streams=streams)
    return (lambda: mx.eval(forward())), (lambda: step(batch))


def measure_variants(names: list[str], preset: str, vocab_size: int, B: int, L: int, repeats: int) -> list[dict]:
    """Step and forward seconds of each variant, timed in turns (one of each per round, each round starting
    with the next variant, `repeats` rounds, the median kept), so a drift in the machine's speed during the run
    falls on every variant alike."""
    runners = {}
    for name in names:  # build and warm up (tracing and compiling happen under the variant)
        forward, step = _variant_runners(name, preset, vocab_size, B, L)
        with VARIANTS[name]():
            forward(), step()
        runners[name] = (forward, step)
        print(f"  built variant {name}", flush=True)
    times = {name: ([], []) for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # each round starts with another variant
        for name in order:
            fns = runners[name]
            with VARIANTS[name]():
                for fn, out in zip(fns, times[name]):
                    tic = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - tic)
    return [{"variant": n, "what": VARIANT_NOTES[n], "forward_s": statistics.median(times[n][0]),
             "step_s": statistics.median(times[n][1]), "step_min_s": min(times[n][1]),
             "step_max_s": max(times[n][1])} for n in names]


def measure(p: argparse.Namespace) -> dict:
    """The whole step, its parts, the op rows and the variants."""
    args = preset_args(p.preset, vocab_size=p.vocab_size)
    if p.seq_len > args.max_seq_len:
        raise UserError(f"--seq-len {p.seq_len} exceeds the {p.preset} context of {args.max_seq_len}")
    model = init_model(args, seed=0)
    parts = measure_parts(model, p.batch_size, p.seq_len, p.vocab_size, p.repeats, streams=1)  # ops run serially
    print(f"  measured the whole step: {parts['step_s'] * 1e3:.1f} ms", flush=True)
    rows = op_rows(model, p.batch_size, p.seq_len, p.repeats)
    print(f"  measured {len(rows)} op rows", flush=True)
    explained = sum(r["step_s"] for r in rows)
    matmul = sum(r["step_s"] for r in rows if r["matmul"])
    forward_matmul = sum(r["forward_s"] * r["count"] for r in rows if r["matmul"])
    variants = measure_variants(p.variants, p.preset, p.vocab_size, p.batch_size, p.seq_len, p.repeats)
    return {"preset": p.preset, "batch_size": p.batch_size, "seq_len": p.seq_len, **parts, "rows": rows,
            "explained_s": explained, "explained_fraction": explained / parts["step_s"],
            "matmul_fraction_of_step": matmul / parts["step_s"],
            "matmul_fraction_of_forward": forward_matmul / parts["forward_s"], "variants": variants,
            "kernels": kernel_rows(p.repeats)}


def print_report(r: dict) -> None:
    """The op table, then the variants."""
    print(f"{r['preset']}, batch {r['batch_size']} x {r['seq_len']}: step {r['step_s'] * 1e3:.1f} ms "
          f"(one CPU stream, as the op rows), loss + gradients {r['loss_and_gradients_s'] * 1e3:.1f} ms, "
          f"forward {r['forward_s'] * 1e3:.1f} ms")
    print(f"{'op':<72} {'count':>5} {'fwd ms':>8} {'fwd+bwd':>8} {'per step':>9} {'share':>6}")
    for row in sorted(r["rows"], key=lambda x: -x["step_s"]):
        print(f"{row['op'][:72]:<72} {row['count']:>5} {row['forward_s'] * 1e3:>8.2f} "
              f"{row['forward_backward_s'] * 1e3:>8.2f} {row['step_s'] * 1e3:>9.1f} "
              f"{row['step_s'] / r['step_s']:>6.1%}")
    print(f"Explained: {r['explained_fraction']:.0%} of the step; matmuls {r['matmul_fraction_of_step']:.0%} of the "
          f"step and {r['matmul_fraction_of_forward']:.0%} of the forward")
    print("\nElement-wise kernels, ns per element (8.4M float32; softmax over rows of 128):")
    for k in r["kernels"]:
        print(f"  {k['kernel']:<8} {k['library']:<18} {k['ns_per_element']:6.2f}")
    if not r["variants"]:
        return
    base = next((v for v in r["variants"] if v["variant"] == "shipped"), None)
    print(f"\nVariants, timed in turns ({len(r['variants'])} per round):")
    print(f"{'variant':<20} {'step ms':>9} {'min':>8} {'max':>8} {'forward':>9} {'speed vs shipped':>17}  what")
    for v in r["variants"]:
        ratio = f"{base['step_s'] / v['step_s']:.2f}x" if base else "-"
        print(f"{v['variant']:<20} {v['step_s'] * 1e3:>9.1f} {v['step_min_s'] * 1e3:>8.1f} "
              f"{v['step_max_s'] * 1e3:>8.1f} "
              f"{v['forward_s'] * 1e3:>9.1f} {ratio:>17}  {v['what']}")


def main(argv: list[str] | None = None) -> None:
    """Profile and print the tables."""
    p = setup_arg_parser().parse_args(argv)
    for name in ("batch_size", "seq_len", "repeats"):
        if getattr(p, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    p.variants = [v.strip() for v in p.variants.split(",") if v.strip()]
    unknown = [v for v in p.variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
    info = machine_info()
    print(f"Machine: {describe(info)}")
    r = measure(p)
    print_report(r)
    if p.out:
        write_results(p.out, {"machine": info, **r})
