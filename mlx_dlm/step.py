"""The training step: what researchers edit and benchmarks import, with no command-line flags.

In the order a step uses them, as in mlx-examples' transformer_lm loop:
- `make_optimizer`: AdamW with warm-up and cosine decay, from plain values;
- `training_loss`: the objective's loss function (diffusion ELBO or masked mean; block NELBO; next-token NLL for AR);
- `make_train_step`: one compiled function (masks, loss, gradients, clipping, update, and the weights' moving
  average `ema_update`); on a multi-core CPU the batch is split over CPU streams (`default_cpu_streams`);
- `make_evaluator`: validation over fixed windows and masks, comparable across steps.

    model = init_model(preset_args("tiny", vocab_size=tok.vocab_size))
    step = make_train_step(model, make_optimizer(iters=1000), training_loss(model, tok.mask_id), grad_clip=1.0)
    loss, grad_norm, applied = step(mx.array(batch))
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import blas
from .diffusion import ar_loss, block_loss, diffusion_loss, feature_draft_loss
from .errors import UserError
from .model import Model

DEFAULT_LR = 1e-3
DEFAULT_WARMUP = 100  # 20 leaves the plateau sooner at 0.7M parameters but destabilises the 7M default (docs/benchmarks.md)
DEFAULT_MIN_LR_RATIO = 0.1
DEFAULT_WEIGHT_DECAY = 0.01


def make_optimizer(iters: int, learning_rate: float = DEFAULT_LR, warmup: int = DEFAULT_WARMUP,
                   min_lr_ratio: float = DEFAULT_MIN_LR_RATIO, weight_decay: float = DEFAULT_WEIGHT_DECAY
                   ) -> optim.Optimizer:
    """AdamW over `iters` steps: linear warm-up to learning_rate, then cosine decay to min_lr_ratio of it."""
    warmup = min(warmup, max(iters - 1, 0))
    decay = optim.cosine_decay(learning_rate, max(iters - warmup, 1), learning_rate * min_lr_ratio)
    schedule = optim.join_schedules([optim.linear_schedule(0.0, learning_rate, warmup), decay], [warmup]) \
        if warmup > 0 else decay
    return optim.AdamW(learning_rate=schedule, weight_decay=weight_decay)


def _assign(tree, values) -> None:
    """Write values into the arrays of a nested dict/list state in place (compiled state stays the same object)."""
    for k in (tree.keys() if isinstance(tree, dict) else range(len(tree))):
        if isinstance(tree[k], (dict, list)):
            _assign(tree[k], values[k])
        else:
            tree[k] = values[k]


MIN_TOKENS_TO_SPLIT = 1024  # below this a step is too short for two streams to pay (measured: docs/benchmarks.md)


def default_cpu_streams(batch_size: int, seq_len: int) -> int:
    """Parts of the batch computed side by side: 2 on a CPU backend with two or more cores, when the batch
    splits evenly and holds at least MIN_TOKENS_TO_SPLIT tokens; else 1. MLX runs a CPU stream's element-wise
    ops on one thread, so two streams with a one-thread BLAS keep both cores busy (measured in
    docs/benchmarks.md); a GPU needs no such split."""
    if mx.default_device() != mx.cpu or (os.cpu_count() or 1) < 2 or batch_size % 2:
        return 1
    return 2 if batch_size * seq_len >= MIN_TOKENS_TO_SPLIT else 1


def _split_loss_and_grad(loss_and_grad: Callable, model: Model, batch: mx.array, key: mx.array,
                         shard: tuple[int, int], streams: list) -> tuple[mx.array, dict]:
    """Loss and gradients as the mean over equal parts of the batch, each part on its own stream.

    Part r of process `rank` is shard rank * n + r of size * n, with the same key: the parts see exactly the
    mask ratios and masks one whole-batch call would draw."""
    rank, size = shard
    n = len(streams)
    parts = []
    for r, (stream, part) in enumerate(zip(streams, mx.split(batch, n))):
        with mx.stream(stream):
            parts.append(loss_and_grad(model, part, key=key, shard=(rank * n + r, size * n)))
    loss = sum(p[0] for p in parts) / n
    grads = tree_map(lambda *g: sum(g) / n, *(p[1] for p in parts))
    return loss, grads


EMA_WARMUP = 10  # the EMA's decay at optimizer step n is min(decay, (1 + n) / (EMA_WARMUP + n))


def ema_update(ema: dict, params: dict, decay: float, step: mx.array, ok: mx.array) -> dict:
    """One step of the exponential moving average of the weights (kept in float32): ema += (1 - d) (params - ema)
    with d = min(decay, (1 + step) / (EMA_WARMUP + step)), so early averages are not dominated by the
    initial weights; unchanged where ok is false (a skipped update)."""
    d = mx.minimum(decay, (1 + step) / (EMA_WARMUP + step))
    return tree_map(lambda e, p: mx.where(ok, e + (1 - d) * (p.astype(mx.float32) - e), e), ema, params)


def make_train_step(model: Model, optimizer: optim.Optimizer, loss_fn: Callable, grad_clip: float = 0.0,
                    skip_nonfinite: bool = False, distributed: bool = False, streams: int = 1,
                    shard: tuple[int, int] = (0, 1), ema: dict | None = None, ema_decay: float = 0.0):
    """One compiled step: loss, gradients (averaged over processes when distributed), clipping and update.

    loss_fn(model, batch, key=, shard=). Each step draws one key from the random state (compiled state, so
    masks and mask ratios are fresh on every call). streams > 1: the batch is split into that many parts,
    computed side by side on separate CPU streams with the cores shared out among their BLAS calls (one
    thread each on 2 cores), and their gradients averaged (the same draws as one part; the masked-mean loss
    becomes the mean of the parts' means).
    shard=(rank, size) of this process in a distributed run. With skip_nonfinite, an update whose loss or
    gradient norm is not finite leaves weights and optimizer untouched. ema: a float32 copy of the trainable
    parameters, moved towards them after every update (`ema_update`). Returns step(batch) -> (loss,
    grad_norm, applied)."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    optimizer.init(model.trainable_parameters())  # keeps existing (resumed) state; fills the rest
    state = [model.state, optimizer.state, mx.random.state] + ([ema] if ema is not None else [])
    cpu_streams = [mx.new_stream(mx.cpu) for _ in range(streams)] if streams > 1 else []
    blas_threads = max(1, (os.cpu_count() or 1) // streams) if cpu_streams else None

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)  # a key drawn from the random state
        if cpu_streams:
            loss, grads = _split_loss_and_grad(loss_and_grad, model, batch, key, shard, cpu_streams)
        else:
            loss, grads = loss_and_grad(model, batch, key=key, shard=shard)
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
        else:
            old_params, old_opt = model.trainable_parameters(), tree_map(lambda a: a, optimizer.state)
            new_params = optimizer.apply_gradients(grads, old_params)
            model.update(tree_map(lambda new, old: mx.where(ok, new, old), new_params, old_params))
            _assign(optimizer.state, tree_map(lambda new, old: mx.where(ok, new, old), optimizer.state, old_opt))
        if ema is not None:
            _assign(ema, ema_update(ema, model.trainable_parameters(), ema_decay, optimizer.state["step"], ok))
        return loss, grad_norm, ok

    def run(batch: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        with blas.threads(blas_threads):  # the cores shared between the streams while they run
            out = step(batch)
            mx.eval(state, out)
        return out

    return run


def training_loss(model: Model, mask_id: int, loss: str = "elbo", t_sampling: str = "stratified",
                  t_per: str = "block", teacher: Model | None = None, t_range: tuple[float, float] = (0.0, 1.0),
                  complementary: bool = False) -> Callable:
    """loss_fn(model, batch, key=None) of the model's objective: diffusion loss, the block NELBO for block
    models (mask ratios per block or per window: t_per; clipped to t_range; complementary masks), or next-token
    NLL for AR. teacher: a diffusion or block model learns that AR model's predictions instead of the data (a
    drafter for it; a feature drafter (feature_dim) learns it from the teacher's hidden states, and needs one)."""
    if model.args.feature_dim:
        if teacher is None:
            raise UserError("a feature drafter (feature_dim) is trained and validated against its AR model: "
                            "pass --draft-for")
        return partial(feature_draft_loss, mask_id=mask_id, teacher=teacher)
    if model.args.model_type == "ar":
        return lambda model, batch, key=None, shard=(0, 1): ar_loss(model, batch)
    if model.args.model_type == "block":
        return partial(block_loss, mask_id=mask_id, t_per=t_per, t_sampling=t_sampling, teacher=teacher,
                       t_range=tuple(t_range), complementary=complementary)
    return partial(diffusion_loss, mask_id=mask_id, loss=loss, t_sampling=t_sampling, teacher=teacher)


def make_evaluator(model: Model, windows: np.ndarray, mask_id: int, batch_size: int,
                   shard: tuple[int, int] = (0, 1), teacher: Model | None = None) -> Callable[[], float]:
    """Validation loss in nats/token over fixed windows (and fixed masks), comparable across steps:
    the ELBO for diffusion models, the exact next-token NLL for AR models. With shard=(rank, size)
    each process takes every size-th batch and the totals are summed over processes. teacher: a feature drafter's
    AR model (its loss is the distillation cross-entropy)."""
    rank, size = shard
    batches = [(i, mx.array(windows[i:i + batch_size])) for i in range(0, len(windows), batch_size)]
    mine = batches[rank::size]
    state = [model.state] + ([teacher.state] if teacher is not None else [])
    loss = mx.compile(partial(training_loss(model, mask_id, teacher=teacher), model), inputs=state)

    def evaluate() -> float:
        total = mx.array(0.0)
        for i, batch in mine:
            total = total + loss(batch, key=mx.random.key(i)) * batch.size
        if size > 1:
            total = mx.distributed.all_sum(total)
        return (total / sum(b.size for _, b in batches)).item()

    return evaluate
