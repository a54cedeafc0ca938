"""The matched autoregressive baseline: training, KV-cached decoding, sampling filters."""

import time

import mlx.core as mx
import numpy as np
import pytest

import mlx_dlm
from mlx_dlm.sample import filter_logits, stream_generate

from conftest import metrics_rows, untrained, user_error
from reference import softmax


@pytest.fixture(scope="module")
def ar(tiny_ar_dir):
    return mlx_dlm.load(tiny_ar_dir)


def test_ar_training_learns_and_matches_dlm_size(tiny_ar_dir, tiny_model_dir):
    rows = metrics_rows(tiny_ar_dir)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]
    ar_model, _ = mlx_dlm.load(tiny_ar_dir)
    dlm_model, _ = mlx_dlm.load(tiny_model_dir)
    assert ar_model.args.model_type == "ar" and dlm_model.args.model_type == "dlm"
    # Same width and depth; the DLM only adds its Linear(1, d) mask-ratio embedding.
    assert dlm_model.num_params() - ar_model.num_params() == 2 * dlm_model.args.dim


def test_greedy_decode_matches_repeated_full_forward(ar):
    model, tok = ar
    prompt = "ROMEO:"
    out = mlx_dlm.generate(model, tok, prompt, max_tokens=20, temp=0.0)
    ids = tok.encode(prompt)
    for _ in range(20):  # the slow way: full forward over the whole prefix, no cache
        ids.append(int(np.array(model(mx.array([ids]))[0, -1]).argmax()))
    assert out == tok.decode(ids)


def test_ar_stream_invariants(ar):
    model, tok = ar
    states = list(stream_generate(model, tok, "KING", max_tokens=12, temp=0.8, seed=1, num_samples=3))
    assert len(states) == 12 and states[-1].nfe == 12
    for k, s in enumerate(states):
        assert (s.committed.sum(axis=1) == 1).all() and s.committed[:, 4 + k].all()
        assert (s.tokens[:, :4] == tok.encode("KING")).all()
    assert (states[-1].tokens != tok.mask_id).all() and states[-1].prompt_seconds > 0
    a = mlx_dlm.generate(model, tok, "KING", max_tokens=30, seed=5, top_k=5)
    assert a == mlx_dlm.generate(model, tok, "KING", max_tokens=30, seed=5, top_k=5)
    assert mlx_dlm.generate(model, tok, "", max_tokens=10, seed=0).startswith("\n")  # nanoGPT-style start


def test_ar_steps_report_time_rate_and_no_revision(ar):
    """Each AR step: no position hidden again; elapsed within the wall time of the whole generation; the rate leaves
    out the prompt pass and the first token per sample it yields."""
    model, tok = ar
    tic = time.perf_counter()
    states = list(stream_generate(model, tok, "KING", max_tokens=6, seed=1, num_samples=2))
    wall = time.perf_counter() - tic
    for k, s in enumerate(states):
        assert s.remasked.shape == s.committed.shape and not s.remasked.any()
        assert 0 < s.prompt_seconds <= s.elapsed <= wall
        assert s.forward_tokens == 2 * (4 + k)  # per sample: the prompt's 4 positions once, then 1 per token
        if k:
            assert s.tokens_per_sec * s.decode_seconds == pytest.approx(2 * k)  # the tokens after the first


@pytest.mark.parametrize("extra", [dict(suffix="END"), dict(template="a[MASK]b")])
def test_ar_models_refuse_a_suffix_or_template(ar, extra):
    model, tok = ar
    assert user_error(mlx_dlm.generate, model, tok, "KING", max_tokens=4, **extra) == \
        "a suffix or template needs a diffusion model; this one is autoregressive"


@pytest.mark.parametrize("shape", [(4, 30), (2, 3, 30)])  # AR: (batch, vocab); diffusion: (batch, positions, vocab)
def test_filters_match_numpy(shape):
    logits = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    rows = logits.reshape(-1, 30)
    kept_k = np.isfinite(np.array(filter_logits(mx.array(logits), top_k=5))).reshape(-1, 30)
    assert all(set(np.flatnonzero(kept)) == set(np.argsort(-row)[:5]) for kept, row in zip(kept_k, rows))
    p = softmax(rows)
    kept_p = np.isfinite(np.array(filter_logits(mx.array(logits), top_p=0.6))).reshape(-1, 30)
    for kept, row in zip(kept_p, p):
        order = np.argsort(-row)
        n = int(np.searchsorted(np.cumsum(row[order]), 0.6) + 1)  # smallest prefix with mass >= 0.6
        assert set(np.flatnonzero(kept)) == set(order[:n])


@pytest.mark.parametrize("temp", [0.5, 2.0])
def test_sampling_temperature_divides_the_logits(temp):
    """4,000 draws of one row against softmax(logits / temp)."""
    from mlx_dlm.sample import sample_tokens

    logits = np.array([0.0, 1.0, 2.0, -1.0], np.float32)
    draws = np.array(sample_tokens(mx.array(np.tile(logits, (4000, 1))), mx.random.key(0), temp))
    want = softmax(logits / temp)
    assert 0.5 * np.abs(np.bincount(draws, minlength=4) / 4000 - want).sum() < 0.03


