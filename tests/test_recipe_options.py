"""Recipe options of the trainer: dropout, MDLM's SUBS parameterisation and an EMA of the weights.

Expectations: the same weights without the option (dropout in eval mode, SUBS's other logits), a float64
numpy cross-entropy over the non-mask vocabulary, and the EMA recursion written out in numpy.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_dlm
from mlx_dlm import train
from mlx_dlm.diffusion import masked_loss
from mlx_dlm.model import init_model, preset_args

from conftest import TINY_TRAIN, metrics_rows

TOKENS = mx.array(np.arange(48).reshape(3, 16) % 16)
T = mx.array([0.2, 0.5, 0.9])


def _model(seed=0, **overrides):
    return init_model(preset_args("tiny", vocab_size=16, **overrides), seed=seed)


def _train(tmp_path, text, *flags, name="run", on_checkpoint=None):
    args = train.setup_arg_parser().parse_args(["--data", str(text), "--out", str(tmp_path / name), *TINY_TRAIN,
                                                *flags])
    return train.train(args, on_checkpoint)


def test_dropout_is_active_in_training_mode_only():
    plain, dropped = _model(), _model(dropout=0.3)  # dropout adds no weights: same seed, same weights
    want = np.array(plain(TOKENS, T))
    dropped.train()
    first, second = np.array(dropped(TOKENS, T)), np.array(dropped(TOKENS, T))
    assert not np.allclose(first, want, atol=1e-3) and not np.allclose(first, second, atol=1e-3)
    dropped.eval()
    np.testing.assert_array_equal(np.array(dropped(TOKENS, T)), want)


def test_dropout_flag_trains_with_dropout_and_validates_without(tmp_path, small_text_path):
    """Same init either way: the step-0 validation (eval mode) is identical, the training losses are not."""
    flags = ("--iters", "3", "--report-every", "1", "--eval-every", "3")
    plain = metrics_rows(_train(tmp_path, small_text_path, *flags, name="plain"))
    dropped_dir = _train(tmp_path, small_text_path, *flags, "--dropout", "0.3", name="dropout")
    dropped = metrics_rows(dropped_dir)
    assert plain[0]["step"] == 0 and plain[0]["val_loss"] == dropped[0]["val_loss"]
    losses = lambda rows: np.array([r["train_loss"] for r in rows if "train_loss" in r])  # noqa: E731
    assert np.abs(losses(plain) - losses(dropped)).max() > 1e-3
    model, _ = mlx_dlm.load(dropped_dir)
    assert model.args.dropout == 0.3 and not model.training


def test_subs_bans_the_mask_logit_and_renormalises_the_loss():
    plain, subs = _model(), _model(subs_mask_id=0)
    raw, got = np.array(plain(TOKENS, T)).astype(np.float64), np.array(subs(TOKENS, T))
    assert np.all(np.isneginf(got[..., 0]))
    np.testing.assert_array_equal(got[..., 1:], raw[..., 1:].astype(np.float32))
    targets = np.array(TOKENS)
    hidden = (np.arange(48).reshape(3, 16) % 3 == 0) & (targets != 0)
    rest = raw[..., 1:]  # the softmax over every id but the mask
    logp = rest - rest.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, targets[..., None] - 1, -1)[..., 0] * hidden
    want = ((ce / np.array(T)[:, None]).sum(1) / 16).mean()
    loss = masked_loss(subs(TOKENS, T), TOKENS, mx.array(hidden), T)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    plain_loss = float(masked_loss(plain(TOKENS, T), TOKENS, mx.array(hidden), T))
    assert plain_loss > want  # the mask's share of probability is gone


def test_subs_keeps_half_precision_logits_half():
    """The banned logit is written in the logits' own dtype: a bfloat16 model's logits stay bfloat16."""
    subs = _model(subs_mask_id=0)
    subs.set_dtype(mx.bfloat16)
    logits = subs(TOKENS, T)
    assert logits.dtype == mx.bfloat16 and np.all(np.isneginf(np.array(logits[..., 0].astype(mx.float32))))


def test_subs_flag_sets_the_tokenizers_mask_id(tmp_path, small_text_path):
    out = _train(tmp_path, small_text_path, "--iters", "2", "--subs")
    model, tokenizer = mlx_dlm.load(out)
    assert model.args.subs_mask_id == tokenizer.mask_id
    assert np.isfinite([r["val_loss"] for r in metrics_rows(out) if "val_loss" in r]).all()


def test_ema_follows_the_recursion_of_the_trained_weights():
    decay, steps = 0.8, 5
    model = _model()
    optimizer = train.optimizer_of(train.setup_arg_parser().parse_args(["--iters", "10", "--warmup", "0"]))
    ema = tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters())

    def loss_fn(model, batch, key=None, shard=(0, 1)):
        return (model(batch, T) ** 2).mean()

    step = train.make_train_step(model, optimizer, loss_fn, ema=ema, ema_decay=decay)
    want = {k: np.array(v, np.float64) for k, v in tree_flatten(ema)}
    for n in range(1, steps + 1):
        step(TOKENS)
        d = min(decay, (1 + n) / (train.EMA_WARMUP + n))
        for k, p in tree_flatten(model.trainable_parameters()):
            want[k] = d * want[k] + (1 - d) * np.array(p, np.float64)
    got = dict(tree_flatten(ema))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(np.array(got[k]), want[k], atol=1e-6, err_msg=k)
    moved = max(np.abs(np.array(got[k]) - np.array(p)).max() for k, p in tree_flatten(model.trainable_parameters()))
    assert moved > 1e-4  # the average is not the weights


class _Crash(Exception):
    pass


def test_ema_run_saves_the_average_and_resumes_exactly(tmp_path, small_text_path):
    flags = ("--iters", "8", "--save-every", "4", "--eval-every", "4", "--ema", "0.9")
    straight = _train(tmp_path, small_text_path, *flags, name="a")

    def crash_at_4(step):
        if step == 4:
            raise _Crash

    with pytest.raises(_Crash):
        _train(tmp_path, small_text_path, *flags, name="b", on_checkpoint=crash_at_4)
    resumed = _train(tmp_path, small_text_path, *flags, "--resume", name="b")
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = mx.load(str(straight / name)), mx.load(str(resumed / name))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=f"{name}: {k}")
    saved = mx.load(str(straight / "model.safetensors"))
    trained = {k[len("train_weights."):]: v for k, v in mx.load(str(straight / "optimizer.safetensors")).items()
               if k.startswith("train_weights.")}
    assert trained.keys() == {k for k in saved if k in trained} and len(trained) > 5
    assert max(float(mx.abs(saved[k] - trained[k]).max()) for k in trained) > 1e-4  # the model file is the average
    # ... an average that followed the training: nearer the trained weights than the initial ones are.
    initial = dict(tree_flatten(train.prepare(train.setup_arg_parser().parse_args(
        ["--data", str(small_text_path), "--out", str(tmp_path / "init"), *TINY_TRAIN, *flags])).model.parameters()))
    for k in trained:
        assert float(mx.abs(saved[k] - trained[k]).sum()) < float(mx.abs(initial[k] - trained[k]).sum()), k
    vals = [r["val_loss"] for r in metrics_rows(straight) if "val_loss" in r]
    model, tokenizer = mlx_dlm.load(straight)  # the last validation scored the saved (averaged) weights
    windows = train.data.eval_windows(
        train.data.split_tokens(tokenizer.encode_array(small_text_path.read_text()), 0.1)[1], 2 * 8, 64)
    assert train.make_evaluator(model, windows, tokenizer.mask_id, 8)() == pytest.approx(vals[-1], rel=1e-6)
