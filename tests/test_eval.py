"""mlx_dlm.eval against independent references: numpy ELBO with fixed masks, brute-force AR NLL, numpy genPPL."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_dlm
from mlx_dlm import eval as ev
from mlx_dlm.model import init_model, preset_args

from reference import forward, log_softmax


def test_elbo_with_fixed_masks_matches_numpy():
    model = init_model(preset_args("tiny", vocab_size=12, dim=32, n_layers=2, max_seq_len=16), seed=0)
    rng = np.random.default_rng(0)
    windows = rng.integers(1, 12, size=(5, 16)).astype(np.int32)
    t = rng.uniform(0.05, 1.0, size=5)
    hidden = rng.uniform(size=(5, 16)) < t[:, None]
    got = ev.elbo_with_masks(model, windows, mx.array(t, dtype=mx.float32), mx.array(hidden), mask_id=0,
                             batch_size=2)  # batches of 2, 2 and 1
    logp = log_softmax(forward(model, np.where(hidden, 0, windows), t))
    nll = -np.take_along_axis(logp, windows[..., None], axis=-1)[..., 0]
    want = (nll * hidden / t[:, None]).sum(axis=1) / 16
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_elbo_draws_vary_and_interval_is_student_t():
    model = init_model(preset_args("tiny", vocab_size=12, dim=32, n_layers=1, max_seq_len=16), seed=0)
    windows = np.random.default_rng(1).integers(1, 12, size=(8, 16)).astype(np.int32)
    est = ev.dlm_elbo(model, windows, 0, draws=4, batch_size=4)
    assert est.draws == 4 and est.half_width > 0
    assert ev.dlm_elbo(model, windows, 0, draws=4, batch_size=8).mean == pytest.approx(est.mean, rel=1e-5)  # batching
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    e = ev.interval(values)
    assert e.mean == 3.0 and e.half_width == pytest.approx(2.776 * np.std(values, ddof=1) / math.sqrt(5), rel=1e-3)


def test_ar_nll_matches_brute_force_prefixes():
    model = init_model(preset_args("tiny", vocab_size=10, dim=32, n_layers=2, max_seq_len=16, model_type="ar"), seed=2)
    windows = np.random.default_rng(3).integers(1, 10, size=(3, 9)).astype(np.int32)
    total, count = 0.0, 0
    for w in windows:  # each token scored by a separate forward over its prefix alone
        for i in range(1, len(w)):
            logits = np.array(model(mx.array(w[None, :i])), dtype=np.float64)[0, -1]
            total -= logits[w[i]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            count += 1
    assert ev.ar_nll(model, windows, batch_size=2).mean == pytest.approx(total / count, rel=1e-5)


def test_generative_perplexity_matches_numpy(tiny_ar_dir):
    model, tok = mlx_dlm.load(tiny_ar_dir)
    texts = ["ROMEO: what say you", "ROMEO: to be or not"]
    got = ev.generative_perplexity(model, tok, texts, "ROMEO:")
    nll, chars = 0.0, 0
    for text in texts:
        ids = np.array([tok.encode(text)])
        logp = log_softmax(forward(model, ids[:, :-1], None))[0]
        token_nll = -logp[np.arange(ids.shape[1] - 1), ids[0, 1:]]
        nll += token_nll[len("ROMEO:") - 1:].sum()
        chars += len(text) - len("ROMEO:")
    assert math.isclose(got, math.exp(nll / chars), rel_tol=1e-4)
    assert ev.char_entropy(["Paaaa", "Pbbbb"], "P") == pytest.approx(1.0)


def test_batched_fill_equals_each_canvas_alone(tiny_model_dir, shakespeare):
    model, tok = mlx_dlm.load(tiny_model_dir)
    lines = [shakespeare[i:i + 24] for i in (1000, 5000, 9000)]
    windows = np.array([tok.encode(s) for s in lines], dtype=np.int32)
    editable = np.zeros(24, dtype=bool)
    editable[9:15] = True  # where infill_accuracy puts a 6-token span: (24 - 6) // 2 = 9
    filled = mlx_dlm.sample.fill(model, tok.mask_id, windows, editable, steps=6)
    assert (filled[:, ~editable] == windows[:, ~editable]).all()
    for row, text in zip(filled, lines):
        template = text[:9] + "[MASK]" * 6 + text[15:]
        alone = mlx_dlm.generate(model, tok, template=template, steps=6, temp=0.0, seed=0)
        assert tok.decode(row) == alone
    acc = ev.infill_accuracy(model, tok.mask_id, windows, span=6, steps=6)
    assert acc == pytest.approx((filled[:, 9:15] == windows[:, 9:15]).mean())


def test_eval_command(tmp_path, tiny_model_dir, tiny_ar_dir, small_text_path, capsys):
    out = tmp_path / "e.json"
    ev.main(["--model", str(tiny_model_dir), "--data", str(small_text_path), "--judge", str(tiny_ar_dir),
             "--seq-len", "64", "--max-windows", "8", "--draws", "3", "--infill-windows", "4", "--samples", "2",
             "--sample-tokens", "16", "--sample-steps", "4", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "Val ELBO:" in printed and "95%, 3 draws" in printed and "Infill accuracy" in printed
    r = json.loads(out.read_text())
    assert r["windows"] == 8 and r["seq_len"] == 64 and r["val_loss"]["draws"] == 3
    assert 0 <= r["infill_accuracy"] <= 1 and r["gen_ppl"] > 1 and len(r["samples"]) == 2
    ev.main(["--model", str(tiny_ar_dir), "--data", str(small_text_path), "--seq-len", "64", "--max-windows", "4"])
    assert "Val NLL (exact)" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("judge", "the judge must be autoregressive"),
    ("chars", "is not in the tokenizer's vocabulary"),
])
def test_eval_errors_are_one_line(case, message, tmp_path, tiny_model_dir, small_text_path, capsys):
    argv = ["--model", str(tiny_model_dir), "--data", str(small_text_path), "--max-windows", "2"]
    if case == "missing":
        argv[1] = str(tmp_path / "nope")
    elif case == "judge":
        argv += ["--judge", str(tiny_model_dir)]
    else:
        bad = tmp_path / "bad.txt"
        bad.write_text("plain text with a \u00e9 and more " * 100, encoding="utf-8")
        argv[3] = str(bad)
    with pytest.raises(SystemExit) as exc:
        ev.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 1 and message in err and len(err.strip().splitlines()) == 1
