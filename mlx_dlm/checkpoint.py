"""Training checkpoints that survive being killed at any moment, even mid-save.

A checkpoint is the model directory plus optimizer.safetensors; both safetensors files carry the
step in their metadata, and the optimizer file also carries the training state (step, data and
random states) as JSON, so one file pair is a complete checkpoint. Before a save replaces the
pair, the current pair is hard-linked to model.prev.safetensors / optimizer.prev.safetensors.
Every replace is atomic, so at any instant at least one pair (current or prev) has matching
steps, and resume picks the newest such pair. state.json is a readable copy of the state.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import UserError
from .fileio import atomic_write, atomic_write_text, write_point
from .io import WEIGHTS_FILE, save_model

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
PREVIOUS = {WEIGHTS_FILE: "model.prev.safetensors", OPTIMIZER_FILE: "optimizer.prev.safetensors"}


def _keep_previous(out: Path) -> None:
    """Hard-link (or copy) the current pair to the prev names, model first."""
    for current, previous in PREVIOUS.items():
        if (out / current).exists():
            tmp = out / f".{previous}.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(out / current, tmp)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(out / current, tmp)
            write_point()
            os.replace(tmp, out / previous)
            write_point()


TRAIN_WEIGHTS = "train_weights."  # prefix of the trained weights in the optimizer file when the model file holds an EMA


def save(out: Path, model, optimizer, tokenizer, state: dict, train_weights: dict | None = None) -> None:
    """Write a checkpoint of `state["step"]` without ever leaving no complete one behind.

    train_weights: the weights being trained, when `model` holds others (their moving average); they are
    stored in the optimizer file."""
    out.mkdir(parents=True, exist_ok=True)
    _keep_previous(out)
    tag = {"step": str(state["step"])}
    opt_state = dict(tree_flatten(optimizer.state))
    if train_weights is not None:
        opt_state.update({TRAIN_WEIGHTS + k: v for k, v in tree_flatten(train_weights)})
    meta = {**tag, "state": json.dumps(state)}
    # Optimizer first: a first save killed early leaves no config.json, so a fresh run may start over.
    atomic_write(out / OPTIMIZER_FILE, lambda tmp: mx.save_safetensors(tmp, opt_state, metadata=meta))
    save_model(out, model, tokenizer, metadata=tag)
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _metadata(path: Path) -> dict | None:
    try:
        return mx.load(str(path), return_metadata=True)[1]
    except (RuntimeError, ValueError, OSError):
        return None  # missing or torn


def restore(out: Path) -> dict:
    """Make the newest complete pair current and return its training state (and the optimizer arrays)."""
    pairs = [(WEIGHTS_FILE, OPTIMIZER_FILE), tuple(PREVIOUS.values())]
    for model_file, opt_file in pairs:
        m, o = _metadata(out / model_file), _metadata(out / opt_file)
        if m and o and m.get("step") == o.get("step") and "state" in o:
            state = json.loads(o["state"])
            if model_file != WEIGHTS_FILE:  # the current pair was torn by a kill: go back to the previous one
                for current, previous in PREVIOUS.items():
                    atomic_write(out / current, lambda tmp, src=out / previous: shutil.copyfile(src, tmp))
                print(f"note: the newest checkpoint in {out} is incomplete (interrupted while saving); resuming "
                      f"from the previous one, step {state['step']}", file=sys.stderr)
            return state
    raise UserError(f"no complete checkpoint to resume in {out} (need {WEIGHTS_FILE} and {OPTIMIZER_FILE} "
                    "from the same step)")


def load_optimizer_state(out: Path) -> tuple[list, list]:
    """The optimizer arrays of the current checkpoint and the trained weights stored beside them (empty unless
    the model file holds a moving average), each as (name, array) pairs."""
    arrays = mx.load(str(out / OPTIMIZER_FILE)).items()
    return ([(k, v) for k, v in arrays if not k.startswith(TRAIN_WEIGHTS)],
            [(k[len(TRAIN_WEIGHTS):], v) for k, v in arrays if k.startswith(TRAIN_WEIGHTS)])


def trim_metrics(path: Path, step: int) -> None:
    """Drop torn lines and rows written after the checkpoint we resume from."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line from a killed run
        if row.get("step", 0) <= step:
            rows.append(line)
    atomic_write_text(path, "".join(r + "\n" for r in rows))
