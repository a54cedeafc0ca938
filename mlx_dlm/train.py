"""`mlx_dlm.train`: train a masked diffusion language model (or its matched AR baseline).

    mlx_dlm.train --data input.txt --preset tiny --iters 300 --out runs/tiny

With no arguments it trains the default preset and recipe on Tiny Shakespeare into ./checkpoints.

A map of the module:
- flags: `setup_arg_parser`; which flags define a run (`RUN_SETTINGS`) and how `--resume` takes them
  from the checkpoint (`resume_settings`); `optimizer_of` (the optimizer the flags describe);
- the step itself is in `step.py` (optimizer, losses, the compiled step, the evaluator), the Ctrl-C/SIGTERM
  watchdog in `stop.py`; `_inference_weights` (eval mode and the averaged weights, for validation and saving);
- the run: `prepare` (data, model, optimizer, resumed state) -> `_loop` (steps, reports, validation,
  checkpoints, signals) -> `train`, which ties them together.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import blas, checkpoint, data
from .block_decode import block_defaults
from .diffusion import LOSSES, T_PER, T_SAMPLING
from .errors import UserError, given_flags, run_cli
from .fileio import ensure_dir
from .io import CONFIG_FILE, load, write_sampling_defaults
from .model import INIT_SCHEMES, MODEL_TYPES, PRESETS, Model, ModelArgs, init_model, preset_args
from .sample import generate
# The training step lives in step.py, the stop watchdog in stop.py; their names stay importable from here.
from .step import (DEFAULT_LR, DEFAULT_MIN_LR_RATIO, DEFAULT_WARMUP, DEFAULT_WEIGHT_DECAY, EMA_WARMUP,  # noqa: F401
                   default_cpu_streams, ema_update, make_evaluator, make_optimizer, make_train_step, training_loss)
from .speculative import check_drafter
from .stop import StopRequest
from .tokenizer import CharTokenizer, SentencePieceTokenizer

DEFAULT_PRESET = "base"
DEFAULT_INIT = "local"
DEFAULT_OUT = "checkpoints"
DEFAULT_ITERS = 5000
DEFAULT_BATCH_SIZE = 16  # learns fastest per FLOP and per second at laptop budgets (docs/benchmarks.md, "Learning speed")
DEFAULT_SEQ_LEN = 128
DEFAULT_REPORT_EVERY = 10
DEFAULT_EVAL_EVERY = 200
DEFAULT_EVAL_BATCHES = 8
DEFAULT_BLOCK_SIZE = 4
BOUNDS = {"dlm": "ELBO", "block": "block NELBO", "ar": "NLL"}  # what validation reports, per objective
FEATURE_BOUND = "distillation cross-entropy against the AR model"  # what a feature drafter's validation reports
ADAPTABLE_FIELDS = {"dropout", "logit_shift", "n_layers"}  # --arch fields --init-from may change (n_layers: lower)

# What defines a run: --resume takes these from the checkpoint, and refuses a flag that contradicts it.
RUN_SETTINGS = ("data", "preset", "arch", "init", "tokenizer", "vocab_size", "sp_model_type", "batch_size", "seq_len",
                "learning_rate", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "objective", "loss",
                "t_sampling", "dtype", "dropout", "subs", "ema", "val_fraction", "seed", "block_size", "t_per",
                "init_from", "draft_for", "t_range", "complementary", "feature_drafter", "feature_layers",
                "draft_context", "train_only")
# Flags that may change on resume, with what changing them does.
CHANGEABLE_ON_RESUME = {"iters": "the cosine schedule now ends at step {new} (was {old})",
                        "eval_batches": "validation now uses {new} batches (was {old}): losses are not comparable "
                                        "across the change"}


# The flags' help texts: wording, not behaviour, so kept out of mutation testing (the parser's names, choices,
# types and defaults stay in it).
# pragma: no mutate start
HELP = {
    "description": "Train a masked diffusion language model.",
    "data": "UTF-8 text file or folder of .txt files (default: Tiny Shakespeare, cached)",
    "preset": f"model size: {', '.join(PRESETS)}",
    "arch": "override one architecture field of the preset, e.g. --arch n_layers=6 --arch "
        "time_cond=false (repeatable; fields: see config.json)",
    "init": "initialisation: local (unit-scale tables, sinusoidal positions, keys start as queries: "
        "attention is local from step 0) or simple_dlm (its N(0, 1) tables)",
    "tokenizer": "characters (simple_dlm) or a SentencePiece model trained on the data",
    "vocab_size": "SentencePiece vocabulary size",
    "sp_model_type": "SentencePiece model type",
    "out": "model directory for checkpoints",
    "resume": "continue the run in --out with the settings it was started with",
    "iters": "total optimizer steps",
    "batch_size": "windows per step (per process)",
    "seq_len": "training window length (at most the model's context)",
    "learning_rate": "peak learning rate",
    "min_lr_ratio": "final lr as a fraction of the peak (1 with --warmup 0: constant)",
    "warmup": "linear warm-up steps",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the global gradient norm (0: off)",
    "objective": "masked diffusion, the matched autoregressive baseline (same Transformer, causal), or block "
        "diffusion (BD3-LM: blocks of --block-size left to right, denoised in parallel inside)",
    "block_size": "block diffusion: positions per block (default 4)",
    "t_per": "block diffusion: draw a mask ratio per block or per window",
    "t_range": "block diffusion: draw mask ratios in [LO, HI] only (BD3-LM's clipped schedule; validation still "
        "reports the block NELBO over [0, 1])",
    "complementary": "block diffusion: also train each window on the complement of its mask (Fast-dLLM v2), so "
        "every token is a target once per window",
    "draft_for": "train a drafter for this AR model (speculative decoding): the targets at masked positions are "
        "its next-token distributions, not the text (distillation); with --objective dlm or block",
    "feature_drafter": "with --draft-for and --objective block: a drafter that reads the AR model's hidden states "
        "(DFlash-style; the last layer's, or --feature-layers) instead of keeping context of its own; each round it "
        "drafts --block-size tokens in one pass of that many rows, run inside the verifier's round",
    "draft_context": "with --feature-drafter: chain the drafts: each drafted token after the first adds a learned "
        "logit bias indexed by the 1 or 2 tokens before it, and the drafts are drawn in turn (0: independently)",
    "train_only": "train only these parameters, comma-separated top-level names of the model (e.g. draft_table, "
        "layers, lm_head); the rest stay as they start (default: all)",
    "feature_layers": "with --feature-drafter: the AR model's layers (0-based) whose outputs the drafter reads, side "
        "by side, e.g. 1,3,5 (default: the last alone)",
    "init_from": "start from this model directory's weights and tokenizer (e.g. shakespeare-ar, to adapt it to "
        "--objective block or dlm); its architecture is kept (--arch may change dropout and logit_shift, and lower "
        "n_layers: a shallower model, e.g. a drafter, keeps evenly spaced layers, the first and last among them)",
    "loss": "diffusion loss",
    "t_sampling": "how mask ratios are drawn: one per bin across the batch, independently, or one for the "
        "whole batch (simple_dlm)",
    "dtype": "parameter dtype",
    "dropout": "residual dropout on the embeddings and every block's outputs, while training only",
    "subs": "MDLM's SUBS parameterisation: the mask token's logit is -inf (it is never predicted)",
    "ema": "keep an exponential moving average of the weights with this decay (e.g. 0.999; 0: off); "
        "validation, samples and the saved model use it",
    "val_fraction": "held-out tail of the corpus",
    "report_every": "steps between training-loss lines",
    "eval_every": "steps between validations",
    "eval_batches": "batches of fixed validation windows",
    "save_every": "checkpoint interval (default: --eval-every)",
    "sample_tokens": "length of the sample shown at eval (0: none)",
    "seed": "seed of weights, batches and masks",
    "upload_repo": "upload the final model to this Hugging Face repo (user/name)",
    "cpu_streams": "split each batch into this many parts computed side by side on CPU streams, the cores "
        "shared among their BLAS calls (CPU backend only; default: 2 on a CPU with 2+ cores for "
        "batches of 1024+ tokens, else 1); the same draws and loss",
    "skip_nonfinite": "skip (and count) updates whose loss or gradient is not finite instead of stopping",
}
# pragma: no mutate end


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of mlx_dlm.train (help texts in HELP)."""
    p = argparse.ArgumentParser(prog="mlx_dlm.train", description=HELP["description"],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help=HELP["data"])
    p.add_argument("--preset", default=DEFAULT_PRESET, help=HELP["preset"])
    p.add_argument("--arch", action="append", default=[], metavar="KEY=VALUE", help=HELP["arch"])
    p.add_argument("--init", choices=INIT_SCHEMES, default=DEFAULT_INIT, help=HELP["init"])
    p.add_argument("--tokenizer", choices=("char", "sp"), default="char", help=HELP["tokenizer"])
    p.add_argument("--vocab-size", type=int, default=512, help=HELP["vocab_size"])
    p.add_argument("--sp-model-type", choices=("bpe", "unigram"), default="bpe", help=HELP["sp_model_type"])
    p.add_argument("--out", default=DEFAULT_OUT, help=HELP["out"])
    p.add_argument("--resume", action="store_true", help=HELP["resume"])
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS, help=HELP["iters"])
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=HELP["batch_size"])
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=HELP["seq_len"])
    p.add_argument("--learning-rate", type=float, default=DEFAULT_LR, help=HELP["learning_rate"])
    p.add_argument("--min-lr-ratio", type=float, default=DEFAULT_MIN_LR_RATIO, help=HELP["min_lr_ratio"])
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=HELP["warmup"])
    p.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY, help=HELP["weight_decay"])
    p.add_argument("--grad-clip", type=float, default=1.0, help=HELP["grad_clip"])
    p.add_argument("--objective", choices=MODEL_TYPES, default="dlm", help=HELP["objective"])
    p.add_argument("--block-size", type=int, default=None, help=HELP["block_size"])
    p.add_argument("--t-per", choices=T_PER, default="block", help=HELP["t_per"])
    p.add_argument("--t-range", type=float, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"), help=HELP["t_range"])
    p.add_argument("--complementary", action="store_true", help=HELP["complementary"])
    p.add_argument("--init-from", metavar="DIR", help=HELP["init_from"])
    p.add_argument("--draft-for", metavar="AR_DIR", help=HELP["draft_for"])
    p.add_argument("--feature-drafter", action="store_true", help=HELP["feature_drafter"])
    p.add_argument("--feature-layers", default="", metavar="I,J,...", help=HELP["feature_layers"])
    p.add_argument("--train-only", default="", metavar="NAME,...", help=HELP["train_only"])
    p.add_argument("--draft-context", type=int, default=0, choices=(0, 1, 2), help=HELP["draft_context"])
    p.add_argument("--loss", choices=LOSSES, default="elbo", help=HELP["loss"])
    p.add_argument("--t-sampling", choices=T_SAMPLING, default="stratified", help=HELP["t_sampling"])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help=HELP["dtype"])
    p.add_argument("--dropout", type=float, default=0.0, help=HELP["dropout"])
    p.add_argument("--subs", action="store_true", help=HELP["subs"])
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY", help=HELP["ema"])
    p.add_argument("--val-fraction", type=float, default=data.DEFAULT_VAL_FRACTION, help=HELP["val_fraction"])
    p.add_argument("--report-every", type=int, default=DEFAULT_REPORT_EVERY, help=HELP["report_every"])
    p.add_argument("--eval-every", type=int, default=DEFAULT_EVAL_EVERY, help=HELP["eval_every"])
    p.add_argument("--eval-batches", type=int, default=DEFAULT_EVAL_BATCHES, help=HELP["eval_batches"])
    p.add_argument("--save-every", type=int, help=HELP["save_every"])
    p.add_argument("--sample-tokens", type=int, default=64, help=HELP["sample_tokens"])
    p.add_argument("--seed", type=int, default=0, help=HELP["seed"])
    p.add_argument("--upload-repo", help=HELP["upload_repo"])
    p.add_argument("--cpu-streams", type=int, help=HELP["cpu_streams"])
    p.add_argument("--skip-nonfinite", action="store_true", help=HELP["skip_nonfinite"])
    return p


