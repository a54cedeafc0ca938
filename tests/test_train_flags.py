"""Training flags reach what they control: each test fails when its flag is ignored.

Expectations are closed forms (the learning-rate schedule, Adam's first moment after one clipped step),
file contents (dtypes, SentencePiece scores) or the values handed to the loss and the optimizer.
"""

import contextlib
import math
import os

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_dlm import blas, train
from mlx_dlm.diffusion import diffusion_loss
from mlx_dlm.model import init_model, preset_args

from conftest import TINY_TRAIN, metrics_rows, learning_rates

BETA1 = 0.9  # AdamW's default first-moment decay


def _train(tmp_path, small_text_path, *flags, name="run"):
    out = tmp_path / name
    train.main(["--data", str(small_text_path), "--out", str(out), *TINY_TRAIN, "--eval-every", "1000", *flags])
    return out


def test_learning_rate_follows_warmup_then_cosine_to_the_floor(tmp_path, small_text_path):
    peak, floor, warmup, iters = 0.01, 0.2, 4, 12
    out = _train(tmp_path, small_text_path, "--iters", str(iters), "--warmup", str(warmup), "--learning-rate",
                 str(peak), "--min-lr-ratio", str(floor), "--report-every", "1")

    def expected(step):  # the rate of update `step` (1-based): the schedule at step - 1 updates done
        k = step - 1
        if k < warmup:
            return peak * k / warmup
        return peak * floor + (peak - peak * floor) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (iters - warmup)))

    rows = [r for r in metrics_rows(out) if "lr" in r]
    assert [r["step"] for r in rows] == list(range(1, iters + 1))
    assert [r["lr"] for r in rows] == pytest.approx([expected(r["step"]) for r in rows], rel=1e-5, abs=1e-12)
    assert rows[warmup]["lr"] == pytest.approx(peak) and rows[-1]["lr"] < peak * (floor + 0.05)


def _rates(*flags, updates):
    """The learning rate of each of the first `updates` updates of the optimizer the flags describe."""
    return learning_rates(train.optimizer_of(train.setup_arg_parser().parse_args(["--learning-rate", "0.01", *flags])),
                          updates)


def test_learning_rate_schedule_at_its_edges():
    cosine = [0.01 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * k / 4))) for k in range(4)]
    assert _rates("--iters", "4", "--warmup", "0", "--min-lr-ratio", "0.5", updates=4) == pytest.approx(cosine)
    # A warm-up as long as the run is cut to iters - 1 steps, so the last update still reaches the peak.
    assert _rates("--iters", "5", "--warmup", "100", updates=5) == pytest.approx([0, 0.0025, 0.005, 0.0075, 0.01])
    assert _rates("--iters", "1", "--warmup", "100", updates=1) == pytest.approx([0.01])  # one update: the peak
    # One warm-up step: the first update at rate 0, then cosine from the peak to 0.1 of it over the other two.
    assert _rates("--iters", "3", "--warmup", "1", updates=3) == pytest.approx([0, 0.01, 0.01 * (0.1 + 0.9 * 0.5)])


@pytest.mark.parametrize("clip", [1e-3, 0.0])
def test_grad_clip_bounds_the_update(tmp_path, small_text_path, clip):
    """After one AdamW step from zero state, the first moments are (1 - beta1) x the (clipped) gradient."""
    out = _train(tmp_path, small_text_path, "--iters", "1", "--warmup", "0", "--grad-clip", str(clip),
                 "--report-every", "1")
    moments = [v for k, v in mx.load(str(out / "optimizer.safetensors")).items() if k.endswith(".m")]
    norm = math.sqrt(sum(float((m.astype(mx.float32) ** 2).sum()) for m in moments))
    grad_norm = next(r["grad_norm"] for r in metrics_rows(out) if "grad_norm" in r)  # before clipping
    assert grad_norm > 10 * 1e-3
    assert norm == pytest.approx((1 - BETA1) * (min(clip, grad_norm) if clip else grad_norm), rel=1e-3)


def test_bfloat16_flag_trains_and_saves_bfloat16_weights(tmp_path, small_text_path):
    out = _train(tmp_path, small_text_path, "--iters", "2", "--dtype", "bfloat16")
    weights = mx.load(str(out / "model.safetensors"))
    assert weights and all(v.dtype == mx.bfloat16 for v in weights.values())


