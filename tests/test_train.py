import ast
import contextlib
import io
import json
import os
import re
import sys
import time
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dlm
from mlx_dlm import blas, train
from mlx_dlm.diffusion import diffusion_loss
from mlx_dlm.errors import UserError
from mlx_dlm.model import init_model, preset_args

from conftest import TINY_TRAIN, cli_error, metrics_rows, untrained, user_error


def _params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_train_step_defaults_are_a_plain_update():
    """make_train_step's defaults: the gradient applied unclipped, and a non-finite update applied as is (reported
    through `applied`, not skipped)."""
    import mlx.nn as nn

    model = init_model(preset_args("tiny", vocab_size=12, dim=32, n_layers=1), seed=0)
    batch = mx.array(np.random.default_rng(0).integers(1, 12, size=(8, 32)).astype(np.int32))

    def fixed(model, batch, key=None, shard=(0, 1)):  # one draw of masks, whatever the step's key
        return 10 * diffusion_loss(model, batch, 0, key=mx.random.key(0))

    before = _params(model)
    _, grads = nn.value_and_grad(model, fixed)(model, batch)
    grads = {k: np.array(g) for k, g in tree_flatten(grads)}
    loss, grad_norm, applied = train.make_train_step(model, optim.SGD(learning_rate=1.0), fixed)(batch)
    assert applied.item() and grad_norm.item() == pytest.approx(np.sqrt(sum((g * g).sum() for g in grads.values())),
                                                                 rel=1e-5)
    assert grad_norm.item() > 1  # a clip at 1 would shrink it
    after = _params(model)
    for k in before:
        np.testing.assert_allclose(after[k], before[k] - grads[k], rtol=1e-4, atol=1e-6, err_msg=k)
    step = train.make_train_step(model, optim.SGD(learning_rate=1.0), lambda *a, **kw: fixed(*a, **kw) * np.nan)
    assert not step(batch)[2].item()
    assert all(np.isnan(v).all() for v in _params(model).values())