def _layer_list(text: str) -> tuple[int, ...]:
    """--feature-layers: comma-separated layer indices (none for "")."""
    try:
        return tuple(int(item) for item in text.split(",")) if text else ()
    except ValueError:
        raise UserError(f"--feature-layers: expected comma-separated layer numbers, got {text!r}") from None


def parse_arch(items: list[str]) -> dict:
    """--arch KEY=VALUE items as ModelArgs overrides (values read as JSON: numbers, true/false, or strings)."""
    fields = {f.name for f in dataclasses.fields(ModelArgs)} - {"model_type", "vocab_size", "block_size", "feature_dim",
                                                        "feature_layers", "draft_context"}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise UserError(f"--arch {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def explicit_settings(args: argparse.Namespace) -> set[str]:
    """For args parsed elsewhere (the Python API): the flags that differ from their defaults."""
    parser = setup_arg_parser()
    return {k for k, v in vars(args).items() if v != parser.get_default(k)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_settings(args: argparse.Namespace, explicit: set[str], saved: dict, verbose: bool = True) -> argparse.Namespace:
    """The args of a resumed run: every setting from the checkpoint unless given on the command line.

    A run-defining flag (RUN_SETTINGS) given with another value than the checkpoint's is a UserError; the
    others may change (the effect of a changed --iters or --eval-batches is printed)."""
    merged = vars(args).copy()
    for name, value in saved.items():
        if name in ("out", "resume") or name not in merged:
            continue
        if name not in explicit:
            merged[name] = value
        elif merged[name] != value and name in RUN_SETTINGS and name != "data":  # data: checked by its sha256
            raise UserError(f"{_flag(name)} {merged[name]} contradicts the checkpoint in {args.out}, which was "
                            f"trained with {value!r}; drop the flag to continue that run")
        elif merged[name] != value and name in CHANGEABLE_ON_RESUME and verbose:
            effect = CHANGEABLE_ON_RESUME[name].format(new=merged[name], old=value)
            print(f"note: {_flag(name)} changed on resume: {effect}", file=sys.stderr)
    return argparse.Namespace(**merged)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("iters", "batch_size", "report_every", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            raise UserError(f"{_flag(name)} must be at least 1")
    if args.seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    if args.cpu_streams is not None and (args.cpu_streams < 1 or args.batch_size % args.cpu_streams):
        raise UserError(f"--cpu-streams must be at least 1 and divide --batch-size {args.batch_size}, "
                        f"got {args.cpu_streams}")
    if (args.cpu_streams or 1) > 1 and mx.default_device() != mx.cpu:
        raise UserError(f"--cpu-streams applies to MLX's CPU backend; this run uses {mx.default_device()}")
    if args.learning_rate <= 0:
        raise UserError("--learning-rate must be positive")
    if not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 <= args.ema < 1.0:
        raise UserError(f"--ema must be a decay in [0, 1) (0: off), got {args.ema}")
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r} (choose from {', '.join(PRESETS)})")
    if args.block_size is not None and (args.objective != "block" or not 1 <= args.block_size <= args.seq_len):
        objective = "" if args.objective == "block" else f" with --objective {args.objective}"
        raise UserError(f"--block-size needs --objective block and must be in [1, --seq-len {args.seq_len}], "
                        f"got {args.block_size}{objective}")
    if args.draft_for and args.objective == "ar":
        raise UserError("--draft-for trains a diffusion drafter: use --objective dlm or block")
    if args.feature_drafter and not (args.draft_for and args.objective == "block" and args.block_size < args.seq_len):
        raise UserError("--feature-drafter needs --draft-for AR_DIR, --objective block and a --block-size below "
                        "--seq-len")
    if (args.feature_layers or args.draft_context) and not args.feature_drafter:
        raise UserError(f"--{'feature-layers' if args.feature_layers else 'draft-context'} applies to "
                        "--feature-drafter")
    if (args.t_range != [0.0, 1.0] or args.complementary) and args.objective != "block":
        raise UserError("--t-range and --complementary apply to --objective block")
    if not 0.0 <= args.t_range[0] < args.t_range[1] <= 1.0:
        raise UserError(f"--t-range must satisfy 0 <= LO < HI <= 1, got {args.t_range[0]} {args.t_range[1]}")
    if args.objective == "block" and args.loss != "elbo":
        raise UserError("--objective block trains the block NELBO: --loss masked-mean does not apply")
    arch = parse_arch(args.arch)
    if args.init_from and set(arch) - ADAPTABLE_FIELDS:
        raise UserError(f"--init-from keeps {args.init_from}'s architecture: --arch may change only "
                        f"{', '.join(sorted(ADAPTABLE_FIELDS))}, not {', '.join(sorted(set(arch) - ADAPTABLE_FIELDS))}")


def _random_state() -> int:
    hi, lo = mx.random.state[0].tolist()
    return (hi << 32) | lo


def optimizer_of(args: argparse.Namespace) -> optim.Optimizer:
    """The optimizer the flags describe (`step.make_optimizer`)."""
    return make_optimizer(args.iters, args.learning_rate, args.warmup, args.min_lr_ratio, args.weight_decay)


def _build_tokenizer(args: argparse.Namespace, text: str):
    if args.tokenizer == "sp":
        return SentencePieceTokenizer.train(text, args.vocab_size, args.sp_model_type)
    return CharTokenizer.from_text(text)


def _log(line: str, bar) -> None:
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


@dataclass
class Progress:
    """Counters a checkpoint carries: optimizer steps, skipped updates, training seconds and FLOPs so far
    (validation and saving excluded), and the last validation loss."""

    step: int = 0
    skipped: int = 0
    train_seconds: float = 0.0
    flops: float = 0.0
    val_loss: float | None = None


@dataclass
class Run:
    """Everything one training run works with, built by `prepare`."""

    args: argparse.Namespace
    out: Path
    model: Model
    tokenizer: object
    optimizer: optim.Optimizer
    train_tokens: np.ndarray
    evaluate: Callable[[], float] | None
    chars_per_token: float
    data_sha: str
    rng: np.random.Generator
    progress: Progress
    rank: int = 0
    size: int = 1
    ema: dict | None = None  # float32 moving average of the trainable parameters (--ema)
    teacher: Model | None = None  # --draft-for: the AR model whose predictions are the targets

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    @property
    def cpu_streams(self) -> int:
        """Parts of the batch computed side by side (--cpu-streams, or the default for this machine)."""
        return self.args.cpu_streams or default_cpu_streams(self.args.batch_size, self.args.seq_len)

    @property
    def flops_per_step(self) -> float:
        """Forward + backward (~3x forward) FLOPs of one step over the global batch, and a drafter's teacher's
        forward pass."""
        a = self.args
        windows = a.batch_size * self.size
        teacher = self.teacher.flops_per_token(a.seq_len) * windows * a.seq_len if self.teacher is not None else 0.0
        if self.model.args.feature_dim:  # one block of B rows for each of the window's L - B positions
            B = self.model.args.block_size
            return 3 * self.model.flops_per_token(B) * windows * (a.seq_len - B) * B + teacher
        kind = self.model.args.model_type
        forwarded = a.seq_len * (2 if kind == "block" else 1)  # block: the noisy and the clean copy
        forwarded *= 2 if a.complementary else 1  # and each window twice, complementary
        predicted = a.seq_len - (kind == "ar")
        return 3 * self.model.flops_per_token(forwarded) * windows * forwarded * predicted / a.seq_len + teacher


def _restore(out: Path, rank: int, size: int) -> dict:
    """Rank 0 repairs and reads the checkpoint; the others read it after rank 0 is done."""
    state = checkpoint.restore(out) if rank == 0 else None
    if size > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0)))
    return state if state is not None else checkpoint.restore(out)