def test_loss_and_t_sampling_flags_reach_the_loss(tmp_path, small_text_path, monkeypatch):
    seen = []
    real = train.training_loss

    def spy(model, mask_id, loss="elbo", t_sampling="stratified", t_per="block", teacher=None, t_range=(0.0, 1.0),
            complementary=False):
        seen.append((loss, t_sampling, t_per) + ((tuple(t_range), complementary) if complementary else ()))
        return real(model, mask_id, loss, t_sampling, t_per, teacher, t_range, complementary)

    monkeypatch.setattr(train, "training_loss", spy)
    _train(tmp_path, small_text_path, "--iters", "1", "--loss", "masked-mean", "--t-sampling", "batch")
    assert ("masked-mean", "batch", "block") in seen
    _train(tmp_path, small_text_path, "--iters", "1", "--objective", "block", "--t-per", "sequence", name="block")
    assert ("elbo", "stratified", "sequence") in seen
    _train(tmp_path, small_text_path, "--iters", "1", "--objective", "block", "--t-range", "0.3", "0.8",
           "--complementary", name="block2")
    assert ("elbo", "stratified", "block", (0.3, 0.8), True) in seen
    # ... and the loss it builds is that diffusion loss, not the default one.
    model = init_model(preset_args("tiny", vocab_size=12, dim=32, n_layers=1), seed=0)
    batch = mx.array(np.random.default_rng(0).integers(1, 12, size=(8, 32)).astype(np.int32))
    losses = {(loss, t): diffusion_loss(model, batch, 0, loss, t, key=mx.random.key(3)).item()
              for loss in ("elbo", "masked-mean") for t in ("stratified", "batch")}
    assert len(set(losses.values())) == 4
    for (loss, t), value in losses.items():
        assert real(model, 0, loss, t)(model, batch, key=mx.random.key(3)).item() == value


def test_weight_decay_reaches_adamw(tmp_path, small_text_path):
    args = train.setup_arg_parser().parse_args(["--data", str(small_text_path), "--out", str(tmp_path / "r"),
                                                "--weight-decay", "0.25", "--learning-rate", "0.1", "--warmup", "0",
                                                *TINY_TRAIN])
    run = train.prepare(args)
    assert run.optimizer.weight_decay == 0.25
    # With zero gradients an AdamW step only decays: w <- w (1 - lr x wd).
    w = run.model.layers[0].mlp.fc1.weight
    before = np.array(w)
    run.optimizer.update(run.model, tree_map(mx.zeros_like, run.model.trainable_parameters()))
    np.testing.assert_allclose(np.array(run.model.layers[0].mlp.fc1.weight), before * (1 - 0.1 * 0.25), rtol=1e-6)


@pytest.mark.parametrize("init, tied", [("local", True), ("simple_dlm", False)])
def test_init_flag_reaches_the_weights(tmp_path, small_text_path, init, tied):
    """--init local starts every key projection as its query; simple_dlm's scheme leaves them independent."""
    from test_init import _query_key_rows

    args = train.setup_arg_parser().parse_args(["--data", str(small_text_path), "--out", str(tmp_path / "r"),
                                                "--init", init, *TINY_TRAIN])
    (q, k), _ = _query_key_rows(train.prepare(args).model)
    assert np.array_equal(q, k) is tied


@pytest.mark.parametrize("kind", ["bpe", "unigram", None])
def test_sp_model_type_flag_picks_the_sentencepiece_algorithm(tmp_path, small_text_path, kind):
    """BPE pieces are scored by merge order (whole numbers); unigram pieces by log-probabilities. Without the flags:
    BPE with 512 pieces."""
    import sentencepiece as spm

    flags = ["--vocab-size", "200", "--sp-model-type", kind] if kind else []
    out = _train(tmp_path, small_text_path, "--iters", "1", "--tokenizer", "sp", *flags)
    sp = spm.SentencePieceProcessor(model_file=str(next(out.glob("*.model"))))
    scores = [sp.GetScore(i) for i in range(sp.GetPieceSize()) if not (sp.IsControl(i) or sp.IsUnknown(i))]
    whole = all(float(s).is_integer() for s in scores)
    assert whole == (kind != "unigram") and sp.GetPieceSize() == (200 if kind else 512)


@pytest.mark.parametrize("flag", ["--init", "--tokenizer", "--sp-model-type", "--objective", "--loss", "--dtype"])
def test_flags_with_choices_refuse_others(capsys, flag):
    with pytest.raises(SystemExit) as exc:
        train.setup_arg_parser().parse_args([flag, "neither"])
    assert exc.value.code == 2 and f"argument {flag}: invalid choice: 'neither'" in capsys.readouterr().err

