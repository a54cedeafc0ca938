"""`mlx_dlm.train`: train a masked diffusion language model.

    mlx_dlm.train --data input.txt --preset tiny --iters 300 --out runs/tiny

With no arguments it trains the simple_dlm preset on Tiny Shakespeare into ./checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import blas, checkpoint, data
from .diffusion import LOSSES, ar_loss, diffusion_loss
from .errors import UserError, run_cli
from .io import CONFIG_FILE, load
from .model import PRESETS, Model, init_model, preset_args
from .sample import generate
from .tokenizer import CharTokenizer, SentencePieceTokenizer

DEFAULT_PRESET = "simple_dlm"
DEFAULT_OUT = "checkpoints"
DEFAULT_ITERS = 5000
DEFAULT_BATCH_SIZE = 64
DEFAULT_SEQ_LEN = 128
DEFAULT_LR = 1e-3
DEFAULT_WARMUP = 100
DEFAULT_REPORT_EVERY = 10
DEFAULT_EVAL_EVERY = 200
DEFAULT_EVAL_BATCHES = 8


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of mlx_dlm.train."""
    p = argparse.ArgumentParser(prog="mlx_dlm.train", description="Train a masked diffusion language model.")
    p.add_argument("--data", help="UTF-8 text file or folder of .txt files (default: Tiny Shakespeare, cached)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"model size: {', '.join(PRESETS)}")
    p.add_argument("--tokenizer", choices=("char", "sp"), default="char",
                   help="characters (simple_dlm) or a SentencePiece model trained on the data")
    p.add_argument("--vocab-size", type=int, default=512, help="SentencePiece vocabulary size")
    p.add_argument("--sp-model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--out", default=DEFAULT_OUT, help="model directory for checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help="training window length (at most the model's context)")
    p.add_argument("--learning-rate", type=float, default=DEFAULT_LR, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--objective", choices=("dlm", "ar"), default="dlm",
                   help="masked diffusion, or the matched autoregressive baseline (same Transformer, causal)")
    p.add_argument("--loss", choices=LOSSES, default="elbo", help="diffusion loss")
    p.add_argument("--t-sampling", choices=("stratified", "uniform"), default="stratified",
                   help="how mask ratios are drawn across a batch")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    p.add_argument("--val-fraction", type=float, default=data.DEFAULT_VAL_FRACTION)
    p.add_argument("--report-every", type=int, default=DEFAULT_REPORT_EVERY)
    p.add_argument("--eval-every", type=int, default=DEFAULT_EVAL_EVERY)
    p.add_argument("--eval-batches", type=int, default=DEFAULT_EVAL_BATCHES)
    p.add_argument("--save-every", type=int, help="checkpoint interval (default: --eval-every)")
    p.add_argument("--sample-tokens", type=int, default=64, help="length of the sample shown at eval (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--upload-repo", help="upload the final model to this Hugging Face repo (user/name)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (and count) updates whose loss or gradient is not finite instead of stopping")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("iters", "batch_size", "report_every", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    if args.learning_rate <= 0:
        raise UserError("--learning-rate must be positive")
    if not args.resume and args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r} (choose from {', '.join(PRESETS)})")


def make_optimizer(args: argparse.Namespace) -> optim.Optimizer:
    """AdamW with linear warm-up then cosine decay to min_lr_ratio of the peak."""
    warmup = min(args.warmup, max(args.iters - 1, 0))
    decay = optim.cosine_decay(args.learning_rate, max(args.iters - warmup, 1),
                               args.learning_rate * args.min_lr_ratio)
    schedule = optim.join_schedules([optim.linear_schedule(0.0, args.learning_rate, warmup), decay], [warmup]) \
        if warmup > 0 else decay
    return optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)


def _assign(tree, values) -> None:
    """Write values into the arrays of a nested dict/list state in place (compiled state stays the same object)."""
    for k in (tree.keys() if isinstance(tree, dict) else range(len(tree))):
        if isinstance(tree[k], (dict, list)):
            _assign(tree[k], values[k])
        else:
            tree[k] = values[k]


def make_train_step(model: Model, optimizer: optim.Optimizer, loss_fn: Callable, grad_clip: float = 0.0,
                    skip_nonfinite: bool = False, distributed: bool = False):
    """One compiled step: loss, gradients (averaged over processes when distributed), clipping and update.

    Random state is compiled state, so masks and mask ratios are fresh on every call. With
    skip_nonfinite, an update whose loss or gradient norm is not finite leaves weights and optimizer
    untouched. Returns step(batch) -> (loss, grad_norm, applied)."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    optimizer.init(model.trainable_parameters())  # keeps existing (resumed) state; fills the rest
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        loss, grads = loss_and_grad(model, batch)
        if distributed:
            grads = nn.average_gradients(grads)
            loss = mx.distributed.all_sum(loss) / mx.distributed.init().size()
        if grad_clip > 0:
            grads, grad_norm = optim.clip_grad_norm(grads, grad_clip)
        else:
            grad_norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
        ok = mx.isfinite(loss) & mx.isfinite(grad_norm)
        if not skip_nonfinite:
            optimizer.update(model, grads)
            return loss, grad_norm, ok
        old_params, old_opt = model.trainable_parameters(), tree_map(lambda a: a, optimizer.state)
        new_params = optimizer.apply_gradients(grads, old_params)
        model.update(tree_map(lambda new, old: mx.where(ok, new, old), new_params, old_params))
        _assign(optimizer.state, tree_map(lambda new, old: mx.where(ok, new, old), optimizer.state, old_opt))
        return loss, grad_norm, ok

    def run(batch: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        out = step(batch)
        mx.eval(state, out)
        return out

    return run


def training_loss(model: Model, mask_id: int, loss: str = "elbo", stratified: bool = True) -> Callable:
    """loss_fn(model, batch, key=None) of the model's objective: diffusion loss, or next-token NLL for AR."""
    if model.args.model_type == "ar":
        return lambda model, batch, key=None: ar_loss(model, batch)
    return partial(diffusion_loss, mask_id=mask_id, loss=loss, stratified=stratified)


def make_evaluator(model: Model, windows: np.ndarray, mask_id: int, batch_size: int,
                   shard: tuple[int, int] = (0, 1)) -> Callable[[], float]:
    """Validation loss in nats/token over fixed windows (and fixed masks), comparable across steps:
    the ELBO for diffusion models, the exact next-token NLL for AR models. With shard=(rank, size)
    each process takes every size-th batch and the totals are summed over processes."""
    rank, size = shard
    batches = [(i, mx.array(windows[i:i + batch_size])) for i in range(0, len(windows), batch_size)]
    mine = batches[rank::size]
    loss = mx.compile(partial(training_loss(model, mask_id), model), inputs=model.state)

    def evaluate() -> float:
        total = mx.array(0.0)
        for i, batch in mine:
            total = total + loss(batch, key=mx.random.key(i)) * batch.size
        if size > 1:
            total = mx.distributed.all_sum(total)
        return (total / sum(b.size for _, b in batches)).item()

    return evaluate


def _random_state() -> int:
    hi, lo = mx.random.state[0].tolist()
    return (hi << 32) | lo


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second SIGINT aborts."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        import signal

        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _build_tokenizer(args: argparse.Namespace, text: str):
    if args.tokenizer == "sp":
        return SentencePieceTokenizer.train(text, args.vocab_size, args.sp_model_type)
    return CharTokenizer.from_text(text)


def _log(line: str, bar) -> None:
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


def train(args: argparse.Namespace, on_checkpoint: Callable[[int], None] | None = None) -> Path:
    """Run training as configured by parsed flags; returns the output directory.

    Under `mlx.launch -n N`, N processes train one model (data parallel): each takes its rows of a
    global batch of N x --batch-size, gradients are averaged, and only rank 0 prints and writes.
    on_checkpoint(step) is called after each checkpoint is written.
    """
    _check_args(args)
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    main_rank = rank == 0
    out = Path(args.out)
    text = data.read_corpus(args.data)
    data_sha = hashlib.sha256(text.encode()).hexdigest()
    resume_state = None
    if args.resume:
        if main_rank:
            resume_state = checkpoint.restore(out)  # may repair a checkpoint torn by a kill
        if size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0)))  # the others read only after rank 0 is done
        if not main_rank:
            resume_state = checkpoint.restore(out)
        model, tokenizer = load(out)
        if resume_state.get("data_sha256") != data_sha and main_rank:
            print("warning: --data differs from the corpus this checkpoint was trained on", file=sys.stderr)
    else:
        if (out / checkpoint.STATE_FILE).exists() or (out / CONFIG_FILE).exists():
            raise UserError(f"{out} already holds a model: pass --resume to continue it, or choose another --out")
        tokenizer = _build_tokenizer(args, text)
        model = init_model(preset_args(args.preset, vocab_size=tokenizer.vocab_size, model_type=args.objective),
                           seed=args.seed)
    seq_len = args.seq_len
    if seq_len > model.args.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {model.args.max_seq_len}")
    if args.dtype == "bfloat16":
        model.set_dtype(mx.bfloat16)

    tokens = tokenizer.encode_array(text)
    train_tokens, val_tokens = data.split_tokens(tokens, args.val_fraction)
    data.check_window(train_tokens, seq_len, "training")
    evaluate = None
    if len(val_tokens) >= seq_len:
        val_windows = data.eval_windows(val_tokens, args.eval_batches * args.batch_size, seq_len)
        evaluate = make_evaluator(model, val_windows, tokenizer.mask_id, args.batch_size, (rank, size))
        chars_per_token = len(tokenizer.decode(val_tokens)) / len(val_tokens)
    elif main_rank:
        print(f"note: validation split has fewer than {seq_len} tokens; skipping validation", file=sys.stderr)

    optimizer = make_optimizer(args)
    # Every process draws the same global batch and masks (same seeds) and keeps its own rows.
    rng = np.random.default_rng(args.seed)
    step, skipped = 0, 0
    if resume_state is not None:
        optimizer.init(model.trainable_parameters())
        optimizer.state = tree_unflatten(checkpoint.load_optimizer_state(out))
        step, skipped = int(resume_state["step"]), int(resume_state.get("skipped", 0))
        rng.bit_generator.state = resume_state["data_rng"]
        mx.random.seed(int(resume_state["mlx_rng"]))
        if main_rank:
            checkpoint.trim_metrics(out / checkpoint.METRICS_FILE, step)
    else:
        mx.random.seed(args.seed)
        if main_rank:
            (out / checkpoint.METRICS_FILE).unlink(missing_ok=True)  # rows of an earlier run that saved no model

    stratified = args.t_sampling == "stratified"
    loss_fn = training_loss(model, tokenizer.mask_id, args.loss, stratified)
    if model.args.model_type == "dlm" and size > 1:
        loss_fn = partial(loss_fn, shard=(rank, size))
    train_step = make_train_step(model, optimizer, loss_fn, args.grad_clip, args.skip_nonfinite, size > 1)
    bound = "ELBO" if model.args.model_type == "dlm" else "NLL"
    save_every = args.save_every or args.eval_every
    rows = slice(rank * args.batch_size, (rank + 1) * args.batch_size)

    def log(line: str) -> None:
        if main_rank:
            _log(line, bar)

    bar = None
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        print(f"mlx_dlm.train: {model.args.model_type} model ({args.preset} preset), "
              f"{model.num_params() / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size} ({tokenizer.kind}), "
              f"{len(train_tokens):,} train / {len(val_tokens):,} val tokens, batch {args.batch_size} x {seq_len}"
              + (f" per process x {size} processes = effective batch {args.batch_size * size}" if size > 1 else "")
              + f", device {mx.default_device()}, blas {blas.status}", flush=True)
        if step:
            print(f"Resuming from step {step}", flush=True)
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=args.iters, initial=step, unit="it", dynamic_ncols=True, leave=False)
    metrics = open(out / checkpoint.METRICS_FILE, "a") if main_rank else None

    def write_metrics(row: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def validate(step: int) -> float:
        t0 = time.perf_counter()
        val = evaluate()
        row = {"step": step, "val_loss": val, "val_bpc": val / math.log(2) / chars_per_token}
        log(f"Iter {step}: Val loss {val:.3f} nats/token, {row['val_bpc']:.3f} bits/char ({bound}), "
            f"Val took {time.perf_counter() - t0:.2f}s")
        write_metrics(row)
        if args.sample_tokens > 0 and step > 0 and main_rank:
            n = min(args.sample_tokens, seq_len)
            log(f"Sample: {generate(model, tokenizer, '', max_tokens=n, steps=max(1, n // 4), seed=step)!r}")
        return val

    def save() -> None:
        state = {"step": step, "data_rng": rng.bit_generator.state, "mlx_rng": _random_state(),
                 "data_sha256": data_sha, "val_loss": last_val, "skipped": skipped, "processes": size,
                 "args": vars(args)}
        if main_rank:
            checkpoint.save(out, model, optimizer, tokenizer, state)
            if on_checkpoint is not None:
                on_checkpoint(step)

    last_val = resume_state.get("val_loss") if resume_state else None
    try:
        with _StopRequest() as stop:
            if evaluate is not None and step == 0:
                last_val = validate(0)  # the untrained baseline, as nanoGPT does
            tic, window_steps, window_loss = time.perf_counter(), 0, 0.0
            while step < args.iters:
                batch = mx.array(data.random_windows(train_tokens, args.batch_size * size, seq_len, rng)[rows])
                lr = optimizer.learning_rate.item()
                loss, grad_norm, applied = train_step(batch)
                step += 1
                if not applied.item():
                    if not args.skip_nonfinite:
                        raise UserError(f"loss or gradient became non-finite at step {step} (loss {loss.item()}); "
                                        f"last good checkpoint kept in {out}; lower --learning-rate or pass "
                                        "--skip-nonfinite")
                    skipped += 1
                    log(f"Iter {step}: skipped a non-finite update ({skipped} so far)")
                else:
                    window_steps += 1
                    window_loss += loss.item()
                if bar is not None:
                    bar.update(1)
                if (step % args.report_every == 0 or step == args.iters) and window_steps:
                    elapsed = time.perf_counter() - tic
                    row = {"step": step, "train_loss": window_loss / window_steps, "lr": lr,
                           "grad_norm": grad_norm.item(), "it_per_sec": window_steps / elapsed,
                           "tokens_per_sec": window_steps * args.batch_size * size * seq_len / elapsed,
                           "skipped": skipped}
                    log(f"Iter {step}: Train loss {row['train_loss']:.3f}, Learning Rate {lr:.3e}, "
                        f"It/sec {row['it_per_sec']:.2f}, Tokens/sec {row['tokens_per_sec']:.0f}")
                    write_metrics(row)
                    tic, window_steps, window_loss = time.perf_counter(), 0, 0.0
                if evaluate is not None and (step % args.eval_every == 0 or step == args.iters):
                    last_val = validate(step)
                    tic = time.perf_counter()
                stopping = stop.signal is not None
                if size > 1:  # every process stops at the same step
                    stopping = mx.distributed.all_sum(mx.array(float(stopping))).item() > 0
                if step % save_every == 0 or step == args.iters or stopping:
                    save()
                    tic = time.perf_counter()
                if stopping:
                    log(f"Stopped by {stop.signal or 'a signal'} at step {step}; checkpoint saved in {out}. "
                        f"Resume with: mlx_dlm.train --resume --out {out} --iters {args.iters} (and the same --data)")
                    return out
    finally:
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
    if size > 1:
        fingerprints = np.array(mx.distributed.all_gather(_fingerprint(model)[None]))
        same = bool((fingerprints == fingerprints[0]).all())
        log(f"Parameters identical on all {size} processes: {'yes' if same else 'NO'}")
    log(f"Saved model to {out} (step {step})")
    if args.upload_repo and main_rank:
        from .hub import upload

        log(f"Uploaded to {upload(out, args.upload_repo)}")
    return out


def _fingerprint(model: Model) -> mx.array:
    """A few float64-free sums over all parameters: equal on replicas that hold identical weights."""
    leaves = [v.astype(mx.float32).reshape(-1) for _, v in tree_flatten(model.parameters())]
    flat = mx.concatenate(leaves)
    return mx.stack([flat.sum(), (flat * flat).sum(), (flat * mx.arange(flat.size) % 97).sum()])


def _main(argv: list[str] | None) -> None:
    train(setup_arg_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