def _adapted_model(args: argparse.Namespace, verifier: ModelArgs | None = None) -> tuple[Model, object]:
    """--init-from's weights and tokenizer as a model of --objective. A model started from an AR one keeps its
    next-token head's meaning (logit_shift: a position is predicted from the output to its left) unless
    --arch logit_shift=false (the SDAR choice). verifier: the --draft-for model's architecture."""
    source, tokenizer = load(args.init_from)
    if any(name.endswith(".scales") for name, _ in tree_flatten(source.parameters())):
        raise UserError(f"--init-from {args.init_from} is quantized; start from a float model")
    config = source.args.to_dict()
    config.update(model_type=args.objective, block_size=args.block_size if args.objective == "block" else 0)
    if args.objective != "ar" and source.args.model_type == "ar":
        config["logit_shift"] = True
    config.update(parse_arch(args.arch))
    if args.dropout:
        config["dropout"] = args.dropout
    config.update(_feature_reading(args, verifier))
    reads = (source.args.feature_dim, source.args.feature_layers)
    if source.args.feature_dim and (config["feature_dim"], config["feature_layers"]) != reads:
        raise UserError(f"--init-from {args.init_from} is a feature drafter reading layers "
                        f"{','.join(map(str, source.args.feature_layers)) or 'the last'}: pass --feature-drafter "
                        f"with the same --feature-layers")
    if source.args.draft_context and config["draft_context"] != source.args.draft_context:
        raise UserError(f"--init-from {args.init_from} chains its drafts on {source.args.draft_context} tokens: pass "
                        f"--feature-drafter --draft-context {source.args.draft_context} to keep its table")
    if not 1 <= config["n_layers"] <= source.args.n_layers:
        raise UserError(f"--init-from {args.init_from} has {source.args.n_layers} layers: --arch n_layers may be "
                        f"1 to {source.args.n_layers}, got {config['n_layers']}")
    model = Model(ModelArgs(**config))
    weights = source.parameters()
    weights["layers"] = [weights["layers"][i] for i in kept_layers(source.args.n_layers, config["n_layers"])]
    model.update(tree_map(lambda p: p.astype(mx.float32), weights))
    if config["feature_dim"] and not source.args.feature_dim:  # the AR's state starts unread: at first the drafter
        # is the source model on its block
        model.feature_proj.update(tree_map(mx.zeros_like, model.feature_proj.parameters()))
    mx.eval(model.parameters())
    return model, tokenizer