def _untrained(model_type="ar", extra_ids=0, seed=4):
    """Context 16 (learned positions: no cache rolling) over 27 characters."""
    return untrained("abcdefghijklmnopqrstuvwxyz ", 16, model_type, extra_ids, seed)


PROMPT = "the quick brown fox jumps"


@pytest.mark.parametrize("prompt_len", [5, 20])  # shorter and longer than the context of 16
def test_ar_slides_its_window_past_the_context_like_nanogpt(prompt_len):
    model, tok = _untrained()
    prompt = PROMPT[:prompt_len]
    last = None
    for last in stream_generate(model, tok, prompt, max_tokens=30, temp=0.0, seed=0):
        pass
    ids = tok.encode(prompt)
    for _ in range(30):  # nanoGPT's sample.py: crop to the last block_size tokens, full forward, greedy
        logits = np.array(model(mx.array([ids[-16:]])))[0, -1]
        logits[tok.mask_id] = -np.inf
        ids.append(int(np.argmax(logits)))
    assert last.tokens[0].tolist() == ids
    assert last.nfe == 30 and last.generated_tokens == 30
    # Positions run per token: the prompt once (its prefill), 1 while the cache lasts, a window of 16 after.
    per_token = [16 if prompt_len > 16 or n > 16 else (prompt_len if n == prompt_len else 1)
                 for n in range(prompt_len, prompt_len + 30)]
    assert last.forward_tokens == sum(per_token)
    assert 0 < last.prompt_seconds <= last.elapsed
    for top_k, top_p in [(1, 1.0), (0, 1e-6)]:  # either filter keeps only the argmax: sampling at temp 1 is greedy
        text = mlx_dlm.generate(model, tok, prompt, max_tokens=30, temp=1.0, top_k=top_k, top_p=top_p, seed=3)
        assert text == tok.decode(ids), (top_k, top_p)
    drawn = [mlx_dlm.generate(model, tok, prompt, max_tokens=30, temp=1.0, seed=s) for s in (5, 5, 6)]
    assert drawn[0] == drawn[1] != drawn[2]  # a seed fixes every draw, in the window steps too


@pytest.mark.parametrize("model_type, prompt_len", [("ar", 5), ("ar", 20), ("dlm", 5)])
def test_samplers_never_propose_ids_the_tokenizer_lacks(model_type, prompt_len):
    model, tok = _untrained(model_type, extra_ids=4)
    vocab = model.args.vocab_size
    model.lm_head.bias = mx.array(np.where(np.arange(vocab) >= tok.vocab_size, 50.0, 0.0).astype(np.float32))
    prompt = PROMPT[:prompt_len]
    window = mx.array([tok.encode(prompt)[-16:]])
    t = mx.array([0.5]) if model_type == "dlm" else None
    assert (np.array(model(window, t)).argmax(-1) >= tok.vocab_size).all()  # unfiltered, these ids win everywhere
    for temp, top_k, top_p in [(0.0, 0, 1.0), (1.0, 0, 1.0), (1.0, 3, 0.9)]:
        last = None
        for last in stream_generate(model, tok, prompt, max_tokens=10 if model_type == "dlm" else 30, temp=temp,
                                    top_k=top_k, top_p=top_p, seed=1, num_samples=2):
            pass
        assert (last.tokens < tok.vocab_size).all() and (last.tokens != tok.mask_id).all(), (temp, top_k, top_p)


@pytest.mark.parametrize("model_type, prompt_len", [("ar", 5), ("ar", 20), ("dlm", 5)])
def test_samplers_see_weights_changed_after_their_first_use(model_type, prompt_len):
    """Training samples at each validation from the model it keeps updating: the sampler's compiled steps
    (kept per model) must read the current weights."""
    model, tok = _untrained(model_type)
    other, _ = _untrained(model_type, seed=5)  # a fresh model object: its sampler is built anew
    options = dict(max_tokens=10 if model_type == "dlm" else 30, temp=0.0, steps=5)
    before = mlx_dlm.generate(model, tok, PROMPT[:prompt_len], **options)
    model.update(other.parameters())
    after = mlx_dlm.generate(model, tok, PROMPT[:prompt_len], **options)
    assert after == mlx_dlm.generate(other, tok, PROMPT[:prompt_len], **options) != before


@pytest.mark.parametrize("prompt_len", [5, 20])
def test_each_ar_token_is_drawn_with_its_own_key(prompt_len):
    """With uniform next-token probabilities, consecutive tokens drawn with one shared key would be equal in every
    sample; with a key per token they agree in about 1 of 27 samples (64 samples here)."""
    model, tok = _untrained()
    model.lm_head.weight = mx.zeros_like(model.lm_head.weight)
    model.lm_head.bias = mx.zeros_like(model.lm_head.bias)
    last = None
    for last in stream_generate(model, tok, PROMPT[:prompt_len], max_tokens=6, temp=1.0, seed=0, num_samples=64):
        pass
    new = last.tokens[:, prompt_len:]
    assert ((new[:, 1:] == new[:, :-1]).mean(axis=0) < 0.3).all()  # each pair of neighbours
