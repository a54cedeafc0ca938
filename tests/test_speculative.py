"""Speculative decoding: the diffusion model drafts, the AR model verifies. The output must be the AR model's: its
greedy text at temperature 0, its exact distribution when sampling (chi-square tests, each at a 0.1% false-alarm
rate), and the verifier's cache after every round as if the rejected drafts had never been seen."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_dlm
from mlx_dlm.block_decode import cached_pass, prefill_blocks
from mlx_dlm.model import KVCache, MEMO_ATTRIBUTE, Model, ModelArgs
from mlx_dlm import sample as sample_module, speculative
from mlx_dlm.speculative import accept, uniform_noise

from conftest import untrained, user_error

CHI2_999 = {4: 18.467, 7: 24.322, 15: 37.697, 63: 103.442}  # 99.9% quantiles of chi-square by degrees of freedom


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tiny_ar_dir):
    (dlm, tok), (ar, _) = mlx_dlm.load(tiny_model_dir), mlx_dlm.load(tiny_ar_dir)
    return ar, dlm, tok


def as_block(model, block_size=4):
    """A shifted block model with model's weights (an AR adapted with no training: a poor but valid drafter)."""
    config = model.args.to_dict() | {"model_type": "block", "block_size": block_size, "logit_shift": True}
    block = Model(ModelArgs(**config))
    block.update({k: v for k, v in model.parameters().items() if k != "t_proj"})  # a block model is not told t
    return block


def as_feature(model, feature_dim, block_size=4, seed=0, draft_context=0):
    """A feature drafter with model's weights and a random reading of the verifier's states (untrained, so what
    it drafts depends on them); with draft_context, chained by a random table (strong biases: a draft's
    distribution depends on the drafts before it)."""
    config = model.args.to_dict() | {"model_type": "block", "block_size": block_size, "logit_shift": True,
                                     "feature_dim": feature_dim, "draft_context": draft_context}
    mx.random.seed(seed)
    drafter = Model(ModelArgs(**config))
    drafter.update({k: v for k, v in model.parameters().items() if k != "t_proj"})
    if draft_context:
        drafter.draft_table = 3 * mx.random.normal(drafter.draft_table.shape)
    return drafter


def drafter_of(kind, dlm, ar):
    """The drafter a test parametrised by kind runs: the DLM itself, its weights in blocks of 4, or as a feature
    drafter reading ar's states, its drafts drawn independently or chained on the 2 tokens before each."""
    return {"dlm": lambda: dlm, "block": lambda: as_block(dlm), "feature": lambda: as_feature(dlm, ar.args.dim),
            "chained": lambda: as_feature(dlm, ar.args.dim, draft_context=2)}[kind]()