def _train_only(model: Model, names: str) -> None:
    """--train-only: freeze every parameter of model but the named top-level ones (arrays or modules)."""
    wanted = [name for name in names.split(",") if name]
    params = model.parameters()
    unknown = [name for name in wanted if name not in params]
    if unknown or not wanted:
        raise UserError(f"--train-only {names!r}: {', '.join(unknown) or 'no name'} is not a parameter of this model "
                        f"(its top-level names: {', '.join(sorted(params))})")
    model.freeze()
    for name in wanted:
        part = getattr(model, name)
        if isinstance(part, nn.Module):
            part.unfreeze()
        elif isinstance(part, list):
            for module in part:
                module.unfreeze()
        else:
            model.unfreeze(keys=[name], recurse=False)


def _feature_reading(args: argparse.Namespace, verifier: ModelArgs | None) -> dict:
    """--feature-drafter: what it reads of the --draft-for model, whose architecture is verifier (feature_dim,
    feature_layers); none otherwise."""
    if not args.feature_drafter:
        return {"feature_dim": 0, "feature_layers": (), "draft_context": 0}
    layers = _layer_list(args.feature_layers)
    if any(not 0 <= i < verifier.n_layers for i in layers) or len(set(layers)) < len(layers):
        raise UserError(f"--feature-layers must name distinct layers of {args.draft_for}'s {verifier.n_layers} "
                        f"(0 to {verifier.n_layers - 1}), got {','.join(map(str, layers))}")
    return {"feature_dim": verifier.dim * max(len(layers), 1), "feature_layers": layers,
            "draft_context": args.draft_context}