def test_flags_take_the_values_the_readme_names():
    parse = train.setup_arg_parser().parse_args
    for flag, values in [("--tokenizer", ("char", "sp")), ("--sp-model-type", ("bpe", "unigram")),
                         ("--init", ("local", "simple_dlm")), ("--objective", ("dlm", "ar"))]:
        for value in values:
            assert getattr(parse([flag, value]), flag[2:].replace("-", "_")) == value


def test_usage_names_the_command_and_the_values_flags_take():
    text = train.setup_arg_parser().format_help()
    assert text.startswith("usage: mlx_dlm.train [-h]") and "--arch KEY=VALUE" in text and "--ema DECAY" in text


def test_skipped_update_is_a_no_op():
    """normal, skipped non-finite, normal == normal, normal: weights and optimizer state untouched by the skip."""
    def run(scales):
        model = init_model(preset_args("tiny", vocab_size=16), seed=0)
        optimizer = train.optimizer_of(train.setup_arg_parser().parse_args(["--iters", "10", "--warmup", "0"]))
        tokens, t = mx.array(np.arange(32).reshape(2, 16) % 16), mx.array([0.3, 0.7])

        def loss_fn(model, scale, key=None, shard=(0, 1)):
            return (model(tokens, t) ** 2).mean() * scale

        step = train.make_train_step(model, optimizer, loss_fn, grad_clip=1.0, skip_nonfinite=True)
        applied = [bool(step(mx.array(s))[2]) for s in scales]
        flat = dict(tree_flatten(model.parameters()))
        flat.update({f"opt.{k}": v for k, v in tree_flatten(optimizer.state)})
        return applied, {k: np.array(v) for k, v in flat.items()}

    applied, with_skip = run([1.0, float("nan"), 1.0])
    _, without = run([1.0, 1.0])
    assert applied == [True, False, True]
    assert with_skip.keys() == without.keys()
    for k in without:
        np.testing.assert_array_equal(with_skip[k], without[k], err_msg=k)


@pytest.mark.parametrize("tokenizer", ["char", "sp"])
def test_val_bpc_converts_nats_per_token_to_bits_per_character(tmp_path, small_text_path, tokenizer):
    import mlx_dlm

    flags = ["--tokenizer", "sp", "--vocab-size", "200"] if tokenizer == "sp" else []
    out = _train(tmp_path, small_text_path, "--iters", "1", *flags)
    _, tok = mlx_dlm.load(out)
    text = small_text_path.read_text(encoding="utf-8")
    tokens = tok.encode_array(text)
    val = tokens[len(tokens) - round(0.1 * len(tokens)):]  # the held-out last 10% of tokens
    chars_per_token = len(tok.decode(val)) / len(val)
    assert (chars_per_token == 1.0) == (tokenizer == "char") and chars_per_token < 10
    for row in (r for r in metrics_rows(out) if "val_loss" in r):
        assert row["val_bpc"] == pytest.approx(row["val_loss"] / math.log(2) / chars_per_token, rel=1e-9)


def test_cpu_streams_flag_reaches_the_step_and_keeps_the_loss(tmp_path, small_text_path, capsys, monkeypatch):
    """--cpu-streams 2 splits the batch (the banner says so; each step shares the cores out among the streams' BLAS
    calls) and trains to the same losses as one stream."""
    threads, real = [], blas.threads

    @contextlib.contextmanager
    def recorded(n):
        threads.append(n)
        with real(n):
            yield

    monkeypatch.setattr(blas, "threads", recorded)
    one = metrics_rows(_train(tmp_path, small_text_path, "--iters", "3", "--report-every", "1", "--cpu-streams", "1",
                       name="one"))
    assert "CPU streams" not in capsys.readouterr().out and threads == [None] * 3  # BLAS left as it is
    threads.clear()
    two = metrics_rows(_train(tmp_path, small_text_path, "--iters", "3", "--report-every", "1", "--cpu-streams", "2",
                       name="two"))
    assert "2 CPU streams" in capsys.readouterr().out and threads == [max(1, (os.cpu_count() or 1) // 2)] * 3
    losses = lambda rows: [r["train_loss"] for r in rows if "train_loss" in r]  # noqa: E731
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4)