@pytest.mark.parametrize("drafter", ["dlm", "block", "feature", "chained"])
@pytest.mark.parametrize("prompt", ["ROMEO:", "\n", "First Citizen:\nWe are"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_is_the_ar_models_own(pair, prompt, k, drafter):
    ar, dlm, tok = pair
    if drafter in ("feature", "chained") and k == 5:
        k = 4  # a feature drafter drafts at most its block
    draft = drafter_of(drafter, dlm, ar)
    alone = mlx_dlm.generate(ar, tok, prompt, max_tokens=40, temp=0, seed=0)
    assert mlx_dlm.generate(ar, tok, prompt, max_tokens=40, temp=0, seed=0, draft_model=draft, draft_length=k) == alone
    batch = mlx_dlm.generate(ar, tok, prompt, max_tokens=40, temp=0, seed=0, draft_model=draft, draft_length=k,
                             num_samples=3)
    assert batch == [alone] * 3


def _nll_per_token(ar, tok, texts: list[str], prompt: str) -> np.ndarray:
    """The AR's own NLL per generated token of each sample (the mask token excluded, as the samplers do)."""
    ids = mx.array([tok.encode(t) for t in texts])
    logits = ar(ids[:, :-1]).astype(mx.float32)
    logits = mx.where(mx.arange(logits.shape[-1]) == tok.mask_id, -mx.inf, logits)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return np.array(nll[:, len(tok.encode(prompt)) - 1:].mean(axis=1))


@pytest.mark.parametrize("drafter", ["dlm", "block", "feature", "chained"])
def test_long_samples_score_under_the_ar_as_its_own_samples_do(pair, drafter):
    """Beyond the first two tokens: 600 samples of 24 tokens each (a batch, each row at its own length; the block
    drafter crosses several blocks), scored by the AR itself. Exact sampling gives the same mean NLL as the AR's
    own samples: a two-sample z-test at a 0.1% false-alarm rate (|z| < 3.29)."""
    ar, dlm, tok = pair
    draft = drafter_of(drafter, dlm, ar)
    options = dict(max_tokens=24, temp=1.0, num_samples=600)
    alone = _nll_per_token(ar, tok, mlx_dlm.generate(ar, tok, "ROMEO:", seed=1, **options), "ROMEO:")
    spec = _nll_per_token(ar, tok, mlx_dlm.generate(ar, tok, "ROMEO:", seed=2, draft_model=draft, draft_length=3,
                                                    **options), "ROMEO:")
    z = (spec.mean() - alone.mean()) / np.sqrt(spec.var(ddof=1) / len(spec) + alone.var(ddof=1) / len(alone))
    assert abs(z) < 3.29


def test_the_acceptance_rule_yields_p_whatever_q():
    """40,000 rounds of K = 3 drafts from fixed q, verified by fixed p: the first token follows p_1 and, where the
    first draft was kept, the second follows p_2 (with fixed p the second position does not depend on the first)."""
    rng = np.random.default_rng(0)
    B, K, V = 40_000, 3, 5
    p = rng.dirichlet(np.ones(V), size=K + 1).astype(np.float32)
    q = rng.dirichlet(np.ones(V) * 0.5, size=K).astype(np.float32)
    drafts = mx.random.categorical(mx.log(mx.broadcast_to(mx.array(q), (B, K, V))), key=mx.random.key(1))
    kept, token = accept(mx.broadcast_to(mx.array(p), (B, K + 1, V)), mx.broadcast_to(mx.array(q), (B, K, V)),
                         drafts, uniform_noise((B, K + V), mx.random.key(2)))
    kept, token, drafts = np.array(kept), np.array(token), np.array(drafts)
    out = np.where(np.arange(K + 1)[None] < kept[:, None], np.pad(drafts, ((0, 0), (0, 1))), -1)
    out[np.arange(B), kept] = token  # the sequence each round writes: kept drafts, then its own token
    first = np.bincount(out[:, 0], minlength=V)
    second = np.bincount(out[kept >= 1, 1], minlength=V)
    assert chi_square(first, p[0]) < CHI2_999[V - 1] and chi_square(second, p[1]) < CHI2_999[V - 1]
    assert 0 < (kept == 0).mean() < 1 and (kept == K).any()  # both branches of the rule were taken


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("drafter", ["dlm", "block", "feature"])
def test_sampled_output_follows_the_ar_models_exact_distribution(drafter, batched):
    """The first two tokens after a prompt, over 1,200 seeds (or 1,200 rows of one batch, each row at its own
    length), against the AR model's exact p(a) p(b | a). The block drafter (blocks of 4, prompt of 3) drafts one
    position and leaves the second to the verifier's rule; the feature drafter's prompt pass draws a from the AR
    and drafts b from the AR's state and a."""
    text = "abcd" * 8
    ar, tok = untrained(text, 16, model_type="ar", seed=5)
    dlm, _ = untrained(text, 16, seed=6)
    if drafter == "block":
        dlm = as_block(untrained(text, 16, model_type="ar", seed=6)[0])
    if drafter == "feature":
        dlm = as_feature(untrained(text, 16, model_type="ar", seed=6)[0], ar.args.dim)
    prompt = "abc" if drafter == "block" else "ab"

    def next_token(context: str) -> np.ndarray:  # the AR's distribution; the mask token is never drawn
        logits = np.array(ar(mx.array([tok.encode(context)]))[0, -1], dtype=np.float64)
        logits[tok.mask_id] = -np.inf
        return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    p1 = next_token(prompt)
    chars = [c for c in tok.chars]
    joint = np.zeros((len(chars), len(chars)))
    for i, a in enumerate(chars):
        p2 = next_token(prompt + a)
        joint[i] = p1[tok.encode(a)[0]] * p2[[tok.encode(b)[0] for b in chars]]
    counts = np.zeros_like(joint)
    outs = (mlx_dlm.generate(ar, tok, prompt, max_tokens=2, temp=1.0, seed=0, draft_model=dlm, draft_length=2,
                             num_samples=1200) if batched else
            [mlx_dlm.generate(ar, tok, prompt, max_tokens=2, temp=1.0, seed=seed, draft_model=dlm, draft_length=2)
             for seed in range(1200)])
    for out in outs:
        counts[chars.index(out[len(prompt)]), chars.index(out[len(prompt) + 1])] += 1
    assert joint.sum() == pytest.approx(1.0)
    assert chi_square(counts.ravel(), joint.ravel()) < CHI2_999[15]


def _next_token(ar, tok, context: str, temp: float = 1.0, top_k: int = 0) -> np.ndarray:
    """The AR's distribution of the token after context at temp, on its top_k tokens (0: all); the mask token is
    never drawn."""
    logits = np.array(ar(mx.array([tok.encode(context)]))[0, -1], dtype=np.float64) / temp
    logits[tok.mask_id] = -np.inf
    if top_k:
        logits[logits < np.sort(logits)[-top_k]] = -np.inf
    return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()


def _first_three(draft_context: int, rows: int, temp: float = 1.0, top_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(the AR's exact joint distribution of the first three characters after "ab" at temp and top_k, their counts
    over `rows` rows of one batch decoded speculatively): the prompt pass draws the first, a feature drafter (chained
    on draft_context characters, or not) drafts the next two."""
    text = "abcd" * 8
    ar, tok = untrained(text, 16, model_type="ar", seed=5)
    drafter = as_feature(untrained(text, 16, model_type="ar", seed=6)[0], ar.args.dim, draft_context=draft_context)
    chars = list(tok.chars)
    ids = [tok.encode(c)[0] for c in chars]

    def p(context):
        return _next_token(ar, tok, context, temp=temp, top_k=top_k)[ids]

    joint = np.einsum("i,ij,ijk->ijk", p("ab"), np.array([p("ab" + a) for a in chars]),
                      np.array([[p("ab" + a + b) for b in chars] for a in chars]))
    outs = mlx_dlm.generate(ar, tok, "ab", max_tokens=3, temp=temp, top_k=top_k, seed=0, draft_model=drafter,
                            draft_length=3, num_samples=rows)
    counts = np.zeros_like(joint)
    for out in outs:
        counts[tuple(chars.index(c) for c in out[2:5])] += 1
    assert joint.sum() == pytest.approx(1.0)
    return joint, counts


@pytest.mark.parametrize("draft_context", [1, 2])
def test_a_chained_drafters_output_follows_the_ar_models_exact_distribution(draft_context):
    """A chained feature drafter draws its drafts in turn, each from a distribution that depends on the drafts
    before it: the first three tokens after a prompt (the prompt pass's, then two drafts, the second chained), over
    6,000 rows of one batch, against the AR model's exact p(a) p(b | a) p(c | a b): chi-square over the 64 cells at a
    0.1% false-alarm rate."""
    joint, counts = _first_three(draft_context, 6000)
    assert chi_square(counts.ravel(), joint.ravel()) < CHI2_999[63]


@pytest.mark.parametrize("draft_context", [0, 2])
def test_top_k_and_temperature_filter_p_and_q_alike(draft_context):
    """Temperature 0.8 and top-k 2 apply to the verifier's p and the drafter's q as the rule requires: the first
    three characters (the prompt pass's, then two drafts, independent or chained) over 4,000 rows follow the AR's
    own filtered joint distribution, on its 8 cells (2 tokens a position) and never outside them: chi-square at a
    0.1% false-alarm rate."""
    joint, counts = _first_three(draft_context, 4000, temp=0.8, top_k=2)
    support = joint > 0
    assert support.sum() == 8 and counts[~support].sum() == 0
    assert chi_square(counts[support], joint[support]) < CHI2_999[7]


def _speculative_caches(ar):
    """(verifier cache, drafter cache) of the one speculative run memoised on ar."""
    return next(v[:2] for k, v in ar.__dict__[MEMO_ATTRIBUTE].items() if k[0] == "speculative")


@pytest.mark.parametrize("drafter", ["dlm", "feature", "chained"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_every_rejection_leaves_the_cache_as_a_fresh_run_on_the_kept_text(pair, num_samples, drafter, monkeypatch):
    """After each round the verifier's cache holds, for every known position of every row, the keys and values a
    fresh prefill of that row's kept text gives: rejected drafts leave no trace, and rows of one batch (each at its
    own length) do not disturb each other. Rounds with 0 .. K drafts kept all occur. Each state is checked before
    the next round is built (without `decoding.ahead`, which would have the cache one round on)."""
    monkeypatch.setattr(speculative, "ahead", lambda rounds: rounds)
    ar, dlm, tok = pair
    dlm = drafter_of(drafter, dlm, ar)
    K, seen = 3, set()
    ar.__dict__.pop(MEMO_ATTRIBUTE, None)  # the one speculative cache left is this test's
    for seed in range(6 // num_samples):
        for state in mlx_dlm.stream_generate(ar, tok, "ROMEO:", max_tokens=30, temp=1.0, seed=seed, draft_model=dlm,
                                             draft_length=K, num_samples=num_samples):
            seen.update(state.draft_kept)
            cache, _ = _speculative_caches(ar)
            for row in range(num_samples):
                known = min(int(np.atleast_1d(np.array(cache.offset))[row]), state.tokens.shape[1])
                fresh = KVCache(ar.args, 1, cache.size)
                ar(mx.array(state.tokens[row:row + 1, :known]), cache=fresh)
                for name in ("keys", "values"):
                    for got, want in zip(cache.state[name], fresh.state[name]):
                        np.testing.assert_allclose(np.array(got[row, :, :known]), np.array(want[0, :, :known]),
                                                   atol=2e-5)
    assert seen == set(range(K + 1))


@pytest.mark.parametrize("num_samples", [1, 3])
def test_the_block_drafters_cache_holds_the_finished_blocks_as_a_fresh_prefill(pair, num_samples):
    """After each round the block drafter's cache holds, for each row's verified text's finished blocks, exactly
    what a fresh prefill of those blocks gives; kept drafts past a block's end, rounds that fold a block and rounds
    that do not all occur (in a batch: rows that fold beside rows that do not)."""
    ar, dlm, tok = pair
    drafter = as_block(dlm)
    ar.__dict__.pop(MEMO_ATTRIBUTE, None)
    seen, folds = set(), set()
    for seed in range(3):
        was = None
        for state in mlx_dlm.stream_generate(ar, tok, "ROMEO:", max_tokens=30, temp=1.0, seed=seed,
                                             draft_model=drafter, draft_length=4, num_samples=num_samples):
            seen.update(state.draft_kept)
            _, cache = _speculative_caches(ar)
            known = state.committed.argmax(axis=1)  # each row's length before this round
            known = np.where(state.committed.any(axis=1), known, state.tokens.shape[1])
            if was is not None:
                folds.add(tuple(sorted(set(known // 4 > was // 4))))  # which rows' pass folded a finished block
            was = known
            for row in range(num_samples):
                finished = int(known[row]) // 4 * 4
                fresh = KVCache(drafter.args, 1, cache.size)
                prefill_blocks(drafter, fresh, mx.array(state.tokens[row:row + 1]), finished) if finished else None
                for name in ("keys", "values"):
                    for got, want in zip(cache.state[name], fresh.state[name]):
                        np.testing.assert_allclose(np.array(got[row, :, :finished]),
                                                   np.array(want[0, :, :finished]), atol=2e-5)
    assert {0, 1} <= seen and {(False,), (True,)} <= folds
    assert num_samples == 1 or (False, True) in folds  # a batch's pass with rows that fold and rows that do not


def test_a_pass_where_some_rows_fold_gives_each_row_its_own_pass(pair):
    """One fold pass over two rows at their own offsets: row 0 folds its finished block 1 and drafts block 2, row 1
    (block 1 already cached) runs block 2 first and ignores the rest of its window. Both rows' block-2 logits, first
    logits and cache equal a batch-1 pass over a cache prefilled with blocks 0-1."""
    _, dlm, tok = pair
    drafter, B, mask_id = as_block(dlm), 4, tok.mask_id
    ids = tok.encode("First Citizen:\nWe are")[:16]
    ids[9:12] = [mask_id] * 3  # block 2: one known token, then masks
    x = mx.array([ids, ids])
    ref_cache = KVCache(drafter.args, 1, 16)
    first = prefill_blocks(drafter, ref_cache, x[:1], 8)
    want, want_first = cached_pass(drafter, ref_cache, B, fold=False)(x[:1, 8:12], first)
    cache = KVCache(drafter.args, 2, 16, per_row=True)
    prefill_blocks(drafter, cache, x, 4)
    row1_cache = KVCache(drafter.args, 1, 16)
    row1_first = prefill_blocks(drafter, row1_cache, x[:1], 8)
    for name in ("keys", "values"):  # row 1 starts with blocks 0-1 cached
        for layer, buffer in enumerate(cache.state[name]):
            cache.state[name][layer] = mx.concatenate([buffer[:1], row1_cache.state[name][layer]], axis=0)
    cache.state["offset"] = mx.array([4, 8], dtype=mx.int32)
    window = mx.concatenate([x[:1, 4:12], x[:1, 8:16]], axis=0)
    got, got_first = cached_pass(drafter, cache, B, fold=True)(
        window, mx.concatenate([mx.zeros_like(row1_first), row1_first]), mx.array([True, False]))
    for row in range(2):
        np.testing.assert_allclose(np.array(got[row]), np.array(want[0]), atol=1e-4)
        np.testing.assert_allclose(np.array(got_first[row]), np.array(want_first[0]), atol=1e-4)
        for name in ("keys", "values"):
            for buffer, ref in zip(cache.state[name], ref_cache.state[name]):
                np.testing.assert_allclose(np.array(buffer[row, :, :8]), np.array(ref[0, :, :8]), atol=2e-5)
    assert cache.offset.tolist() == [8, 8]


def test_refusals_are_one_line(pair, tmp_path):
    ar, dlm, tok = pair
    wrong, wrong_tok = untrained("xyz", 64, seed=1)
    assert "the drafter's vocabulary" in user_error(mlx_dlm.generate, ar, tok, "RO", max_tokens=4, draft_model=wrong)
    assert "the drafter must be a diffusion model" in user_error(mlx_dlm.generate, ar, tok, "RO", draft_model=ar)
    assert "verifies with an autoregressive model" in user_error(mlx_dlm.generate, dlm, tok, "RO", draft_model=dlm)
    assert "within both models' context" in user_error(mlx_dlm.generate, ar, tok, "RO", max_tokens=2000,
                                                       draft_model=dlm)
    assert user_error(mlx_dlm.generate, ar, tok, "RO", draft_model=dlm, draft_length=0) == \
        "--draft-length must be at least 1, got 0"
    # a batch's block drafter runs 2 blocks past a row's text (a row that folds nothing runs its block first): that
    # much room is needed within the context, one block at batch 1
    drafter, context = as_block(dlm), min(ar.args.max_seq_len, dlm.args.max_seq_len)
    fits = dict(max_tokens=context - 2 - 4, temp=0, draft_model=drafter, draft_length=1)
    assert len(mlx_dlm.generate(ar, tok, "RO", **fits)) == context - 4
    assert "within both models' context" in user_error(mlx_dlm.generate, ar, tok, "RO", num_samples=2, **fits)


def test_generate_command_drafts_and_reports(tiny_model_dir, tiny_ar_dir, capsys):
    import importlib

    generate = importlib.import_module("mlx_dlm.generate")
    base = ["--model", str(tiny_ar_dir), "--prompt", "ROMEO:", "--max-tokens", "24", "--temp", "0", "--seed", "3"]
    generate.main(base)
    alone = capsys.readouterr().out.split("\n==========\n")[0]
    generate.main(base + ["--draft", str(tiny_model_dir), "--draft-length", "3"])
    text, stats = capsys.readouterr().out.split("\n==========\n")
    assert text == alone
    rounds = int(stats.split(" rounds (")[0].rsplit(", ", 1)[1])
    assert f"({rounds} drafter + {rounds} verifier passes)" in stats and "P(draft 1..3 kept): " in stats
    kept = int(stats.split(" drafts kept of ")[0].rsplit("(", 1)[1])
    assert kept + rounds >= 24 and f"drafts kept of {3 * rounds})" in stats  # every round adds kept + 1 tokens


def test_the_server_decodes_speculatively(tiny_model_dir, tiny_ar_dir):
    import http.client
    import json
    import threading

    from mlx_dlm.server import make_server

    server = make_server(str(tiny_ar_dir), port=0, quiet=True, draft=str(tiny_model_dir))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
        body = {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0, "draft_length": 3}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
    ar, tok = mlx_dlm.load(tiny_ar_dir)
    assert "ROMEO:" + reply["choices"][0]["text"] == mlx_dlm.generate(ar, tok, "ROMEO:", max_tokens=20, temp=0)
    assert server.app.draft is not None and 1 <= reply["nfe"] <= 20  # rounds, each adding at least one token


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("drafter", [None, "dlm", "block", "feature", "chained"])
def test_building_the_next_round_ahead_changes_no_state(pair, drafter, num_samples, monkeypatch):
    """With `decoding.ahead` (the next round or AR token built before the host reads this one) every state is the
    one the decoder gives without it: tokens, counts and kept drafts, round by round; and no extra round runs."""
    ar, dlm, tok = pair
    draft = drafter_of(drafter, dlm, ar) if drafter else None

    def states():
        return [(s.tokens.tolist(), s.committed.tolist(), s.nfe, s.generated_tokens, s.forward_tokens, s.draft_kept,
                 s.prompt_pass_tokens) for s in mlx_dlm.stream_generate(
                    ar, tok, "ROMEO:", max_tokens=23, temp=1.0, seed=4, draft_model=draft, draft_length=3,
                    num_samples=num_samples)]

    pipelined = states()
    for module in (speculative, sample_module):
        monkeypatch.setattr(module, "ahead", lambda steps: steps)
    assert pipelined == states()
    assert pipelined[-1][3] == 23 * num_samples


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_a_feature_drafters_prompt_pass_draws_the_first_token(pair, max_tokens):
    """A feature drafter: the verifier's prompt pass draws the first token, as the AR decoder's does (a state of
    its own, its token counted as the prompt pass's), and drafts from there; greedy text is the AR's at any length."""
    ar, dlm, tok = pair
    drafter = drafter_of("feature", dlm, ar)
    states = list(mlx_dlm.stream_generate(ar, tok, "ROMEO:", max_tokens=max_tokens, temp=0, draft_model=drafter,
                                          draft_length=3))
    first = states[0]
    assert (first.nfe, first.prompt_pass_tokens, first.generated_tokens, first.draft_kept) == (1, 1, 1, ())
    assert first.committed[0].nonzero()[0].tolist() == [len("ROMEO:")]
    assert states[-1].decode_passes == len(states) - 1 and all(s.draft_kept for s in states[1:])
    assert mlx_dlm.generate(ar, tok, "ROMEO:", max_tokens=max_tokens, temp=0, draft_model=drafter,
                            draft_length=3) == mlx_dlm.generate(ar, tok, "ROMEO:", max_tokens=max_tokens, temp=0)