def kept_layers(n_source: int, n: int) -> list[int]:
    """The source layers a model of n layers starts from: evenly spaced, the first and (n > 1) the last kept."""
    return [round(i * (n_source - 1) / (n - 1)) for i in range(n)] if n > 1 else [0]


def _load_teacher(args: argparse.Namespace) -> tuple[Model, object]:
    """--draft-for's model and tokenizer, refused unless autoregressive."""
    teacher, teacher_tokenizer = load(args.draft_for)
    if teacher.args.model_type != "ar":
        raise UserError(f"--draft-for {args.draft_for} is a {teacher.args.model_type} model: a drafter is trained "
                        "for an autoregressive one")
    return teacher, teacher_tokenizer


def _teacher(loaded: tuple[Model, object], model: Model, tokenizer) -> Model:
    """The loaded --draft-for model, frozen, checked to be one the drafter can draft for (vocabulary, states)."""
    teacher, teacher_tokenizer = loaded
    check_drafter(teacher, model, teacher_tokenizer, tokenizer)
    teacher.freeze()
    return teacher


def _new_model(args: argparse.Namespace, tokenizer, verifier: ModelArgs | None = None) -> Model:
    overrides = parse_arch(args.arch)
    if args.dropout:
        overrides["dropout"] = args.dropout
    if args.subs:
        overrides["subs_mask_id"] = tokenizer.mask_id
    if args.objective == "block":
        overrides["block_size"] = args.block_size
        overrides.update(_feature_reading(args, verifier))
    model_args = preset_args(args.preset, vocab_size=tokenizer.vocab_size, model_type=args.objective, **overrides)
    return init_model(model_args, seed=args.seed, init=args.init)


