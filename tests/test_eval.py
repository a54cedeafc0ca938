"""mlx_dlm.eval against independent references: numpy ELBO with fixed masks, brute-force AR NLL, numpy genPPL."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_dlm
from mlx_dlm import eval as ev
from mlx_dlm.model import init_model, preset_args

from conftest import cli_error
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


@pytest.mark.parametrize("n, low, high, coverage", [(10, 2, 9, 1 - 2 * 11 / 1024), (15, 4, 12, 1 - 2 * 576 / 32768),
                                                     (5, 1, 5, 1 - 2 / 32)])
def test_median_interval_takes_the_order_statistics_of_the_binomial_table(n, low, high, coverage):
    """The published table of distribution-free intervals for a median (Conover, Practical Nonparametric
    Statistics, table A3): x_(2)..x_(9) for 10 draws, x_(4)..x_(12) for 15; 5 draws reach no 95%: min..max."""
    shuffled = np.random.default_rng(0).permutation(np.arange(1, n + 1)).tolist()
    m = ev.median_interval(shuffled)
    assert (m.low, m.high, m.count) == (low, high, n) and m.median == (n + 1) / 2
    assert m.coverage == pytest.approx(coverage)


def test_median_interval_holds_the_true_median_as_often_as_it_says():
    """2,000 sets of 15 lognormal draws (true median 1): the intervals hold 1 at their stated coverage (96.5%);
    a binomial test at a 0.1% false-alarm rate (3.3 sigma of 0.41 points) accepts 95.1%-97.8%."""
    rng = np.random.default_rng(1)
    results = [ev.median_interval(rng.lognormal(size=15).tolist()) for _ in range(2000)]
    held = np.mean([m.low <= 1.0 <= m.high for m in results])
    sigma = math.sqrt(results[0].coverage * (1 - results[0].coverage) / 2000)
    assert abs(held - results[0].coverage) < 3.3 * sigma


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
    texts = ["ROMEO: what say you", "ROMEO: to be or not", "ROMEO: a longer line than both"]  # two lengths
    got = ev.generative_perplexity(ev.model_judge("tiny", model, tok, batch_size=1), texts, "ROMEO:")
    nll, chars = 0.0, 0
    for text in texts:
        ids = np.array([tok.encode(text)])
        logp = log_softmax(forward(model, ids[:, :-1], None))[0]
        token_nll = -logp[np.arange(ids.shape[1] - 1), ids[0, 1:]]
        nll += token_nll[len("ROMEO:") - 1:].sum()
        chars += len(text) - len("ROMEO:")
    assert math.isclose(got, math.exp(nll / chars), rel_tol=1e-4)
    assert ev.char_entropy(["Paaaa", "Pbbbb"], "P") == pytest.approx(1.0)


def test_an_empty_prompt_is_scored_from_a_newline(tiny_ar_dir):
    model, tok = mlx_dlm.load(tiny_ar_dir)
    judge = ev.model_judge("tiny", model, tok)
    assert judge.completion_nll(["to be"], 0)[0] == pytest.approx(judge.completion_nll(["\nto be"], 1)[0], rel=1e-5)


def test_real_text_is_cut_and_scored_exactly_like_samples(shakespeare):
    """Reference windows: the prompt's length then the completion's, from the held-out tail; a judge scores the
    same number of characters of each as of a sample, after the same number of prompt characters."""
    windows = ev.reference_texts(shakespeare, prompt_chars=6, completion_chars=128, count=48)
    cut = len(shakespeare) - round(len(shakespeare) * 0.1)
    assert len(windows) == 48 and all(len(w) == 134 and w in shakespeare[cut:] for w in windows)
    assert len(set(windows)) == 48
    seen = []
    judge = ev.Judge("recorder", lambda texts, start: seen.append((list(texts), start)) or np.ones(len(texts)))
    samples = ["ROMEO:" + "x" * 128, "ROMEO:" + "y" * 128]
    for texts in (samples, windows):
        assert ev.generative_perplexity(judge, texts, "ROMEO:") == pytest.approx(math.exp(1 / 128))
    assert [start for _, start in seen] == [6, 6]


def test_distinct_ngrams_at_an_equal_count():
    texts = ["P:abcabcabc", "P:abcdefgh"]
    grams = [t[i:i + 4] for t in texts for i in range(2, len(t) - 3)]
    assert ev.ngram_count(texts, 2) == len(grams) == 11
    assert ev.distinct_ngrams(texts, 2) == pytest.approx(len(set(grams)) / 11)
    assert ev.distinct_ngrams(texts, 2, count=6) == pytest.approx(3 / 6)  # the first text's six 4-grams
    with pytest.raises(mlx_dlm.UserError, match="over 12 n-grams asked of texts that hold 11"):
        ev.distinct_ngrams(texts, 2, count=12)


def test_a_judge_with_a_contestants_weights_is_refused(tiny_ar_dir, tmp_path):
    import shutil

    model, tok = mlx_dlm.load(tiny_ar_dir)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_ar_dir, copy)  # another path, the same weights
    judge = ev.model_judge(str(copy), *mlx_dlm.load(copy))
    with pytest.raises(mlx_dlm.UserError, match="has the weights of contestant"):
        ev.check_independent([judge], {"contestant": model})
    ev.check_independent([judge], {"contestant": model}, allow_self_judge=True)
    assert judge.self_judged == ["contestant"]
    other = init_model(model.args, seed=123)
    fresh = ev.model_judge("other", other, tok)
    ev.check_independent([fresh], {"contestant": model})
    assert fresh.self_judged == []


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
             "--judge", "ngram", "--seq-len", "64", "--max-windows", "8", "--draws", "3", "--infill-windows", "4",
             "--samples", "2", "--sample-tokens", "16", "--sample-steps", "4", "--reference-windows", "3",
             "--json", str(out)])
    printed = capsys.readouterr().out
    assert "Val ELBO:" in printed and "95%, 3 draws" in printed and "Infill accuracy" in printed
    assert "Generative perplexity under ngram6:" in printed and "held-out text scored the same way" in printed
    r = json.loads(out.read_text())
    assert r["windows"] == 8 and r["seq_len"] == 64 and r["val_loss"]["draws"] == 3
    assert 0 <= r["infill_accuracy"] <= 1 and len(r["samples"]) == 2
    assert set(r["judges"]) == {str(tiny_ar_dir), "ngram6"}
    for j in r["judges"].values():
        assert j["gen_ppl"] > 1 and j["reference_gen_ppl"] > 1 and j["self_judged"] == []
    assert r["distinct4_count"] == 2 * (16 - 3)  # the samples hold fewer 4-grams than 3 windows: their count
    assert 0 < r["sample_distinct4"] <= 1 and 0 < r["reference_distinct4"] <= 1 and r["reference_entropy_bits"] > 2
    ev.main(["--model", str(tiny_ar_dir), "--data", str(small_text_path), "--seq-len", "64", "--max-windows", "4",
             "--samples", "0"])
    assert "Val NLL (exact)" in capsys.readouterr().out


def test_eval_measures_a_drafter_on_its_samples(tmp_path, tiny_model_dir, tiny_ar_dir, small_text_path, capsys):
    """--draft: the samples are decoded speculatively, and the drafts' acceptance is what the decoder's rounds kept
    with the same options."""
    import mlx_dlm
    from mlx_dlm.speculative import acceptance_by_position, tokens_per_round

    out = tmp_path / "d.json"
    argv = ["--model", str(tiny_ar_dir), "--data", str(small_text_path), "--seq-len", "64", "--max-windows", "2",
            "--samples", "3", "--sample-tokens", "20", "--judge", "ngram", "--seed", "4"]
    ev.main([*argv, "--draft", str(tiny_model_dir), "--json", str(out)])
    r = json.loads(out.read_text())
    ar, tok = mlx_dlm.load(tiny_ar_dir)
    drafter, _ = mlx_dlm.load(tiny_model_dir)
    kept = [k for s in mlx_dlm.stream_generate(ar, tok, "ROMEO:", draft_model=drafter, max_tokens=20, seed=4,
                                               num_samples=3) for k in s.draft_kept]
    assert r["draft"] == str(tiny_model_dir) and r["tokens_per_round"] == pytest.approx(tokens_per_round(kept))
    assert r["draft_acceptance"] == pytest.approx(acceptance_by_position(kept, len(r["draft_acceptance"])))
    assert r["samples"] == mlx_dlm.generate(ar, tok, "ROMEO:", draft_model=drafter, max_tokens=20, seed=4,
                                            num_samples=3)
    assert "tokens per round; P(draft 1.." in capsys.readouterr().out
    assert "--samples must be at least 1" in cli_error(capsys, ev.main, [*argv[:-6], "--samples", "0", "--draft",
                                                                          str(tiny_model_dir)])
    assert "verifies with an autoregressive model" in cli_error(
        capsys, ev.main, ["--model", str(tiny_model_dir), "--data", str(small_text_path), "--max-windows", "2",
                          "--draft", str(tiny_model_dir)])


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("judge", "the judge must be autoregressive"),
    ("self", "has the weights of"),
    ("chars", "is not in the tokenizer's vocabulary"),
])
def test_eval_errors_are_one_line(case, message, tmp_path, tiny_model_dir, tiny_ar_dir, small_text_path, capsys):
    argv = ["--model", str(tiny_model_dir), "--data", str(small_text_path), "--max-windows", "2"]
    if case == "missing":
        argv[1] = str(tmp_path / "nope")
    elif case == "judge":
        argv += ["--judge", str(tiny_model_dir)]
    elif case == "self":
        argv[1] = str(tiny_ar_dir)
        argv += ["--judge", str(tiny_ar_dir) + "/"]  # the model itself, named another way
    else:
        bad = tmp_path / "bad.txt"
        bad.write_text("plain text with a \u00e9 and more " * 100, encoding="utf-8")
        argv[3] = str(bad)
        argv += ["--judge", "ngram"]
    with pytest.raises(SystemExit) as exc:
        ev.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 1 and message in err and len(err.strip().splitlines()) == 1