def test_compiled_step_draws_fresh_masks():
    model = init_model(preset_args("tiny", vocab_size=12, dim=32, n_layers=1), seed=0)
    before = _params(model)
    step = train.make_train_step(model, optim.SGD(learning_rate=0.0), partial(diffusion_loss, mask_id=0))
    batch = mx.array(np.random.default_rng(0).integers(1, 12, size=(8, 32)).astype(np.int32))
    mx.random.seed(0)
    losses = [step(batch)[0].item() for _ in range(4)]
    assert len(set(losses)) == 4  # same batch and weights: only fresh masks / t can change the loss
    mx.random.seed(0)
    assert step(batch)[0].item() == losses[0]  # and the draws follow the seeded random state
    after = _params(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_compiled_step_learns():
    model = init_model(preset_args("tiny", vocab_size=12, dim=32, n_layers=1), seed=0)
    step = train.make_train_step(model, optim.AdamW(learning_rate=3e-3), partial(diffusion_loss, mask_id=0), 1.0)
    batch = mx.array(np.tile(np.arange(1, 12, dtype=np.int32), (16, 3))[:, :32])
    mx.random.seed(1)
    first = np.mean([step(batch)[0].item() for _ in range(5)])
    for _ in range(150):
        step(batch)
    last = np.mean([step(batch)[0].item() for _ in range(5)])
    assert last < 0.5 * first


@pytest.mark.parametrize("objective,loss", [("dlm", "elbo"), ("ar", "elbo")])
def test_batch_split_over_cpu_streams_is_the_whole_batch_step(objective, loss):
    """Two parts on two CPU streams give the loss, gradient norm and update of one whole-batch step: the parts
    see the same mask ratios and masks (shards of one draw), and the mean of their losses is the batch's."""
    def one_step(streams):
        model = init_model(preset_args("tiny", vocab_size=20, model_type=objective), seed=0)
        loss_fn = train.training_loss(model, mask_id=0, loss=loss)
        # SGD: the update is the (clipped) gradient itself (Adam's first step would amplify float noise in
        # near-zero gradients to +-lr)
        step = train.make_train_step(model, optim.SGD(learning_rate=1.0), loss_fn, 1.0, streams=streams)
        mx.random.seed(7)
        batch = mx.array(np.random.default_rng(0).integers(1, 20, size=(8, 32)), dtype=mx.int32)
        out = [float(a) for a in step(batch)[:2]]
        return out, {k: np.array(v) for k, v in tree_flatten(model.parameters())}

    (loss1, norm1), params1 = one_step(1)
    (loss2, norm2), params2 = one_step(2)
    assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-4)
    for name in params1:
        np.testing.assert_allclose(params2[name], params1[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_blas_threads_are_set_for_the_block_and_restored():
    before = blas.get_threads()
    if before is None:
        pytest.skip("no OpenBLAS loaded")
    with blas.threads(1):
        assert blas.get_threads() == 1
    assert blas.get_threads() == before
    with blas.threads(None):
        assert blas.get_threads() == before


@pytest.mark.parametrize("cores, streams, threads", [(4, 2, 2), (2, 2, 1), (3, 2, 1), (1, 2, 1), (None, 2, 1),
                                                    (4, 1, None)])
def test_streams_share_the_cores_among_their_blas_calls(monkeypatch, cores, streams, threads):
    """While a split step runs, each stream's BLAS gets cores // streams threads (at least 1; an unknown count
    is one core); an unsplit step leaves BLAS alone (None)."""
    asked = []
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(blas, "threads", lambda n: asked.append(n) or contextlib.nullcontext())
    model = init_model(preset_args("tiny", vocab_size=20), seed=0)
    step = train.make_train_step(model, optim.SGD(learning_rate=0.1), train.training_loss(model, mask_id=0),
                                 streams=streams)
    step(mx.array(np.random.default_rng(0).integers(1, 20, size=(4, 16)), dtype=mx.int32))
    assert asked == [threads]


def test_training_run_writes_model_and_falling_val_loss(tiny_model_dir):
    rows = metrics_rows(tiny_model_dir)
    train_rows = [r for r in rows if "train_loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 20, 40] and val[-1] < val[0]
    assert {"lr", "it_per_sec", "tokens_per_sec", "grad_norm"} <= set(train_rows[0])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "state.json"):
        assert (tiny_model_dir / name).exists()
    assert not list(tiny_model_dir.glob(".*tmp*"))  # no temp files left behind
    assert json.loads((tiny_model_dir / "state.json").read_text())["step"] == 40


@pytest.mark.parametrize("flags, kind, arch, init, streams, bound", [
    ([], "dlm", "", "local", "", "ELBO"),
    (["--objective", "ar", "--ema", "0.9", "--arch", "n_layers=1", "--init", "simple_dlm", "--cpu-streams", "2"],
     "ar", ", arch ['n_layers=1']", "simple_dlm", ", 2 CPU streams", "NLL, EMA weights"),
])
def test_console_reports_what_metrics_jsonl_holds(tmp_path, small_text_path, capsys, flags, kind, arch, init,
                                                  streams, bound):
    """The printed lines (mlx-lm's style) carry the metrics rows' values, in the order the cadence flags ask."""
    text, out = small_text_path.read_text(), tmp_path / "run"
    tic = time.perf_counter()
    train.main(["--data", str(small_text_path), "--out", str(out), *TINY_TRAIN, "--iters", "12", "--report-every", "5",
                "--eval-every", "6", "--sample-tokens", "16", *flags])
    seconds = time.perf_counter() - tic
    lines = capsys.readouterr().out.splitlines()
    rows = metrics_rows(out)
    model, tok = mlx_dlm.load(out)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert lines[0] == (f"mlx_dlm.train: {kind} model (tiny preset{arch}, {init} init), {params / 1e6:.2f}M "
                        f"parameters, vocab {len(set(text)) + 1} (char), {round(len(text) * 0.9):,} train tokens, "
                        f"batch 8 x 64, device {mx.default_device()}, blas {blas.status}{streams}")
    assert lines[-1] == f"Saved model to {out} (step 12)"
    kinds = [line.split(":")[1].split()[0] if line.startswith("Iter ") else line.split(":")[0] for line in lines[1:-1]]
    assert kinds == ["Val", "Train", "Val", "Sample", "Train", "Train", "Val", "Sample"]  # reports 5, 10, 12; vals 0, 6, 12
    train_rows, val_rows = [r for r in rows if "train_loss" in r], [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 12] and [r["step"] for r in val_rows] == [0, 6, 12]
    train_lines = [line for line in lines if "Train loss" in line]
    for line, r in zip(train_lines, train_rows, strict=True):
        assert r["tokens_per_sec"] == pytest.approx(r["it_per_sec"] * 8 * 64)
        assert line == (f"Iter {r['step']}: Train loss {r['train_loss']:.3f}, Learning Rate {r['lr']:.3e}, "
                        f"It/sec {r['it_per_sec']:.2f}, Tokens/sec {r['tokens_per_sec']:.0f}")
    val_lines = [re.fullmatch(rf"Iter (\d+): Val loss (\S+) nats/token, (\S+) bits/char \({bound}\), Val took (\S+)s",
                              line) for line in lines if "Val loss" in line]
    for match, r in zip(val_lines, val_rows, strict=True):
        assert int(match[1]) == r["step"] and 0 <= float(match[4]) <= seconds
        assert (float(match[2]), float(match[3])) == (round(r["val_loss"], 3), round(r["val_bpc"], 3))
    samples = [ast.literal_eval(line[len("Sample: "):]) for line in lines if line.startswith("Sample: ")]
    start = "\n" if kind == "ar" else ""  # an AR model starts from a newline, as nanoGPT's sample.py does
    assert all(s.startswith(start) and len(s) == len(start) + 16 for s in samples) and len(samples) == 2
    assert set("".join(samples)) <= set(text)
    # The last sample: from the saved (step 12) weights, seeded by the step.
    assert samples[-1] == mlx_dlm.generate(model, tok, "", max_tokens=16, steps=4, seed=12)


@pytest.mark.parametrize("n", [1, 4])
def test_short_samples_show_from_the_first_step(tmp_path, small_text_path, capsys, n):
    """With validation at every step, an n-character sample follows each validation after the untrained step 0;
    the last is what the saved model gives with n // 4 steps (at least one), seeded by the step."""
    out = tmp_path / "run"
    train.main(["--data", str(small_text_path), "--out", str(out), *TINY_TRAIN, "--iters", "2", "--eval-every", "1",
                "--sample-tokens", str(n)])
    lines = capsys.readouterr().out.splitlines()
    samples = [ast.literal_eval(line[len("Sample: "):]) for line in lines if line.startswith("Sample: ")]
    assert len(samples) == 2 and all(len(s) == n for s in samples)
    model, tok = mlx_dlm.load(out)
    assert samples[-1] == mlx_dlm.generate(model, tok, "", max_tokens=n, steps=1, seed=2)


def test_report_rows_average_the_steps_of_their_window_and_checkpoints_follow_save_every(tmp_path, small_text_path):
    """A row every 4 steps holds the mean of the per-step losses a row-per-step run logs (same seed, same draws);
    its rate is its steps over the training seconds it adds; FLOPs grow by a fixed amount per step; checkpoints
    land every --save-every steps and at the end (else every --eval-every)."""
    parse = train.setup_arg_parser().parse_args
    common = ["--data", str(small_text_path), *TINY_TRAIN, "--iters", "10"]
    saved, wall = {}, {}
    for name, flags in [("each", ["--report-every", "1", "--eval-every", "4"]),
                        ("fours", ["--report-every", "4", "--eval-every", "1000", "--save-every", "3"])]:
        steps = saved.setdefault(name, [])
        tic = time.perf_counter()
        train.train(parse([*common, *flags, "--out", str(tmp_path / name)]), steps.append)
        wall[name] = time.perf_counter() - tic
    assert saved == {"each": [4, 8, 10], "fours": [3, 6, 9, 10]}
    each, fours = ([r for r in metrics_rows(tmp_path / name) if "train_loss" in r] for name in ("each", "fours"))
    losses = [r["train_loss"] for r in each]
    untrained = metrics_rows(tmp_path / "each")[0]
    assert untrained["step"] == 0 and losses[0] == pytest.approx(untrained["val_loss"], rel=0.2)  # one ELBO, two draws
    assert 0 < fours[-1]["train_seconds"] < wall["fours"]
    assert [r["step"] for r in fours] == [4, 8, 10]
    assert [r["train_loss"] for r in fours] == pytest.approx([np.mean(losses[0:4]), np.mean(losses[4:8]),
                                                             np.mean(losses[8:10])], rel=1e-6)
    seconds = [0.0] + [r["train_seconds"] for r in fours]
    assert [r["it_per_sec"] * (b - a) for r, a, b in zip(fours, seconds, seconds[1:])] == pytest.approx([4, 4, 2])
    model, _ = mlx_dlm.load(tmp_path / "fours")
    optimizer_file = mx.load(str(tmp_path / "fours" / train.checkpoint.OPTIMIZER_FILE))
    assert not any(k.startswith(train.checkpoint.TRAIN_WEIGHTS) for k in optimizer_file)  # no --ema: no second copy
    per_step = 3 * model.flops_per_token(64) * 8 * 64  # forward + backward over 8 windows of 64 predicted tokens
    assert [r["flops"] for r in fours] == pytest.approx([4 * per_step, 8 * per_step, 10 * per_step])


@pytest.mark.parametrize("batch_size", [2, 4])
def test_ar_validation_is_the_exact_next_token_nll_over_every_window(shakespeare, batch_size):
    """An AR model's validation loss: the mean next-token NLL over all windows (9 here, so the last batch is short),
    against the float64 numpy model."""
    from reference import forward, log_softmax

    model, tok = untrained(shakespeare[:2000], max_seq_len=16, model_type="ar")
    windows = np.random.default_rng(1).integers(1, tok.vocab_size, size=(9, 16)).astype(np.int32)
    logp = log_softmax(forward(model, windows, None)[:, :-1])
    nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1).mean()
    assert train.make_evaluator(model, windows, tok.mask_id, batch_size)() == pytest.approx(nll, rel=1e-5)


def test_fingerprint_matches_numpy_and_tells_moved_weights_apart():
    """The checksum distributed runs compare across processes: sum, sum of squares, position-weighted sum."""
    model = init_model(preset_args("tiny", vocab_size=12), seed=1)
    flat = np.concatenate([np.array(v, dtype=np.float64).reshape(-1) for _, v in tree_flatten(model.parameters())])
    expected = [flat.sum(), (flat * flat).sum(), (flat * (np.arange(flat.size) % 97)).sum()]
    np.testing.assert_allclose(np.array(train._fingerprint(model)), expected, rtol=1e-4)
    weights = model.tok_emb.weight
    model.tok_emb.weight = mx.concatenate([weights[1:], weights[:1]])  # the same numbers, moved
    moved = np.array(train._fingerprint(model))
    assert moved[:2] == pytest.approx(expected[:2], rel=1e-4) and moved[2] != pytest.approx(expected[2], rel=1e-3)


def test_state_json_holds_the_runs_counters(tmp_path, small_text_path):
    out = tmp_path / "run"
    train.main(["--data", str(small_text_path), "--out", str(out), *TINY_TRAIN, "--iters", "6", "--eval-every", "3",
                "--report-every", "3"])
    state = json.loads((out / "state.json").read_text())
    last = metrics_rows(out)[-1]
    assert last["step"] == state["step"] == 6 and state["processes"] == 1 and state["skipped"] == 0
    assert (state["val_loss"], state["train_seconds"], state["flops"]) == \
        (last["val_loss"], last["train_seconds"], last["flops"])
    assert state["args"]["iters"] == 6 and state["args"]["out"] == str(out)


def test_progress_bar_on_a_terminal_counts_steps_from_the_resumed_one(tmp_path, small_text_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stand-in for the terminal
    out = str(tmp_path / "run")
    train.main(["--data", str(small_text_path), "--out", out, *TINY_TRAIN, "--iters", "6", "--eval-every", "6",
                "--report-every", "3"])
    captured = capsys.readouterr()
    counts = re.findall(r"\| (\d+)/(\d+) \[", captured.err)  # tqdm's "n/total [elapsed<left, rate it/s]"
    assert counts[0] == ("0", "6") and counts[-1] == ("6", "6") and all(b == "6" and int(a) <= 6 for a, b in counts)
    assert "it/s]" in captured.err and captured.out.splitlines()[-1] == f"Saved model to {out} (step 6)"
    assert captured.err.endswith("\r") and not captured.err.split("\r")[-2].strip()  # the bar is erased at the end
    train.main(["--resume", "--out", out, "--iters", "9"])
    counts = re.findall(r"\| (\d+)/(\d+) \[", capsys.readouterr().err)
    assert counts[0] == ("6", "9") and counts[-1] == ("9", "9")


class _PipeStdout(io.StringIO):
    """stdout as a pipe sees it: records each write and each flush."""

    def __init__(self):
        super().__init__()
        self.events = []

    def write(self, text):
        self.events.append(text)
        return super().write(text)

    def flush(self):
        self.events.append(None)


def test_console_lines_are_flushed_as_they_are_printed(tmp_path, small_text_path, monkeypatch):
    """Under nohup or a pipe each line reaches the log when it is printed, not when a buffer fills."""
    pipe = _PipeStdout()
    monkeypatch.setattr(sys, "stdout", pipe)
    train.main(["--data", str(small_text_path), "--out", str(tmp_path / "run"), *TINY_TRAIN, "--iters", "2",
                "--report-every", "1", "--eval-every", "1"])
    ends = [i for i, text in enumerate(pipe.events) if text is not None and text.endswith("\n")]
    assert len(ends) == len(pipe.getvalue().splitlines()) >= 6  # banner, 3 validations, 2 reports, saved
    assert all(pipe.events[i + 1] is None for i in ends)


def test_save_load_identical_weights_and_logits(tmp_path):
    from mlx_dlm.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh ")
    model = init_model(preset_args("simple_dlm", vocab_size=tok.vocab_size, dim=32, n_layers=2, hidden_dim=64), seed=3)
    mlx_dlm.save_model(tmp_path / "m", model, tok)
    back, back_tok = mlx_dlm.load(tmp_path / "m")
    saved = dict(tree_flatten(model.parameters()))
    for name, value in tree_flatten(back.parameters()):
        np.testing.assert_array_equal(np.array(value), np.array(saved[name]), err_msg=name)
    x = mx.array([tok.encode("abc hgfe"), tok.encode("deadbeef")])
    t = mx.array([0.2, 0.7])
    # the same weights; on the CPU the loaded ones are laid out for decoding (model.decode_layout), so BLAS sums
    # in another order: equal to float32 rounding, not bit for bit
    np.testing.assert_allclose(np.array(back(x, t)), np.array(model(x, t)), rtol=1e-5, atol=1e-6)
    assert back_tok.chars == tok.chars and back.args == model.args


class _Crash(Exception):
    pass


def test_resume_continues_exactly(tmp_path, small_text_path):
    common = ["--data", str(small_text_path), "--iters", "12", "--save-every", "4", "--eval-every", "6", *TINY_TRAIN,
              "--report-every", "4"]  # no report window spans the resume at step 8
    straight = train.train(train.setup_arg_parser().parse_args([*common, "--out", str(tmp_path / "a")]))

    def crash_at_8(step):
        if step == 8:
            raise _Crash

    with pytest.raises(_Crash):
        train.train(train.setup_arg_parser().parse_args([*common, "--out", str(tmp_path / "b")]), crash_at_8)
    resumed = train.train(train.setup_arg_parser().parse_args([*common, "--out", str(tmp_path / "b"), "--resume"]))

    a, _ = mlx_dlm.load(straight)
    b, _ = mlx_dlm.load(resumed)
    pa, pb = _params(a), _params(b)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)  # bit-identical
    timing = ("it_per_sec", "tokens_per_sec", "train_seconds")

    def rows(path):
        return [{k: v for k, v in row.items() if k not in timing} for row in metrics_rows(path)]

    assert rows(straight) == rows(resumed)  # same val losses, rates and norms; later rows dropped, none doubled


def test_refuses_to_overwrite_and_resume_needs_checkpoint(tmp_path, small_text_path, tiny_model_dir):
    parse = train.setup_arg_parser().parse_args
    with pytest.raises(UserError, match="already holds a model"):
        train.train(parse(["--data", str(small_text_path), "--out", str(tiny_model_dir), *TINY_TRAIN]))
    with pytest.raises(UserError, match="no complete checkpoint to resume"):
        train.train(parse(["--data", str(small_text_path), "--out", str(tmp_path / "x"), "--resume", *TINY_TRAIN]))


def test_prepare_refuses_what_would_lose_or_mix_runs(tmp_path, small_text_path, monkeypatch, capsys):
    parse = train.setup_arg_parser().parse_args
    base = ["--data", str(small_text_path), *TINY_TRAIN]
    for name in ("config.json", "state.json"):  # a model file alone, or a training state alone, is a model
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text("{}")
        assert user_error(train.prepare, parse([*base, "--out", str(out)])) == (
            f"{out} already holds a model: pass --resume to continue it, or choose another --out")
    assert user_error(train.prepare, parse([*base, "--out", str(tmp_path / "c"), "--seq-len", "257"])) == \
        "--seq-len 257 exceeds the model's context of 256"
    assert train.prepare(parse([*base, "--out", str(tmp_path / "c"), "--seq-len", "256"])).args.seq_len == 256
    stale = tmp_path / "stale"  # rows of an earlier run that stopped before its first checkpoint
    stale.mkdir()
    (stale / "metrics.jsonl").write_text('{"step": 99, "val_loss": 1.0}\n')
    train.prepare(parse([*base, "--out", str(stale)]))
    assert not (stale / "metrics.jsonl").exists()

    other = tmp_path / "other.txt"
    other.write_text(small_text_path.read_text()[:-1] + "?")
    train.main([*base, "--iters", "2", "--eval-every", "2", "--out", str(tmp_path / "r")])
    assert cli_error(capsys, train.main, ["--resume", "--out", str(tmp_path / "r"), "--data", str(other)]) == (
        f"the data ({other}) differs from the corpus this checkpoint was trained on (sha256 mismatch)")
    monkeypatch.setattr(train.data, "read_corpus", lambda path: small_text_path.read_text() if path is None else "")
    train.main([*TINY_TRAIN, "--iters", "2", "--eval-every", "2", "--out", str(tmp_path / "d")])  # the default corpus
    monkeypatch.setattr(train.data, "read_corpus", lambda path: other.read_text())  # as if it had changed
    assert cli_error(capsys, train.main, ["--resume", "--out", str(tmp_path / "d")]) == (
        "the data (Tiny Shakespeare) differs from the corpus this checkpoint was trained on (sha256 mismatch)")


@pytest.mark.parametrize("text_len, fraction, validates", [(800, "0.1", True), (790, "0.1", False), (400, "0.2", True),
                                                          (395, "0.2", False)])
def test_validation_needs_one_window_of_held_out_tokens(tmp_path, text_len, fraction, validates, capsys, shakespeare):
    """--val-fraction 0.1 of 800 characters (or 0.2 of 400) is 80 tokens: exactly one window of 80 validates; 79
    cannot."""
    data = tmp_path / "t.txt"
    data.write_text(shakespeare[:text_len])
    train.main(["--data", str(data), "--out", str(tmp_path / "o"), *TINY_TRAIN, "--seq-len", "80", "--iters", "2",
                "--eval-every", "2", "--batch-size", "2", "--val-fraction", fraction])
    rows = metrics_rows(tmp_path / "o")
    assert [r["step"] for r in rows if "val_loss" in r] == ([0, 2] if validates else [])
    note = "note: validation split has fewer than 80 tokens; skipping validation"
    assert capsys.readouterr().err.splitlines() == ([] if validates else [note])


def test_sentencepiece_training_run(tmp_path, small_text_path):
    out = tmp_path / "sp"
    train.main(["--data", str(small_text_path), "--out", str(out), "--tokenizer", "sp", "--vocab-size", "200",
                "--iters", "4", "--eval-every", "4", *TINY_TRAIN])
    model, tok = mlx_dlm.load(out)
    assert tok.kind == "sp" and model.args.vocab_size == 200
    text = mlx_dlm.generate(model, tok, "ROMEO:", max_tokens=16, steps=4, seed=0)
    assert text.startswith("ROMEO:")


def test_resume_takes_the_runs_settings_from_the_checkpoint(tmp_path, small_text_path, capsys):
    flags = [*TINY_TRAIN, "--data", str(small_text_path), "--iters", "10", "--save-every", "5", "--eval-every", "5",
             "--batch-size", "4", "--learning-rate", "3e-3", "--warmup", "2", "--arch", "n_layers=1"]
    straight = train.train(train.setup_arg_parser().parse_args([*flags, "--out", str(tmp_path / "a")]))

    def crash_at_5(step):
        if step == 5:
            raise _Crash

    with pytest.raises(_Crash):
        train.train(train.setup_arg_parser().parse_args([*flags, "--out", str(tmp_path / "b")]), crash_at_5)
    train.main(["--resume", "--out", str(tmp_path / "b")])  # nothing else: data, batch, lr, arch from the checkpoint
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["step"] == 10 and state["args"]["batch_size"] == 4 and state["args"]["learning_rate"] == 3e-3
    assert state["args"]["preset"] == "tiny" and state["args"]["arch"] == ["n_layers=1"]
    pa, pb = _params(mlx_dlm.load(straight)[0]), _params(mlx_dlm.load(tmp_path / "b")[0])
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)  # bit-identical to the uninterrupted run

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # a run-defining flag that contradicts the checkpoint
        train.main(["--resume", "--out", str(tmp_path / "b"), "--batch-size", "8"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "--batch-size 8 contradicts the checkpoint" in err and len(err.splitlines()) == 1
    # Given on the command line, a flag counts even at its default value (16), which the checkpoint's 4 is not.
    assert cli_error(capsys, train.main, ["--resume", "--out", str(tmp_path / "b"), "--batch-size", "16"]).startswith(
        "--batch-size 16 contradicts the checkpoint")
    train.main(["--resume", "--out", str(tmp_path / "b"), "--iters", "12", "--batch-size", "4",  # same values: fine
                "--data", f"{small_text_path.parent}/./{small_text_path.name}"])  # same corpus, other spelling
    assert "--iters changed on resume: the cosine schedule now ends at step 12 (was 10)" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 12


def test_resume_settings_take_the_checkpoints_values_unless_given(capsys):
    parse = train.setup_arg_parser().parse_args
    saved = vars(parse(["--batch-size", "4", "--iters", "10", "--data", "a.txt", "--out", "old", "--eval-batches",
                        "2", "--arch", "n_layers=1"])) | {"retired_flag": 1}  # a flag this version no longer has
    args = parse(["--resume", "--out", "new", "--iters", "20", "--eval-batches", "3", "--data", "b.txt",
                  "--report-every", "7"])
    given = {"resume", "out", "iters", "eval_batches", "data", "report_every"}
    assert train.explicit_settings(args) == given
    assert train.explicit_settings(parse(["--batch-size", "16", "--iters", "9"])) == {"iters"}  # 16: the default
    expected = {k: v for k, v in saved.items() if k != "retired_flag"}
    expected |= {"out": "new", "resume": True, "iters": 20, "eval_batches": 3, "data": "b.txt", "report_every": 7}
    assert vars(train.resume_settings(args, given, saved)) == expected  # data: checked by its sha256 instead
    assert capsys.readouterr().err.splitlines() == [
        "note: --iters changed on resume: the cosine schedule now ends at step 20 (was 10)",
        "note: --eval-batches changed on resume: validation now uses 3 batches (was 2): losses are not comparable "
        "across the change"]
    merged = train.resume_settings(parse(["--resume"]), set(), saved)  # where and whether: never the checkpoint's
    assert (merged.out, merged.resume) == ("checkpoints", True)
    train.resume_settings(args, given, saved, verbose=False)  # the other processes of a distributed run
    assert capsys.readouterr().err == ""
    for flag, value, shown in [("--batch-size", "8", "8"), ("--learning-rate", "0.5", "0.5"),
                               ("--arch", "n_layers=2", "['n_layers=2']"), ("--objective", "ar", "ar")]:
        name = flag[2:].replace("-", "_")
        args = parse(["--resume", "--out", "new", flag, value])
        assert user_error(train.resume_settings, args, {name}, saved) == (
            f"{flag} {shown} contradicts the checkpoint in new, which was trained with {saved[name]!r}; drop the "
            "flag to continue that run")
        train.resume_settings(args, set(), saved)  # not given: fine


def test_arch_overrides_are_checked(tmp_path, small_text_path):
    parse = train.setup_arg_parser().parse_args
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        train.train(parse(["--data", str(small_text_path), "--out", str(tmp_path / "x"), "--arch", "depth=3"]))
    assert train.parse_arch(["time_cond=false", "n_heads=2", "pos_emb=rope"]) == \
        {"time_cond": False, "n_heads": 2, "pos_emb": "rope"}


TRAIN_REFUSALS = [
    *[([flag, "0"], f"{flag} must be at least 1")
      for flag in ("--iters", "--batch-size", "--report-every", "--eval-every", "--eval-batches")],
    (["--seq-len", "1"], "--seq-len must be at least 2"),
    (["--cpu-streams", "0"], "--cpu-streams must be at least 1 and divide --batch-size 16, got 0"),
    (["--batch-size", "6", "--cpu-streams", "4"], "--cpu-streams must be at least 1 and divide --batch-size 6, got 4"),
    (["--learning-rate", "0"], "--learning-rate must be positive"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--ema", "-0.1"], "--ema must be a decay in [0, 1) (0: off), got -0.1"),
    (["--ema", "1"], "--ema must be a decay in [0, 1) (0: off), got 1.0"),
    (["--preset", "galactic"], "unknown preset 'galactic' (choose from tiny, simple_dlm, base, small)"),
]
TRAIN_ACCEPTED = [  # the edge values next to each refusal
    ["--iters", "1", "--batch-size", "1", "--report-every", "1", "--eval-every", "1", "--eval-batches", "1",
     "--seq-len", "2"],
    ["--cpu-streams", "1"], ["--batch-size", "6", "--cpu-streams", "3"], ["--learning-rate", "1e-9"],
    ["--dropout", "0"], ["--dropout", "0.99"], ["--ema", "0"], ["--ema", "0.999"],
]


def test_training_flags_are_refused_at_their_bounds_and_accepted_next_to_them():
    parse = train.setup_arg_parser().parse_args
    for argv, message in TRAIN_REFUSALS:
        assert user_error(train._check_args, parse(argv)) == message, argv
    for argv in TRAIN_ACCEPTED:
        train._check_args(parse(argv))
    fields = "attn_out_proj, bias, dim, dropout"  # the start of ModelArgs' sorted field names
    assert user_error(train._check_args, parse(["--arch", "n_layers"])).startswith(
        f"--arch 'n_layers': expected KEY=VALUE with KEY one of {fields}")
    for field in ("model_type", "vocab_size", "block_size"):  # set by --objective, the tokenizer, --block-size
        assert f", {field}" not in user_error(train.parse_arch, [f"{field}=2"])


def test_cpu_streams_are_for_the_cpu_backend(monkeypatch):
    parse = train.setup_arg_parser().parse_args
    for cores in (1, None):  # one core, or an unknown count: nothing to share out
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        assert train.default_cpu_streams(64, 128) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert train.default_cpu_streams(16, 64) == 2 and train.default_cpu_streams(16, 63) == 1  # 1024 tokens split
    assert train.default_cpu_streams(15, 1024) == 1  # an odd batch does not split evenly
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)  # as on a Mac (no GPU here)
    assert train.default_cpu_streams(64, 128) == 1
    assert user_error(train._check_args, parse(["--cpu-streams", "2"])) == \
        f"--cpu-streams applies to MLX's CPU backend; this run uses {mx.gpu}"
    train._check_args(parse(["--cpu-streams", "1"]))
    train._check_args(parse([]))


def test_half_precision_weights_compute_in_float32_on_cpu(tmp_path):
    from mlx_dlm.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh ")
    model = init_model(preset_args("tiny", vocab_size=tok.vocab_size), seed=3)
    model.set_dtype(mx.float16)
    mlx_dlm.save_model(tmp_path / "m", model, tok)
    assert all(v.dtype == mx.float16 for v in mx.load(str(tmp_path / "m" / "model.safetensors")).values())
    back, _ = mlx_dlm.load(tmp_path / "m")
    kept, _ = mlx_dlm.io.load(tmp_path / "m", keep_dtype=True)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(back.parameters()))
    assert all(v.dtype == mx.float16 for _, v in tree_flatten(kept.parameters()))
    x, t = mx.array([tok.encode("abc hgfe")]), mx.array([0.4])
    want = np.array(kept(x, t).astype(mx.float32))
    np.testing.assert_allclose(np.array(back(x, t)), want, atol=2e-2)  # same weights; fp16 arithmetic differs