def prepare(args: argparse.Namespace, explicit: set[str] | None = None) -> Run:
    """Read the data, build or restore model, optimizer and random states, set up validation.

    On --resume the run's settings come from the checkpoint (see `resume_settings`)."""
    if args.objective == "block" and args.block_size is None:
        args = argparse.Namespace(**{**vars(args), "block_size": DEFAULT_BLOCK_SIZE})
    _check_args(args)
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    out = Path(args.out)
    resume_state = None
    if args.resume:
        resume_state = _restore(out, rank, size)
        args = resume_settings(args, explicit_settings(args) if explicit is None else explicit,
                               resume_state.get("args", {}), rank == 0)
        _check_args(args)
    elif (out / checkpoint.STATE_FILE).exists() or (out / CONFIG_FILE).exists():
        raise UserError(f"{out} already holds a model: pass --resume to continue it, or choose another --out")
    text = data.read_corpus(args.data)  # a missing corpus leaves no empty --out behind
    loaded_teacher = _load_teacher(args) if args.draft_for else None  # so does a teacher that is not AR
    verifier = loaded_teacher[0].args if loaded_teacher else None
    adapted = None
    if resume_state is None and args.init_from:  # so does a source that cannot be adapted
        mx.random.seed(args.seed)  # dropout and the model's other draws
        adapted = _adapted_model(args, verifier)
    if resume_state is None and rank == 0:
        ensure_dir(out, "--out")  # fail before any work, not at the first checkpoint
    data_sha = hashlib.sha256(text.encode()).hexdigest()
    if resume_state is not None:
        if resume_state.get("data_sha256", data_sha) != data_sha:
            raise UserError(f"the data ({args.data or 'Tiny Shakespeare'}) differs from the corpus this checkpoint "
                            "was trained on (sha256 mismatch)")
        model, tokenizer = load(out)
    elif adapted is not None:
        model, tokenizer = adapted
    else:
        tokenizer = _build_tokenizer(args, text)
        model = _new_model(args, tokenizer, verifier)
    if args.seq_len > model.args.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's context of {model.args.max_seq_len}")
    if args.dtype == "bfloat16":
        model.set_dtype(mx.bfloat16)
    if args.train_only:
        _train_only(model, args.train_only)

    tokens = tokenizer.encode_array(text)
    train_tokens, val_tokens = data.split_tokens(tokens, args.val_fraction)
    data.check_window(train_tokens, args.seq_len, "training")
    teacher = _teacher(loaded_teacher, model, tokenizer) if loaded_teacher else None
    evaluate, chars_per_token = None, 1.0
    if len(val_tokens) >= args.seq_len:
        val_windows = data.eval_windows(val_tokens, args.eval_batches * args.batch_size, args.seq_len)
        evaluate = make_evaluator(model, val_windows, tokenizer.mask_id, args.batch_size, (rank, size),
                                  teacher if model.args.feature_dim else None)
        chars_per_token = len(tokenizer.decode(val_tokens)) / len(val_tokens)
    elif rank == 0:
        print(f"note: validation split has fewer than {args.seq_len} tokens; skipping validation", file=sys.stderr)

    optimizer = optimizer_of(args)
    rng = np.random.default_rng(args.seed)  # every process draws the same global batch and keeps its rows
    progress = Progress()
    # With --ema: the initial weights, or on resume the model file, which holds the average.
    ema = tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters()) if args.ema else None
    if resume_state is not None:
        optimizer.init(model.trainable_parameters())
        saved, train_weights = checkpoint.load_optimizer_state(out)
        optimizer.state = tree_unflatten(saved)
        if ema is not None:  # the weights being trained sit beside the optimizer
            model.update(tree_map(lambda w, p: w.astype(p.dtype), tree_unflatten(train_weights),
                                  model.trainable_parameters()))
        progress = Progress(**{k: resume_state[k] for k in ("step", "skipped", "train_seconds", "flops", "val_loss")
                               if resume_state.get(k) is not None})
        rng.bit_generator.state = resume_state["data_rng"]
        mx.random.seed(int(resume_state["mlx_rng"]))
        if rank == 0:
            checkpoint.trim_metrics(out / checkpoint.METRICS_FILE, progress.step)
    else:
        mx.random.seed(args.seed)
        if rank == 0:
            (out / checkpoint.METRICS_FILE).unlink(missing_ok=True)  # rows of an earlier run that saved no model
    return Run(args, out, model, tokenizer, optimizer, train_tokens, evaluate, chars_per_token, data_sha, rng,
               progress, rank, size, ema, teacher)


def _banner(run: Run) -> str:
    a, m = run.args, run.model
    arch = f", arch {a.arch}" if a.arch else ""
    origin = f"from {a.init_from}{arch}" if a.init_from else f"{a.preset} preset{arch}, {a.init} init"
    block = f", blocks of {m.args.block_size}" + (", shifted" if m.args.logit_shift else "") \
        if m.args.model_type == "block" else ""
    block += (f", a {'feature ' if m.args.feature_dim else ''}drafter for {a.draft_for}" if a.draft_for else "")
    return (f"mlx_dlm.train: {m.args.model_type} model ({origin}{block}), "
            f"{m.num_params() / 1e6:.2f}M parameters, vocab {run.tokenizer.vocab_size} ({run.tokenizer.kind}), "
            f"{len(run.train_tokens):,} train tokens, batch {a.batch_size} x {a.seq_len}"
            + (f" per process x {run.size} processes = effective batch {a.batch_size * run.size}"
               if run.size > 1 else "")
            + f", device {mx.default_device()}, blas {blas.status}"
            + (f", {run.cpu_streams} CPU streams" if run.cpu_streams > 1 else ""))


class _Logger:
    """Rank 0's output: lines on stdout (above the progress bar on a terminal) and rows in metrics.jsonl."""

    def __init__(self, run: Run):
        self.bar = self.metrics = None
        if not run.main_rank:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=run.args.iters, initial=run.progress.step, unit="it", dynamic_ncols=True,
                            leave=False)
        self.metrics = open(run.out / checkpoint.METRICS_FILE, "a")

    def line(self, text: str) -> None:
        if self.metrics is not None:
            _log(text, self.bar)

    def row(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        for f in (self.metrics, self.bar):
            if f is not None:
                f.close()


@contextmanager
def _inference_weights(run: Run):
    """The model as it is evaluated and saved: eval mode (no dropout), and the EMA weights when kept."""
    trained = run.model.trainable_parameters()
    if run.ema is not None:
        run.model.update(tree_map(lambda e, p: e.astype(p.dtype), run.ema, trained))
    run.model.eval()
    try:
        yield trained
    finally:
        run.model.train()
        if run.ema is not None:
            run.model.update(trained)


def _validate(run: Run, log: _Logger) -> float:
    t0 = time.perf_counter()
    p = run.progress
    with _inference_weights(run):
        val = run.evaluate()
        bound = (FEATURE_BOUND if run.model.args.feature_dim else BOUNDS[run.model.args.model_type]) + (
            ", EMA weights" if run.ema else "")
        row = {"step": p.step, "val_loss": val, "val_bpc": val / math.log(2) / run.chars_per_token,
               "train_seconds": p.train_seconds, "flops": p.flops}
        log.line(f"Iter {p.step}: Val loss {val:.3f} nats/token, {row['val_bpc']:.3f} bits/char ({bound}), "
                 f"Val took {time.perf_counter() - t0:.2f}s")
        log.row(row)
        n = min(run.args.sample_tokens, run.args.seq_len)
        if n > 0 and p.step > 0 and run.main_rank and not run.model.args.feature_dim:  # a drafter alone: no text
            args = run.model.args
            pace = block_defaults(args) if args.model_type == "block" else {"steps": max(1, n // 4)}
            text = generate(run.model, run.tokenizer, '', max_tokens=n, seed=p.step, **pace)
            log.line(f"Sample: {text!r}")
    return val


def _save(run: Run, on_checkpoint: Callable[[int], None] | None) -> None:
    p = run.progress
    state = {"step": p.step, "data_rng": run.rng.bit_generator.state, "mlx_rng": _random_state(),
             "data_sha256": run.data_sha, "val_loss": p.val_loss, "skipped": p.skipped,
             "train_seconds": p.train_seconds, "flops": p.flops, "processes": run.size, "args": vars(run.args)}
    if run.main_rank:
        with _inference_weights(run) as trained:  # with --ema the model file holds the average
            checkpoint.save(run.out, run.model, run.optimizer, run.tokenizer, state,
                            trained if run.ema is not None else None)
        if run.model.args.model_type == "block":  # how it decodes by default (a file already there is kept)
            write_sampling_defaults(run.out, block_defaults(run.model.args))
        if on_checkpoint is not None:
            on_checkpoint(p.step)


def _stopping(run: Run, stop: StopRequest) -> bool:
    stopping = stop.signal is not None
    if run.size > 1:  # every process stops at the same step
        stopping = mx.distributed.all_sum(mx.array(float(stopping))).item() > 0
    return stopping


def _loop(run: Run, log: _Logger, stop: StopRequest, on_checkpoint) -> bool:
    """Train until --iters or a stop signal; returns True when stopped by a signal."""
    a, p = run.args, run.progress
    loss_fn = training_loss(run.model, run.tokenizer.mask_id, a.loss, a.t_sampling, a.t_per, run.teacher,
                            a.t_range, a.complementary)
    run.model.train()  # dropout on while training (`_inference_weights` switches it off)
    train_step = make_train_step(run.model, run.optimizer, loss_fn, a.grad_clip, a.skip_nonfinite, run.size > 1,
                                 streams=run.cpu_streams, shard=(run.rank, run.size), ema=run.ema,
                                 ema_decay=a.ema)
    rows = slice(run.rank * a.batch_size, (run.rank + 1) * a.batch_size)
    save_every = a.save_every or a.eval_every
    if run.evaluate is not None and p.step == 0:
        p.val_loss = _validate(run, log)  # the untrained baseline, as nanoGPT does
    window_steps, window_loss, window_seconds = 0, 0.0, 0.0
    while p.step < a.iters:
        tic = time.perf_counter()
        batch = mx.array(data.random_windows(run.train_tokens, a.batch_size * run.size, a.seq_len, run.rng)[rows])
        loss, grad_norm, applied = train_step(batch)
        lr = run.optimizer.learning_rate.item()  # the rate this update used (the schedule sets it before applying)
        p.step += 1
        if not applied.item():
            if not a.skip_nonfinite:
                kept = (f"last good checkpoint kept in {run.out}" if (run.out / checkpoint.STATE_FILE).exists()
                        else "no checkpoint was saved before it")
                raise UserError(f"loss or gradient became non-finite at step {p.step} (loss {loss.item()}); {kept}; "
                                "lower --learning-rate or pass --skip-nonfinite")
            p.skipped += 1
            log.line(f"Iter {p.step}: skipped a non-finite update ({p.skipped} so far)")
        else:
            window_steps += 1
            window_loss += loss.item()
        elapsed = time.perf_counter() - tic
        p.train_seconds += elapsed
        p.flops += run.flops_per_step
        window_seconds += elapsed
        log.tick()
        if (p.step % a.report_every == 0 or p.step == a.iters) and window_steps:
            row = {"step": p.step, "train_loss": window_loss / window_steps, "lr": lr,
                   "grad_norm": grad_norm.item(), "it_per_sec": window_steps / window_seconds,
                   "tokens_per_sec": window_steps * a.batch_size * run.size * a.seq_len / window_seconds,
                   "skipped": p.skipped, "train_seconds": p.train_seconds, "flops": p.flops}
            log.line(f"Iter {p.step}: Train loss {row['train_loss']:.3f}, Learning Rate {lr:.3e}, "
                     f"It/sec {row['it_per_sec']:.2f}, Tokens/sec {row['tokens_per_sec']:.0f}")
            log.row(row)
            window_steps, window_loss, window_seconds = 0, 0.0, 0.0
        if run.evaluate is not None and (p.step % a.eval_every == 0 or p.step == a.iters):
            p.val_loss = _validate(run, log)
        stopping = _stopping(run, stop)
        if p.step % save_every == 0 or p.step == a.iters or stopping:
            _save(run, on_checkpoint)
        if stopping:
            log.line(f"Stopped by {stop.signal or 'a signal'} at step {p.step}; checkpoint saved in {run.out}. "
                     f"Resume with: mlx_dlm.train --resume --out {run.out}")
            return True
    return False


def train(args: argparse.Namespace, on_checkpoint: Callable[[int], None] | None = None,
          explicit: set[str] | None = None) -> Path:
    """Run training as configured by parsed flags; returns the output directory.

    Under `mlx.launch -n N`, N processes train one model (data parallel): each takes its rows of a
    global batch of N x --batch-size, gradients are averaged, and only rank 0 prints and writes.
    on_checkpoint(step) is called after each checkpoint is written. explicit: the flags the user gave
    (resume refuses those that contradict the checkpoint); by default, those that differ from the defaults.
    """
    run = prepare(args, explicit)
    log = _Logger(run)
    log.line(_banner(run))
    if run.progress.step:
        log.line(f"Resuming from step {run.progress.step}")
    try:
        with StopRequest(run.out) as stop:
            stopped = _loop(run, log, stop, on_checkpoint)
    finally:
        log.close()
    if stopped:
        return run.out
    if run.size > 1:
        log.line(_replicas_agree(run))
    log.line(f"Saved model to {run.out} (step {run.progress.step})")
    if run.args.upload_repo and run.main_rank:
        from .upload import upload

        log.line(f"Uploaded to {upload(run.out, run.args.upload_repo)}")
    return run.out


def _replicas_agree(run: Run) -> str:
    """The closing line of a distributed run: whether every process ends with the same weights."""
    fingerprints = np.array(mx.distributed.all_gather(_fingerprint(run.model)[None]))
    same = bool((fingerprints == fingerprints[0]).all())
    return f"Parameters identical on all {run.size} processes: {'yes' if same else 'NO'}"


def _fingerprint(model: Model) -> mx.array:
    """A few float64-free sums over all parameters: equal on replicas that hold identical weights (the last one,
    weighted by position modulo 97, also tells weights apart that sit in other places)."""
    leaves = [v.astype(mx.float32).reshape(-1) for _, v in tree_flatten(model.parameters())]
    flat = mx.concatenate(leaves)
    return mx.stack([flat.sum(), (flat * flat).sum(), (flat * (mx.arange(flat.size) % 97)).sum()])


def _main(argv: list[str] | None) -> None:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    train(args, explicit=given_flags(parser, argv))


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
